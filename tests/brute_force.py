"""Ground truth for the tests: relative flatness from the full layer Hessian, computed independently of
fam_hf's hooks: the loss is re-evaluated as a function of the layer's weight with ``functional_call``
(or by hand for a tied LM head), and differentiated twice by ``torch.autograd.functional.hessian``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.functional import hessian


def kappa_from_loss_fn(
    loss_of_weight: Callable[[torch.Tensor], torch.Tensor],
    weight: torch.Tensor,
    *,
    create_graph: bool = False,
    detach_hessian: bool = False,
) -> torch.Tensor:
    """κ = Σ ⟨w_s, w_s'⟩ Tr(H_{s,s'}) with H the Hessian of ``loss_of_weight`` at ``weight`` (d, m).

    ``loss_of_weight(E)`` must evaluate the loss with the layer's weight replaced by ``weight + E``, so
    the Hessian is taken at ``E = 0`` while ``weight`` keeps its own graph (for gradients of κ).
    """
    d, m = weight.shape
    zero = torch.zeros_like(weight.detach(), requires_grad=True)
    h = hessian(loss_of_weight, zero, create_graph=create_graph).reshape(d, m, d, m)
    if detach_hessian:
        h = h.detach()
    traces = torch.einsum("aibi->ab", h)
    return ((weight @ weight.T) * traces).sum()


def functional_loss(model, batch, param_name: str, transpose: bool = False):
    """``E ↦ loss`` with ``param_name`` replaced by ``param + E`` (``E`` in (out, in) layout)."""
    param = dict(model.named_parameters())[param_name]

    def loss(e):
        delta = e.T if transpose else e
        return torch.func.functional_call(model, {param_name: param + delta}, args=(), kwargs=batch).loss

    return loss

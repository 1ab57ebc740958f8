"""The reference FAM penalty, re-implemented from its description as the benchmark's baseline.

The paper's reference implementation (Petzka et al., NeurIPS 2021;
docs/mathematics.md#exact-layer-hessian) computes the full
Hessian of the training loss with respect to one layer's weight ``W: (d, m)`` with
``torch.func.jacfwd(torch.func.jacrev(loss_of_weight))``, where ``loss_of_weight(W)`` runs the *whole*
model with that weight replaced (``torch.func.functional_call``), and then

    κ = Σ_{s,s'} ⟨w_s, w_s'⟩ · Tr(H_{s,s'}),      H: (d, m, d, m)

with the Hessian wrapped as a constant, so the penalty's gradient flows only through ``⟨w_s, w_s'⟩``
(fam_hf's ``fam_hessian_grad="detached"``). It needs one extra forward pass of the model per step plus a
``(d·m)²`` Hessian built with ``d·m`` forward-mode tangents: fine on a 2×384 classifier head, impossible
on a 49,152×576 LM head (:func:`hessian_bytes`).

This module is benchmark code only; fam_hf itself never builds this Hessian outside tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jacfwd, jacrev
from transformers import Trainer


def reference_hessian(model: nn.Module, batch: Mapping[str, Any], weight_name: str) -> torch.Tensor:
    """Full Hessian ``(d, m, d, m)`` of ``model(**batch).loss`` w.r.t. the parameter ``weight_name``.

    ``jacfwd(jacrev(·))`` over a function that runs the whole model with the weight swapped in, as the
    reference code does. Dropout (train mode) draws one mask shared by every tangent (``randomness="same"``),
    i.e. the Hessian of the loss of one forward pass. Returned detached (a constant).
    """
    weight = dict(model.named_parameters())[weight_name]

    def loss_of_weight(w: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {weight_name: w}, args=(), kwargs=dict(batch)).loss

    hessian = jacfwd(jacrev(loss_of_weight), randomness="same")(weight.detach())
    return hessian.detach()


def reference_kappa(model: nn.Module, batch: Mapping[str, Any], weight_name: str = "classifier.weight") -> torch.Tensor:
    """κ of the layer whose weight is ``weight_name``: the reference method, differentiable through ``W W^T`` only.

    Returns a scalar: ``Σ_{s,s'} (W Wᵀ)_{s,s'} · Tr(H_{s,s'})`` with ``H`` from :func:`reference_hessian`.
    """
    weight = dict(model.named_parameters())[weight_name]
    hessian = reference_hessian(model, batch, weight_name)
    block_traces = torch.einsum("aibi->ab", hessian)  # (d, d): Tr(H_{s,s'})
    return ((weight @ weight.T) * block_traces.to(weight.dtype)).sum()


def hessian_bytes(d: int, m: int, bytes_per_entry: int = 4) -> int:
    """Memory of the full ``(d·m)²`` layer Hessian the reference method builds (float32 by default)."""
    return (d * m) ** 2 * bytes_per_entry


class ReferenceFAMTrainer(Trainer):
    """``Trainer`` whose training loss is ``L + λ·κ`` with κ from :func:`reference_kappa` (benchmark baseline).

    Args:
        fam_lambda: λ.
        weight_name: the parameter whose layer is penalised (default: BERT's ``classifier.weight``).
        Everything else as :class:`transformers.Trainer`.
    """

    def __init__(self, *args: Any, fam_lambda: float, weight_name: str = "classifier.weight", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fam_lambda = fam_lambda
        self.weight_name = weight_name

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        if model.training and self.fam_lambda > 0:
            loss = loss + self.fam_lambda * reference_kappa(model, inputs, self.weight_name).to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

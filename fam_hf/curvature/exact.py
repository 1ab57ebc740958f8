"""The exact layer Hessian and κ from it: ``d·m`` double-backward passes, for small layers and for tests
(docs/mathematics.md#exact-layer-hessian)."""

from __future__ import annotations

import torch


def layer_hessian(loss: torch.Tensor, perturbation: torch.Tensor, *, create_graph: bool = False) -> torch.Tensor:
    """Full Hessian of ``loss`` w.r.t. a ``(d, m)`` weight perturbation, as a ``(d, m, d, m)`` tensor.

    ``perturbation`` is a leaf of zeros that the forward added to the layer's weight (``z + E φ``).
    One backward per entry: ``d·m`` double-backwards. Only for small layers.
    """
    (grad,) = torch.autograd.grad(loss, perturbation, create_graph=True)
    flat = grad.reshape(-1)
    rows = []
    for i in range(flat.numel()):
        (row,) = torch.autograd.grad(
            flat[i], perturbation, retain_graph=True, create_graph=create_graph, allow_unused=True
        )
        rows.append(torch.zeros_like(perturbation) if row is None else row)
    return torch.stack(rows).reshape(*perturbation.shape, *perturbation.shape)


def kappa_from_hessian(hessian: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``κ = Σ_{s,s'} ⟨w_s, w_s'⟩ Tr(H_{s,s'})`` from a ``(d, m, d, m)`` layer Hessian and ``W: (d, m)``."""
    block_traces = torch.einsum("aibi->ab", hessian)  # (d, d): Tr(H_{s,s'})
    return ((weight @ weight.T) * block_traces).sum()

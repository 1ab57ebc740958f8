"""The exact κ of a small layer from its full Hessian: the ground truth the other estimators are tested against
(docs/mathematics.md#exact-layer-hessian)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..curvature import explain_missing_double_backward, kappa_from_hessian, layer_hessian
from ..layers import Layer
from .base import DEFAULT_MAX_EXACT_ENTRIES, NO_LOSS, Recording, RelativeFlatness


class ExactFlatness(RelativeFlatness):
    """κ from the layer's whole ``(d·m)²`` Hessian: a weight perturbation ``E: (d, m)`` of zeros is added to the
    layer's output as ``E φ`` and the loss is differentiated twice with respect to it (``d·m`` double-backward
    passes). For layers of at most ``max_exact_entries`` weights."""

    estimator = "exact"
    second_order = True

    @classmethod
    def refusal(cls, model: nn.Module, layer: Layer, *, loss: str = "model", **options: Any) -> str | None:
        limit = options.get("max_exact_entries", DEFAULT_MAX_EXACT_ENTRIES)
        d, m = layer.shape
        if d * m > limit:
            return (
                f"estimator='exact' on '{layer.name}' ({d}×{m} = {d * m} weights) would build a {d * m}² Hessian "
                f"with {d * m} double-backward passes; it is meant for layers of at most {limit} weights "
                "(max_exact_entries). Use estimator='probe' or 'closed_form'"
            )
        return None

    class Recording(Recording):
        perturbation: torch.Tensor  # E: (d, m), zeros that require grad
        weight: torch.Tensor  # W: (d, m)

        def capture(self, features, output, weight, first_call):
            if first_call:
                self.perturbation = torch.zeros_like(weight, requires_grad=True)
                self.weight = weight if self.differentiable else weight.detach()
            perturbed = output + F.linear(features, self.perturbation.to(features.dtype))
            if first_call:
                self.output = perturbed
            return perturbed

        def value(self, loss, logits):
            if loss is None:
                raise ValueError(NO_LOSS)
            if not self.output.requires_grad:
                raise RuntimeError(self.unused_message())
            full = self.differentiable and self.flatness.hessian_grad == "full"
            # checkpointed blocks are recomputed here
            with self.flatness.kernels(self.differentiable), explain_missing_double_backward():
                try:
                    hessian = layer_hessian(loss, self.perturbation, create_graph=full)
                except RuntimeError as error:
                    if "not have been used in the graph" not in str(error):
                        raise
                    raise RuntimeError(self.unused_message()) from error
            hessian, weight = hessian.to(self.weight.dtype), self.weight
            if self.feature_scale is not None:  # the Hessian w.r.t. W' = W diag(σ): H / (σ_i σ_j)
                sigma, inverse = (t.to(weight.dtype) for t in self.feature_scale)
                hessian = hessian * (inverse[None, :, None, None] * inverse[None, None, None, :])
                weight = weight * sigma
            return kappa_from_hessian(hessian, weight), None

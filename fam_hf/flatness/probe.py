"""Probe estimates of κ for any layer (docs/mathematics.md#probe-form, #gauss-newton-form).

Both add ``Σ_p δ_p · W R_p φ`` to the layer's output in the forward pass, with Rademacher ``R_p`` and a leaf
``δ = 0``. :class:`ProbeFlatness` differentiates the loss twice with respect to ``δ`` (the Hessian's quadratic
forms: the paper's κ, any loss); :class:`GaussNewtonFlatness` pushes each direction through the logits and takes
the Gauss–Newton quadratic form there (κ ≥ 0 on any layer; the model's own loss).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..curvature import (
    UnusedPerturbationError,
    compute_dtype,
    explain_missing_double_backward,
    gauss_newton_forms,
    logit_tangents,
    probe_quadratic_forms,
    rademacher,
)
from ..layers import Layer
from .base import NO_LOSS, Recording, RelativeFlatness
from .closed_form import estimator_refusal, loss_refusal


class ProbeFlatness(RelativeFlatness):
    """Hutchinson-style κ of any layer under any loss: one Hessian-vector product's worth of work per probe,
    unbiased, with its standard error over the probes."""

    estimator = "probe"
    second_order = True
    draws_probes = True
    reports_stderr = True

    class Recording(Recording):
        probe_matrices: torch.Tensor  # R: (P, m, m)
        delta: torch.Tensor  # (P,), zeros that require grad
        directions: list[torch.Tensor]  # u_p = W R_p φ, shaped like z
        detached_directions: list[torch.Tensor] | None  # u_p with φ detached ("detached" gradient semantics)

        def capture(self, features, output, weight, first_call):
            fam = self.flatness
            if first_call:
                self.probe_matrices = rademacher(
                    fam.probes, weight.shape[1], weight.shape[1], generator=fam.generator, dtype=weight.dtype,
                    device=weight.device,
                )  # fmt: skip
                self.delta = torch.zeros(
                    fam.probes, dtype=compute_dtype(weight.dtype), device=weight.device, requires_grad=True
                )
            directions = _directions(features, self.probe_matrices, weight, self.feature_scale)
            perturbed = output + sum(d * u for d, u in zip(self.delta.to(output.dtype), directions))
            detached = None
            if fam.hessian_grad == "detached" and self.differentiable:
                # built on every call: a checkpoint's recomputation must save what its forward saved
                detached = _directions(features.detach(), self.probe_matrices, weight, self.feature_scale)
            if first_call:
                self.directions, self.detached_directions, self.output = directions, detached, perturbed
            return perturbed

        def value(self, loss, logits):
            if loss is None:
                raise ValueError(NO_LOSS)
            # checkpointed blocks are recomputed here
            with self.flatness.kernels(self.differentiable), explain_missing_double_backward():
                values = self.forms(loss, logits)
            return values.mean(), values

        def forms(self, loss: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
            """The per-probe quadratic forms ``(P,)``."""
            try:
                return probe_quadratic_forms(
                    loss,
                    self.delta,
                    self.output,
                    self.directions,
                    hessian_grad=self.flatness.hessian_grad,
                    create_graph=self.differentiable,
                    detached_directions=self.detached_directions,
                    unused_is_zero=not self.differentiable,  # training: a κ that trains nothing is an error
                )
            except UnusedPerturbationError as error:
                raise RuntimeError(self.unused_message()) from error


class GaussNewtonFlatness(ProbeFlatness):
    """κ with the layer Hessian replaced by its Gauss–Newton part ``Σ_t c_t J_tᵀ ∇²ℓ_t J_t``: positive
    semi-definite, so κ ≥ 0 and a penalty on it is bounded below on any layer; equal to the Hessian's κ on an
    output head. Needs the model's logits and its own loss (cross-entropy, MSE, BCE)."""

    estimator = "gauss_newton"
    needs_logits = True
    reports_stderr = False  # its spread is in FlatnessResult.std_error; fam/kappa_stderr is the probe's

    @classmethod
    def refusal(cls, model: nn.Module, layer: Layer, *, loss: str = "model", **options: Any) -> str | None:
        reason = loss_refusal(model, layer, options.get("head_loss"), custom_loss=loss == "custom", output_head=False)
        if reason is not None:
            return estimator_refusal(cls.estimator, reason)
        if options.get("hessian_grad", "full") == "detached":
            return (
                "estimator='gauss_newton' differentiates its curvature in full; hessian_grad='detached' is for "
                "the probe and the closed form (use hessian_grad='full')"
            )
        return None

    class Recording(ProbeFlatness.Recording):
        def forms(self, loss, logits):
            labels, head_loss = self.mirrored_loss()
            if logits is None:
                raise ValueError(
                    "the Gauss–Newton estimator needs the model's logits: pass them to result(loss, logits=...), or "
                    "name the output layer whose output they are: head_loss=HeadLoss(..., head=NAME)"
                )
            tangents = logit_tangents(logits, self.delta, create_graph=self.differentiable)
            if tangents is None:
                if self.differentiable:
                    raise RuntimeError(self.unused_message())
                return torch.zeros_like(self.delta)
            logits, stacked, weights = head_loss.positions(
                logits,
                torch.cat(tangents, dim=-1),  # (..., P·d): selected and pooled with the logits
                labels,
                input_ids=self.batch.get("input_ids"),
                num_items_in_batch=self.norm.items(self.norm.model_takes_items),
            )
            stacked = stacked.reshape(logits.shape[0], len(tangents), logits.shape[-1])
            forms = gauss_newton_forms(logits, stacked, weights, head_loss.loss_type)
            return forms * self.norm.scale(self.norm.model_takes_items)  # from the logits: scaled as the loss is


def _directions(
    features: torch.Tensor,
    probe_matrices: torch.Tensor,
    weight: torch.Tensor,
    scale: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """``u_p = W R_p φ`` for every probe, shaped like the layer's output: ``(..., d)``. With the features' scale
    ``(σ, 1/σ)`` (``normalize_features``), ``u_p = W' R_p φ'`` for ``W' = W diag(σ)``, ``φ' = φ / σ``."""
    weight = weight.to(features.dtype)
    if scale is not None:
        features, weight = features * scale[1], weight * scale[0]
    return [F.linear(F.linear(features, r.to(features.dtype)), weight) for r in probe_matrices]

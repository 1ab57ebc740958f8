"""SAM sharpness: how much the loss rises under the worst weight perturbation of radius ρ.

    sharpness_ρ(w) = max_{‖ε‖ ≤ ρ} L(w + ε) − L(w)  ≈  L(w + ε̂) − L(w)

with the one-step ascent of SAM (Foret, Kleiner, Mobahi, Neyshabur, ICLR 2021), ``ε̂ = ρ g / ‖g‖``,
``g = ∇L(w)``, ``‖·‖`` the Euclidean norm over the whole parameter subset; or of adaptive SAM (ASAM;
Kwon, Kim, Park, Choi, ICML 2021), ``ε̂ = ρ T² g / ‖T g‖`` with ``T = diag(|w| + η)``, the maximiser of
the first-order loss over ``‖T⁻¹ ε‖ ≤ ρ`` (scale-invariant for ``η = 0``). Wen, Li, Ma (NeurIPS 2023)
show that minimizing this and reaching the flattest minimum are different things — measure both.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .hessian import LossFn, Wrt, resolve_subset


@dataclass
class SAMSharpness:
    """One-step SAM (or ASAM) sharpness on one batch.

    Attributes:
        value: ``L(w + ε̂) − L(w)`` (loss units); 0 where the gradient is 0.
        loss: ``L(w)``.
        perturbed_loss: ``L(w + ε̂)``.
        gradient_norm: ``‖g‖`` (SAM) or ``‖T g‖`` (ASAM) over the subset.
        rho: the radius ``ρ``.
        adaptive: ASAM (True) or SAM.
    """

    value: torch.Tensor
    loss: torch.Tensor
    perturbed_loss: torch.Tensor
    gradient_norm: torch.Tensor
    rho: float
    adaptive: bool

    def __float__(self) -> float:
        return float(self.value)


def sam_sharpness(
    model: nn.Module,
    batch: Mapping[str, Any],
    wrt: Wrt = None,
    *,
    rho: float = 0.05,
    adaptive: bool = False,
    eta: float = 0.0,
    loss_fn: LossFn | None = None,
) -> SAMSharpness:
    """One-step SAM sharpness ``L(w + ε̂) − L(w)`` on ``batch``.

    Args:
        model: run as it is: call ``model.eval()`` first, or dropout draws different masks in the two
            forward passes and the difference measures noise as well as sharpness.
        batch: a transformers batch with labels (``model(**batch).loss``), or what ``loss_fn`` takes.
        wrt: what is perturbed: None (default: every trainable parameter, as SAM does), a parameter or a
            sequence of parameters, or a layer spec (that layer's weight map ``W: (d, m)``).
        rho: the radius ``ρ`` (SAM's default 0.05; ASAM's papers use larger ones, e.g. 0.5–2).
        adaptive: ASAM's ``ε̂ = ρ T² g / ‖T g‖``, ``T = |w| + η`` elementwise, instead of SAM's.
        eta: ASAM's ``η`` (its code defaults to 0.01, which keeps zero weights perturbable).
        loss_fn: ``loss_fn(model, batch) -> loss`` for models that do not compute their own loss.

    Returns:
        :class:`SAMSharpness`.

    The weights are never written: ``L(w + ε̂)`` is evaluated through ``torch.func.functional_call``
    (or a forward hook for a layer), so the model, its ``.grad`` and any optimizer state are bit-identical
    afterwards. Cost: two forward passes and one backward pass; besides the model, one buffer of the subset's
    size (the gradient, turned into ``w + ε̂`` in place).
    """
    if rho < 0:
        raise ValueError(f"rho={rho} must be non-negative")
    subset = resolve_subset(model, wrt)
    variables = subset.variables()  # a layer's zero δ, or the parameters' own storage (no copy)
    with torch.enable_grad():
        loss = subset.loss(model, batch, variables, loss_fn)
        grads = torch.autograd.grad(loss, variables, allow_unused=True)
    del variables
    grads = [torch.zeros_like(w) if g is None else g.contiguous() for g, w in zip(grads, subset.values)]
    norm = ascent_norm(zip(grads, subset.values), adaptive=adaptive, eta=eta)
    if norm > 0:
        with torch.no_grad():
            # Each gradient becomes ε̂ in place, and for parameters w + ε̂ (what the variables stand for): one buffer
            # of the subset's size in all.
            for i, w in enumerate(subset.values):
                epsilon = ascent_direction(grads[i], w, adaptive=adaptive, eta=eta).mul_(rho / norm)
                grads[i] = epsilon if subset.layer is not None else epsilon.add_(w)
            perturbed = subset.loss(model, batch, grads, loss_fn).detach()
    else:  # a stationary point of the subset: the first-order ascent has no direction
        perturbed = loss.detach()
    loss = loss.detach()
    return SAMSharpness(perturbed - loss, loss, perturbed, norm, rho, adaptive)


def ascent_norm(grads_and_weights: Iterable[tuple[torch.Tensor, torch.Tensor]], *, adaptive: bool = False,
                eta: float = 0.0) -> torch.Tensor:  # fmt: skip
    """``‖g‖`` (SAM) or ``‖T g‖`` with ``T = |w| + η`` (ASAM) over every ``(gradient, weight)`` pair: the norm
    that ε̂ is divided by. Pairs are consumed one at a time (a generator keeps one converted gradient alive)."""
    total = None
    for grad, weight in grads_and_weights:
        g = grad * (weight.abs() + eta) if adaptive else grad
        square = g.pow(2).sum()
        total = square if total is None else total + square.to(total)
    return torch.zeros(()) if total is None else total.sqrt()  # nothing to perturb: no ascent direction


def ascent_direction(grad: torch.Tensor, weight: torch.Tensor, *, adaptive: bool = False, eta: float = 0.0):
    """``ε̂ · ‖·‖ / ρ`` for one tensor: ``g`` (SAM) or ``T² g`` (ASAM); ε̂ = ρ · this / :func:`ascent_norm`."""
    return grad * (weight.abs() + eta).pow(2) if adaptive else grad

"""Probe estimates of κ: Rademacher probes, their quadratic forms through the loss (Hessian) or through the logits
(Gauss–Newton), and the random draws every estimator and measure shares.

A probe ``R: (m, m)`` perturbs a layer's output by ``δ · W R φ``; ``d²L/dδ²`` at ``δ = 0`` is
``vec(WR)ᵀ H vec(WR)``, whose mean over Rademacher ``R`` is κ (docs/mathematics.md#probe-form).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .heads import LOSS_TYPES, compute_dtype


def rademacher(
    *shape: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """A tensor of ``shape`` with i.i.d. ±1 entries, drawn from ``generator`` on the CPU (so the draw is the same
    whatever the device) and moved to ``device`` without a host synchronisation.

    The probe estimators draw ``rademacher(P, m, m)`` (``P`` matrices ``R: (m, m)``); Hutchinson's trace draws
    ``rademacher(n, k)`` (``k`` vectors as columns)."""
    signs = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8)
    return host_to_device(signs, device).to(dtype) * 2 - 1


def default_generator(generator: torch.Generator | None = None) -> torch.Generator:
    """``generator``, or a fresh CPU generator seeded with 0, so that estimates are reproducible by default."""
    return generator if generator is not None else torch.Generator().manual_seed(0)


def host_to_device(tensor: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """Copy a CPU tensor to ``device`` without a host synchronisation: a copy from pageable memory waits for
    the device's queue, one from pinned memory does not."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cpu":
        return tensor
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def sample_positions(
    weights: torch.Tensor, fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``k = ⌈fraction·count⌉`` of the ``count`` positions the loss counts (``weights ≠ 0``), uniformly without
    replacement, and their weights times ``count / k``: an unbiased estimate of ``Σ_t weights_t …``, exact when
    ``fraction = 1``. The fraction is of the counted positions, not of the batch, so that an assistant-only or
    completion-only loss saves what it says; counting them is one host synchronisation.

    Returns ``(chosen indices: (k,), reweighted weights: (k,))``."""
    counted = weights != 0
    count = int(counted.sum())
    k = min(count, math.ceil(fraction * count))
    # random keys, the uncounted ones last: the k smallest are a uniform draw among the counted positions
    keys = host_to_device(torch.rand(weights.shape[0], generator=generator), weights.device).masked_fill(~counted, 2.0)
    chosen = keys.topk(k, largest=False).indices
    return chosen, weights[chosen] * (count / max(k, 1))


class UnusedPerturbationError(RuntimeError):
    """The loss does not depend on the probe's perturbation: its curvature is 0 and a penalty would train nothing."""


def probe_quadratic_forms(
    loss: torch.Tensor,
    delta: torch.Tensor,
    output: torch.Tensor,
    directions: Sequence[torch.Tensor],
    *,
    hessian_grad: str = "full",
    create_graph: bool = True,
    detached_directions: Sequence[torch.Tensor] | None = None,
    unused_is_zero: bool = True,
) -> torch.Tensor:
    """Quadratic forms ``q_p = u_pᵀ H_z u_p = d²L/dδ_p²`` for directions added at a layer's output.

    The forward pass computed the layer's output as ``z + Σ_p δ_p u_p`` with ``δ = 0``; ``H_z`` is the
    Hessian of ``L`` w.r.t. the layer output over all positions. With ``u_p = W R_p φ`` this is
    ``vec(W R_p)ᵀ H vec(W R_p)``, an unbiased probe of κ. No parameter ``.grad`` is touched (only
    ``torch.autograd.grad`` w.r.t. ``δ`` and ``output``), so it coexists with DDP's gradient hooks.

    Args:
        loss: scalar ``L``, computed from ``output``.
        delta: ``(P,)`` leaf of zeros with ``requires_grad``.
        output: the perturbed layer output ``z + Σ δ_p u_p``, shape ``(..., d)``.
        directions: ``P`` tensors ``u_p`` shaped like ``output``.
        hessian_grad: ``"full"``: the result is ``d²L/dδ_p²`` with its whole graph (Hessian included).
            ``"detached"``: the result has the value ``q_p`` and the gradient ``2 (H_z u_p)·∂u_p``
            taken through ``detached_directions`` only (``u_p`` recomputed with ``φ`` detached), i.e.
            the Hessian held constant.
        create_graph: whether the result must be differentiable at all.
        detached_directions: required for ``"detached"`` with ``create_graph``.
        unused_is_zero: when ``loss`` does not depend on ``delta`` at all, return zeros (a measurement: the
            curvature is 0) or, if False, raise :class:`UnusedPerturbationError` (a penalty that trains nothing).

    Returns:
        ``(P,)`` tensor of ``q_p``.

    Cost: one double-backward to ``δ`` (shared), then one per probe.
    """
    (first,) = torch.autograd.grad(loss, delta, create_graph=True, allow_unused=True)
    if first is None and not unused_is_zero:
        raise UnusedPerturbationError("the loss does not depend on the perturbation δ")
    if first is None or not first.requires_grad:  # loss does not depend on the layer: zero curvature
        return torch.zeros_like(delta)
    values = []
    for p, direction in enumerate(directions):
        if hessian_grad == "full":
            (row,) = torch.autograd.grad(
                first[p], delta, retain_graph=True, create_graph=create_graph, allow_unused=True
            )
            values.append(row[p] if row is not None else delta.new_zeros(()))
            continue
        (hu,) = torch.autograd.grad(first[p], output, retain_graph=True, allow_unused=True)
        if hu is None:
            values.append(delta.new_zeros(()))
            continue
        q = (hu * direction.detach()).sum()
        if create_graph:
            surrogate = 2 * (hu * detached_directions[p]).sum()  # d/dθ of uᵀ H u with H constant
            q = q + surrogate - surrogate.detach()
        values.append(q)
    return torch.stack(values)


def logit_tangents(
    logits: torch.Tensor, delta: torch.Tensor, *, create_graph: bool = True
) -> list[torch.Tensor] | None:
    """``a_p = ∂logits/∂δ_p`` for each entry of the perturbation ``δ: (P,)``: the Jacobian-vector products
    ``J u_p`` of the logits, each shaped like ``logits``; None when the logits do not depend on ``δ``.

    Reverse-over-reverse (no forward-mode rules needed from the model's kernels): ``g(v) = vᵀ ∂logits/∂δ``
    is linear in a dummy cotangent ``v``, and ``∂g_p/∂v = J u_p``. With ``create_graph`` each ``a_p`` is
    differentiable w.r.t. everything the logits depend on.

    Cost: one backward to ``δ`` with its graph kept, then one backward of that per probe.
    """
    cotangent = torch.zeros_like(logits, requires_grad=True)
    (pulled,) = torch.autograd.grad(logits, delta, grad_outputs=cotangent, create_graph=True, allow_unused=True)
    if pulled is None or not pulled.requires_grad:
        return None
    tangents = []
    for p in range(delta.numel()):
        (tangent,) = torch.autograd.grad(pulled[p], cotangent, retain_graph=True, create_graph=create_graph)
        tangents.append(tangent)
    return tangents


def gauss_newton_forms(
    logits: torch.Tensor, tangents: torch.Tensor, position_weights: torch.Tensor, loss_type: str
) -> torch.Tensor:
    """Gauss–Newton quadratic forms ``q_p = Σ_t c_t a_{p,t}ᵀ ∇²ℓ(z_t) a_{p,t}`` (each ≥ 0).

    With ``a_p = J u_p``, ``u_p = W R_p φ`` (see :func:`logit_tangents`), ``E_R[q_p]`` is κ with the layer
    Hessian replaced by ``G = Σ_t c_t J_tᵀ ∇²ℓ_t J_t``, the Hessian minus the term that carries the loss's
    gradient w.r.t. the logits (the term that makes a body layer's Hessian indefinite away from a minimum).

    Args:
        logits: ``z: (N, d)`` at the positions the loss counts (``HeadLoss.positions``).
        tangents: ``a: (N, P, d)``, the logits' tangents at those positions.
        position_weights: ``c: (N,)``.
        loss_type: ``"cross_entropy"`` (``∇²ℓ = diag p − p pᵀ``: ``aᵀ∇²ℓ a = Σ_s p_s a_s² − (p·a)²``),
            ``"mse"`` (``2 I``) or ``"bce"`` (``diag σ(1 − σ)``).

    Returns:
        ``(P,)`` in ``compute_dtype(logits.dtype)``, differentiable w.r.t. both tensors.
    """
    dtype = compute_dtype(logits.dtype)
    logits, tangents = logits.to(dtype), tangents.to(dtype)
    if loss_type == "cross_entropy":
        probs = torch.softmax(logits, dim=-1)[:, None, :]  # (N, 1, d)
        forms = (probs * tangents.square()).sum(-1) - (probs * tangents).sum(-1).square()  # (N, P)
    elif loss_type == "mse":
        forms = 2 * tangents.square().sum(-1)
    elif loss_type == "bce":
        sig = torch.sigmoid(logits)[:, None, :]
        forms = (sig * (1 - sig) * tangents.square()).sum(-1)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    return position_weights.to(dtype) @ forms

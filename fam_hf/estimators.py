"""Estimators of relative flatness κ (Petzka et al., NeurIPS 2021), as plain functions over tensors.

For a layer ``z = W φ`` with ``W: (d, m)`` (rows ``w_s``) and the training loss ``L``,

    κ(W) = Σ_{s,s'} ⟨w_s, w_s'⟩ · Tr(H_{s,s'}),      H_{s,s'} = ∂²L / ∂w_s ∂w_s'  (m × m blocks).

Three ways to get it (DESIGN §2.1):

* :func:`closed_form` — exact, for an output head whose loss is a mean of per-position terms:
  ``κ = Σ_t c_t ‖φ_t‖² Tr(W Wᵀ ∇²ℓ_t)``; a few extra matrix products, first-order autograd only.
* :func:`probe_quadratic_forms` — Hutchinson-style: ``κ = E_R[vec(WR)ᵀ H vec(WR)]`` for Rademacher
  ``R: (m, m)``; each probe is ``d²L/dδ²`` when ``δ · W R φ`` is added to the layer's output, i.e. one
  Hessian-vector product, any layer, any loss.
* :func:`layer_hessian` + :func:`kappa_from_hessian` — the full ``(d·m)²`` Hessian; tests only.

Gradient semantics (``hessian_grad``): ``"full"`` differentiates everything, the Hessian included (the
true gradient of ``L + λκ``); ``"detached"`` holds the Hessian constant, so only the two explicit ``W``
factors carry gradient (the reference implementation's choice).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch

LOSS_TYPES = ("cross_entropy", "mse", "bce")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (bf16/fp16 curvature underflows), else the input's own float type."""
    return torch.promote_types(dtype, torch.float32)


def closed_form(
    weight: torch.Tensor,
    features: torch.Tensor,
    logits: torch.Tensor,
    position_weights: torch.Tensor,
    loss_type: str,
) -> torch.Tensor:
    """Exact κ of an output head feeding a per-position loss.

    ``κ = Σ_t c_t ‖φ_t‖² · Tr(W Wᵀ ∇²_z ℓ(z_t))`` where ``c_t`` is the loss's weight of position ``t``
    (``1/N`` for a mean over ``N`` counted positions, 0 for ignored ones), and per loss

    * ``"cross_entropy"``: ``∇²ℓ = diag p − p pᵀ``, so ``Tr(·) = Σ_s p_s ‖w_s‖² − ‖Wᵀp‖²``
      (the variance of the head's rows under the predicted distribution);
    * ``"mse"`` (``(z − y)²`` per element): ``∇²ℓ = 2 I``, so ``Tr(·) = 2 ‖W‖²_F``;
    * ``"bce"`` (with logits, per element): ``∇²ℓ = diag σ(1 − σ)``, so ``Tr(·) = Σ_s σ_s(1 − σ_s) ‖w_s‖²``.

    Cross terms between positions vanish because each ``ℓ_t`` depends on ``z_t`` alone. The Hessian of
    these losses does not depend on the labels, only on which positions count.

    Args:
        weight: ``W: (d, m)``.
        features: ``φ: (N, m)``, the head's inputs at the positions that enter the loss.
        logits: ``z: (N, d)``, the head's outputs at those positions.
        position_weights: ``c: (N,)``.
        loss_type: one of ``"cross_entropy"``, ``"mse"``, ``"bce"``.

    Returns:
        Scalar κ in ``compute_dtype(weight.dtype)``, differentiable w.r.t. every input. Detach
        ``features`` and ``logits`` for the ``"detached"`` gradient semantics.

    Cost: one ``(N, d) × (d, m)`` product (``p W``) for cross-entropy, ``O(N·d)`` otherwise.
    """
    dtype = compute_dtype(weight.dtype)
    weight, features, logits = weight.to(dtype), features.to(dtype), logits.to(dtype)
    feature_sq = features.pow(2).sum(-1)  # (N,)
    row_sq = weight.pow(2).sum(-1)  # (d,)
    if loss_type == "cross_entropy":
        probs = torch.softmax(logits, dim=-1)
        curvature = probs @ row_sq - (probs @ weight).pow(2).sum(-1)
    elif loss_type == "mse":
        curvature = 2 * row_sq.sum()
    elif loss_type == "bce":
        sig = torch.sigmoid(logits)
        curvature = (sig * (1 - sig)) @ row_sq
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    return (position_weights.to(dtype) * feature_sq * curvature).sum()


def rademacher(
    count: int, size: int, *, generator: torch.Generator | None = None, dtype=torch.float32, device=None
) -> torch.Tensor:
    """``count`` Rademacher matrices ``R: (size, size)`` (entries ±1), drawn from ``generator`` on the CPU
    (so the draw is the same whatever the device) and moved to ``device``."""
    signs = torch.randint(0, 2, (count, size, size), generator=generator, dtype=torch.int8)
    return (signs.to(dtype) * 2 - 1).to(device)


def probe_quadratic_forms(
    loss: torch.Tensor,
    delta: torch.Tensor,
    output: torch.Tensor,
    directions: Sequence[torch.Tensor],
    *,
    hessian_grad: str = "full",
    create_graph: bool = True,
    detached_directions: Sequence[torch.Tensor] | None = None,
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

    Returns:
        ``(P,)`` tensor of ``q_p``.

    Cost: one double-backward to ``δ`` (shared), then one per probe.
    """
    (first,) = torch.autograd.grad(loss, delta, create_graph=True, allow_unused=True)
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


@contextmanager
def explain_missing_double_backward():
    """Re-raise autograd's "derivative for X is not implemented" with what to do about it."""
    try:
        yield
    except RuntimeError as error:
        if "derivative for" not in str(error) or "not implemented" not in str(error):
            raise
        raise RuntimeError(
            f"{error}. The probe/exact estimators need a second derivative through everything after the layer, "
            "and a kernel there has none (typically a fused attention kernel: flash-attention, or SDPA's fused "
            "kernels under activation checkpointing). Load the model with attn_implementation='eager', or put FAM "
            "on a layer after the attention blocks (the output head takes the closed form)"
        ) from error


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

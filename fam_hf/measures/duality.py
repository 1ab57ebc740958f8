"""Activity–weight duality (Feng, Zhang, Tu, "Activity–weight duality in feed-forward neural networks
reveals two co-determinants for generalization", Nature Machine Intelligence 2023).

For a dense layer ``z = W a (+ b)`` with ``W: (d, m)``, a change of the layer's input activity
``a → a + Δa`` is exactly a change of its weights ``W → W + ΔW`` with

    ΔW = W Δa aᵀ / ‖a‖²,        since  (W + ΔW) a = W a + W Δa (aᵀa)/‖a‖² = W (a + Δa).

Pairing each test example with a training example (same label, e.g. a nearest neighbour) and taking
``Δa = a_test − a_train`` at the layer, the test loss of the pair is the training loss at the dual weights
``W + ΔW_i`` — exactly when everything the input changes reaches the loss through this layer (a
feed-forward chain, or an output head). In a residual network the change also bypasses the layer and, in
a transformer, mixes positions; the decomposition then describes only the part routed through the layer.
Expanding the loss around the trained ``W`` to second order,

    L_test − L_train ≈ E_i[gᵀ vec(ΔW_i)] + ½ E_i[vec(ΔW_i)ᵀ H vec(ΔW_i)]
                     = E_i[gᵀ vec(ΔW_i)] + Σ_j ½ λ_j σ_j²,        σ_j² = E_i[(v_jᵀ vec(ΔW_i))²],

over the eigenpairs ``(λ_j, v_j)`` of the training loss's Hessian ``H`` w.r.t. ``W`` (``g`` its gradient,
≈ 0 at a minimum): each direction contributes its sharpness ``λ_j`` times the spread ``σ_j²`` of the dual
weights along it. ``σ_j²`` here is the mean square (second moment about 0) of the projections, so that
the sum over all ``n = d·m`` directions is exactly the second-order Taylor term; the paper's variance
equals it when the projections have mean 0. Over the top ``k`` directions the sum is a partial sum.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..layers import resolve_layer
from .eigen import estimate_top_eigenpairs
from .hessian import LossFn, LossHessian, Operator, as_operator, model_loss


def dual_weight_change(weight: torch.Tensor, activity: torch.Tensor, activity_change: torch.Tensor) -> torch.Tensor:
    """The weight change dual to an activity change: ``ΔW = W Δa aᵀ / ‖a‖²``, per example.

    Args:
        weight: ``W: (d, m)``.
        activity: ``a: (..., m)``, the layer's inputs (one row per example or position).
        activity_change: ``Δa: (..., m)``, same shape.

    Returns:
        ``ΔW: (..., d, m)`` with ``(W + ΔW_i) a_i = W (a_i + Δa_i)`` exactly (up to rounding).

    Cost: ``O(N·d·m)``.

    Raises:
        ValueError: an activity is exactly zero (no weight change acts on it).
    """
    if activity.shape != activity_change.shape:
        raise ValueError(f"activity {tuple(activity.shape)} and activity_change {tuple(activity_change.shape)} differ")
    norm_sq = activity.pow(2).sum(-1)
    if (norm_sq == 0).any():
        raise ValueError("an activity vector is zero, so no weight change can act on it; drop those examples")
    moved = activity_change @ weight.T  # W Δa: (..., d)
    return moved.unsqueeze(-1) * (activity / norm_sq.unsqueeze(-1)).unsqueeze(-2)


@dataclass
class DualityDecomposition:
    """The train→test loss change of a layer decomposed over Hessian eigendirections.

    Attributes:
        eigenvalues: ``λ: (k,)``, largest first (loss per squared weight unit).
        sigma_sq: ``σ²: (k,)``, mean square of ``v_jᵀ vec(ΔW_i)`` over the ``N`` pairs.
        contributions: ``½ λ σ²: (k,)`` (loss units).
        total: ``Σ_j ½ λ_j σ_j²`` over the ``k`` directions (the full second-order term when ``k = n``).
        taylor_term: ``½ E_i[vec(ΔW_i)ᵀ H vec(ΔW_i)]``, computed directly; None when not asked for.
        first_order_term: ``E_i[gᵀ vec(ΔW_i)]`` (≈ 0 at a minimum); None when no gradient was given.
        dual_weights: ``ΔW: (N, d, m)``.
    """

    eigenvalues: torch.Tensor
    sigma_sq: torch.Tensor
    contributions: torch.Tensor
    total: torch.Tensor
    taylor_term: torch.Tensor | None
    first_order_term: torch.Tensor | None
    dual_weights: torch.Tensor


def duality_decomposition(
    dual_weights: torch.Tensor,
    eigenvalues: torch.Tensor,
    eigenvectors: torch.Tensor,
    *,
    hessian: Operator | None = None,
    gradient: torch.Tensor | None = None,
) -> DualityDecomposition:
    """``½ λ_j σ_j²`` for each eigendirection, from dual weights and Hessian eigenpairs.

    Args:
        dual_weights: ``ΔW: (N, d, m)`` (or ``(N, n)``), flattened row-major as the Hessian's variables.
        eigenvalues: ``λ: (k,)``.
        eigenvectors: ``V: (n, k)``, orthonormal columns.
        hessian: the Hessian (a :class:`~fam_hf.measures.LossHessian` or a dense ``(n, n)`` tensor), to
            compute the Taylor term directly.
        gradient: ``g: (n,)``, for the first-order term.

    Cost: ``O(N·n·k)``; the Taylor term adds ``rank(ΔW) ≤ min(N, n)`` Hessian-vector products (from the
    SVD ``ΔW = P S Qᵀ``: ``E_i[ΔW_iᵀ H ΔW_i] = Σ_r (s_r²/N) q_rᵀ H q_r``).
    """
    flat = dual_weights.reshape(dual_weights.shape[0], -1)
    count = flat.shape[0]
    projections = flat @ eigenvectors.to(flat.dtype)  # (N, k)
    sigma_sq = projections.pow(2).mean(0)
    contributions = 0.5 * eigenvalues.to(flat.dtype) * sigma_sq
    taylor = None
    if hessian is not None:
        matmat = as_operator(hessian).matmat
        _, s, qt = torch.linalg.svd(flat, full_matrices=False)
        keep = s > s.max() * torch.finfo(s.dtype).eps * max(flat.shape)  # numerical rank r
        s, q = s[keep], qt[keep].T  # (r,), (n, r)
        taylor = 0.5 * (s.pow(2) / count * (q * matmat(q).to(q.dtype)).sum(0)).sum()
    first_order = None if gradient is None else (flat @ gradient.to(flat.dtype)).mean()
    return DualityDecomposition(
        eigenvalues=eigenvalues,
        sigma_sq=sigma_sq,
        contributions=contributions,
        total=contributions.sum(),
        taylor_term=taylor,
        first_order_term=first_order,
        dual_weights=dual_weights,
    )


def layer_inputs(
    model: nn.Module, batch: Mapping[str, Any], layer: str = "auto", *, loss_fn: LossFn | None = None
) -> torch.Tensor:
    """The activities ``φ: (..., m)`` entering ``layer`` on ``batch`` (one forward pass, no grad).

    The forward pass is ``loss_fn(model, batch)`` (default ``model(**batch).loss``, so the batch needs its
    labels); for a token model ``φ`` is ``(B, L, m)``, one activity per position.
    """
    module = resolve_layer(model, layer).module
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda mod, inputs, output: captured.append(inputs[0].detach()))
    try:
        with torch.no_grad():
            (loss_fn or model_loss)(model, batch)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"layer '{layer}' ran {len(captured)} times in one forward pass; expected once")
    return captured[0]


def activity_weight_duality(
    model: nn.Module,
    train_batch: Mapping[str, Any],
    test_batch: Mapping[str, Any],
    layer: str = "auto",
    *,
    k: int = 8,
    method: str = "lanczos",
    taylor: bool = True,
    loss_fn: LossFn | None = None,
    generator: torch.Generator | None = None,
) -> DualityDecomposition:
    """Decompose the train→test loss change at ``layer`` over the top-``k`` Hessian eigendirections.

    Example ``i`` of ``test_batch`` is paired with example ``i`` of ``train_batch`` (arrange the pairing
    first: same label, e.g. nearest neighbours in the layer's input space); for a token model the pairs
    are positions ``(i, t)``. With ``a``, ``a'`` the layer's inputs on the two batches, ``ΔW_i`` is
    :func:`dual_weight_change` of ``(a_i, a'_i − a_i)``, and the Hessian ``H``, its eigenpairs and the
    gradient are those of the training loss on ``train_batch`` w.r.t. the layer's weight ``W: (d, m)``.

    Args:
        model: run as it is (``model.eval()``); nothing in it is modified.
        train_batch, test_batch: batches of the same shape (with labels, or what ``loss_fn`` takes).
        layer: a dense layer (see :func:`fam_hf.resolve_layer`); default the output head.
        k: eigendirections (``k = n`` with ``method="exact"`` gives the full second-order term).
        method: ``"lanczos"`` or ``"exact"`` (see :func:`~fam_hf.measures.estimate_top_eigenpairs`).
        taylor: also compute ``½ E_i[ΔW_iᵀ H ΔW_i]`` directly (``≤ min(N, d·m)`` more HVPs).
        loss_fn: ``loss_fn(model, batch) -> loss`` for models that do not compute their own loss.
        generator: RNG for Lanczos' start; default seeded with 0.

    Cost: two forward passes for the activities, one forward and backward for the Hessian, its Lanczos
    steps, and the Taylor term's HVPs.
    """
    resolved = resolve_layer(model, layer)
    train = layer_inputs(model, train_batch, resolved.name, loss_fn=loss_fn)
    test = layer_inputs(model, test_batch, resolved.name, loss_fn=loss_fn)
    if train.shape != test.shape:
        raise ValueError(
            f"the layer's inputs differ in shape between the batches ({tuple(train.shape)} vs {tuple(test.shape)}); "
            "pair every test example with one training example"
        )
    hessian = LossHessian(model, train_batch, resolved.name, loss_fn=loss_fn)
    weight = hessian.subset.values[0]
    m = weight.shape[1]
    dual = dual_weight_change(
        weight, train.reshape(-1, m).to(weight.dtype), (test - train).reshape(-1, m).to(weight.dtype)
    )
    eig = estimate_top_eigenpairs(hessian, k, method=method, generator=generator)
    return duality_decomposition(
        dual, eig.values, eig.vectors, hessian=hessian if taylor else None, gradient=hessian.gradient
    )

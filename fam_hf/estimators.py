"""Estimators of relative flatness κ (Petzka et al., NeurIPS 2021), as plain functions over tensors.

For a layer ``z = W φ`` with ``W: (d, m)`` (rows ``w_s``) and the training loss ``L``,

    κ(W) = Σ_{s,s'} ⟨w_s, w_s'⟩ · Tr(H_{s,s'}),      H_{s,s'} = ∂²L / ∂w_s ∂w_s'  (m × m blocks).

Three ways to get it (DESIGN §2.1):

* :func:`closed_form` — exact, for an output head whose loss is a mean of per-position terms:
  ``κ = Σ_t c_t ‖φ_t‖² Tr(W Wᵀ ∇²ℓ_t)``; a few extra matrix products, first-order autograd only.
* :func:`probe_quadratic_forms` — Hutchinson-style: ``κ = E_R[vec(WR)ᵀ H vec(WR)]`` for Rademacher
  ``R: (m, m)``; each probe is ``d²L/dδ²`` when ``δ · W R φ`` is added to the layer's output, i.e. one
  Hessian-vector product, any layer, any loss.
* :func:`gauss_newton_forms` — the same probes with the Hessian replaced by its Gauss–Newton part
  ``G = Σ_t c_t J_tᵀ ∇²ℓ_t J_t`` (``J_t = ∂logits_t/∂vec(W)``): positive semi-definite everywhere, so κ_GN ≥ 0
  on any layer; equal to the Hessian on an output head and wherever the loss's gradient w.r.t. the logits
  vanishes (an interpolating minimum). One Jacobian-vector product of the logits per probe.
* :func:`layer_hessian` + :func:`kappa_from_hessian` — the full ``(d·m)²`` Hessian; tests only.

Gradient semantics (``hessian_grad``): ``"full"`` differentiates everything, the Hessian included (the
true gradient of ``L + λκ``); ``"detached"`` holds the Hessian constant, so only the two explicit ``W``
factors carry gradient (the reference implementation's choice).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager

import torch

LOSS_TYPES = ("cross_entropy", "mse", "bce")
CHUNK_ELEMENTS = 1 << 24  # logits entries per chunk of the cross-entropy closed form: 64 MiB in float32


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (bf16/fp16 curvature underflows), else the input's own float type."""
    return torch.promote_types(dtype, torch.float32)


def closed_form(
    weight: torch.Tensor,
    features: torch.Tensor,
    logits: torch.Tensor,
    position_weights: torch.Tensor,
    loss_type: str,
    *,
    chunk_elements: int = CHUNK_ELEMENTS,
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
        chunk_elements: cross-entropy works through the logits in row chunks of about this many
            entries, so no extra ``(N, d)`` tensor is kept (see :func:`softmax_curvature`).

    Returns:
        Scalar κ in ``compute_dtype(weight.dtype)``, differentiable w.r.t. every input. Detach
        ``features`` and ``logits`` for the ``"detached"`` gradient semantics.

    Cost (cross-entropy): three ``N·d·m`` matrix products — ``P W`` forward, ``V Wᵀ`` and ``Pᵀ V``
    backward (one fewer when ``logits`` are detached); ``O(N·d)`` for MSE and BCE.
    """
    dtype = compute_dtype(weight.dtype)
    feature_sq = features.to(dtype).pow(2).sum(-1)  # (N,)
    if loss_type == "cross_entropy":
        # bf16 logits on a GPU (autocast): the products run on bf16 tensor cores, as the model's own do
        product_dtype = torch.bfloat16 if logits.is_cuda and logits.dtype == torch.bfloat16 else None
        chunk_rows = max(1, chunk_elements // logits.shape[-1])
        curvature = softmax_curvature(logits, weight, chunk_rows=chunk_rows, product_dtype=product_dtype)
        return (position_weights.to(dtype) * feature_sq * curvature).sum()
    weight, logits = weight.to(dtype), logits.to(dtype)
    row_sq = weight.pow(2).sum(-1)  # (d,)
    if loss_type == "mse":
        curvature = 2 * row_sq.sum()
    elif loss_type == "bce":
        sig = torch.sigmoid(logits)
        curvature = (sig * (1 - sig)) @ row_sq
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    return (position_weights.to(dtype) * feature_sq * curvature).sum()


def softmax_curvature(
    logits: torch.Tensor, weight: torch.Tensor, *, chunk_rows: int, product_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``c_t = Σ_s p_{t,s} ‖w_s‖² − ‖Wᵀ p_t‖²`` with ``p_t = softmax(z_t)``: ``Tr(W Wᵀ ∇²ℓ_t)`` for cross-entropy.

    Args:
        logits: ``z: (N, d)`` (any float dtype; computed in float32 or wider).
        weight: ``W: (d, m)``.
        chunk_rows: rows of ``z`` processed at a time.
        product_dtype: dtype of the three ``N·d·m`` products' operands (accumulated in float32 where the
            hardware does, as bf16 tensor cores do); None: the compute dtype. Softmax, ``‖w_s‖²`` and the
            final difference stay in the compute dtype. bf16 products moved κ by 1.2e-4 (relative) on
            SmolLM2-135M's LM head over 511 Shakespeare tokens.

    Returns:
        ``(N,)`` in ``compute_dtype(weight.dtype)``, differentiable w.r.t. ``logits`` and ``weight``.

    A custom autograd function: the forward keeps only ``V = P W: (N, m)`` and ``c: (N,)``, and the
    backward recomputes ``P`` chunk by chunk, so the penalty adds no ``(N, d)`` tensor
    to what the loss already keeps (an LM head's ``d`` is the vocabulary).
    """
    return _SoftmaxCurvature.apply(logits, weight, chunk_rows, product_dtype)


class _SoftmaxCurvature(torch.autograd.Function):
    # Gradients, with s_t = r − 2 W v_t (r_s = ‖w_s‖², v_t = Wᵀ p_t) and g_t the incoming gradient:
    #   ∂c_t/∂z_t = p_t ⊙ (s_t − p_t·s_t)                        (softmax Jacobian applied to ∂c_t/∂p_t = s_t)
    #   ∂Σ g_t c_t/∂W = 2 diag(Σ_t g_t p_t) W − 2 (g ⊙ P)ᵀ V
    # The (rows × d) work is memory-bound next to the three products, so it is done in place.

    @staticmethod
    def forward(ctx, logits, weight, chunk_rows: int, product_dtype: torch.dtype | None) -> torch.Tensor:
        dtype = compute_dtype(weight.dtype)
        with torch.autocast(logits.device.type, enabled=False):
            w = weight.to(dtype)
            w_product = w if product_dtype is None else weight.to(product_dtype)
            row_sq = torch.linalg.vector_norm(w, dim=-1).square()
            n = logits.shape[0]
            curvature = logits.new_empty(n, dtype=dtype)
            mixed = logits.new_empty(n, w.shape[1], dtype=dtype)  # V = P W
            for rows in _chunks(n, chunk_rows):
                probs = torch.softmax(logits[rows], dim=-1, dtype=dtype)
                torch.mv(probs, row_sq, out=curvature[rows])
                if product_dtype is None:
                    torch.mm(probs, w, out=mixed[rows])
                else:
                    mixed[rows] = probs.to(product_dtype) @ w_product
            curvature -= mixed.pow(2).sum(-1)
        ctx.save_for_backward(logits, weight, mixed, curvature)
        ctx.chunk_rows, ctx.product_dtype = chunk_rows, product_dtype
        return curvature

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        logits, weight, mixed, curvature = ctx.saved_tensors
        need_logits, need_weight = ctx.needs_input_grad[:2]
        dtype = mixed.dtype
        grad_logits = torch.empty_like(logits) if need_logits else None
        grad_weight = None
        with torch.autocast(logits.device.type, enabled=False):
            w = weight.to(dtype)
            product_dtype = ctx.product_dtype
            w_product = w if product_dtype is None else weight.to(product_dtype)
            row_sq = torch.linalg.vector_norm(w, dim=-1).square()
            grad = grad.to(dtype)
            if need_weight:
                grad_weight = torch.zeros_like(w)
                prob_mass = w.new_zeros(w.shape[0])  # Σ_t g_t p_t
            for rows in _chunks(logits.shape[0], ctx.chunk_rows):
                weighted = torch.softmax(logits[rows], dim=-1, dtype=dtype).mul_(grad[rows, None])  # g ⊙ P
                v = mixed[rows]
                if need_logits:
                    if product_dtype is None:
                        s = torch.addmm(row_sq, v, w.T, alpha=-2)  # (rows, d)
                    else:
                        s = (v.to(product_dtype) @ w_product.T).to(dtype).mul_(-2).add_(row_sq)
                    s.sub_((curvature[rows] - v.pow(2).sum(-1))[:, None])  # p·s = p·r − 2‖v‖² = c − ‖v‖²
                    if grad_logits.dtype == dtype:
                        torch.mul(s, weighted, out=grad_logits[rows])
                    else:
                        grad_logits[rows] = s.mul_(weighted)
                if need_weight:
                    prob_mass += weighted.sum(0)
                    if product_dtype is None:
                        grad_weight.addmm_(weighted.T, v, alpha=-2)
                    else:
                        grad_weight.add_(weighted.T.to(product_dtype) @ v.to(product_dtype), alpha=-2)
            if need_weight:
                grad_weight = grad_weight.addcmul_(prob_mass[:, None], w, value=2).to(weight.dtype)
        return grad_logits, grad_weight, None, None


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def rademacher(
    count: int, size: int, *, generator: torch.Generator | None = None, dtype=torch.float32, device=None
) -> torch.Tensor:
    """``count`` Rademacher matrices ``R: (size, size)`` (entries ±1), drawn from ``generator`` on the CPU
    (so the draw is the same whatever the device) and moved to ``device``."""
    signs = torch.randint(0, 2, (count, size, size), generator=generator, dtype=torch.int8)
    return host_to_device(signs, device).to(dtype) * 2 - 1


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


@contextmanager
def explain_missing_double_backward():
    """Re-raise autograd's "derivative for X is not implemented" (and TRL's fused LM head's out= kernel error)
    with what to do about it."""
    try:
        yield
    except RuntimeError as error:
        message = str(error)
        if "arguments don't support automatic differentiation" in message:  # out=... kernels: TRL's fused LM head
            raise RuntimeError(
                f"{error}. The probe/exact estimators need a second derivative through everything after the layer, "
                "and the loss runs through a kernel that has none: TRL's fused LM head (its chunked log-prob kernel "
                "writes with out=). Penalise the LM head, whose closed form needs only a first derivative "
                "(fam_hf.trl.FAMSFTTrainer takes it from the head's input), or compute the loss from the full logits"
            ) from error
        if "derivative for" not in message or "not implemented" not in message:
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

"""Closed forms of κ for an output head: from its logits, or from its input without forming them.

For a head ``z = W φ (+ b)`` feeding a loss that is a weighted sum of per-position terms, the cross terms of the
layer Hessian vanish and ``κ = Σ_t c_t ‖φ_t‖² Tr(W Wᵀ ∇²_z ℓ_t)`` (docs/mathematics.md#closed-form-for-an-output-head).
:func:`closed_form` takes the head's logits; :func:`weighted_curvature_from_features` takes its input and weight
only, for losses that never form the logits (fused LM heads), in row chunks with its gradient in the same loop.
:func:`head_hessian_trace` is the same sum with ``W Wᵀ`` replaced by the identity: the head's exact Hessian trace
``Tr(H_W) = Σ_t c_t ‖φ_t‖² Tr ∇²_z ℓ_t`` (docs/measures.md#hessian-trace).
Pure tensor functions: the formula, the shapes and the cost are in each docstring.
"""

from __future__ import annotations

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


def logit_curvature_trace(logits: torch.Tensor, loss_type: str, *, chunk_rows: int) -> torch.Tensor:
    """``Tr ∇²_z ℓ(z_t)`` of each row: the curvature of the per-position loss in the logits, traced.

    * ``"cross_entropy"``: ``Tr(diag p − p pᵀ) = 1 − ‖p_t‖²``, ``p_t = softmax(z_t)``;
    * ``"mse"`` (``(z − y)²`` per element): ``Tr(2 I_d) = 2d``;
    * ``"bce"`` (with logits, per element): ``Σ_s σ(z_{t,s}) (1 − σ(z_{t,s}))``.

    None depends on the labels (docs/mathematics.md#closed-form-for-an-output-head).

    Args:
        logits: ``z: (N, d)``, any float dtype.
        loss_type: one of ``"cross_entropy"``, ``"mse"``, ``"bce"``.
        chunk_rows: rows of ``z`` whose probabilities are formed at a time, so that the only ``(N, d)`` tensor is
            ``z`` itself (an LM head's ``d`` is the vocabulary).

    Returns:
        ``(N,)`` in ``compute_dtype(logits.dtype)``, not differentiable (a measurement).

    Cost: one softmax (or sigmoid) over ``z``, ``O(N·d)``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    dtype = compute_dtype(logits.dtype)
    n, d = logits.shape
    if loss_type == "mse":
        return torch.full((n,), 2.0 * d, dtype=dtype, device=logits.device)
    curvature = logits.new_empty(n, dtype=dtype)
    with torch.no_grad(), torch.autocast(logits.device.type, enabled=False):
        for rows in chunks(n, chunk_rows):
            if loss_type == "cross_entropy":
                probs = torch.softmax(logits[rows], dim=-1, dtype=dtype)
                curvature[rows] = 1 - torch.linalg.vector_norm(probs, dim=-1).square()
            else:
                sig = torch.sigmoid(logits[rows].to(dtype))
                curvature[rows] = (sig * (1 - sig)).sum(-1)
    return curvature


def head_hessian_trace(
    features: torch.Tensor,
    logits: torch.Tensor,
    position_weights: torch.Tensor,
    loss_type: str,
    *,
    bias: bool = False,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Exact ``Tr(H_W)`` of an output head ``z = W φ (+ b)`` feeding a per-position loss ``L = Σ_t c_t ℓ(z_t)``.

    ``H_W = Σ_t c_t (φ_t φ_tᵀ) ⊗ ∇²_z ℓ_t`` (cross terms between positions vanish: each ``ℓ_t`` depends on ``z_t``
    alone, and ``z`` is linear in ``W``), so

        Tr(H_W) = Σ_t c_t ‖φ_t‖² · Tr ∇²_z ℓ_t,

    with ``Tr ∇²_z ℓ_t`` from :func:`logit_curvature_trace` (``1 − ‖p_t‖²`` for cross-entropy, ``2d`` for MSE,
    ``Σ_s σ_s(1 − σ_s)`` for BCE). It is κ's closed form (:func:`closed_form`) with ``W Wᵀ`` replaced by the
    identity. The head is linear, so its Gauss–Newton matrix is this Hessian and the value is ``Tr(G_W)`` too.
    ``bias=True`` adds the bias's own block, ``Tr(H_b) = Σ_t c_t Tr ∇²_z ℓ_t`` (the trace w.r.t. ``(W, b)``).

    Args:
        features: ``φ: (N, m)``, the head's inputs at the positions that enter the loss.
        logits: ``z: (N, d)``, the head's outputs there.
        position_weights: ``c: (N,)`` (``1/N`` for a mean over ``N`` counted positions, 0 for ignored ones).
        loss_type: one of ``"cross_entropy"``, ``"mse"``, ``"bce"``.
        bias: include the bias's block.
        chunk_elements: logits entries whose probabilities are formed at a time (no extra ``(N, d)`` tensor).

    Returns:
        A 0-d tensor in ``compute_dtype(logits.dtype)`` (loss per squared weight unit), summed in float64.

    Cost: one softmax over ``z`` and ``‖φ_t‖²``: ``O(N·(d + m))``, no product with ``W`` (the weight is not read).
    """
    dtype = compute_dtype(logits.dtype)
    curvature = logit_curvature_trace(logits, loss_type, chunk_rows=max(1, chunk_elements // logits.shape[-1]))
    with torch.no_grad():
        scale = features.to(torch.float64).pow(2).sum(-1)  # ‖φ_t‖²
        if bias:
            scale = scale + 1
        total = (position_weights.to(torch.float64) * scale * curvature.to(torch.float64)).sum()
    return total.to(dtype)


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
            for rows in chunks(n, chunk_rows):
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
            for rows in chunks(logits.shape[0], ctx.chunk_rows):
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


def chunks(n: int, size: int) -> list[slice]:
    """``[0, size), [size, 2·size), …`` up to ``n``: the row chunks of the closed forms."""
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def weighted_curvature_from_features(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    row_weights: torch.Tensor,
    *,
    chunk_rows: int,
    through_logits: bool = True,
    product_dtype: torch.dtype | None = None,
    label_probability_of: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Σ_t a_t c_t`` with ``c_t = Σ_s p_{t,s} ‖w_s‖² − ‖Wᵀ p_t‖²``, ``p_t = softmax(W φ_t + b)``, never keeping
    the logits. κ of the head is this with ``a_t`` the loss's weight of position t times ``‖φ_t‖²``.

    ``c_t`` is :func:`softmax_curvature` of ``z = φ Wᵀ + b``.

    Args:
        features: ``φ: (N, m)``.
        weight: ``W: (d, m)``.
        bias: ``b: (d,)`` or None.
        row_weights: ``a: (N,)``.
        chunk_rows: rows of ``φ`` whose ``(rows, d)`` logits are formed at a time.
        through_logits: False holds ``p`` constant (the ``"detached"`` gradient semantics: the Hessian is
            constant, only the explicit ``W`` factors carry gradient; ``φ`` and ``b`` get none).
        product_dtype: operand dtype of the ``N·d·m`` products (bf16 on a GPU); None: the compute dtype.
        label_probability_of: labels ``y: (N,)``: weigh each row by its predicted probability of its label too,
            ``a_t ← a_t · sg(p_{t,y_t})``, held constant (DFT's loss ``−sg(p_y) log p_y`` has Hessian
            ``sg(p_y) (diag p − p pᵀ)``; docs/mathematics.md#closed-form-for-an-output-head).

    Returns:
        a 0-d tensor in ``compute_dtype(weight.dtype)``, differentiable w.r.t. every float tensor argument.

    The output is a scalar, so its gradient is known up to one factor while the chunk's softmax is at hand: when
    it will be needed (grad mode on, an input requiring grad), the forward computes it in the same chunk loop
    and backward only scales it (in place, once: a second backward through the same graph is an error).
    Cost: ``Z = Φ Wᵀ``, ``V = P W``, ``S = V Wᵀ`` and ``G_Z W`` (four ``N·d·m`` products, one softmax per
    chunk) for ``φ``; ``G_Zᵀ Φ`` and ``(a ⊙ P)ᵀ V`` more for ``W``. Kept for backward: the gradients
    (``N × m``, and ``d × m`` when ``W`` trains) and ``c: (N,)``.
    """
    # under no_grad no graph is built, so the forward must not compute a gradient nobody will read
    eager = torch.is_grad_enabled()
    return _WeightedCurvature.apply(
        features, weight, bias, row_weights, chunk_rows, through_logits, product_dtype, eager, label_probability_of
    )


class _WeightedCurvature(torch.autograd.Function):
    # With r_s = ‖w_s‖², v_t = Wᵀ p_t, s_t = r − 2 W v_t (so p_t·s_t = c_t − ‖v_t‖²), for Σ_t a_t c_t:
    #   G_z[t] = a_t · p_t ⊙ (s_t − p_t·s_t)                  (∂/∂z_t)
    #   ∂/∂φ_t = G_z[t] W,   ∂/∂b = Σ_t G_z[t],   ∂/∂a_t = c_t
    #   ∂/∂W   = G_zᵀ Φ  +  2 diag(Σ_t a_t p_t) W − 2 (a ⊙ P)ᵀ V      (through z, then the explicit factors)
    # With labels, a_t is multiplied by q_t = p_{t,y_t}, a constant (DFT's detached weight): ∂/∂a_t = q_t c_t.

    @staticmethod
    def forward(ctx, features, weight, bias, row_weights, chunk_rows, through_logits, product_dtype, eager, labels):
        dtype = compute_dtype(weight.dtype)
        need_features, need_weight, need_bias, _ = ctx.needs_input_grad[:4] if eager else (False,) * 4
        need_features, need_bias = need_features and through_logits, need_bias and through_logits
        through_z = need_features or need_bias or (need_weight and through_logits)
        n = features.shape[0]
        with torch.autocast(features.device.type, enabled=False):
            w = weight.to(dtype)
            row_sq = torch.linalg.vector_norm(w, dim=-1).square()
            a = row_weights.detach().to(dtype, copy=labels is not None)
            label_prob = None if labels is None else features.new_empty(n, dtype=dtype)
            curvature = features.new_empty(n, dtype=dtype)
            grad_features = torch.empty_like(features, dtype=dtype) if need_features else None  # every row set
            grad_weight = torch.zeros_like(w) if need_weight else None
            grad_bias = w.new_zeros(w.shape[0]) if need_bias else None
            prob_mass = w.new_zeros(w.shape[0]) if need_weight else None  # Σ_t a_t p_t
            for rows in chunks(n, chunk_rows):
                phi = features[rows]
                probs = torch.softmax(_logits(phi, weight, bias, dtype, product_dtype), dim=-1)
                if labels is not None:
                    label_prob[rows] = probs.gather(1, labels[rows, None].to(probs.device)).squeeze(1)
                    a[rows] *= label_prob[rows]
                v = _mm(probs, w, product_dtype)
                v_sq = v.pow(2).sum(-1)
                curvature[rows] = torch.mv(probs, row_sq) - v_sq
                if not (through_z or need_weight):
                    continue
                weighted = probs.mul_(a[rows, None])  # a ⊙ P (P is not needed any more)
                if need_weight:
                    prob_mass += weighted.sum(0)
                    grad_weight.sub_(_mm(weighted.T, v, product_dtype), alpha=2)
                if through_z:
                    s = _mm(v, w.T, product_dtype).mul_(-2).add_(row_sq)  # (rows, d)
                    s.sub_((curvature[rows] - v_sq)[:, None])  # p·s
                    grad_z = s.mul_(weighted)
                    if need_features:
                        grad_features[rows] = _mm(grad_z, w, product_dtype)
                    if need_bias:
                        grad_bias += grad_z.sum(0)
                    if need_weight:
                        grad_weight += _mm(grad_z.T, phi.to(dtype), product_dtype)
                    del grad_z, s
            if need_weight:
                grad_weight.addcmul_(prob_mass[:, None], w, value=2)
            value = (a * curvature).sum()
        ctx.grads = (grad_features, grad_weight, grad_bias)
        ctx.save_for_backward(curvature if labels is None else curvature * label_prob)  # ∂value/∂row_weights
        ctx.dtypes = (features.dtype, weight.dtype, None if bias is None else bias.dtype, row_weights.dtype)
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (curvature,) = ctx.saved_tensors
        if ctx.grads is None:
            raise RuntimeError(
                "the LM-head closed form's backward ran a second time (retain_graph=True): its gradient, computed "
                "in the forward pass, is scaled in place and handed over the first time; run the forward again"
            )
        # in place: no second copy of a head-sized weight gradient (it becomes lm_head.weight.grad)
        grads, ctx.grads = ctx.grads, None
        scaled = [None if g is None else g.mul_(grad.to(g.dtype)).to(t) for g, t in zip(grads, ctx.dtypes)]
        grad_rows = curvature.mul(grad).to(ctx.dtypes[3]) if ctx.needs_input_grad[3] else None
        return (*scaled, grad_rows, None, None, None, None, None)


def _logits(phi, weight, bias, dtype, product_dtype) -> torch.Tensor:
    """``φ Wᵀ + b`` for one chunk, in ``dtype`` (operands in ``product_dtype`` when given)."""
    operand = dtype if product_dtype is None else product_dtype
    z = (phi.to(operand) @ weight.to(operand).T).to(dtype)
    return z if bias is None else z.add_(bias.to(dtype))


def _mm(a: torch.Tensor, b: torch.Tensor, product_dtype) -> torch.Tensor:
    if product_dtype is None:
        return a @ b
    return (a.to(product_dtype) @ b.to(product_dtype)).to(a.dtype)

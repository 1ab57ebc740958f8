"""κ of a causal LM's output head from its *input*: the closed form for losses that never form the logits.

TRL's ``SFTTrainer`` (and Liger-style fused kernels) compute the loss as ``hidden states × lm_head.weight`` in
chunks, so ``lm_head``'s own forward never runs and no ``(N, vocab)`` logits tensor exists. The closed form
(DESIGN §2.1 (b)) needs only the head's input ``φ``, its weight ``W`` and the loss's counted positions:

    κ = Σ_t c_t ‖φ_t‖² ( Σ_s p_{t,s} ‖w_s‖² − ‖Wᵀ p_t‖² ),      p_t = softmax(W φ_t + b),

with ``c_t = 1/N`` over the ``N`` positions the loss counts (``-100`` elsewhere), or ``1/num_items_in_batch``.
:func:`weighted_curvature_from_features` computes the sum in row chunks, forming each chunk's logits once, with
the gradient in the same loop, so the penalty never keeps an ``N × d`` tensor.

:class:`HeadInputFlatness` is the estimator built on it: it captures ``φ`` as the backbone's
``last_hidden_state`` (what TRL's fused head multiplies by ``lm_head.weight``), with a hook on the backbone
module, and turns it into a :class:`~fam_hf.FlatnessResult` after the forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from .estimators import CHUNK_ELEMENTS, _chunks, compute_dtype, sample_positions
from .head_loss import IGNORE_INDEX, head_loss_for
from .layers import Layer, resolve_layer, unwrap_model


def weighted_curvature_from_features(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    row_weights: torch.Tensor,
    *,
    chunk_rows: int,
    through_logits: bool = True,
    product_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``Σ_t a_t c_t`` with ``c_t = Σ_s p_{t,s} ‖w_s‖² − ‖Wᵀ p_t‖²``, ``p_t = softmax(W φ_t + b)``, never keeping
    the logits. κ of the head is this with ``a_t`` the loss's weight of position t times ``‖φ_t‖²``.

    ``c_t`` is :func:`fam_hf.estimators.softmax_curvature` of ``z = φ Wᵀ + b``.

    Args:
        features: ``φ: (N, m)``.
        weight: ``W: (d, m)``.
        bias: ``b: (d,)`` or None.
        row_weights: ``a: (N,)``.
        chunk_rows: rows of ``φ`` whose ``(rows, d)`` logits are formed at a time.
        through_logits: False holds ``p`` constant (the ``"detached"`` gradient semantics: the Hessian is
            constant, only the explicit ``W`` factors carry gradient; ``φ`` and ``b`` get none).
        product_dtype: operand dtype of the ``N·d·m`` products (bf16 on a GPU); None: the compute dtype.

    Returns:
        a 0-d tensor in ``compute_dtype(weight.dtype)``, differentiable w.r.t. every tensor argument.

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
        features, weight, bias, row_weights, chunk_rows, through_logits, product_dtype, eager
    )


class _WeightedCurvature(torch.autograd.Function):
    # With r_s = ‖w_s‖², v_t = Wᵀ p_t, s_t = r − 2 W v_t (so p_t·s_t = c_t − ‖v_t‖²), for Σ_t a_t c_t:
    #   G_z[t] = a_t · p_t ⊙ (s_t − p_t·s_t)                  (∂/∂z_t)
    #   ∂/∂φ_t = G_z[t] W,   ∂/∂b = Σ_t G_z[t],   ∂/∂a_t = c_t
    #   ∂/∂W   = G_zᵀ Φ  +  2 diag(Σ_t a_t p_t) W − 2 (a ⊙ P)ᵀ V      (through z, then the explicit factors)

    @staticmethod
    def forward(ctx, features, weight, bias, row_weights, chunk_rows, through_logits, product_dtype, eager):
        dtype = compute_dtype(weight.dtype)
        need_features, need_weight, need_bias, _ = ctx.needs_input_grad[:4] if eager else (False,) * 4
        need_features, need_bias = need_features and through_logits, need_bias and through_logits
        through_z = need_features or need_bias or (need_weight and through_logits)
        n = features.shape[0]
        with torch.autocast(features.device.type, enabled=False):
            w = weight.to(dtype)
            row_sq = torch.linalg.vector_norm(w, dim=-1).square()
            a = row_weights.detach().to(dtype)
            curvature = features.new_empty(n, dtype=dtype)
            grad_features = torch.empty_like(features, dtype=dtype) if need_features else None  # every row set
            grad_weight = torch.zeros_like(w) if need_weight else None
            grad_bias = w.new_zeros(w.shape[0]) if need_bias else None
            prob_mass = w.new_zeros(w.shape[0]) if need_weight else None  # Σ_t a_t p_t
            for rows in _chunks(n, chunk_rows):
                phi = features[rows]
                probs = torch.softmax(_logits(phi, weight, bias, dtype, product_dtype), dim=-1)
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
        ctx.save_for_backward(curvature)
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
        return (*scaled, grad_rows, None, None, None, None)


def _logits(phi, weight, bias, dtype, product_dtype) -> torch.Tensor:
    """``φ Wᵀ + b`` for one chunk, in ``dtype`` (operands in ``product_dtype`` when given)."""
    operand = dtype if product_dtype is None else product_dtype
    z = (phi.to(operand) @ weight.to(operand).T).to(dtype)
    return z if bias is None else z.add_(bias.to(dtype))


def _mm(a: torch.Tensor, b: torch.Tensor, product_dtype) -> torch.Tensor:
    if product_dtype is None:
        return a @ b
    return (a.to(product_dtype) @ b.to(product_dtype)).to(a.dtype)


def lm_head_positions(
    hidden: torch.Tensor,
    batch: Mapping[str, Any],
    num_items_in_batch: torch.Tensor | int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The head inputs at the positions a causal-LM loss counts, with the loss's weight of each.

    Args:
        hidden: the backbone's ``last_hidden_state``, ``(B, T, m)``.
        batch: the inputs: ``shift_labels: (B, T)`` (already aligned with ``hidden``, as under context
            parallelism) or else ``labels: (B, T)``, scored one position ahead (``hidden[t]`` predicts
            ``labels[t + 1]``). Assistant-only and completion-only masks, packing and padding-free batches all
            arrive as ``-100`` labels.
        num_items_in_batch: the loss's denominator when it is given one; else the count of counted positions.

    Returns:
        ``features: (N, m)`` (only the counted positions; a host synchronisation, as TRL's kernel does on
        GPUs) and ``weights: (N,)`` with ``Σ_t weights_t ℓ_t`` the loss.
    """
    labels = batch.get("shift_labels")
    if labels is None:
        labels = batch.get("labels")
        if labels is None:
            raise ValueError("the LM-head closed form needs the batch's labels (or shift_labels)")
        labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} do not line up with the head's input {tuple(hidden.shape)}; the LM-head "
            "closed form expects the backbone's last_hidden_state of the batch the loss was computed on"
        )
    counted = (labels != IGNORE_INDEX).to(hidden.device)
    features = hidden[counted]
    dtype = compute_dtype(hidden.dtype)
    if num_items_in_batch is not None:
        denominator = torch.as_tensor(num_items_in_batch, device=hidden.device, dtype=dtype)
    else:
        denominator = counted.sum().to(dtype).clamp_min(1)
    weights = torch.ones(features.shape[0], device=hidden.device, dtype=dtype) / denominator
    return features, weights


class HeadInputFlatness:
    """Exact κ of a causal LM's output head from the head's input (the backbone's last hidden state).

    The estimator for models and losses that never materialise the logits (TRL's fused LM head). It owns
    its capture (a forward hook on the backbone) and its result. The interface is
    :class:`~fam_hf.RelativeFlatness`'s: :meth:`record` around the forward pass, then
    :meth:`HeadInputRecording.result`.

    Args:
        model: a transformers ``*ForCausalLM`` (optionally PEFT- or DDP-wrapped) with an unmodified
            cross-entropy head (no soft-capping or logit scaling).
        hessian_grad, scale, generator, token_fraction: as :class:`~fam_hf.RelativeFlatness`.
        chunk_elements: logits entries formed at a time (``rows × vocabulary``).
    """

    estimator = "closed_form"
    capture = "head_input"
    probes = 1

    def __init__(
        self,
        model: nn.Module,
        *,
        hessian_grad: str = "full",
        scale: str = "paper",
        generator: torch.Generator | None = None,
        token_fraction: float = 1.0,
        chunk_elements: int = CHUNK_ELEMENTS,
    ) -> None:
        self.model = model
        self.layer: Layer = resolve_layer(model, "auto")
        head_loss = head_loss_for(model)
        if head_loss is None or not head_loss.shift_labels or not self.layer.is_output_head:
            raise ValueError(
                f"the LM-head closed form applies to a causal LM's output head under its plain cross-entropy; "
                f"{type(unwrap_model(model)).__name__} is not one (or its logits are soft-capped/scaled)"
            )
        base = unwrap_model(model)
        self.backbone: nn.Module = base.base_model
        if self.backbone is base:
            raise ValueError(f"{type(base).__name__} has no backbone module (base_model) whose output feeds the head")
        self.hessian_grad = hessian_grad
        self.scale = scale
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.token_fraction = token_fraction
        self.chunk_elements = chunk_elements
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._recording: HeadInputRecording | None = None

    @property
    def description(self) -> str:
        return f"closed form from the input of '{self.layer.name}' (the backbone's last hidden state)"

    @contextmanager
    def record(
        self,
        batch: Mapping[str, Any] | None = None,
        *,
        num_items_in_batch: torch.Tensor | int | None = None,
        differentiable: bool = True,
    ) -> Iterator[HeadInputRecording]:
        """Capture the backbone's output during the forward pass run inside the ``with`` block."""
        if self._handle is None:
            self._handle = self.backbone.register_forward_hook(self._hook)
        recording = HeadInputRecording(self, batch or {}, num_items_in_batch, differentiable)
        self._recording, recording.open = recording, True
        try:
            yield recording
        finally:
            recording.open = False

    def kernels(self, differentiable: bool = False):
        """A no-op: the closed form needs first-order autograd only."""
        return nullcontext()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle, self._recording = None, None

    def _hook(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        recording = self._recording
        if recording is not None and recording.open:
            hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            recording._on_forward(hidden)


class HeadInputRecording:
    """What one forward pass left at the backbone's output; created by :meth:`HeadInputFlatness.record`."""

    def __init__(self, flatness, batch, num_items_in_batch, differentiable: bool) -> None:
        self.flatness = flatness
        self.batch = batch
        self.num_items_in_batch = num_items_in_batch
        self.differentiable = differentiable
        self.calls = 0
        self.hidden: torch.Tensor | None = None
        self.with_grad = False  # whether gradients were enabled when self.hidden was computed

    def _on_forward(self, hidden: torch.Tensor) -> None:
        self.calls += 1
        # The first pass that can carry the penalty's gradient wins (a no-grad pass for metrics may follow it).
        if self.hidden is None or (not self.with_grad and torch.is_grad_enabled()):
            self.hidden, self.with_grad = hidden, torch.is_grad_enabled()

    def result(self, loss: torch.Tensor | None = None, *, logits: torch.Tensor | None = None):
        from .flatness import FlatnessResult

        fam = self.flatness
        name = fam.backbone.__class__.__name__
        if self.hidden is None:
            raise RuntimeError(
                f"the backbone ({name}) whose output feeds '{fam.layer.name}' did not run during the forward pass "
                "inside record(): κ would train nothing; run the model's forward inside record()"
            )
        weight = fam.layer.weight()
        if weight.dim() != 2 or weight.numel() == 0:
            raise RuntimeError(
                f"the weight of '{fam.layer.name}' is partitioned outside its forward pass ({tuple(weight.shape)}); "
                "the LM-head closed form from the head's input needs the whole matrix: train with DDP"
            )
        if self.differentiable and not self.with_grad:
            raise RuntimeError(
                f"the backbone ({name}) ran only under torch.no_grad() inside record(), so the loss was not computed "
                f"from it and the penalty on '{fam.layer.name}' would train nothing; run the loss's forward pass with "
                "gradients enabled inside record()"
            )
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            hidden = self.hidden if self.differentiable and fam.hessian_grad == "full" else self.hidden.detach()
            if not self.differentiable:
                weight = weight.detach()
            features, weights = lm_head_positions(hidden, self.batch, self.num_items_in_batch)
            if fam.token_fraction < 1:
                chosen, weights = sample_positions(weights, fam.token_fraction, fam.generator)
                features = features[chosen]
            module = fam.layer.module
            bias = getattr(getattr(module, "base_layer", module), "bias", None)
            if bias is not None and not self.differentiable:
                bias = bias.detach()
            dtype = compute_dtype(weight.dtype)
            product_dtype = torch.bfloat16 if features.is_cuda and features.dtype == torch.bfloat16 else None
            value = weighted_curvature_from_features(
                features,
                weight,
                bias,
                weights.to(dtype) * features.to(dtype).pow(2).sum(-1),
                chunk_rows=max(1, fam.chunk_elements // weight.shape[0]),
                through_logits=fam.hessian_grad == "full",
                product_dtype=product_dtype,
            )
        scale = 1.0 / weight.shape[1] if fam.scale == "reference" else 1.0
        return FlatnessResult(value=value * scale, std_error=None, estimator="closed_form", layer=fam.layer.name)

"""The exact closed forms of κ for an output head (docs/mathematics.md#closed-form-for-an-output-head).

:class:`ClosedFormFlatness` reads the head's input and logits at the head's forward hook, under the loss the model
computes itself (:class:`~fam_hf.head_loss.HeadLoss`). :class:`HeadInputFlatness` is for losses that never run the
head module and never form the logits (TRL's fused LM head): it captures the head's input as the backbone's
``last_hidden_state`` and computes the same κ from it and the head's weight, in row chunks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..curvature import CHUNK_ELEMENTS, closed_form, compute_dtype, sample_positions, weighted_curvature_from_features
from ..head_loss import IGNORE_INDEX, HeadLoss, as_head_loss, head_input_rescaled, head_loss_for
from ..layers import Layer, resolve_layer, unwrap_model
from ..options import FUSED_LOSS_TYPES, check_choice
from .base import Recording, RelativeFlatness

MIRRORED_LOSSES = "causal-LM or sequence-classification cross-entropy, MSE, BCE, on logits that are not soft-capped"


def loss_refusal(
    model: nn.Module,
    layer: Layer,
    head_loss: HeadLoss | str | None = None,
    *,
    custom_loss: bool = False,
    output_head: bool = True,
) -> str | None:
    """Why no loss that fam_hf can mirror in the logits is known for ``layer`` of ``model`` (None: one is), for the
    estimators and measures that need the loss's curvature in the logits: the closed forms (``output_head=True``:
    ``layer`` must also be the output layer) and Gauss–Newton (any layer). The caller says what fails and what to
    use instead; the reason says what to tell fam_hf.

    The loss is the user's ``head_loss`` where given (for the closed forms, of ``layer`` itself when it names a
    layer), or else the model's own (:func:`~fam_hf.head_loss.head_loss_for`), which ``custom_loss`` (a loss
    computed outside the model) rules out.
    """
    spec = as_head_loss(head_loss)
    if spec is not None:
        if not output_head or spec.head is None or resolve_layer(model, spec.head).name == layer.name:
            return None
        return (
            f"'{layer.name}' is not the output layer that head_loss names ('{spec.head}'), and inside the network "
            f"the Hessian has terms the closed form does not; measure '{spec.head}'"
        )
    if custom_loss:
        return (
            "it mirrors the model's own loss, but the loss is computed outside the model (a Trainer's "
            "compute_loss_func or label smoothing, or a measurement's loss_fn=); to measure, say which layer's output "
            "the loss reads and which loss it is: head_loss=HeadLoss('cross_entropy' | 'mse' | 'bce', head=NAME, "
            "labels=KEY)"
        )
    if output_head and not layer.is_output_head:
        return (
            f"'{layer.name}' is not the model's output head (fam_hf recognises transformers' heads; if it is this "
            f"model's output layer, say so and name its loss: head_loss=HeadLoss('cross_entropy', head='{layer.name}', "
            "labels=KEY))"
        )
    if head_loss_for(model) is None:
        return (
            f"{type(model).__name__}'s loss is not one fam_hf recognises ({MIRRORED_LOSSES}); if it is one of them, "
            "name it and the output layer: head_loss=HeadLoss('cross_entropy' | 'mse' | 'bce', head=NAME, labels=KEY) "
            f"(or head_loss='cross_entropy' when '{layer.name}' is the output layer and batch['labels'] its targets)"
        )
    return None


def estimator_refusal(estimator: str, reason: str | None) -> str | None:
    """``reason`` (from :func:`loss_refusal`) as an estimator's refusal, with the estimator that always applies."""
    if reason is None:
        return None
    return f"estimator='{estimator}' cannot apply: {reason}; or use estimator='probe' (or 'auto')"


class ClosedFormFlatness(RelativeFlatness):
    """Exact κ of the model's output head from its logits, under the model's own cross-entropy, MSE or BCE loss:
    a few extra matrix products, first-order autograd only."""

    estimator = "closed_form"
    samples_positions = True

    @classmethod
    def refusal(cls, model: nn.Module, layer: Layer, *, loss: str = "model", **options: Any) -> str | None:
        reason = loss_refusal(model, layer, options.get("head_loss"), custom_loss=loss == "custom")
        return estimator_refusal(cls.estimator, reason)

    class Recording(Recording):
        def capture(self, features, output, weight, first_call):
            if first_call:
                self.output = output
                self._value = self._closed_form(weight, features, output)
            return None

        def _closed_form(self, weight, features, output) -> torch.Tensor:
            fam = self.flatness
            labels, head_loss = self.mirrored_loss()
            output, features = head_loss.scaled(output, features)  # s·z = W (s·φ) where the loss rescales z
            if self.feature_scale is not None:  # W' = W diag(σ) acting on φ' = φ / σ: the same output
                sigma, inverse = self.feature_scale
                features, weight = features * inverse, weight * sigma
            with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
                if fam.hessian_grad == "detached" or not self.differentiable:
                    output, features = output.detach(), features.detach()
                output, features, weights = head_loss.positions(
                    output,
                    features,
                    labels,
                    input_ids=self.batch.get("input_ids"),
                    num_items_in_batch=self.norm.items(self.norm.model_takes_items),
                )
                if fam.token_fraction < 1:
                    chosen, weights = sample_positions(weights, fam.token_fraction, fam.generator)
                    output, features = output[chosen], features[chosen]
                return closed_form(weight, features, output, weights, head_loss.loss_type)

        def value(self, loss, logits):
            if logits is not None and logits.shape[-1] != self.output.shape[-1]:
                raise ValueError(
                    f"the model's logits ({tuple(logits.shape)}) are not the output of '{self.flatness.layer.name}' "
                    f"({tuple(self.output.shape)}); use estimator='probe'"
                )
            return self._value * self.norm.scale(self.norm.model_takes_items), None


class HeadInputFlatness(RelativeFlatness):
    """Exact κ of a causal LM's output head from the head's input (the backbone's last hidden state).

    The estimator for losses that never materialise the logits (TRL's fused LM head): it captures ``φ`` with a
    hook on the backbone module and computes κ from it, the head's weight and the loss's counted positions, in
    row chunks (:func:`fam_hf.curvature.weighted_curvature_from_features`), so the penalty never keeps an
    ``N × vocabulary`` tensor. Its result is ``"closed_form"``'s.

    Args:
        model: a transformers ``*ForCausalLM`` (optionally PEFT- or DDP-wrapped) with an unmodified
            cross-entropy head (no soft-capping or logit scaling).
        layer: ``"auto"`` or the head's name; any other layer is refused.
        chunk_elements: logits entries formed at a time (``rows × vocabulary``).
        loss_type: the fused loss's per-token term, as TRL's ``SFTConfig.loss_type`` names it: ``"nll"``
            (cross-entropy) or ``"dft"`` (cross-entropy weighed by the token's own detached probability of its
            label, whose Hessian is that weight times cross-entropy's: κ is weighed the same way).
        The other options are :class:`~fam_hf.RelativeFlatness`'s.
    """

    estimator = "closed_form"
    samples_positions = True

    def __init__(
        self, model: nn.Module, layer: str = "auto", estimator: str = "auto", *, chunk_elements: int = CHUNK_ELEMENTS,
        loss_type: str = "nll", **options: Any,
    ) -> None:  # fmt: skip
        super().__init__(model, layer, estimator, **options)
        check_choice("loss_type", loss_type, FUSED_LOSS_TYPES)
        self.loss_type = loss_type
        if self.head_loss is not None or self.normalize_features:
            raise ValueError(
                "HeadInputFlatness is the LM-head closed form of a causal LM's own loss (TRL's fused head); head_loss= "
                "and normalize_features= are for measurement: use fam_hf.relative_flatness"
            )
        base = unwrap_model(model)
        self.backbone: nn.Module = base.base_model
        if self.backbone is base:
            raise ValueError(f"{type(base).__name__} has no backbone module (base_model) whose output feeds the head")
        self.chunk_elements = chunk_elements

    @classmethod
    def refusal(cls, model: nn.Module, layer: Layer, *, loss: str = "fused", **options: Any) -> str | None:
        head_loss = head_loss_for(model)
        if head_loss is None or not head_loss.shift_labels:
            return (
                f"the LM-head closed form applies to a causal LM's output head under its plain cross-entropy; "
                f"{type(unwrap_model(model)).__name__} is not one (or its logits are soft-capped)"
            )
        if head_input_rescaled(model):
            return (
                f"{type(unwrap_model(model)).__name__} rescales the backbone's output before its head, which the "
                "head-input closed form (TRL's fused LM head) does not mirror; the closed form on the logits does "
                "(FAMTrainer, or relative_flatness)"
            )
        if head_loss.logit_scale != 1:
            return (
                f"{type(unwrap_model(model)).__name__} rescales its logits (×{head_loss.logit_scale:g}) before the loss, "
                "which the head-input closed form (TRL's fused LM head) does not mirror; the closed form on the "
                "logits does (FAMTrainer, or relative_flatness)"
            )
        if not layer.is_output_head:
            return f"the LM-head closed form applies to the output head only; '{layer.name}' is not it"
        return None

    @property
    def description(self) -> str:
        weighed = ", each token weighed by its probability (DFT)" if self.loss_type == "dft" else ""
        return f"closed form from the input of '{self.layer.name}' (the backbone's last hidden state{weighed})"

    @property
    def hooked_module(self) -> nn.Module:
        return self.backbone

    class Recording(Recording):
        hidden: torch.Tensor | None = None  # the backbone's last_hidden_state: (B, T, m)

        def on_forward(self, features, output):
            if not self.open:
                return None
            self.calls += 1
            hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            # The first pass that can carry the penalty's gradient wins (a no-grad pass for metrics may follow it).
            if self.hidden is None or (not self.with_grad and torch.is_grad_enabled()):
                self.hidden, self.with_grad = hidden, torch.is_grad_enabled()
            return None

        def check(self) -> None:
            fam = self.flatness
            name = type(fam.backbone).__name__
            if self.hidden is None:
                raise RuntimeError(
                    f"the backbone ({name}) whose output feeds '{fam.layer.name}' did not run during the forward pass "
                    "inside record(): κ would train nothing; run the model's forward inside record()"
                )
            if self.differentiable and not self.with_grad:
                raise RuntimeError(
                    f"the backbone ({name}) ran only under torch.no_grad() inside record(), so the loss was not "
                    f"computed from it and the penalty on '{fam.layer.name}' would train nothing; run the loss's "
                    "forward pass with gradients enabled inside record()"
                )

        def value(self, loss, logits):
            fam = self.flatness
            weight = fam.layer.weight()
            if weight.dim() != 2 or weight.numel() == 0:
                raise RuntimeError(
                    f"the weight of '{fam.layer.name}' is partitioned outside its forward pass ({tuple(weight.shape)}); "
                    "the LM-head closed form from the head's input needs the whole matrix: train with DDP"
                )
            self.fan_in = weight.shape[1]
            # the fused loss divides by num_items_in_batch whenever Trainer gives it one
            with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
                hidden = self.hidden if self.differentiable and fam.hessian_grad == "full" else self.hidden.detach()
                if not self.differentiable:
                    weight = weight.detach()
                features, weights, labels = lm_head_positions(hidden, self.batch, self.norm.items(True))
                if fam.token_fraction < 1:
                    chosen, weights = sample_positions(weights, fam.token_fraction, fam.generator)
                    features, labels = features[chosen], labels[chosen]
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
                    label_probability_of=labels if fam.loss_type == "dft" else None,
                )
            return value * self.norm.scale(True), None


def lm_head_positions(
    hidden: torch.Tensor,
    batch: Mapping[str, Any],
    num_items_in_batch: torch.Tensor | int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The head inputs at the positions a causal-LM loss counts, with the loss's weight and the label of each.

    Args:
        hidden: the backbone's ``last_hidden_state``, ``(B, T, m)``.
        batch: the inputs: ``shift_labels: (B, T)`` (already aligned with ``hidden``, as under context
            parallelism) or else ``labels: (B, T)``, scored one position ahead (``hidden[t]`` predicts
            ``labels[t + 1]``). Assistant-only and completion-only masks, packing and padding-free batches all
            arrive as ``-100`` labels.
        num_items_in_batch: the loss's denominator when it is given one; else the count of counted positions.

    Returns:
        ``features: (N, m)`` (only the counted positions; a host synchronisation, as TRL's kernel does on
        GPUs), ``weights: (N,)`` with ``Σ_t weights_t ℓ_t`` the loss, and ``labels: (N,)``.
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
    return features, weights, labels.to(hidden.device)[counted]

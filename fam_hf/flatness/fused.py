"""The training loss and κ of a causal LM's head in one pass: :class:`FusedHeadFlatness`, the estimator a trainer uses
when the penalty trains on the LM head (docs/mathematics.md#the-fused-lm-head-kernel).

The model runs to its last hidden state only (``logits_to_keep`` selects no position, so the head forms no
logits); :meth:`FusedHeadFlatness.Recording.fused` then computes the cross-entropy over the counted positions and
κ of the head with :func:`fam_hf.curvature.fused_head_loss`, whose loss carries the gradient of ``L + λ·κ``. The
step never holds an ``N × vocabulary`` tensor beyond one chunk, and the logits' softmax is taken once.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..curvature import FUSED_CHUNK_ELEMENTS, FusedHead, compute_dtype, fused_head_loss, sample_positions
from ..head_loss import IGNORE_INDEX
from ..layers import Layer, unwrap_model
from .closed_form import HeadInputFlatness, estimator_refusal, lm_head_positions, loss_refusal


class FusedHeadFlatness(HeadInputFlatness):
    """κ of a causal LM's output head computed with the training loss itself, in one chunked pass.

    A trainer runs the model with :meth:`forward_kwargs` inside :meth:`record` (no labels: the model forms neither
    logits nor loss) and asks the recording for :meth:`Recording.fused`: the loss over the counted positions,
    normalised as the loss it replaces, and κ (``"closed_form"``'s, in the loss's normalisation), with the gradients
    w.r.t. the head's input, weight and bias formed in that pass.

    Args:
        model: a transformers ``*ForCausalLM`` whose forward takes ``logits_to_keep`` (optionally PEFT- or
            DDP-wrapped; not a PEFT prompt-learning model, whose virtual tokens the labels do not cover).
        chunk_elements: logits entries formed at a time (``rows × vocabulary``).
        draw_over_grid: draw the token sample (``token_fraction < 1``) as :class:`ClosedFormFlatness` does, among
            every position of the batch, rather than among the counted rows as :class:`HeadInputFlatness` does: both
            draws are uniform over the counted positions, and this one is the same draw for the same generator
            state as the estimator the fused kernel stands in for.
        The other arguments are :class:`HeadInputFlatness`'s.
    """

    def __init__(self, model: nn.Module, layer: str = "auto", estimator: str = "auto", *,
                 chunk_elements: int = FUSED_CHUNK_ELEMENTS, draw_over_grid: bool = False, **options: Any) -> None:  # fmt: skip
        super().__init__(model, layer, estimator, chunk_elements=chunk_elements, **options)
        self.draw_over_grid = draw_over_grid

    @classmethod
    def refusal(cls, model: nn.Module, layer: Layer, *, loss: str = "model", **options: Any) -> str | None:
        reason = HeadInputFlatness.refusal(model, layer)
        if reason is not None:
            return reason
        if loss == "custom":
            return estimator_refusal("closed_form", loss_refusal(model, layer, custom_loss=True))
        base = unwrap_model(model)
        if "logits_to_keep" not in inspect.signature(base.forward).parameters:
            return (
                f"{type(base).__name__}.forward takes no logits_to_keep, so it cannot run to its last hidden state "
                "without forming the logits; the penalty is computed beside the model's own loss instead"
            )
        configs = getattr(model, "peft_config", None) or {}
        if any(getattr(config, "is_prompt_learning", False) for config in configs.values()):
            return "a PEFT prompt-learning model prepends virtual tokens that the labels do not cover"
        return None

    @property
    def description(self) -> str:
        return f"closed form of '{self.layer.name}' fused with the loss (one chunked pass over the counted tokens)"

    @staticmethod
    def forward_kwargs() -> dict[str, Any]:
        """What the trainer adds to the model's inputs (which it passes without labels): no logits."""
        return {"logits_to_keep": torch.empty(0, dtype=torch.long)}

    class Recording(HeadInputFlatness.Recording):
        head: FusedHead | None = None
        loss_takes_items = True

        def fused(
            self, lam: float, *, kappa_grad: bool = False, loss_takes_items: bool = True, metrics: bool = False
        ) -> FusedHead:
            """The loss and κ of the recorded pass.

            Args:
                lam: the multiplier of :attr:`FlatnessResult.value` in the penalty added to the loss: the loss
                    returned carries the gradient of ``loss + lam · value`` (0: the loss's own).
                kappa_grad: give κ its own gradient (for a step whose λ is set from κ after the pass).
                loss_takes_items: the loss is divided by ``num_items_in_batch`` when the trainer gives it (else it
                    is the mean over this micro-batch's counted positions).
                metrics: also each counted token's entropy and whether its label is the top-1 prediction.

            Returns:
                :class:`~fam_hf.curvature.FusedHead` over the counted positions, κ unscaled (:meth:`result` scales
                it as the trainer scales the loss: by the world size under token averaging).
            """
            self.check()
            fam = self.flatness
            weight = fam.layer.weight()
            if weight.dim() != 2 or weight.numel() == 0:
                raise RuntimeError(
                    f"the weight of '{fam.layer.name}' is partitioned outside its forward pass "
                    f"({tuple(weight.shape)}); the fused LM-head loss needs the whole matrix: train with DDP"
                )
            self.fan_in, self.loss_takes_items = weight.shape[1], loss_takes_items
            hidden = self.hidden
            features, weights, labels = lm_head_positions(hidden, self.batch, self.norm.items(loss_takes_items))
            counted = _shifted_labels(self.batch).to(hidden.device) != IGNORE_INDEX
            kappa_weights = weights
            if fam.token_fraction < 1:  # κ on the sample, which goes first; the loss on every row
                if fam.draw_over_grid:  # the draw of the closed form on the logits, which sees every position
                    grid = counted.reshape(-1)
                    chosen, factor = sample_positions(grid.to(weights.dtype), fam.token_fraction, fam.generator)
                    chosen = (torch.cumsum(grid, 0) - 1)[chosen]
                    kappa_weights = weights[chosen] * factor
                else:
                    chosen, kappa_weights = sample_positions(weights, fam.token_fraction, fam.generator)
                rest = torch.ones_like(weights, dtype=torch.bool).index_fill_(0, chosen, False)
                order = torch.cat([chosen, rest.nonzero().squeeze(1)])
                features, labels, weights = features[order], labels[order], weights[order]
            module = fam.layer.module
            bias = getattr(getattr(module, "base_layer", module), "bias", None)
            product_dtype = torch.bfloat16 if features.is_cuda and features.dtype == torch.bfloat16 else None
            reference = 1.0 / self.fan_in if fam.scale == "reference" else 1.0
            self.head = fused_head_loss(
                features,
                weight,
                bias,
                labels,
                weights.to(compute_dtype(weight.dtype)),
                kappa_weights,
                lam=lam * reference,
                kappa_grad=kappa_grad,
                through_logits=fam.hessian_grad == "full",
                dft=fam.loss_type == "dft",  # each token's loss weighed by its detached probability (TRL's DFT)
                metrics=metrics,
                chunk_rows=max(1, fam.chunk_elements // weight.shape[0]),
                product_dtype=product_dtype,
            )
            return self.head

        def value(self, loss, logits):
            if self.head is None:
                raise RuntimeError("FusedHeadFlatness: call recording.fused(...) after the forward pass, before result()")
            return self.head.kappa * self.norm.scale(self.loss_takes_items), None


def _shifted_labels(batch) -> torch.Tensor:
    # as lm_head_positions aligns them: hidden[t] predicts labels[t + 1], or shift_labels as given
    labels = batch.get("shift_labels")
    if labels is None:
        labels = nn.functional.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[..., 1:]
    return labels

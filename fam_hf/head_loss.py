"""How an output head's logits enter the model's own loss, so the closed form can mirror it exactly.

transformers computes the loss inside the model (``transformers.loss.loss_utils``):

* ``*ForCausalLM``: cross-entropy over shifted labels (``logits[t]`` scores ``labels[t+1]``), ignoring
  ``-100``; the sum divided by ``num_items_in_batch`` when the Trainer passes it (gradient accumulation
  and multi-device token averaging), else the mean over counted tokens.
* ``*ForSequenceClassification``: by ``config.problem_type`` (inferred as transformers does when unset):
  ``regression`` → ``MSELoss`` (mean over every element), ``single_label_classification`` →
  cross-entropy (mean over examples whose label is not ``-100``), ``multi_label_classification`` →
  ``BCEWithLogitsLoss`` (mean over every element). Decoder models (Llama, GPT-2, Qwen …) run their
  ``score`` head at every position and pool the logits of the last non-padding token.

A causal LM that rescales its head's output before the loss (Cohere's ``logit_scale``, Granite's ``1 /
logits_scaling``) is mirrored with that factor (:attr:`HeadLoss.logit_scale`). Anything else (masked LM, seq2seq,
token classification, soft-capped logits, custom losses)
is not recognised from the model: use the probe estimator there, which differentiates whatever loss is actually
used, or say what the loss is with a :class:`HeadLoss` of your own (``head_loss=``; any ``nn.Module``, plain
torch included: which layer's output the loss reads, which batch key holds the targets, and which of the three
losses it is, averaged as PyTorch's ``reduction="mean"`` averages). The weights this yields, per loss:
docs/mathematics.md#counted-positions-and-normalisation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

from .curvature.heads import LOSS_TYPES
from .layers import unwrap_model

_CAUSAL_LMS = frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
_SEQUENCE_CLASSIFIERS = frozenset(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values())

IGNORE_INDEX = -100

# Config attributes of models that soft-cap the head's output before the loss (Gemma 2/3, RecurrentGemma): not a
# linear map of it, so the closed form cannot mirror it. Rescalings are (HeadLoss.logit_scale, _logit_scale).
_LOGIT_CAPS = ("final_logit_softcapping", "logits_soft_cap")


@dataclass(frozen=True)
class HeadLoss:
    """The model's loss as a function of its head's output.

    Read from a transformers model by :func:`head_loss_for`, or stated by the user for any model
    (``head_loss=HeadLoss("cross_entropy", head="fc3", labels="y")``): the loss is then taken to be
    ``F.cross_entropy(logits, batch[labels])`` (mean over the targets that are not ``-100``),
    ``F.mse_loss(logits, batch[labels])`` or ``F.binary_cross_entropy_with_logits(logits, batch[labels])`` (means
    over every element), with ``logits: (..., d)`` the output of the layer named ``head`` and targets shaped
    ``(...)`` (cross-entropy) or like the logits.

    Attributes:
        loss_type: ``"cross_entropy"``, ``"mse"`` or ``"bce"``.
        shift_labels: causal LM: the logits at position ``t`` are scored against ``labels[t + 1]``.
        honours_num_items: the model divides its summed loss by ``num_items_in_batch`` when given it.
        pad_token_id: for decoder sequence classifiers, which pool the last non-padding position.
        head: the module name of the output layer whose output the loss reads (a user's spec; None: the
            model's own output head, or the layer measured).
        labels: the batch key that holds the targets.
        pool_last_token: a sequence classifier that scores every position and pools the last non-padding one
            (transformers' decoder classifiers).
        logit_scale: the loss reads ``logit_scale · z``, ``z`` the head's output (Cohere's ``config.logit_scale``,
            Granite's ``1 / config.logits_scaling``); read from the model's config only. The closed forms take
            ``s·z = W (s·φ)``: the head's input scaled with it (:meth:`scaled`).
    """

    loss_type: str
    shift_labels: bool = False
    honours_num_items: bool = False
    pad_token_id: int | None = None
    head: str | None = None
    labels: str = "labels"
    pool_last_token: bool = False
    logit_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"HeadLoss: loss_type={self.loss_type!r} is not one of {', '.join(map(repr, LOSS_TYPES))}")

    def scaled(self, output: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's output and input as the loss sees them: ``(s·z, s·φ)``, so that ``s·z = W (s·φ)`` (a head
        without a bias; :func:`head_loss_for` reads ``s`` for causal LMs only, whose heads have none)."""
        if self.logit_scale == 1:
            return output, features
        return output * self.logit_scale, features * self.logit_scale

    def aligned(self, labels: torch.Tensor, batch: Mapping[str, Any]) -> tuple[torch.Tensor, HeadLoss]:
        """The targets the loss scores and the spec that reads them: a causal LM's loss takes the batch's
        ``shift_labels`` as they are (already aligned with the logits, as transformers' context parallelism passes
        them) in place of shifting ``labels``."""
        if self.shift_labels and torch.is_tensor(batch.get("shift_labels")):
            return batch["shift_labels"], dataclasses.replace(self, shift_labels=False)
        return labels, self

    def positions(
        self,
        logits: torch.Tensor,
        features: torch.Tensor,
        labels: torch.Tensor,
        *,
        input_ids: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flatten the head's outputs to the positions the loss sees, with the loss's weight of each.

        Args:
            logits: the head's output, ``(B, d)``, ``(B, T, d)`` (LM, or a decoder classifier before pooling).
            features: the head's input, same leading shape with ``m`` instead of ``d``.
            labels: the batch's labels: ``(B, T)`` token ids, ``(B,)`` classes, ``(B,)``/``(B, C)`` targets.
            input_ids: needed to pool a decoder classifier's last non-padding token.
            num_items_in_batch: the denominator the model used, when it was passed one.

        Returns:
            ``logits: (N, d)``, ``features: (N, m)``, ``weights: (N,)`` with ``Σ_t weights_t ℓ_t`` equal
            to the model's loss (ignored positions weigh 0; no host synchronisation).
        """
        if self.shift_labels:
            labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        elif self.pool_last_token and logits.dim() == 3:  # a sequence classifier that scored every position
            logits, features = self._pool_last_token(logits, features, input_ids)
        d, dtype = logits.shape[-1], torch.promote_types(logits.dtype, torch.float32)
        logits, features = logits.reshape(-1, d), features.reshape(-1, features.shape[-1])
        if self.loss_type == "cross_entropy":
            counted = (labels.reshape(-1) != IGNORE_INDEX).to(dtype)
            if self.honours_num_items and num_items_in_batch is not None:
                denominator = torch.as_tensor(num_items_in_batch, device=counted.device, dtype=dtype)
            else:
                denominator = counted.sum().clamp_min(1)  # an all-ignored batch contributes 0, not NaN
            return logits, features, counted / denominator
        # MSE and BCE average over every element: (examples × outputs)
        weights = torch.full((logits.shape[0],), 1.0 / logits.numel(), device=logits.device, dtype=dtype)
        return logits, features, weights

    def _pool_last_token(self, logits, features, input_ids):
        # mirrors transformers' GenericForSequenceClassification
        batch = torch.arange(logits.shape[0], device=logits.device)
        if self.pad_token_id is None or input_ids is None:
            last = torch.full_like(batch, logits.shape[1] - 1)
        else:
            non_pad = (input_ids != self.pad_token_id).to(logits.device, torch.int32)
            token_indices = torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32)
            last = (token_indices * non_pad).argmax(-1)
        return logits[batch, last], features[batch, last]


def head_loss_for(model: nn.Module, labels: torch.Tensor | None = None) -> HeadLoss | None:
    """The :class:`HeadLoss` of ``model``'s own loss, or None when it is not one the closed form mirrors.

    ``labels`` (optional) settles a classifier's ``problem_type`` when the config leaves it unset, by
    transformers' rule: one label → regression; integer labels → single-label; else multi-label.
    """
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    # FSDP2's fully_shard swaps in a subclass ("FSDPGPT2LMHeadModel"): look through the MRO
    names = {cls.__name__ for cls in type(model).__mro__}
    if config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(c, attr, None) is not None for c in (config, text_config) for attr in _LOGIT_CAPS):
        return None
    scale = _logit_scale(text_config if _logit_scale(text_config) != 1 else config)
    if names & _CAUSAL_LMS or any(name.endswith("ForCausalLM") for name in names):
        return HeadLoss("cross_entropy", shift_labels=True, honours_num_items=True, logit_scale=scale)
    if scale != 1:
        return None  # a classifier whose logits are rescaled: none known
    if names & _SEQUENCE_CLASSIFIERS or any(name.endswith("ForSequenceClassification") for name in names):
        problem = config.problem_type
        if problem is None:
            if config.num_labels == 1:
                problem = "regression"
            elif labels is None or labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        loss_type = {
            "regression": "mse",
            "single_label_classification": "cross_entropy",
            "multi_label_classification": "bce",
        }[problem]
        return HeadLoss(loss_type, pad_token_id=getattr(config, "pad_token_id", None), pool_last_token=True)
    return None


# How a model rescales around its head, by model_type, where it is not Cohere's `logit_scale` (× the logits) or
# Granite's `logits_scaling` (÷ the logits): the same attribute means different things in different models.
# "input÷" divides the head's *input*, which its hook reads already divided (nothing for the closed form on the logits
# to undo), but which the fused head, reading the backbone's output, does not see.
_HEAD_SCALINGS: dict[str, tuple[str, str]] = {
    "falcon_h1": ("lm_head_multiplier", "logits×"),
    "hyperclovax": ("logits_scaling", "logits×"),
    "minicpm3": ("logits_scaling", "input÷"),
}


def _logit_scale(config) -> float:
    """The factor a model multiplies its head's output by before the loss (1: none): ``logit_scale`` times
    ``1 / logits_scaling``, or as :data:`_HEAD_SCALINGS` says for the model's type."""
    scale = getattr(config, "logit_scale", None)
    scale = float(1.0 if scale is None else scale)
    attribute, how = _HEAD_SCALINGS.get(getattr(config, "model_type", None), ("logits_scaling", "logits÷"))
    factor = getattr(config, attribute, None)
    if factor is None or how == "input÷":
        return scale
    return scale * float(factor) if how == "logits×" else scale / float(factor)


def head_input_rescaled(model: nn.Module) -> bool:
    """Whether ``model``'s head reads the backbone's last hidden state rescaled (MiniCPM3), which a loss formed from
    that hidden state (the fused LM head) would have to mirror."""
    config = getattr(unwrap_model(model), "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return _HEAD_SCALINGS.get(getattr(text_config, "model_type", None), ("", ""))[1] == "input÷"


def as_head_loss(spec: HeadLoss | str | None) -> HeadLoss | None:
    """A user's ``head_loss=``: a :class:`HeadLoss`, or the name of its loss type (``"cross_entropy"``, ``"mse"``,
    ``"bce"``: the layer measured is the output layer and the batch's ``"labels"`` are its targets), or None."""
    if isinstance(spec, HeadLoss) and spec.logit_scale != 1:
        raise ValueError(
            f"HeadLoss(logit_scale={spec.logit_scale}) is read from a model's config (Cohere, Granite), not given; for "
            "a loss on a rescaled output, name the layer whose output the loss reads as it is: head=NAME"
        )
    if spec is None or isinstance(spec, HeadLoss):
        return spec
    if isinstance(spec, str):
        return HeadLoss(spec)
    raise TypeError(
        f"head_loss={spec!r}: expected a HeadLoss (e.g. HeadLoss('cross_entropy', head='fc3', labels='y')) or one "
        f"of {', '.join(map(repr, LOSS_TYPES))}"
    )


def head_loss_value(head_loss: HeadLoss, logits: torch.Tensor, labels: torch.Tensor, **positions) -> torch.Tensor:
    """The loss ``head_loss`` says the model computes, from the head's ``logits`` and the batch's ``labels`` (what the
    closed form assumes; compared with the loss actually computed, it catches a spec that does not describe it)."""
    logits, _, weights = head_loss.positions(logits, logits[..., :1], labels, **positions)
    logits = logits.to(weights.dtype)
    if head_loss.shift_labels:
        labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    if head_loss.loss_type == "cross_entropy":
        targets = labels.reshape(-1)
        per_position = nn.functional.cross_entropy(logits, targets.clamp_min(0), reduction="none")
    else:
        targets = labels.reshape(logits.shape).to(logits.dtype)
        loss = nn.functional.mse_loss if head_loss.loss_type == "mse" else nn.functional.binary_cross_entropy_with_logits
        per_position = loss(logits, targets, reduction="none").sum(-1)
    return (weights * per_position).sum()


LossFn = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]
"""``loss_fn(model, batch) -> scalar loss``: how a model that does not compute its own loss is measured."""

_LOSS_FN_EXAMPLE = "loss_fn=lambda model, batch: F.cross_entropy(model(batch['x']), batch['y'])"


def call_model(model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``model(**batch)`` read as ``(loss, logits)``: from a transformers ``ModelOutput`` or a plain dict (keys
    ``"loss"``, ``"logits"``), or a tensor (the logits, no loss). Either may be None."""
    try:
        outputs = model(**batch)
    except TypeError as error:
        if "unexpected keyword argument" not in str(error) and "missing" not in str(error):
            raise
        raise TypeError(
            f"{type(model).__name__}(**batch) failed ({error}); a model that does not take the batch's keys "
            f"({', '.join(map(repr, batch))}) as keyword arguments is measured through a loss function: {_LOSS_FN_EXAMPLE}"
        ) from error
    if isinstance(outputs, torch.Tensor):
        return None, outputs
    if isinstance(outputs, Mapping):
        return outputs.get("loss"), outputs.get("logits")
    raise TypeError(
        f"{type(model).__name__} returned a {type(outputs).__name__}; fam_hf reads a ModelOutput, a dict with "
        f"'loss' (and 'logits'), or a logits tensor. Pass the loss: {_LOSS_FN_EXAMPLE}"
    )


def model_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The default ``loss_fn``: the ``loss`` of ``model(**batch)`` (a transformers model given its labels, or any
    model returning a dict with ``"loss"``)."""
    loss, logits = call_model(model, batch)
    if loss is None:
        returned = f"a tensor of shape {tuple(logits.shape)}" if logits is not None else "no 'loss'"
        raise ValueError(
            f"{type(model).__name__} returned {returned} and no loss: give the batch its labels (a transformers "
            f"model computes its loss from them), or pass the loss as a function of the model and the batch: "
            f"{_LOSS_FN_EXAMPLE}"
        )
    return loss

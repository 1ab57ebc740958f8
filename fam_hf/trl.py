"""FAM, SAM and Flat-LoRA inside TRL's ``SFTTrainer``: ``FAMSFTConfig`` / ``FAMSFTTrainer``, ``SAMSFTConfig`` /
``SAMSFTTrainer``, ``FlatLoRASFTConfig`` / ``FlatLoRASFTTrainer``.

Needs the ``trl`` extra (``pip install 'fam_hf[trl]'``; tested with trl 1.16): without trl, importing this
module raises :class:`~fam_hf.extras.MissingExtraError` with that command. ``import fam_hf`` never imports it.

``SFTTrainer`` computes its loss with a *fused* LM head (``model(**inputs, fused_lm_head=True)``: the hidden
states times ``lm_head.weight``, in chunks, no logits), so ``lm_head``'s forward never runs in training.
``FAMSFTTrainer`` therefore takes κ of the LM head from the head's input (:class:`fam_hf.flatness.HeadInputFlatness`:
the backbone's last hidden state, at the positions the loss counts, assistant-only / completion-only masks,
packing and padding-free batches included) and never asks TRL for the logits (which would cost an extra
no-grad full-logits forward per step). Under ``loss_type="dft"`` (each token's loss weighed by its own detached
probability) κ is weighed the same way. The probe and exact estimators need a second derivative through the
loss, which TRL's fused kernel does not have: they are refused while the loss goes through the fused head.
With ``compute_loss_func`` or label smoothing, TRL computes the loss from the full logits and FAM behaves as
in ``FAMTrainer`` (the probe).

When the penalty trains (λ > 0), ``FAMSFTTrainer`` computes TRL's loss itself, on fam_hf's fused LM-head kernel
(:class:`fam_hf.flatness.FusedHeadFlatness`: the loss, κ and the gradient of ``L + λκ`` in one chunked pass; no
TRL private API), and logs TRL's ``entropy``, ``mean_token_accuracy`` and ``num_tokens`` from the same pass; with
λ = 0 the step is ``SFTTrainer``'s own.

``FlatLoRASFTTrainer`` perturbs the adapted layers as :class:`~fam_hf.FlatLoRATrainer` does; TRL's fused LM head
never runs the head module, so a trainable LM head (full fine-tuning) is left unperturbed there (a warning says so).

``SAMSFTTrainer``'s second pass (at ``w + ε̂``) runs ``SFTTrainer.compute_loss`` again; TRL's metrics
(``num_tokens``, ``entropy``, ``mean_token_accuracy``) keep the first pass's values only.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from .config import FAMFields
from .extras import require
from .flat_lora_config import FlatLoRAFields
from .flat_lora_trainer import FlatLoRAMixin
from .layers import output_head_name
from .sam_config import SAMFields
from .sam_trainer import SAMMixin
from .trainer import FAMMixin

trl = require("trl", "fam_hf.trl (FAMSFTTrainer, SAMSFTTrainer, FlatLoRASFTTrainer)")
SFTConfig, SFTTrainer = trl.SFTConfig, trl.SFTTrainer
from trl.trainer.utils import get_config_model_id  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = [
    "FAMSFTConfig",
    "FAMSFTTrainer",
    "FlatLoRASFTConfig",
    "FlatLoRASFTTrainer",
    "SAMSFTConfig",
    "SAMSFTTrainer",
]


@dataclass
class FAMSFTConfig(FAMFields, SFTConfig):
    """Training arguments for :class:`FAMSFTTrainer`: every ``trl.SFTConfig`` field, with TRL's defaults, plus
    the ``fam_*`` fields of :class:`~fam_hf.config.FAMFields`."""


def sft_output_dir(model) -> str:
    """``output_dir`` of the config built when ``args`` is None: ``SFTTrainer``'s (``<model name>-SFT``)."""
    name = model if isinstance(model, str) else get_config_model_id(model.config)
    return f"{name.split('/')[-1]}-SFT"


class FAMSFTTrainer(FAMMixin, SFTTrainer):
    """``trl.SFTTrainer`` whose training loss is ``L + λ·κ`` (:class:`~fam_hf.trainer.FAMMixin`), with κ of the
    LM head computed from the fused head's input. Takes exactly what ``SFTTrainer`` takes, with ``args`` a
    :class:`FAMSFTConfig` (``None``, an ``SFTConfig`` or a ``TrainingArguments`` becomes one, with the ``fam_*``
    defaults)."""

    fam_config_class = FAMSFTConfig
    default_output_dir = staticmethod(sft_output_dir)
    _tag_names = [*SFTTrainer._tag_names, "fam"]

    def fam_loss_kind(self) -> str:
        # SFTTrainer.compute_loss: the fused head, unless the loss needs the full logits
        if self.compute_loss_func is not None or (self.label_smoother is not None and self.args.loss_type == "nll"):
            return "custom"
        return "fused"

    def fam_estimator_options(self) -> dict:
        # DFT weighs each token's loss by its own detached probability: the head-input closed form weighs it too
        return {"loss_type": self.args.loss_type} if self.fam_loss_kind() == "fused" else {}

    _fam_fused_mirrors = SFTTrainer

    def _fam_fused_applies(self, inputs):
        # SFTTrainer's own fused path only: not with MoE auxiliary losses (super()), not DeepSpeed sequence parallelism
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        parallel = parallelism is not None and parallelism.sp_backend == "deepspeed" and parallelism.sp_enabled
        return super()._fam_fused_applies(inputs) and not parallel

    def _fam_fused_forward_kwargs(self):
        return {**super()._fam_fused_forward_kwargs(), "use_cache": False}  # as SFTTrainer.compute_loss sets it

    def _fam_fused_loss(self, recording, lam, kappa_grad, inputs, norm):
        # SFTTrainer.compute_loss on its fused head (trl 1.16), with the loss, entropy and token accuracy from the
        # kernel's pass: the summed per-token loss over num_items_in_batch (else the counted tokens, at least 1),
        # times the world size under token averaging
        head = recording.fused(lam, kappa_grad=kappa_grad, metrics=True)
        scale = norm.scale(True)
        loss = head.loss if scale == 1 else head.loss * scale
        gather = self.accelerator.gather_for_metrics
        num_valid = gather(torch.as_tensor(head.entropy.shape[0], device=head.loss.device)).sum()
        entropy_sum = gather(head.entropy.sum()).sum()
        num_correct = gather(head.is_top1.sum()).sum()
        metrics = self._metrics["train"]
        metrics["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        metrics["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
        if "attention_mask" in inputs:
            tokens = gather(inputs["attention_mask"].sum()).sum().item()
        elif "position_ids" in inputs:
            local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
            tokens = gather(local).sum().item()
        else:
            raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
        self._total_train_tokens += tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        return loss


@dataclass
class SAMSFTConfig(SAMFields, SFTConfig):
    """Training arguments for :class:`SAMSFTTrainer`: every ``trl.SFTConfig`` field, with TRL's defaults, plus
    the ``sam_*`` fields of :class:`~fam_hf.sam_config.SAMFields`."""


class SAMSFTTrainer(SAMMixin, SFTTrainer):
    """``trl.SFTTrainer`` stepping with SAM's (or ASAM's) gradient (:class:`~fam_hf.sam_trainer.SAMMixin`).
    Takes exactly what ``SFTTrainer`` takes, with ``args`` a :class:`SAMSFTConfig` (``None``, an ``SFTConfig`` or a
    ``TrainingArguments`` becomes one, with the ``sam_*`` defaults)."""

    sam_config_class = SAMSFTConfig
    default_output_dir = staticmethod(sft_output_dir)
    _tag_names = [*SFTTrainer._tag_names, "sam"]

    @contextlib.contextmanager
    def _sam_second_pass(self):
        # SFTTrainer.compute_loss appends entropy/token accuracy and adds to the token count on every call
        metrics = {key: list(values) for key, values in self._metrics["train"].items()}
        tokens = self._total_train_tokens
        try:
            yield
        finally:
            self._metrics["train"].clear()
            self._metrics["train"].update(metrics)
            self._total_train_tokens = tokens


@dataclass
class FlatLoRASFTConfig(FlatLoRAFields, SFTConfig):
    """Training arguments for :class:`FlatLoRASFTTrainer`: every ``trl.SFTConfig`` field, with TRL's defaults, plus
    the ``flat_lora_*`` fields of :class:`~fam_hf.flat_lora_config.FlatLoRAFields`."""


class FlatLoRASFTTrainer(FlatLoRAMixin, SFTTrainer):
    """``trl.SFTTrainer`` training on ``L(W + ε)`` (:class:`~fam_hf.flat_lora_trainer.FlatLoRAMixin`). Takes exactly
    what ``SFTTrainer`` takes, with ``args`` a :class:`FlatLoRASFTConfig` (``None``, an ``SFTConfig`` or a
    ``TrainingArguments`` becomes one, with the ``flat_lora_*`` defaults)."""

    flat_lora_config_class = FlatLoRASFTConfig
    default_output_dir = staticmethod(sft_output_dir)
    _tag_names = [*SFTTrainer._tag_names, "flat-lora"]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        head = output_head_name(self.model)
        if any(layer.name == head for layer in self.flat_lora.layers):
            logger.warning(
                "Flat-LoRA: '%s' trains, but SFTTrainer's fused LM head never runs the head module, so its weight is "
                "not perturbed (the other layers are); freeze it or train with FlatLoRATrainer to perturb it",
                head,
            )

    def flat_lora_layer_names(self) -> list[str]:
        head = output_head_name(self.model)  # the fused loss never runs it, so its hook never adds ε φ
        return [name for name in super().flat_lora_layer_names() if name != head]

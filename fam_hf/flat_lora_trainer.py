"""``FlatLoRAMixin``: Flat-LoRA's random weight perturbation in front of any ``Trainer`` subclass;
``FlatLoRATrainer``: ``FlatLoRAMixin`` + ``transformers.Trainer``.

One Flat-LoRA step (Li et al., ICML 2025) on the step's batch:

    ε ~ N(0, σ_t² ‖w_s‖² / m) per entry of every perturbed layer's merged weight;   w ← optimizer step with ∇L(w + ε).

The cost is one plain step plus, per perturbed layer, one product with ``ε`` forward and one backward and two
draws of ``ε`` (:mod:`fam_hf.perturbation`): no second pass (SAM's), no copy of the weights.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from .flat_lora_config import FlatLoRAConfig, FlatLoRAFields
from .hub import HubCardMixin
from .perturbation import PerturbedLayers, cosine_sigma, perturbed_layers
from .trainer_base import adopt_args, check_args, check_mixin_order, fix_sequence_classifier_loss, trainer_output_dir

logger = logging.getLogger(__name__)


class FlatLoRAMixin(HubCardMixin):
    """Flat-LoRA (random weight perturbation of the merged weights), in front of any :class:`transformers.Trainer`
    subclass.

    ``class MyTrainer(FlatLoRAMixin, SomeTrainer)`` with ``args`` a dataclass that mixes in
    :class:`~fam_hf.flat_lora_config.FlatLoRAFields`. It overrides ``training_step`` (the forward and backward of
    each micro-batch run with the step's noise) and ``log`` (``flat_lora/sigma``), each calling ``super()``.

    Which layers: every LoRA-adapted layer (the merged ``W0 + s·B·A``) and every other linear layer whose weight
    trains (full fine-tuning; a head in ``modules_to_save``): :func:`fam_hf.perturbation.perturbed_layers`. The
    noise of step ``t`` is a function of (``flat_lora_seed`` or ``seed``, ``t``, layer) only, so the micro-batches
    of a step, the DDP ranks and a resumed run all draw the same; ``k`` micro-batches of ``b`` give the step of one
    batch of ``k·b``. The weights are never written: after the step they are the unperturbed ones plus the
    optimizer's update, bit for bit. ``loss`` is logged at ``w + ε`` (the objective trained).

    Sequence classifiers' loss is averaged as in :class:`~fam_hf.FAMTrainer` (``model_accepts_loss_kwargs = False``
    for them). Saving or pushing writes a model card (:class:`~fam_hf.hub.HubCardMixin`) with the ``flat-lora`` and
    ``random-weight-perturbation`` tags, the ``flat_lora_*`` settings, the seed, the perturbed layers and the logged
    ``σ_t``.

    **Distributed**: DDP and ZeRO-1/2 (every rank holds the whole weights). **FSDP2** (``fully_shard``; Trainer's
    default FSDP): the row scales are taken from the sharded weights at the start of each micro-batch's step
    (the merged weight formed on the shards, its row norms gathered), so each rank adds the same full ``ε`` to its
    own micro-batch's forward as one process would; the weights are never written, so nothing sharded is
    perturbed or restored. Refused: FSDP1 (``fsdp_config={"version": 1}``: its flattened shards have no rows
    outside the forward; use version 2) and DeepSpeed ZeRO-3 (the same for its partitioned parameters; use
    ZeRO-2 or FSDP2).
    """

    args: FlatLoRAFields
    # What args=None, or a config of a class it extends, becomes; None: args must already carry the flat_lora_* fields.
    flat_lora_config_class: type | None = None
    default_output_dir = staticmethod(trainer_output_dir)  # where args=None trains: Trainer's

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_mixin_order(cls, FlatLoRAMixin)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        args, kwargs = adopt_args(
            type(self), self.flat_lora_config_class, (args, kwargs), self.default_output_dir, "flat_lora"
        )
        super().__init__(*args, **kwargs)
        check_args(self, FlatLoRAFields, self.flat_lora_config_class, "flat_lora")
        self.args.check_flat_lora_fields()
        _check_sharding(self)
        fix_sequence_classifier_loss(self)
        self._flat_lora_setup(self.model)

    def _flat_lora_setup(self, model: nn.Module) -> None:
        """The perturbed layers of ``model`` and the noise seed, from ``self.args``: at construction, and again when
        ``train()`` builds a new model from ``model_init`` (each hyperparameter-search trial with its settings)."""
        previous = getattr(self, "flat_lora", None)
        if previous is not None:  # the hooks of the model (or trial) this one replaces
            previous.remove()
        self.flat_lora = PerturbedLayers(perturbed_layers(model))
        self.flat_lora_noise_seed = self.args.seed if self.args.flat_lora_seed is None else self.args.flat_lora_seed
        logger.info(
            "Flat-LoRA: σ=%g (%s) on %d layers", self.args.flat_lora_sigma, self.args.flat_lora_schedule,
            len(self.flat_lora.layers),
        )  # fmt: skip

    def call_model_init(self, trial=None) -> nn.Module:
        model = super().call_model_init(trial)
        if getattr(self, "flat_lora", None) is not None:  # train() re-creating the model: the noise follows it
            self._flat_lora_setup(model)
        return model

    def _hp_search_setup(self, trial) -> None:
        # Trainer.train sets a trial's hyperparameters after building its model: σ, the schedule, the seed follow
        super()._hp_search_setup(trial)
        if trial is not None and self.hp_search_backend is not None:
            self.args.check_flat_lora_fields()
            self._flat_lora_setup(self.model)

    def flat_lora_layer_names(self) -> list[str]:
        """The names of the layers whose output gets ``ε φ`` (the model card lists them)."""
        return [layer.name for layer in self.flat_lora.layers]

    def flat_lora_sigma_at(self, step: int) -> float:
        """``σ_t`` at optimizer step ``step``: the cosine schedule over ``state.max_steps``, or constant."""
        cfg = self.args
        if cfg.flat_lora_schedule == "constant":
            return cfg.flat_lora_sigma
        return cosine_sigma(cfg.flat_lora_sigma, step, self.state.max_steps)

    def training_step(
        self, model: nn.Module, inputs: dict[str, torch.Tensor | Any], num_items_in_batch=None
    ) -> torch.Tensor:
        step = self.state.global_step
        with self.flat_lora.active(self.flat_lora_noise_seed, step, self.flat_lora_sigma_at(step)):
            return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs["flat_lora/sigma"] = self.flat_lora.sigma  # σ_t of the last step trained
        super().log(logs, start_time)


class FlatLoRATrainer(FlatLoRAMixin, Trainer):
    """:class:`FlatLoRAMixin` on :class:`transformers.Trainer`: takes exactly what ``Trainer`` takes, with ``args`` a
    :class:`~fam_hf.FlatLoRAConfig` (``None`` or a ``TrainingArguments`` becomes one, with the ``flat_lora_*``
    defaults). See :class:`FlatLoRAMixin` for what it adds."""

    flat_lora_config_class = FlatLoRAConfig


def _check_sharding(trainer: Trainer) -> None:
    """Raise ValueError for the sharding Flat-LoRA cannot take its row scales from: FSDP1 and ZeRO-3."""
    if trainer.is_fsdp_enabled and not getattr(trainer.accelerator, "is_fsdp2", False):
        raise ValueError(
            f"{type(trainer).__name__} takes each perturbed layer's row norms from its weights before the forward "
            "pass; FSDP1 keeps them as flattened shards with no rows there. Use FSDP2: fsdp_config={'version': 2} "
            "(Trainer's default), or fsdp_version: 2 in the accelerate config"
        )
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if trainer.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3:
        raise ValueError(
            f"{type(trainer).__name__} takes each perturbed layer's row norms from its weights before the forward "
            "pass; DeepSpeed ZeRO-3 keeps them as flat partitions with no rows there. Use ZeRO-1/2, or FSDP2 "
            "(fsdp_config={'version': 2})"
        )

"""``FAMMixin``: what FAM adds to a ``Trainer`` (any subclass); ``FAMTrainer``: ``FAMMixin`` + ``Trainer``."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from .config import FAMConfig, FAMFields
from .flatness import FusedHeadFlatness, HeadInputFlatness, LossNorm, RelativeFlatness, choose
from .hub import HubCardMixin
from .penalty import FAMPenalty
from .trainer_base import (
    adopt_args,
    check_args,
    check_mixin_order,
    fix_sequence_classifier_loss,
    trainer_output_dir,
)

logger = logging.getLogger(__name__)

FAM_STATE_NAME = "fam_state.pt"  # written into every checkpoint folder


class FAMMixin(HubCardMixin):
    """Relative Flatness Aware Minimization, in front of any :class:`transformers.Trainer` subclass.

    ``class MyTrainer(FAMMixin, SomeTrainer)`` with ``args`` a dataclass that mixes in
    :class:`~fam_hf.config.FAMFields` (``@dataclass class MyConfig(FAMFields, SomeConfig)``). It overrides
    ``compute_loss`` (the penalty), ``training_step`` (kernels with the derivatives a second-order estimator
    needs), ``log`` (the ``fam/*`` metrics) and the RNG checkpointing (the probe RNG), each calling ``super()``;
    the model card and the Hub push come from :class:`~fam_hf.hub.HubCardMixin`. Placed after a ``Trainer``
    subclass in the bases it would be bypassed: that is a TypeError when the class is defined.

    During training, each micro-batch's loss becomes ``L + λ_t · κ``, where κ is the relative flatness of
    ``args.fam_layer`` on that micro-batch, normalised exactly as the loss is (mean, or sum over
    ``num_items_in_batch`` under gradient accumulation and multi-device token averaging), so that
    accumulated and all-reduced penalties equal κ of the whole batch. κ comes from the same forward
    pass as ``L``: the layer's input and output are captured with a hook.

    One training micro-batch: :meth:`compute_loss` builds the :class:`~fam_hf.flatness.LossNorm` of this
    micro-batch (:meth:`fam_loss_norm`), records the forward pass with ``self.flatness`` (the estimator chosen
    for a penalty under this trainer's loss: :meth:`fam_loss_kind`), lets the wrapped trainer compute its loss,
    asks the recording for κ, and hands both to ``self.fam_penalty`` (:class:`~fam_hf.penalty.FAMPenalty`),
    which returns the loss with the penalty and keeps the metrics that :meth:`log` reports.

    Evaluation and prediction are untouched. Logged with ``loss``, averaged the same way:
    ``fam/kappa``, ``fam/penalty`` (``λ_t·κ`` as added to the loss), ``fam/task_loss`` (``loss`` without the
    penalty), ``fam/lambda``, ``fam/kappa_stderr`` (probe estimator with ≥ 2 probes) and ``fam/skipped``
    (penalties dropped because κ was not finite).
    """

    args: FAMFields
    # What args=None, or a config of a class it extends, becomes (Trainer and TRL's trainers accept both); None:
    # args must already carry the fam_* fields.
    fam_config_class: type | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_mixin_order(cls, FAMMixin)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        args, kwargs = adopt_args(type(self), self.fam_config_class, (args, kwargs), self.default_output_dir, "fam")
        super().__init__(*args, **kwargs)
        check_args(self, FAMFields, self.fam_config_class, "fam")
        self._fam_setup(self.model)

    def _fam_setup(self, model: nn.Module) -> None:
        """The estimator and the penalty for ``model`` under ``self.args``: at construction, and again each time
        ``train()`` builds a new model with ``model_init`` (a hyperparameter search may have set new ``fam_*``)."""
        cfg = self.args
        cfg.check_fam_fields()  # __post_init__ does it only where FAMFields comes first in the config's bases
        fix_sequence_classifier_loss(self, model)
        if getattr(self, "flatness", None) is not None:
            self.flatness.close()
        seed = cfg.seed if cfg.fam_seed is None else cfg.fam_seed
        self.flatness: RelativeFlatness = self._fam_flatness(torch.Generator().manual_seed(seed), model)
        layer = self.flatness.layer
        self.fam_penalty = FAMPenalty(cfg, layer.name, logs_stderr=self.flatness.reports_stderr and cfg.fam_probes > 1)
        if getattr(self, "fam_fused", None) is not None:
            self.fam_fused.close()
        self.fam_fused: FusedHeadFlatness | None = self._fam_fused_head(model)
        if self.fam_penalty.trains and cfg.fam_hessian_grad == "detached" and not layer.weight().requires_grad:
            raise ValueError(
                f"fam_hessian_grad='detached' holds the Hessian constant, so the penalty's gradient flows only through "
                f"the weight of '{layer.name}', which is frozen: the penalty would train nothing. Use "
                "fam_hessian_grad='full' (its gradient reaches the layers that feed the head, adapters included), "
                "or penalise a trainable layer"
            )
        if self.is_deepspeed_enabled and self.flatness.second_order:
            raise ValueError(
                f"fam_estimator='{self.flatness.estimator}' takes torch.autograd.grad through the model, and DeepSpeed "
                "runs its gradient reduction at the end of every backward pass, that one included (and ZeRO-3 frees "
                "the weights it differentiates through); put FAM on the output head with the closed form (verified "
                "under ZeRO-2 and ZeRO-3), or train with DDP"
            )
        self._fam_refuse_liger()
        logger.info(
            "FAM: λ=%s on layer '%s' (%s), estimator %s",
            cfg.fam_lambda if cfg.fam_lambda_relative is None else f"{cfg.fam_lambda_relative:g}·L₀/κ₀",
            layer.name,
            layer.kind,
            self.flatness.description or self.flatness.estimator,
        )

    def call_model_init(self, trial=None) -> nn.Module:
        model = super().call_model_init(trial)
        if getattr(self, "fam_penalty", None) is not None:  # train() re-creating the model: FAM follows it
            self._fam_setup(model)
        return model

    def _hp_search_setup(self, trial) -> None:
        # Trainer.train sets a trial's hyperparameters after building its model: FAM follows them (fam_lambda …)
        super()._hp_search_setup(trial)
        if trial is not None and self.hp_search_backend is not None:
            self._fam_setup(self.model)

    default_output_dir = staticmethod(trainer_output_dir)  # where args=None trains: Trainer's

    def _fam_refuse_liger(self) -> None:
        # Trainer applies liger's kernels when train() starts; refused here, before a step is taken.
        if not self.args.use_liger_kernel:
            return
        fused_ce = (self.args.liger_kernel_config or {}).get("fused_linear_cross_entropy", True)  # liger's default
        if fused_ce and self.fam_loss_kind() != "fused":
            raise ValueError(
                "use_liger_kernel=True replaces the model's LM head and loss by liger's fused linear cross-entropy, "
                f"which never runs '{self.flatness.layer.name}' nor forms the logits, and has no second derivative: "
                "FAM could not see the loss it penalises. Keep liger's other kernels with "
                "liger_kernel_config={'fused_linear_cross_entropy': False}, or use fam_hf.trl.FAMSFTTrainer (TRL "
                "turns that kernel off and FAM takes κ from the head's input)"
            )
        if self.flatness.second_order:
            raise ValueError(
                f"fam_estimator='{self.flatness.estimator}' differentiates the loss twice through the model, and "
                "liger's Triton kernels (RMSNorm, RoPE, SwiGLU) have no second derivative; turn use_liger_kernel off, "
                "or put FAM on the output head with the closed form"
            )

    def fam_loss_kind(self) -> str:
        """What this trainer's training loss is, for the choice of estimator: ``"model"`` (the model's own loss
        through its head), ``"custom"`` (``compute_loss_func`` or label smoothing: only the probe mirrors it) or
        ``"fused"`` (a loss that never runs the head module; TRL's SFTTrainer)."""
        return "custom" if self.compute_loss_func is not None or self.label_smoother is not None else "model"

    def fam_estimator_options(self) -> dict[str, Any]:
        """Options of the estimator that only this trainer's loss determines (``FAMSFTTrainer``: the fused loss's
        ``loss_type``); none for the model's own loss."""
        return {}

    def _fam_wants_outputs(self) -> bool:
        # Gauss–Newton differentiates the logits and the closed form checks it saw the loss's logits. Free from
        # the model's own loss (Trainer returns what the model returned); from a trainer whose loss never forms
        # them (TRL's) an extra no-grad forward, so asked for there only when the estimator needs them.
        return self.flatness.needs_logits or self.fam_loss_kind() == "model"

    def _fam_flatness(self, generator: torch.Generator, model: nn.Module) -> RelativeFlatness:
        """The estimator of κ of ``model`` under this trainer's loss (:func:`fam_hf.flatness.registry.choose`, for a
        penalty)."""
        cfg = self.args
        options = dict(
            probes=cfg.fam_probes,
            hessian_grad=cfg.fam_hessian_grad,
            scale=cfg.fam_scale,
            generator=generator,
            token_fraction=cfg.fam_token_fraction,
            **self.fam_estimator_options(),
        )
        estimator = choose(
            model, cfg.fam_layer, cfg.fam_estimator, options, purpose="penalty", loss=self.fam_loss_kind()
        )
        return estimator(model, cfg.fam_layer, cfg.fam_estimator, **options)

    def fam_loss_norm(self, num_items_in_batch: torch.Tensor | int | None) -> LossNorm:
        """How ``Trainer`` normalises this micro-batch's loss (its own rules, ``transformers.Trainer.compute_loss``
        and ``training_step``), so that κ is normalised the same way."""
        average = self.args.average_tokens_across_devices
        if self.args.n_gpu > 1:
            world = self.args.n_gpu
        else:
            world = self.accelerator.num_processes // self.get_tp_size()
        return LossNorm(
            num_items_in_batch=num_items_in_batch,
            model_takes_items=bool(self.model_accepts_loss_kwargs),
            world_size=world if average else 1,
            accumulation_share=1.0
            if self._loss_is_scaled_for_ga(num_items_in_batch)
            else 1.0 / self.current_gradient_accumulation_steps,
        )

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        # Trainer.training_step divides the loss by the accumulation steps unless this holds. The class
        # attribute that overrides the rule came with transformers 5.19; before it, the rule alone decides.
        declared = getattr(self, "loss_is_scaled_for_ga", None)
        if declared is not None:
            return declared
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    # -- schedule (FAMPenalty's) -------------------------------------------------------------------------

    @property
    def fam_base_lambda(self) -> float | None:
        """λ from ``fam_lambda``, or as ``fam_lambda_relative`` set it at the first penalised step."""
        return self.fam_penalty.base_lambda

    @fam_base_lambda.setter
    def fam_base_lambda(self, value: float | None) -> None:
        self.fam_penalty.base_lambda = value

    def fam_lambda_at(self, step: int) -> tuple[float, float] | None:
        """``(λ_t, multiplier)`` at optimizer step ``step``, or None: :meth:`FAMPenalty.at`."""
        return self.fam_penalty.at(step)

    # -- loss -------------------------------------------------------------------------------------------

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        # forward, backward and any activation-checkpoint recomputation all see the same kernels
        with self.flatness.kernels(differentiable=self.fam_penalty.trains):
            return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        step = self.state.global_step
        if model.training:
            self.fam_penalty.seen(step)
        schedule = self.fam_penalty.at(step) if model.training else None
        if schedule is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.fam_fused is not None and not return_outputs and self._fam_fused_applies(inputs):
            return self._fam_fused_compute_loss(model, inputs, num_items_in_batch)
        if self.flatness.draws_probes:
            self._fam_probes_of_step(step)
        batch = {key: inputs.get(key) for key in ("labels", "shift_labels", "input_ids")}  # super() may pop labels
        want_outputs = return_outputs or self._fam_wants_outputs()
        norm = self.fam_loss_norm(num_items_in_batch)
        with self.flatness.record(batch, norm=norm, differentiable=schedule[0] > 0) as recording:
            loss = super().compute_loss(model, inputs, want_outputs, num_items_in_batch)
        loss, outputs = loss if want_outputs else (loss, None)
        result = recording.result(loss, logits=outputs.get("logits") if isinstance(outputs, dict) else None)
        loss = self.fam_penalty.add(loss, result, step, norm, self.accelerator)
        return (loss, outputs) if return_outputs else loss

    def _fam_probes_of_step(self, step: int) -> None:
        # Every micro-batch of an optimizer step draws the step's probes: for fixed probes the estimate is linear in
        # the loss, so k micro-batches of b then give the estimate of one batch of k·b (as the ranks of DDP do).
        generator = self.flatness.generator
        if getattr(self, "_fam_probe_step", None) != step:
            self._fam_probe_step, self._fam_probe_state = step, generator.get_state()
        else:
            generator.set_state(self._fam_probe_state)

    # -- the fused LM-head loss ---------------------------------------------------------------------------

    def _fam_fused_head(self, model: nn.Module) -> FusedHeadFlatness | None:
        """The estimator that computes the loss and κ of a causal LM's head in one pass
        (:class:`~fam_hf.flatness.FusedHeadFlatness`), where the penalty trains on that head with the closed form and
        the loss is one it reproduces; else None (κ is computed beside the trainer's own loss)."""
        cfg = self.args
        if not self.fam_penalty.trains or self.flatness.estimator != "closed_form" or not self.fam_fuse_head:
            return None
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return None  # FSDP and ZeRO-3 gather the head's weight only inside its forward, which the kernel skips
        # only where _fam_fused_loss reproduces the loss that super().compute_loss would compute
        if getattr(super().compute_loss, "__func__", None) is not self._fam_fused_mirrors.compute_loss:
            return None
        kind = self.fam_loss_kind()
        if FusedHeadFlatness.refusal(model, self.flatness.layer, loss=kind) is not None:
            return None
        return FusedHeadFlatness(
            model, cfg.fam_layer, "closed_form", hessian_grad=cfg.fam_hessian_grad, scale=cfg.fam_scale,
            generator=self.flatness.generator, token_fraction=cfg.fam_token_fraction,
            draw_over_grid=not isinstance(self.flatness, HeadInputFlatness), **self.fam_estimator_options(),
        )  # fmt: skip

    fam_fuse_head = True  # False: κ beside the trainer's own loss, as with λ = 0 (comparisons, benchmarks)
    _fam_fused_mirrors = Trainer  # the trainer whose compute_loss _fam_fused_loss reproduces

    def _fam_fused_applies(self, inputs: dict[str, Any]) -> bool:
        """Whether this micro-batch's loss is the fused kernel's: the model's own cross-entropy on its labels and
        nothing else. Not with a mixture of experts' router auxiliary loss (``config.output_router_logits``), which
        the model adds only when it computes the loss itself."""
        if inputs.get("labels") is None and inputs.get("shift_labels") is None:
            return False
        config = getattr(self.accelerator.unwrap_model(self.model), "config", None)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return not getattr(text_config, "output_router_logits", False)

    def _fam_fused_compute_loss(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch) -> torch.Tensor:
        """``L + λ·κ`` of a micro-batch from one pass of the fused LM-head kernel: the model runs to its last hidden
        state, the kernel forms the loss (:meth:`_fam_fused_loss` normalises it as the trainer's own), κ and the
        gradients of both (docs/architecture.md, "One training step, traced")."""
        step = self.state.global_step
        lam, multiplier = self.fam_penalty.at(step)
        calibrating = self.fam_penalty.base_lambda is None  # fam_lambda_relative: λ comes from this pass's κ
        norm = self.fam_loss_norm(num_items_in_batch)
        batch = {key: inputs.get(key) for key in ("labels", "shift_labels", "input_ids")}
        forward = {key: value for key, value in inputs.items() if key not in ("labels", "shift_labels")}
        with self.fam_fused.record(batch, norm=norm) as recording:
            model(**forward, **self._fam_fused_forward_kwargs())
        loss = self._fam_fused_loss(recording, 0.0 if calibrating else lam * multiplier, calibrating, inputs, norm)
        return self.fam_penalty.add(loss, recording.result(loss), step, norm, self.accelerator)

    def _fam_fused_forward_kwargs(self) -> dict[str, Any]:
        """Added to the model's inputs (without labels) on the fused path: what the trainer's own forward passes
        beyond the batch, and ``logits_to_keep`` selecting no position."""
        return self.fam_fused.forward_kwargs()

    def _fam_fused_loss(self, recording, lam: float, kappa_grad: bool, inputs: dict[str, Any], norm: LossNorm):
        """The trainer's loss from the fused kernel: ``Trainer.compute_loss`` on a causal LM (the model's
        cross-entropy, divided by ``num_items_in_batch`` when the model takes it, times the world size under token
        averaging)."""
        takes_items = bool(self.model_accepts_loss_kwargs)
        loss = recording.fused(lam, kappa_grad=kappa_grad, loss_takes_items=takes_items).loss
        scale = norm.scale(takes_items)
        return loss if scale == 1 else loss * scale

    # -- checkpoints ------------------------------------------------------------------------------------

    def _save_rng_state(self, output_dir: str) -> None:
        # The probe RNG travels with Trainer's own RNG states so a resumed run draws the same probes.
        super()._save_rng_state(output_dir)
        if self.args.should_save:
            state = {"probe_rng": self.flatness.generator.get_state(), "base_lambda": self.fam_penalty.base_lambda,
                     "skipped": self.fam_penalty.skipped}  # fmt: skip
            torch.save(state, os.path.join(output_dir, FAM_STATE_NAME))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        path = None if checkpoint is None else os.path.join(checkpoint, FAM_STATE_NAME)
        if path is not None and os.path.isfile(path):
            state = torch.load(path, weights_only=True)
            self.flatness.generator.set_state(state["probe_rng"])
            if self.args.fam_lambda_relative is not None and state.get("base_lambda") is not None:
                self.fam_penalty.base_lambda = state["base_lambda"]  # as calibrated at the run's first step
            self.fam_penalty.skipped = state.get("skipped", 0)  # the run's count as of its last log before saving
        elif path is not None and self.flatness.draws_probes:
            logger.warning("FAM: %s has no %s; the resumed run draws different probes", checkpoint, FAM_STATE_NAME)

    # -- logging ----------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Every rank logs at the same steps, so the mean over processes is safe here (as for `loss`).
        self.fam_penalty.log(logs, self.accelerator, self.state.global_step)
        if "train_runtime" in logs:  # Trainer's last log of a train() call
            self.fam_penalty.finish(logs, self.accelerator)
        super().log(logs, start_time)


class FAMTrainer(FAMMixin, Trainer):
    """:class:`FAMMixin` on :class:`transformers.Trainer`: takes exactly what ``Trainer`` takes, with ``args`` a
    :class:`~fam_hf.FAMConfig` (``None`` or a ``TrainingArguments`` becomes one, with the ``fam_*`` defaults). See
    :class:`FAMMixin` for what it adds."""

    fam_config_class = FAMConfig

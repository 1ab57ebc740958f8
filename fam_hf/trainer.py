"""``FAMMixin``: what FAM adds to a ``Trainer`` (any subclass); ``FAMTrainer``: ``FAMMixin`` + ``Trainer``."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from .config import FAMFields
from .flatness import RelativeFlatness, penalty_estimator
from .hub import HubCardMixin
from .trainer_base import MetricSums, check_args, check_mixin_order, fix_sequence_classifier_loss

logger = logging.getLogger(__name__)

FAM_STATE_NAME = "fam_state.pt"  # written into every checkpoint folder


class FAMMixin(HubCardMixin):
    """Relative Flatness Aware Minimization, in front of any :class:`transformers.Trainer` subclass.

    ``class MyTrainer(FAMMixin, SomeTrainer)`` with ``args`` a dataclass that mixes in
    :class:`~fam_hf.config.FAMFields` (``@dataclass class MyConfig(FAMFields, SomeConfig)``). It overrides
    ``compute_loss`` (the penalty), ``training_step`` (attention kernels with a double backward, for the probe),
    ``log`` (the ``fam/*`` metrics) and the RNG checkpointing (the probe RNG), each calling ``super()``; the
    model card and the Hub push come from :class:`~fam_hf.hub.HubCardMixin`. Placed after a ``Trainer`` subclass in the bases it would be bypassed: that is a TypeError when
    the class is defined.

    During training, each micro-batch's loss becomes ``L + λ_t · κ``, where κ is the relative flatness of
    ``args.fam_layer`` on that micro-batch, normalised exactly as the loss is (mean, or sum over
    ``num_items_in_batch`` under gradient accumulation and multi-device token averaging), so that
    accumulated and all-reduced penalties equal κ of the whole batch. κ comes from the same forward
    pass as ``L``: the layer's input and output are captured with a hook.

    Evaluation and prediction are untouched. Logged with ``loss``, averaged the same way:
    ``fam/kappa``, ``fam/penalty`` (``λ_t·κ`` as added to the loss), ``fam/task_loss`` (``loss`` without the
    penalty), ``fam/lambda``, ``fam/kappa_stderr``
    (probe estimator with ≥ 2 probes) and ``fam/skipped`` (penalties dropped because κ was not finite).
    """

    args: FAMFields
    _fam_config_name = "FAMConfig"  # named in the error when args lack the fam_* fields
    # Whether compute_loss asks the wrapped trainer for its outputs (to check the closed form saw the loss's
    # logits). Free for Trainer; a trainer whose loss never forms the logits (TRL's) recomputes them for it.
    _fam_wants_outputs = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_mixin_order(cls, FAMMixin)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_args(self, FAMFields, self._fam_config_name, "fam")
        cfg = self.args
        cfg.check_fam_fields()  # __post_init__ does it only where FAMFields comes first in the config's bases
        fix_sequence_classifier_loss(self)
        seed = cfg.seed if cfg.fam_seed is None else cfg.fam_seed
        self.flatness = self._fam_flatness(torch.Generator().manual_seed(seed))
        layer = self.flatness.layer
        penalised = self._fam_penalised = cfg.fam_lambda > 0 or cfg.fam_lambda_relative is not None
        if penalised and cfg.fam_hessian_grad == "detached" and not layer.weight().requires_grad:
            raise ValueError(
                f"fam_hessian_grad='detached' holds the Hessian constant, so the penalty's gradient flows only through "
                f"the weight of '{layer.name}', which is frozen: the penalty would train nothing. Use "
                "fam_hessian_grad='full' (its gradient reaches the layers that feed the head, adapters included), "
                "or penalise a trainable layer"
            )
        if self.is_deepspeed_enabled and self.flatness.estimator != "closed_form":
            raise ValueError(
                f"fam_estimator='{self.flatness.estimator}' takes torch.autograd.grad through the model, and DeepSpeed "
                "runs its gradient reduction at the end of every backward pass, that one included (and ZeRO-3 frees "
                "the weights it differentiates through); put FAM on the output head with the closed form (verified "
                "under ZeRO-2 and ZeRO-3), or train with DDP"
            )
        self._fam_sums = MetricSums(("kappa", "penalty", "stderr", "skipped"))
        self._fam_steps = 0  # optimizer steps with a penalty since the last log
        self._fam_lambda = 0.0
        # λ from fam_lambda, or from fam_lambda_relative at the first penalised step (then saved in checkpoints)
        self.fam_base_lambda: float | None = cfg.fam_lambda if cfg.fam_lambda_relative is None else None
        self._fam_skipped = 0  # penalties dropped because κ was not finite, as of the last log
        self._fam_last_step = -1
        self._fam_warned_negative = False  # κ < 0 (an indefinite Hessian) is reported once
        logger.info(
            "FAM: λ=%s on layer '%s' (%s), estimator %s",
            cfg.fam_lambda if cfg.fam_lambda_relative is None else f"{cfg.fam_lambda_relative:g}·L₀/κ₀",
            self.flatness.layer.name,
            self.flatness.layer.kind,
            getattr(self.flatness, "description", self.flatness.estimator),
        )

    def _fam_flatness(self, generator: torch.Generator):
        """The estimator of κ for this trainer's loss (a subclass whose loss never runs the head picks another)."""
        cfg = self.args
        estimator = cfg.fam_estimator
        custom_loss = self.compute_loss_func is not None or self.label_smoother is not None
        if custom_loss and estimator in ("closed_form", "gauss_newton"):
            raise ValueError(
                f"fam_estimator='{estimator}' mirrors the model's own loss, but this Trainer computes its loss "
                "with compute_loss_func or label smoothing; use fam_estimator='probe' (or 'auto')"
            )
        if estimator == "auto":
            estimator = "probe" if custom_loss else penalty_estimator(self.model, cfg.fam_layer, cfg.fam_hessian_grad)
        return RelativeFlatness(
            self.model,
            cfg.fam_layer,
            estimator,
            probes=cfg.fam_probes,
            hessian_grad=cfg.fam_hessian_grad,
            scale=cfg.fam_scale,
            generator=generator,
            token_fraction=cfg.fam_token_fraction,
        )

    # -- schedule ---------------------------------------------------------------------------------------

    def fam_lambda_at(self, step: int) -> tuple[float, float] | None:
        """``(λ_t, multiplier)`` at optimizer step ``step``, or None when the lazy schedule skips it.

        ``λ_t = λ · min(1, (step + 1) / fam_warmup_steps)``; the penalty added is ``multiplier · λ_t · κ``
        with ``multiplier = fam_every_n_steps`` on the steps it runs (every k-th, starting at 0).
        """
        cfg = self.args
        if step % cfg.fam_every_n_steps:
            return None
        lam = self.fam_base_lambda if self.fam_base_lambda is not None else 1.0  # 1: not set yet (the first step)
        if cfg.fam_warmup_steps:
            lam *= min(1.0, (step + 1) / cfg.fam_warmup_steps)
        return lam, float(cfg.fam_every_n_steps)

    # -- loss -------------------------------------------------------------------------------------------

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        # forward, backward and any activation-checkpoint recomputation all see the same kernels
        with self.flatness.kernels(differentiable=self._fam_penalised):
            return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        schedule = self.fam_lambda_at(self.state.global_step) if model.training else None
        if schedule is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        lam, multiplier = schedule
        calibrating = self.fam_base_lambda is None  # fam_lambda_relative: λ comes from this micro-batch
        batch = {key: inputs.get(key) for key in ("labels", "shift_labels", "input_ids")}  # super() may pop labels
        want_outputs = return_outputs or self._fam_wants_outputs
        model_items = self._fam_loss_items(num_items_in_batch)
        with self.flatness.record(batch, num_items_in_batch=model_items, differentiable=lam > 0) as recording:
            loss = super().compute_loss(model, inputs, want_outputs, num_items_in_batch)
        loss, outputs = loss if want_outputs else (loss, None)
        result = recording.result(loss, logits=_logits(outputs))
        kappa = result.value
        if result.estimator in ("closed_form", "gauss_newton"):  # from the logits; the probe's from `loss`, scaled
            kappa = kappa * self._loss_scale(num_items_in_batch)
        # A non-finite κ (overflow) drops this micro-batch's penalty, value and gradient, without a host sync:
        # it is counted on the device and reported at the next log.
        finite = torch.isfinite(kappa.detach())
        kappa = torch.where(finite, kappa, torch.zeros_like(kappa))
        if calibrating:
            lam *= self._fam_calibrate(loss.detach(), kappa.detach())
        if lam > 0:
            loss = loss + (lam * multiplier * kappa).to(loss.dtype)
        self._fam_record(kappa.detach(), result.std_error, lam, multiplier, num_items_in_batch, skipped=~finite)
        return (loss, outputs) if return_outputs else loss

    def _fam_calibrate(self, loss: torch.Tensor, kappa: torch.Tensor) -> float:
        """``fam_lambda_relative``: ``λ = share · L₀ / κ₀`` from this micro-batch's loss and κ, averaged over the
        processes (every rank reaches its first penalised step together). One host synchronisation, once."""
        share = self.args.fam_lambda_relative
        both = self.accelerator.reduce(torch.stack([loss.float(), kappa.float()]), reduction="mean")
        loss_0, kappa_0 = both.tolist()
        if not (kappa_0 > 0 and loss_0 > 0 and math.isfinite(kappa_0 / loss_0)):
            raise ValueError(
                f"fam_lambda_relative={share:g} sets λ = share · L₀ / κ₀ at the first penalised step, but there "
                f"L₀ = {loss_0:.4g} and κ₀ = {kappa_0:.4g} on '{self.flatness.layer.name}' (both must be > 0); set "
                "fam_lambda directly"
            )
        self.fam_base_lambda = share * loss_0 / kappa_0
        logger.info("FAM: λ = %g · %.4g / %.4g = %.4g (fam_lambda_relative)", share, loss_0, kappa_0,
                    self.fam_base_lambda)  # fmt: skip
        return self.fam_base_lambda

    def _fam_loss_items(self, num_items_in_batch):
        """The denominator of the loss's sum over positions, when it is ``num_items_in_batch`` (else None: the
        loss is a mean over the micro-batch's counted positions)."""
        return num_items_in_batch if self.model_accepts_loss_kwargs else None

    def _loss_scale(self, num_items_in_batch) -> float:
        # Trainer.compute_loss multiplies the loss by the number of processes when it averages tokens
        # across devices (DDP then averages gradients); the penalty must be scaled the same way.
        if (
            self.args.average_tokens_across_devices
            and (self.model_accepts_loss_kwargs or self.compute_loss_func)
            and num_items_in_batch is not None
        ):
            return self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu
        return 1

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        # Trainer.training_step divides the loss by the accumulation steps unless this holds. The class
        # attribute that overrides the rule came with transformers 5.19; before it, the rule alone decides.
        declared = getattr(self, "loss_is_scaled_for_ga", None)
        if declared is not None:
            return declared
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    # -- checkpoints ------------------------------------------------------------------------------------

    def _save_rng_state(self, output_dir: str) -> None:
        # The probe RNG travels with Trainer's own RNG states so a resumed run draws the same probes.
        super()._save_rng_state(output_dir)
        if self.args.should_save:
            state = {"probe_rng": self.flatness.generator.get_state(), "base_lambda": self.fam_base_lambda}
            torch.save(state, os.path.join(output_dir, FAM_STATE_NAME))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        path = None if checkpoint is None else os.path.join(checkpoint, FAM_STATE_NAME)
        if path is not None and os.path.isfile(path):
            state = torch.load(path, weights_only=True)
            self.flatness.generator.set_state(state["probe_rng"])
            if self.args.fam_lambda_relative is not None and state.get("base_lambda") is not None:
                self.fam_base_lambda = state["base_lambda"]  # as calibrated at the run's first step
        elif path is not None and self.flatness.estimator == "probe":
            logger.warning("FAM: %s has no %s; the resumed run draws different probes", checkpoint, FAM_STATE_NAME)

    # -- logging ----------------------------------------------------------------------------------------

    def _fam_record(self, kappa, std_error, lam, multiplier, num_items_in_batch, skipped) -> None:
        step = self.state.global_step
        if step != self._fam_last_step:
            self._fam_steps += 1
            self._fam_last_step = step
        self._fam_lambda = lam
        # mirror what training_step does to the loss before it is summed into tr_loss
        share = (
            1.0 if self._loss_is_scaled_for_ga(num_items_in_batch) else 1.0 / self.current_gradient_accumulation_steps
        )
        stderr = torch.zeros_like(kappa) if std_error is None else torch.where(skipped, 0, std_error.to(kappa))
        kappa, stderr = kappa.float() * share, stderr.float() * share
        self._fam_sums.add(kappa=kappa, penalty=lam * multiplier * kappa, stderr=stderr, skipped=skipped.float())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._fam_sums:
            # Every rank logs at the same steps, so the mean over processes is safe here (as for `loss`).
            steps = self._fam_steps
            sums = self._fam_sums.reduce(self.accelerator, divide={"kappa": steps, "penalty": steps, "stderr": steps})
            means = {k: v / self.accelerator.num_processes for k, v in sums.items()}
            skipped = int(sums["skipped"])
            logs["fam/kappa"], logs["fam/penalty"] = means["kappa"], means["penalty"]
            logs["fam/task_loss"] = logs["loss"] - means["penalty"]  # the model's own loss, comparable across λ
            if self.flatness.estimator == "probe" and self.flatness.probes > 1:
                logs["fam/kappa_stderr"] = means["stderr"]
            logs["fam/lambda"] = self._fam_lambda
            if skipped:
                self._fam_skipped += skipped
                logger.warning(
                    "FAM: κ was not finite on %d micro-batches since the last log (%d in all); they trained without "
                    "the penalty",
                    skipped,
                    self._fam_skipped,
                )
            logs["fam/skipped"] = self._fam_skipped
            if means["kappa"] < 0 and not self._fam_warned_negative:
                self._fam_warned_negative = True
                logger.warning(
                    "FAM: κ of '%s' averaged %.4g < 0 over the last %d steps: the loss's Hessian w.r.t. this layer is "
                    "not positive semi-definite here (a layer inside the network, away from a minimum), and minimising "
                    "λ·κ then rewards negative curvature with no lower bound (in issue 13's study it drove κ to −3,000 "
                    "and the training loss below 0 at λ = 0.003). Use fam_estimator='gauss_newton' (κ ≥ 0 on any layer; "
                    "what 'auto' trains with under the model's own loss), penalise the output head (its closed form "
                    "is ≥ 0), or lower fam_lambda and watch fam/kappa and fam/task_loss",
                    self.flatness.layer.name,
                    means["kappa"],
                    steps,
                )
            self._fam_steps = 0
        super().log(logs, start_time)


def _logits(outputs: Any) -> torch.Tensor | None:
    if isinstance(outputs, dict):
        return outputs.get("logits")
    return None


class FAMTrainer(FAMMixin, Trainer):
    """:class:`FAMMixin` on :class:`transformers.Trainer`: takes exactly what ``Trainer`` takes, with ``args`` a
    :class:`~fam_hf.FAMConfig`. See :class:`FAMMixin` for what it adds."""

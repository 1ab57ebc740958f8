"""``FAMPenalty``: what ``λ_t · κ`` does to a micro-batch's loss, and what it logs; no ``Trainer`` in it.

A trainer hands it each training micro-batch's loss and κ (already in the loss's normalisation,
:class:`~fam_hf.flatness.LossNorm`) and, at each log, an accelerator to reduce over processes with. It owns the
schedule (warm-up, lazy steps), λ's calibration from ``fam_lambda_relative``, the finite check (a non-finite κ
drops that micro-batch's penalty, value and gradient) and the ``fam/*`` metrics
(docs/mathematics.md#batches).
"""

from __future__ import annotations

import logging
import math

import torch

from .flatness import FlatnessResult, LossNorm
from .trainer_base import MetricSums

logger = logging.getLogger(__name__)


class FAMPenalty:
    """The penalty ``λ_t · κ`` of one training run.

    Args:
        fields: the ``fam_*`` fields (a :class:`~fam_hf.FAMConfig` or any config that mixes in ``FAMFields``).
        layer: the penalised layer's name, for messages.
        logs_stderr: log ``fam/kappa_stderr`` (the probe's standard error, with two probes or more).

    Attributes:
        base_lambda: λ from ``fam_lambda``, or from ``fam_lambda_relative`` once calibrated (None until then).
    """

    def __init__(self, fields, layer: str, logs_stderr: bool = False) -> None:
        self.fields = fields
        self.layer = layer
        self.logs_stderr = logs_stderr
        self.base_lambda: float | None = fields.fam_lambda if fields.fam_lambda_relative is None else None
        self.sums = MetricSums(("kappa", "penalty", "skipped"))
        self.step_samples: list[torch.Tensor] = []  # per penalised step since the last log: its per-probe κ (P,)
        self.steps = 0  # optimizer steps with a penalty since the last log
        self.interval_start: int | None = None  # the first optimizer step since the last log (penalised or not)
        self.current_lambda = 0.0
        self.skipped = 0  # penalties dropped because κ was not finite, as of the last log
        self.micro_batches = 0  # penalised micro-batches in this process since the start
        self._last_step = -1
        self._warned_negative = False  # κ < 0 (an indefinite Hessian) is reported once

    @property
    def trains(self) -> bool:
        """Whether the penalty has a gradient (λ > 0 or set from the loss), not only a logged value."""
        return self.fields.fam_lambda > 0 or self.fields.fam_lambda_relative is not None

    def at(self, step: int) -> tuple[float, float] | None:
        """``(λ_t, multiplier)`` at optimizer step ``step``, or None when the lazy schedule skips it.

        ``λ_t = λ · min(1, (step + 1) / fam_warmup_steps)``; the penalty added is ``multiplier · λ_t · κ``
        with ``multiplier = fam_every_n_steps`` on the steps it runs (every k-th, starting at 0).
        """
        every, warmup = self.fields.fam_every_n_steps, self.fields.fam_warmup_steps
        if step % every:
            return None
        lam = self.base_lambda if self.base_lambda is not None else 1.0  # 1: not set yet (the first step)
        if warmup:
            lam *= min(1.0, (step + 1) / warmup)
        return lam, float(every)

    def seen(self, step: int) -> None:
        """Note a training micro-batch of optimizer step ``step``, penalised or not: the logged ``loss`` averages
        over every optimizer step since the last log, and so does ``fam/penalty``."""
        if self.interval_start is None:
            self.interval_start = step

    def add(self, loss: torch.Tensor, result: FlatnessResult, step: int, norm: LossNorm, accelerator) -> torch.Tensor:
        """``loss + multiplier · λ_t · κ`` for a micro-batch of optimizer step ``step`` (which :meth:`at` runs),
        with its metrics recorded. ``accelerator`` averages the first step's loss and κ over the processes
        when ``fam_lambda_relative`` sets λ."""
        lam, multiplier = self.at(step)
        kappa = result.value
        # A non-finite κ (overflow) drops this micro-batch's penalty, value and gradient, counted on the device and
        # reported at the next log. Dropping its graph takes a host synchronisation (Trainer's NaN filter already
        # takes one per micro-batch): masking the value alone would send a zero gradient into a graph whose local
        # derivatives overflowed too, and 0·inf is NaN in every gradient.
        finite = torch.isfinite(kappa.detach())
        if not finite:
            kappa = torch.zeros_like(kappa.detach())
        if self.base_lambda is None:  # fam_lambda_relative: λ comes from this micro-batch
            lam *= self.calibrate(loss.detach(), kappa.detach(), accelerator)
        if lam > 0:
            loss = loss + (lam * multiplier * kappa).to(loss.dtype)
        self._record(kappa.detach(), result.samples, lam, multiplier, step, norm, skipped=~finite)
        return loss

    def calibrate(self, loss: torch.Tensor, kappa: torch.Tensor, accelerator) -> float:
        """``fam_lambda_relative``: ``λ = share · L₀ / κ₀`` from this micro-batch's loss and κ, averaged over the
        processes (every rank reaches its first penalised step together), or 0 and λ left unset when the
        micro-batch counts no target on any process (both 0). One host synchronisation per call, until λ is set."""
        share = self.fields.fam_lambda_relative
        both = accelerator.reduce(torch.stack([loss.float(), kappa.float()]), reduction="mean")
        loss_0, kappa_0 = both.tolist()
        if loss_0 == 0 and kappa_0 == 0:  # a micro-batch that counts no target (all -100): the next one sets λ
            return 0.0
        if not (kappa_0 > 0 and loss_0 > 0 and math.isfinite(kappa_0 / loss_0)):
            raise ValueError(
                f"fam_lambda_relative={share:g} sets λ = share · L₀ / κ₀ at the first penalised step, but there "
                f"L₀ = {loss_0:.4g} and κ₀ = {kappa_0:.4g} on '{self.layer}' (both must be > 0); set "
                "fam_lambda directly"
            )
        self.base_lambda = share * loss_0 / kappa_0
        logger.info("FAM: λ = %g · %.4g / %.4g = %.4g (fam_lambda_relative)", share, loss_0, kappa_0,
                    self.base_lambda)  # fmt: skip
        return self.base_lambda

    def _record(self, kappa, samples, lam, multiplier, step, norm: LossNorm, skipped) -> None:
        new_step = step != self._last_step
        if new_step:
            self.steps += 1
            self._last_step = step
        self.micro_batches += 1
        self.current_lambda = lam
        # mirror what training_step does to the loss before it is summed into the logged loss
        share = norm.accumulation_share
        kappa = kappa.float() * share
        self.sums.add(kappa=kappa, penalty=lam * multiplier * kappa, skipped=skipped.float())
        if self.logs_stderr and samples is not None:
            # the step's micro-batches share its probes: its per-probe values add up, and its standard error is
            # theirs (adding the micro-batches' standard errors would overstate it)
            samples = torch.where(skipped, 0, samples.float()) * share
            if new_step or not self.step_samples:
                self.step_samples.append(samples)
            else:
                self.step_samples[-1] = self.step_samples[-1] + samples

    def log(self, logs: dict[str, float], accelerator, step: int) -> None:
        """Add the ``fam/*`` metrics to ``logs`` (which holds ``loss``, logged at optimizer step ``step``) when the
        penalty ran since the last log: ``fam/kappa`` (and, for the probe, ``fam/kappa_stderr``) averaged over the
        penalised steps, ``fam/penalty`` (what the penalty added to ``loss``) and ``fam/task_loss`` averaged as
        ``loss`` is, over every optimizer step since the last log, ``fam/lambda`` and ``fam/skipped``. One
        collective (two with ``fam/kappa_stderr``): every process must call it at the same steps (as ``Trainer``
        logs)."""
        if "loss" not in logs:
            return
        start, self.interval_start = self.interval_start, step  # the next interval starts at this step
        if not self.sums:
            return
        steps = self.steps
        interval = steps if start is None else max(step - start, steps)
        sums = self.sums.reduce(accelerator, divide={"kappa": steps, "penalty": interval})
        means = {k: v / accelerator.num_processes for k, v in sums.items()}
        skipped = int(sums["skipped"])
        logs["fam/kappa"], logs["fam/penalty"] = means["kappa"], means["penalty"]
        logs["fam/task_loss"] = logs["loss"] - means["penalty"]  # the model's own loss, comparable across λ
        if self.logs_stderr and self.step_samples:
            logs["fam/kappa_stderr"] = self._step_std_error(accelerator)
        logs["fam/lambda"] = self.current_lambda
        if skipped:
            self.skipped += skipped
            logger.warning(
                "FAM: κ was not finite on %d micro-batches since the last log (%d in all); they trained without "
                "the penalty",
                skipped,
                self.skipped,
            )
        logs["fam/skipped"] = self.skipped
        if means["kappa"] < 0 and not self._warned_negative:
            self._warned_negative = True
            logger.warning(
                "FAM: κ of '%s' averaged %.4g < 0 over the last %d steps: the loss's Hessian w.r.t. this layer is "
                "not positive semi-definite here (a layer inside the network, away from a minimum), and minimising "
                "λ·κ then rewards negative curvature with no lower bound (on MiniLM in this project's study, "
                "STUDY.md, it drove κ to −3,000 and the training loss below 0 at λ = 0.003). Use "
                "fam_estimator='gauss_newton' (κ ≥ 0 on any layer; what 'auto' trains with under the model's own "
                "loss), penalise the output head (its closed form is ≥ 0), or lower fam_lambda and watch fam/kappa "
                "and fam/task_loss",
                self.layer,
                means["kappa"],
                steps,
            )
        self.steps = 0

    def _step_std_error(self, accelerator) -> float:
        """The probe's standard error of one step's κ (over the processes and micro-batches that share the step's
        probes: the std of the summed per-probe values / √P), averaged over the steps since the last log. A second
        collective, at the same steps as the first."""
        samples = torch.stack(self.step_samples)  # (steps, P)
        self.step_samples = []
        samples = accelerator.reduce(samples, reduction="sum") / accelerator.num_processes
        return (samples.std(dim=1) / math.sqrt(samples.shape[1])).mean().item()

    def finish(self, logs: dict[str, float], accelerator) -> None:
        """At the end of training (``logs`` holds ``train_runtime``): add ``fam/skipped``, the penalties dropped in
        the whole run (the last log's count plus any since), and warn when there were any, so that a run shorter
        than ``logging_steps`` says it too. One collective, which every process reaches (as ``Trainer`` logs)."""
        pending = self.sums.reduce(accelerator)["skipped"] if self.sums else 0.0
        self.skipped += int(pending)
        self.steps, self.interval_start, self.step_samples = 0, None, []
        logs["fam/skipped"] = self.skipped
        if self.skipped:
            logger.warning(
                "FAM: the penalty on '%s' was dropped on %d of the run's %d penalised micro-batches (counted over "
                "every process) because κ was not finite (an overflow: half-precision weights or a diverging run); "
                "those trained on the loss alone. Lower the learning rate or train in bf16/float32 with the weights "
                "in float32",
                self.layer,
                self.skipped,
                accelerator.reduce(torch.tensor(self.micro_batches, device=accelerator.device), reduction="sum").item(),
            )

"""``SAMMixin``: SAM's (or ASAM's) optimizer step in front of any ``Trainer`` subclass; ``SAMTrainer``: ``SAMMixin``
+ ``transformers.Trainer``.

One SAM step (Foret, Kleiner, Mobahi, Neyshabur, ICLR 2021) on the step's batch:

    g = ∇L(w);   ε̂ = ρ g / ‖g‖  (SAM)   or   ε̂ = ρ T² g / ‖T g‖, T = |w| + η  (ASAM; Kwon et al., ICML 2021);
    w ← optimizer step with the gradient ∇L(w + ε̂), taken at w (the weights are restored first).

The perturbation is :func:`fam_hf.sam_sharpness`'s, so ``sam/sharpness`` here is that measure on the step's batch.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.training_args import OptimizerNames

from .hub import HubCardMixin
from .measures.sam import ascent_direction, ascent_norm
from .sam_config import SAMConfig, SAMFields
from .trainer_base import (
    MetricSums,
    adopt_args,
    check_args,
    check_mixin_order,
    fix_sequence_classifier_loss,
    trainer_output_dir,
)

logger = logging.getLogger(__name__)


class SAMMixin(HubCardMixin):
    """Sharpness-Aware Minimization (SAM, or adaptive SAM), in front of any :class:`transformers.Trainer` subclass.

    ``class MyTrainer(SAMMixin, SomeTrainer)`` with ``args`` a dataclass that mixes in
    :class:`~fam_hf.sam_config.SAMFields`; it overrides ``training_step`` and ``log`` and calls ``super()``
    (after a ``Trainer`` subclass in the bases it would be bypassed: a TypeError when the class is defined).
    A trainer whose ``compute_loss`` records metrics of its own (TRL's) keeps the first pass's only: see
    :meth:`_sam_second_pass`. Every optimizer step costs
    two forward and two backward passes per micro-batch:

    - **first pass**, on each micro-batch as Trainer hands it over: the loss at ``w`` and its gradient,
      accumulated in ``.grad`` over the step's micro-batches (scaled exactly as Trainer scales the loss, so it
      is the gradient of the whole step's batch). The micro-batch's inputs are kept (not its activations).
    - on the step's **last** micro-batch: ``ε̂`` from that accumulated gradient, ``w ← w + ε̂`` on the trainable
      parameters only (``requires_grad``; under PEFT, the adapters), ``.grad`` cleared, then the **second
      pass** over every kept micro-batch at ``w + ε̂``, accumulating ``∇L(w + ε̂)``; then ``w`` is restored
      bit for bit, and Trainer clips, steps the optimizer (and the GradScaler) with that gradient as usual.

    So ``k`` micro-batches of ``b`` give the same step as one batch of ``k·b``.

    **DDP**: the first pass runs under ``no_sync``, so each rank perturbs with its own local gradient (its
    share of the global batch), as in the SAM paper's m-sharpness (m = the per-rank batch) and common SAM
    implementations; it saves one all-reduce per step. The second pass is all-reduced as usual, so the ranks
    step with the same averaged gradient and stay in sync.

    **Mixed precision**: both passes go through ``accelerator.backward`` (the GradScaler under fp16); ``ε̂`` is
    computed in float32 from the first-pass gradient divided by the scaler's scale. If that gradient is not
    finite, the step is taken without perturbation (a plain step; the GradScaler then skips it if the
    gradient at ``w`` is not finite either), a warning is logged and ``sam/skipped`` counts it: no NaN is
    ever written into the weights. If it is exactly zero, there is no ascent direction and ``ε̂ = 0``.

    **Returned / logged loss**: ``training_step`` returns the first-pass loss (at ``w``), so ``loss`` is
    comparable with plain and FAM runs. Logged with it, averaged like it over steps and ranks: ``sam/rho``,
    ``sam/grad_norm`` (the ascent norm: ``‖g‖``, or ``‖T g‖`` under ASAM, of the first-pass gradient; per
    rank under DDP), ``sam/sharpness`` (``L(w + ε̂) − L(w)`` on the step's batch; ≈ ``ρ · sam/grad_norm`` for
    small ρ) and ``sam/skipped`` (steps taken without perturbation since the start, summed over ranks).

    Sequence classifiers return a per-micro-batch mean although Trainer takes their loss for one summed over
    ``num_items_in_batch``; as :class:`~fam_hf.FAMTrainer`, ``SAMTrainer`` sets ``model_accepts_loss_kwargs =
    False`` for them, so that the loss is averaged correctly under gradient accumulation.

    Not supported (refused in ``__init__``): DeepSpeed and FSDP (sharded parameters and gradients; DeepSpeed's
    backward also steps the optimizer), and the LOMO optimizers (their backward updates the weights).
    """

    args: SAMFields
    # What args=None, or a config of a class it extends, becomes; None: args must already carry the sam_* fields.
    sam_config_class: type | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_mixin_order(cls, SAMMixin)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        args, kwargs = adopt_args(type(self), self.sam_config_class, (args, kwargs), self.default_output_dir, "sam")
        super().__init__(*args, **kwargs)
        check_args(self, SAMFields, self.sam_config_class, "sam")
        self.args.check_sam_fields()  # __post_init__ does it only where SAMFields comes first in the config's bases
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                "SAMTrainer supports one device and DDP, not DeepSpeed or FSDP (SAM perturbs the full, unsharded "
                "parameters); launch with a DDP accelerate config such as configs/accelerate/multi_gpu.yaml"
            )
        if self.args.optim in (OptimizerNames.LOMO, OptimizerNames.ADALOMO):
            raise ValueError(
                f"optim={self.args.optim.value!r} updates the weights inside backward, before SAM's second pass; "
                "use an optimizer that steps after backward (e.g. adamw_torch, sgd)"
            )
        fix_sequence_classifier_loss(self)  # else k micro-batches would differ from one batch of k times the size
        self._sam_kept: list[tuple[dict[str, Any], torch.Tensor]] = []  # this step's inputs and first-pass losses
        self._sam_backup: list[tuple[nn.Parameter, torch.Tensor]] = []  # (parameter, its value at w)
        self._sam_skipped = 0
        self._sam_sums = MetricSums(("sharpness", "grad_norm", "steps"))  # since the last log
        logger.info("SAM: ρ=%g, %s", self.args.sam_rho, "adaptive (ASAM)" if self.args.sam_adaptive else "SAM")

    default_output_dir = staticmethod(trainer_output_dir)  # where args=None trains: Trainer's

    def _inner_training_loop(self, *args: Any, **kwargs: Any):
        # A (re)started loop (auto_find_batch_size's retry after an out-of-memory error, a train() after an
        # exception) starts its step afresh: the kept micro-batches of an interrupted step are not replayed.
        self._sam_kept = []
        return super()._inner_training_loop(*args, **kwargs)

    # -- one step ---------------------------------------------------------------------------------------

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """First pass on this micro-batch; on the step's last micro-batch, also perturb, run the second pass over
        all of the step's micro-batches and restore. Returns the loss at ``w`` (scaled as Trainer's)."""
        # Trainer already wraps all but the last micro-batch in no_sync; the last one's first pass must not
        # all-reduce either (each rank perturbs with its own gradient).
        with self.accelerator.no_sync(model):
            loss = super().training_step(model, dict(inputs), num_items_in_batch)
        self._sam_kept.append((inputs, loss))
        if not self.accelerator.sync_gradients:
            return loss  # not the step's last micro-batch: keep accumulating the first-pass gradient

        kept, self._sam_kept = self._sam_kept, []
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        epsilon_norm = self._sam_perturb(params)  # weights now at w + ε̂ (or w if skipped); .grad cleared
        try:
            with self._sam_second_pass():
                sharpness = torch.zeros((), device=loss.device, dtype=_compute_dtype(loss.dtype))
                for i, (micro_inputs, loss_at_w) in enumerate(kept):
                    # All-reduce (DDP) only with the step's last backward, as Trainer does for a plain step.
                    sync = contextlib.nullcontext() if i == len(kept) - 1 else self.accelerator.no_sync(model)
                    with sync:
                        loss_at_eps = super().training_step(model, dict(micro_inputs), num_items_in_batch)
                    sharpness += loss_at_eps - loss_at_w
        finally:
            self._sam_restore()
        if epsilon_norm is not None:
            self._sam_record(sharpness, epsilon_norm)
        return loss

    def _sam_second_pass(self):
        """Context around the second pass (at ``w + ε̂``). A trainer that records metrics in ``compute_loss``
        (TRL's token counts, entropy, token accuracy) overrides it to keep only the first pass's."""
        return contextlib.nullcontext()

    @torch.no_grad()
    def _sam_perturb(self, params: list[nn.Parameter]) -> torch.Tensor | None:
        """Move ``params`` to ``w + ε̂`` (ε̂ from their ``.grad``, the first-pass gradient) and clear ``.grad``.

        Returns the ascent norm (``‖g‖`` or ``‖T g‖``), or None when the step is taken without perturbation
        because that gradient is not finite. ε̂ is computed in float32 from the gradient divided by the
        GradScaler's scale (fp16), never from the scaled one (float64 parameters stay float64).
        """
        cfg = self.args
        scaler = getattr(self.accelerator, "scaler", None)
        inv_scale = 1.0 / scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
        dtype = _compute_dtype(*(p.dtype for p in params))

        def pairs():  # (unscaled gradient, weight) in the compute dtype, one parameter at a time
            for p in params:
                yield p.grad.to(dtype) * inv_scale, p.detach().to(dtype)

        norm = ascent_norm(pairs(), adaptive=cfg.sam_adaptive, eta=cfg.sam_eta)
        self._sam_backup = []
        if not torch.isfinite(norm).item():
            self._sam_skipped += 1
            logger.warning(
                "SAM: the first-pass gradient is not finite at step %d; this step is taken without perturbation "
                "(%d skipped so far)",
                self.state.global_step,
                self._sam_skipped,
            )
            norm = None
        elif norm > 0:  # at a stationary point there is no ascent direction: ε̂ = 0, as in sam_sharpness
            for p, (grad, weight) in zip(params, pairs()):
                direction = ascent_direction(grad, weight, adaptive=cfg.sam_adaptive, eta=cfg.sam_eta)
                self._sam_backup.append((p, p.detach().clone()))
                p.add_((direction * (cfg.sam_rho / norm)).to(p.dtype))
        for p in params:
            p.grad = None
        return norm

    @torch.no_grad()
    def _sam_restore(self) -> None:
        # Copy back rather than subtract ε̂: w + ε̂ − ε̂ is not w in floating point.
        for p, w in self._sam_backup:
            p.copy_(w)
        self._sam_backup = []

    # -- logging ----------------------------------------------------------------------------------------

    def _sam_record(self, sharpness: torch.Tensor, norm: torch.Tensor) -> None:
        norm = norm.detach().to(sharpness)
        self._sam_sums.add(sharpness=sharpness, grad_norm=norm, steps=torch.ones_like(norm))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            # Every rank logs at the same steps (as for `loss`), so the collective below is safe. Sums and counts
            # are reduced separately: a rank that skipped its perturbation recorded no sharpness for that step.
            total = self._sam_sums.reduce(self.accelerator, extra={"skipped": float(self._sam_skipped)})
            logs["sam/rho"] = self.args.sam_rho
            if total["steps"] > 0:
                logs["sam/grad_norm"] = total["grad_norm"] / total["steps"]
                logs["sam/sharpness"] = total["sharpness"] / total["steps"]
            logs["sam/skipped"] = int(total["skipped"])
        super().log(logs, start_time)


class SAMTrainer(SAMMixin, Trainer):
    """:class:`SAMMixin` on :class:`transformers.Trainer`: takes exactly what ``Trainer`` takes, with ``args`` a
    :class:`~fam_hf.SAMConfig` (``None`` or a ``TrainingArguments`` becomes one, with the ``sam_*`` defaults). See
    :class:`SAMMixin` for what it adds."""

    sam_config_class = SAMConfig


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or float64 when any of ``dtypes`` is (half-precision gradients are never used as they are)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32

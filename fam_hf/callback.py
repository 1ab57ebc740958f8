"""``FlatnessCallback``: log κ and other flatness measures on fixed probe batches while a Trainer trains.

Works with any ``transformers.Trainer`` (FAMTrainer or not)::

    callback = FlatnessCallback(train_batch, eval_batch, every_n_steps=50)
    trainer.add_callback(callback.attach(trainer))      # or FlatnessCallback(..., trainer=trainer)
    trainer.train()
    # trainer.state.log_history holds {"flatness/train/kappa": …, "flatness/eval/kappa": …, "flatness/gap": …}

With ``"hessian_spectrum"`` among the measures it also writes each measured spectrum as JSON in the trainer's
``output_dir`` (``spectrum-step{N}-{split}.json``), for ``fam-hf plot spectrum-step*-train.json --out DIR``.

How the numbers reach ``log_history`` and the ``report_to`` integrations: callbacks are not handed the
trainer, and ``Trainer.log`` appends a *copy* of ``logs`` to ``state.log_history`` before it calls
``on_log``, while the integration callbacks (TensorBoard, W&B, …) come before user callbacks in the list.
Adding keys to ``logs`` inside ``on_log`` would therefore reach neither. So the callback keeps a reference
to the trainer and calls ``trainer.log(metrics)`` itself, as TRL's ``WinRateCallback`` does: one
``log_history`` entry (with ``step`` and ``epoch``) per measurement, seen by every integration. (That
call clears ``control.should_log``; the callback restores it so the Trainer's own log of the step is kept.)

Distributed runs: the measures run no collective operation, and every rank would compute the same numbers
on the same probe batches, so only the main process (``state.is_world_process_zero``) computes and logs;
the other ranks wait for it at their next collective. (FSDP/ZeRO-3-sharded weights are refused by the
measures themselves.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .flatness import relative_flatness
from .measures import HessianSpectrum, hessian_spectrum, hessian_trace, jacobian_norm, sam_sharpness, top_eigenvalues

Batch = Mapping[str, Any]
DEFAULT_MEASURES = ("kappa", "hessian_trace", "top_eigenvalue")
MEASURES = ("kappa", "hessian_trace", "top_eigenvalue", "sam_sharpness", "jacobian_norm", "hessian_spectrum")


def logged_names(measures: Sequence[str], spectrum_top: int = 3) -> list[str]:
    """The names :func:`measure_batches` returns values under, in order: each measure's own name, but
    ``"hessian_spectrum"`` as ``spectrum_top1`` … ``spectrum_top{spectrum_top}`` (its largest Ritz values)."""
    names = []
    for name in measures:
        names += [f"spectrum_top{i}" for i in range(1, spectrum_top + 1)] if name == "hessian_spectrum" else [name]
    return names


def check_measures(measures: Sequence[str]) -> None:
    unknown = [m for m in measures if m not in MEASURES]
    if unknown:
        raise ValueError(f"unknown measure(s) {', '.join(map(repr, unknown))}; choose from {', '.join(MEASURES)}")


def measure_batches(
    model: nn.Module,
    batches: Sequence[Batch],
    measures: Sequence[str] = DEFAULT_MEASURES,
    *,
    layer: str = "auto",
    estimator: str = "auto",
    probes: int = 16,
    trace_probes: int = 64,
    trace_method: str = "hutchinson",
    scale: str = "paper",
    rho: float = 0.05,
    spectrum_top: int = 3,
    spectrum_runs: int = 4,
    spectrum_steps: int = 64,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    on_spectrum: Callable[[int, HessianSpectrum], None] | None = None,
) -> dict[str, list[float]]:
    """Each measure (and ``"loss"``, the model's mean loss) on each batch: ``{name: [value per batch]}``, with
    ``"hessian_spectrum"`` under ``spectrum_top1`` … (:func:`logged_names`).

    ``log`` (e.g. ``print``) is told what is being measured as it starts, with how long the last one took.
    ``on_spectrum(batch_index, spectrum)`` is handed each measured :class:`~fam_hf.measures.HessianSpectrum`.

    The model is run in eval mode and each module put back in its mode afterwards; batches are moved to its
    device; each measure draws its probes from a generator seeded with ``seed + i`` for the ``i``-th batch and
    the global torch RNG state is restored, so measuring does not change what a training run does next. See :class:`FlatnessCallback`
    for the measures and options.
    """
    check_measures(measures)
    if "hessian_spectrum" in measures and spectrum_top < 1:
        raise ValueError(f"spectrum_top={spectrum_top} must be at least 1 (the largest Ritz values logged)")

    def value(name: str, batch: Batch, index: int) -> dict[str, torch.Tensor]:
        # the same probes for a batch at every measurement (comparable over training), other probes for each batch
        # (their estimation errors average out over the batches instead of being shared)
        generator = torch.Generator().manual_seed(seed + index)
        if name == "kappa":
            return {name: relative_flatness(
                model, batch, layer, estimator, probes=probes, scale=scale, generator=generator
            ).value}  # fmt: skip
        if name == "hessian_trace":
            trace = hessian_trace(model, batch, layer, probes=trace_probes, method=trace_method, generator=generator)
            return {name: trace.value}
        if name == "top_eigenvalue":
            return {name: top_eigenvalues(model, batch, layer, k=1, generator=generator).sharpness}
        if name == "sam_sharpness":
            return {name: sam_sharpness(model, batch, layer, rho=rho).value}
        if name == "hessian_spectrum":
            spectrum = hessian_spectrum(
                model, batch, layer, runs=spectrum_runs, steps=spectrum_steps, generator=generator
            )
            if on_spectrum is not None:
                on_spectrum(index, spectrum)
            return dict(zip(logged_names([name], spectrum_top), spectrum.top(spectrum_top)))
        return {name: jacobian_norm(model, batch, probes=probes, generator=generator).value}

    device = next(model.parameters()).device
    modes = {module: module.training for module in model.modules()}
    values: dict[str, list[float]] = {name: [] for name in ("loss", *logged_names(measures, spectrum_top))}
    try:
        model.eval()
        # fork_rng: nothing here should draw from the global RNG, but a run must train identically either way
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for index, batch in enumerate(batches):
                batch = _to_device(batch, device)
                with torch.no_grad():
                    values["loss"].append(float(model(**batch).loss))
                for name in measures:
                    if log is not None:
                        log(f"batch {index + 1}/{len(batches)}: {name} …")
                    start = time.perf_counter()
                    measured = value(name, batch, index)
                    for key, number in measured.items():
                        values[key].append(float(number))
                    if log is not None:
                        shown = ", ".join(f"{key} = {float(number):.6g}" for key, number in measured.items())
                        log(f"batch {index + 1}/{len(batches)}: {shown} ({time.perf_counter() - start:.1f} s)")
    finally:
        for module, training in modes.items():
            module.training = training
    return values


class FlatnessCallback(TrainerCallback):
    """Compute flatness measures on fixed train and eval probe batches and log them through the Trainer.

    Args:
        train_batch: a collated batch (dict of tensors, labels included, so ``model(**batch).loss`` is the
            loss) or a list of them; measures are averaged over the list with equal weight per batch.
        eval_batch: the same for held-out data, or None (then no ``flatness/eval/*`` and no gap).
        measures: names from ``"kappa"`` (:func:`fam_hf.relative_flatness`), ``"hessian_trace"``,
            ``"top_eigenvalue"`` (``λ_max``), ``"sam_sharpness"`` (``L(w+ε̂) − L(w)``, radius ``rho``),
            ``"jacobian_norm"`` (input–output, w.r.t. input embeddings), ``"hessian_spectrum"`` (the eigenvalue
            density by stochastic Lanczos quadrature, :func:`fam_hf.measures.hessian_spectrum`: logged as its
            ``spectrum_top`` largest Ritz values, :meth:`~fam_hf.measures.HessianSpectrum.top`, and saved whole as
            JSON). The Hessian measures and SAM are taken w.r.t. ``layer``'s weight, so they describe the same
            matrix as κ.
        layer: the layer spec (``"auto"``: the output head); see :func:`fam_hf.resolve_layer`.
        every_n_steps: measure at every ``n``-th optimizer step (``global_step % n == 0``); None: never.
        on_evaluate: measure after each evaluation (``Trainer.evaluate``, in or outside training).
        estimator, probes, scale: for κ (see :func:`fam_hf.relative_flatness`); ``probes`` also sets the
            Jacobian projections.
        trace_probes: Hessian-vector products for the Hutchinson trace.
        trace_method: :func:`fam_hf.measures.hessian_trace`'s ``method``: ``"hutchinson"`` (default), or ``"auto"``,
            exact in closed form on an output head (one forward pass; on an LM head 0.26× a training step, where 64
            probes cost about 28 steps) and Hutchinson elsewhere.
        rho: SAM radius.
        spectrum_top: how many of the spectrum's largest Ritz values are logged (``spectrum_top1`` … ``spectrum_topk``;
            each the largest over the runs of the runs' ``i``-th largest, a lower bound on ``λ_i``).
        spectrum_runs, spectrum_steps: the spectrum's random starts and Lanczos steps per start (``runs`` and
            ``steps`` of :func:`fam_hf.measures.hessian_spectrum`; ``runs × steps`` Hessian-vector products).
        seed: every measurement draws its probes from a generator seeded with ``seed``, so repeated
            measurements of the same weights agree and the run's own RNG streams are untouched.
        trainer: the trainer to log through; or call :meth:`attach` later.

    Logged keys (one ``trainer.log`` call per measurement): ``flatness/{train,eval}/{measure}`` (for the spectrum
    ``flatness/{train,eval}/spectrum_top1`` … ``spectrum_top{k}``), ``flatness/{train,eval}/loss`` (the probe
    batches' mean loss) and ``flatness/gap`` = eval − train loss.

    Spectra: each measured spectrum is written (by the main process only) as
    ``{output_dir}/spectrum-step{N}-{split}.json`` (``…-{split}-batch{i}.json`` when a split has several batches),
    named ``"{split}, step {N}"`` for the legend: ``fam-hf plot OUT/spectrum-step*-train.json --out DIR`` overlays
    them (:meth:`~fam_hf.measures.HessianSpectrum.save`). :attr:`spectra` holds the last measurement's.

    The model is measured in eval mode (its mode is restored afterwards), its weights and ``.grad`` are not
    touched, and the global torch RNG state is restored, so a run trains identically with or without it.
    Cost per measurement: per batch, one forward pass for the loss plus each measure's own cost.
    """

    def __init__(
        self,
        train_batch: Batch | Sequence[Batch],
        eval_batch: Batch | Sequence[Batch] | None = None,
        *,
        measures: Sequence[str] = DEFAULT_MEASURES,
        layer: str = "auto",
        every_n_steps: int | None = None,
        on_evaluate: bool = True,
        estimator: str = "auto",
        probes: int = 16,
        trace_probes: int = 64,
        trace_method: str = "hutchinson",
        scale: str = "paper",
        rho: float = 0.05,
        spectrum_top: int = 3,
        spectrum_runs: int = 4,
        spectrum_steps: int = 64,
        seed: int = 0,
        trainer: Trainer | None = None,
    ) -> None:
        check_measures(measures)
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(
                f"every_n_steps={every_n_steps} must be at least 1 (or None to measure only at evaluation)"
            )
        self.batches = {"train": _as_list(train_batch), "eval": [] if eval_batch is None else _as_list(eval_batch)}
        if not self.batches["train"]:
            raise ValueError("train_batch is empty; pass a collated batch (a dict of tensors with labels) or a list")
        self.measures = tuple(measures)
        self.every_n_steps = every_n_steps
        self.measure_on_evaluate = on_evaluate
        if "hessian_spectrum" in self.measures and spectrum_top < 1:
            raise ValueError(f"spectrum_top={spectrum_top} must be at least 1 (the largest Ritz values logged)")
        self._options = dict(
            layer=layer, estimator=estimator, probes=probes, trace_probes=trace_probes, trace_method=trace_method,
            scale=scale, rho=rho,
            spectrum_top=spectrum_top, spectrum_runs=spectrum_runs, spectrum_steps=spectrum_steps, seed=seed,
        )  # fmt: skip
        self.trainer = trainer
        self.spectra: dict[str, list[HessianSpectrum]] = {}
        self._last_step: int | None = None

    def attach(self, trainer: Trainer) -> FlatnessCallback:
        """Log through ``trainer``; returns self, for ``trainer.add_callback(callback.attach(trainer))``."""
        self.trainer = trainer
        return self

    # -- measurement --------------------------------------------------------------------------------------

    def compute(self, model: nn.Module) -> dict[str, float]:
        """The logged metrics for ``model`` now, without logging them; the spectra measured go to :attr:`spectra`
        (``{split: [one per batch]}``)."""
        metrics: dict[str, float] = {}
        self.spectra = {}
        for split, batches in self.batches.items():
            if batches:
                kept = self.spectra.setdefault(split, []) if "hessian_spectrum" in self.measures else []
                values = measure_batches(
                    model, batches, self.measures, on_spectrum=lambda _, spectrum, kept=kept: kept.append(spectrum),
                    **self._options,
                )  # fmt: skip
                metrics.update({f"flatness/{split}/{name}": sum(v) / len(v) for name, v in values.items()})
        if "flatness/eval/loss" in metrics:
            metrics["flatness/gap"] = metrics["flatness/eval/loss"] - metrics["flatness/train/loss"]
        return metrics

    def _measure_and_log(self, state: TrainerState, model: nn.Module | None) -> None:
        if not state.is_world_process_zero or state.global_step == self._last_step:
            return  # a step measured already (e.g. every_n_steps and an evaluation at the same step)
        if self.trainer is None:
            raise RuntimeError(
                "FlatnessCallback has no trainer to log through; add it with "
                "trainer.add_callback(callback.attach(trainer)) or FlatnessCallback(..., trainer=trainer)"
            )
        self._last_step = state.global_step
        metrics = self.compute(model if model is not None else self.trainer.model)
        self.save_spectra(self.trainer.args.output_dir, state.global_step)
        # Trainer.log ends in CallbackHandler.on_log, which clears control.should_log: from on_step_end that
        # would swallow the Trainer's own `loss` log of this step, so the flag is put back.
        should_log = self.trainer.control.should_log
        self.trainer.log(metrics)
        self.trainer.control.should_log = should_log

    def save_spectra(self, output_dir: str | Path, step: int) -> list[Path]:
        """Write :attr:`spectra` as ``output_dir/spectrum-step{step}-{split}[-batch{i}].json``; returns the paths."""
        paths = []
        for split, spectra in self.spectra.items():
            for index, spectrum in enumerate(spectra):
                several = len(spectra) > 1
                suffix, label = (f"-batch{index}", f", batch {index}") if several else ("", "")
                path = Path(output_dir) / f"spectrum-step{step}-{split}{suffix}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                paths.append(spectrum.save(path, name=f"{split}, step {step}{label}"))
        return paths

    # -- Trainer events -----------------------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._last_step = None  # a new run (a second train(), a hyperparameter-search trial) measures its steps

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._last_step = None  # an evaluate() after training (of the best model, say) measures at the last step too

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self._measure_and_log(state, kwargs.get("model"))

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.measure_on_evaluate:
            self._measure_and_log(state, kwargs.get("model"))


def _as_list(batches: Batch | Sequence[Batch]) -> list[Batch]:
    batches = [batches] if isinstance(batches, Mapping) else list(batches)
    for batch in batches:
        if not isinstance(batch, Mapping):
            raise TypeError(f"a probe batch must be a collated batch (a dict of tensors), got {type(batch).__name__}")
        for key, value in batch.items():
            if isinstance(value, (list, tuple)):
                raise TypeError(
                    f"the probe batch's {key!r} is a {type(value).__name__}, not a tensor: pass a collated batch, e.g. "
                    "data_collator([dataset[i] for i in range(8)]), not dataset[:8]"
                )
    return batches


def _to_device(batch: Batch, device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

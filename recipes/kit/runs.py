"""What a recipe run measures and writes: fixed κ batches, the FAM settings, metrics JSON, a safe output dir.

A run starts with :func:`start_run`, measures κ and the loss on fixed batches before and after training
(:class:`FixedBatchKappa`), and ends with :func:`finish`: ``metrics.json``, ``fam_config.json``, the model and
the printed summary. ``study/run.py`` trains its baselines with :func:`as_config` and the same measurements.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

from fam_hf import FAMConfig
from fam_hf.model_card import resolved_fam_settings

logger = logging.getLogger(__name__)

KAPPA_SPLITS = ("train", "test")  # κ is reported on fixed batches of these splits


def start_run(script, args: FAMConfig) -> None:
    """Refuse a used ``output_dir`` (unless ``script.overwrite_output`` or a resumed run), then seed what is
    initialised before ``Trainer`` seeds (a new classifier head, LoRA matrices) with ``args.seed``."""
    from transformers import set_seed

    if args.push_to_hub and not getattr(script, "save_model", True):
        raise ValueError(
            "--push_to_hub true with --save_model false would create the Hub repository and upload nothing; "
            "save the model (--save_model true), or drop --push_to_hub"
        )
    for name in ("kappa_batches", "kappa_probes"):
        if getattr(script, name, 1) < 1:
            raise ValueError(f"--{name} {getattr(script, name)} must be at least 1 (κ is reported on fixed batches)")
    if isinstance(args.resume_from_checkpoint, str) and args.resume_from_checkpoint.lower() in ("true", "false"):
        raise ValueError(
            f"--resume_from_checkpoint {args.resume_from_checkpoint}: name the checkpoint folder, e.g. "
            "--resume_from_checkpoint OUTPUT_DIR/checkpoint-500"
        )
    check_output_dir(args.output_dir, script.overwrite_output, resuming=args.resume_from_checkpoint is not None)
    set_seed(args.seed)


def fixed_batches(dataset, collator, args: FAMConfig, count: int) -> list[dict[str, torch.Tensor]]:
    """The first ``count`` batches of ``dataset`` in order, so κ is measured on the same data every time."""
    size = args.per_device_eval_batch_size
    rows = [dataset[i] for i in range(min(len(dataset), count * size))]
    return [collator(rows[i : i + size]) for i in range(0, len(rows), size)]


@contextmanager
def model_loss(trainer) -> Iterator[None]:
    """Inside it ``trainer.evaluate`` reports the model's own loss, not the label-smoothed training objective.

    ``Trainer`` applies ``label_smoothing_factor`` in ``compute_loss``, evaluation included, so a held-out loss
    (and a perplexity taken from it) would carry ε times the mean −log p over all classes. With SmolLM2's 49k
    vocabulary that is large: a study run at ε = 0.005 reported test perplexity 44.2 against plain's 41.2, while
    the model's own loss on fixed test batches was plain's (3.732 vs 3.736 nats). Metrics from predictions
    (accuracy, F1) are unaffected either way.
    """
    smoother, trainer.label_smoother = trainer.label_smoother, None
    try:
        yield
    finally:
        trainer.label_smoother = smoother


def fixed_batch_measures(model, batches, args: FAMConfig, probes: int) -> dict[str, float]:
    """Mean loss and κ of ``args.fam_layer`` over ``batches`` in eval mode: ``{"loss": …, "kappa": …}``.

    κ with the config's layer, estimator and scale (``probes`` probes seeded with ``args.seed``); the loss is
    the model's own mean loss per batch, without dropout. Model mode and the global RNG state are restored afterwards.
    """
    from fam_hf.callback import measure_batches  # imports transformers' Trainer machinery: only when measuring

    values = measure_batches(
        model,
        batches,
        ("kappa",),
        layer=args.fam_layer,
        estimator=args.fam_estimator,
        probes=probes,
        scale=args.fam_scale,
        seed=args.seed,
    )
    return {name: float(np.mean(v)) for name, v in values.items()}


class FixedBatchKappa:
    """κ of ``args.fam_layer`` and the model's own loss on fixed train and test batches, at the start and the end.

    The batches are the first ``script.kappa_batches`` of each of :data:`KAPPA_SPLITS`, in order
    (:func:`fixed_batches`), measured in eval mode (:func:`fixed_batch_measures`, ``script.kappa_probes``
    probes), so the loss gap on them is test − train without dropout. Whatever trains the run, κ is that of
    ``args``' layer and estimator.
    """

    def __init__(self, splits, collator, args: FAMConfig, script) -> None:
        count = script.kappa_batches
        self.batches = {split: fixed_batches(splits[split], collator, args, count) for split in KAPPA_SPLITS}
        self.args, self.probes, self.count = args, script.kappa_probes, count
        self.measured: dict[str, dict[str, dict[str, float]]] = {}  # when ("start", "end") → split → measure

    def measure(self, when: str, model) -> None:
        """Measure ``model`` on every split's batches now, as ``when`` (``"start"`` or ``"end"``)."""
        self.measured[when] = {
            split: fixed_batch_measures(model, batches, self.args, self.probes)
            for split, batches in self.batches.items()
        }

    def metrics(self) -> dict[str, float]:
        """``kappa_train_start``, ``kappa_train_end``, ``loss_train_start`` … ``loss_test_end`` for ``metrics.json``."""
        start, end = self.measured["start"], self.measured["end"]
        return {
            f"{name}_{split}_{when}": value[split][name]
            for split in self.batches
            for name in ("kappa", "loss")
            for when, value in (("start", start), ("end", end))
        }

    def summary(self, layer: str) -> str:
        """The summary's κ line: train and test, start → end."""
        start, end = self.measured["start"], self.measured["end"]
        return (
            f"κ({layer}) on {self.count} fixed batches — train: {start['train']['kappa']:.4g} → "
            f"{end['train']['kappa']:.4g}; test: {start['test']['kappa']:.4g} → {end['test']['kappa']:.4g}"
        )


def flatness_callback(trainer, batches: dict[str, list], args: FAMConfig, script):
    """A :class:`~fam_hf.FlatnessCallback` on the fixed ``train``/``test`` batches, added to ``trainer``.

    Logs ``script.flatness_measures`` of ``args.fam_layer`` every ``script.flatness_every_n_steps`` optimizer
    steps and after each evaluation; None when the recipe asks for no measures.
    """
    if not script.flatness_measures:
        return None
    from fam_hf.callback import FlatnessCallback

    callback = FlatnessCallback(
        batches["train"],
        batches["test"],
        measures=script.flatness_measures,
        layer=args.fam_layer,
        every_n_steps=script.flatness_every_n_steps,
        trace_method=script.flatness_trace_method,
        estimator=args.fam_estimator,
        probes=script.kappa_probes,
        scale=args.fam_scale,
        seed=args.seed,
        trainer=trainer,
    )
    trainer.add_callback(callback)
    return callback


def as_config(args, config_class: type, **extra):
    """``config_class`` (a ``TrainingArguments`` subclass) with ``args``' TrainingArguments fields and ``extra``.

    The study trains its SAM baseline with ``as_config(fam_args, SAMConfig, sam_rho=0.05)``: every training
    setting (seed, steps, batch sizes, schedule) is the one the FAM and plain runs get.
    """
    from transformers import TrainingArguments

    shared = {f.name for f in fields(TrainingArguments) if f.init}
    return config_class(**{name: getattr(args, name) for name in shared}, **extra)


def fam_settings(trainer, script, args: FAMConfig | None = None) -> dict:
    """The FAM fields of the config, what they resolved to, and the recipe's own arguments: ``fam_config.json``.

    ``args``: the FAM config κ is measured with, used where the trainer is not a ``FAMTrainer`` (the study's SAM
    runs); a ``FAMTrainer`` records its own (the study's FAM-body runs train another layer than κ is measured on).
    The ``"fam"`` part is :func:`fam_hf.model_card.resolved_fam_settings`, what the model card shows.
    """
    return {"fam": resolved_fam_settings(trainer, args), "script": asdict(script)}


# An earlier run's outputs that this run may not write again (a full fine-tune after a LoRA one writes no adapter):
# left in place, `from_pretrained` and a push would take them with this run's.
PREVIOUS_RUN_FILES = (
    "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "model.safetensors",
    "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json", "model-*-of-*.safetensors",
    "pytorch_model-*-of-*.bin", "metrics.json", "fam_config.json", "trainer_state.json", "README.md",
)  # fmt: skip


def check_output_dir(output_dir: str, overwrite: bool, resuming: bool = False) -> None:
    """Refuse a non-empty ``output_dir`` unless ``overwrite`` (:func:`remove_previous_run` clears the earlier run's
    outputs once this one has trained and writes its own) or ``resuming`` (a checkpoint in it is continued)."""
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not (overwrite or resuming):
        raise FileExistsError(
            f"output_dir '{output_dir}' is not empty (an earlier run?); choose another --output_dir, or pass "
            "--overwrite_output true to write into it (or --resume_from_checkpoint to continue it)"
        )


def remove_previous_run(output_dir: str) -> list[str]:
    """Remove an earlier run's model, adapter, metrics, state and card from ``output_dir`` (:data:`PREVIOUS_RUN_FILES`;
    nothing else); returns their paths. Called just before a run writes its own, so a run that fails first (bad
    data, say) leaves the folder as it was."""
    removed = sorted({str(p) for pattern in PREVIOUS_RUN_FILES for p in Path(output_dir).glob(pattern) if p.is_file()})
    for path in removed:
        Path(path).unlink(missing_ok=True)  # every rank may get here: the first one removes it
    if removed:
        logger.info("--overwrite_output: removed the earlier run's %s", ", ".join(Path(p).name for p in removed))
    return removed


def write_json(folder: str, name: str, values: dict) -> None:
    with open(os.path.join(folder, name), "w") as f:
        json.dump(values, f, indent=2, default=str)


def save_run(trainer, script, args: FAMConfig, metrics: dict) -> dict:
    """Write a recipe's outputs into ``args.output_dir``; return its FAM settings (``fam_config.json``).

    ``trainer_state.json`` (the log history), ``metrics.json`` and ``fam_config.json`` first, then the model
    (or adapter) and tokenizer if ``script.save_model``: the model card (README.md) reads the files before it,
    and ``--push_to_hub`` uploads them all.
    """
    if getattr(script, "overwrite_output", False) and args.resume_from_checkpoint is None:
        if trainer.is_world_process_zero():
            remove_previous_run(args.output_dir)
    trainer.save_state()
    settings = fam_settings(trainer, script, args)
    if trainer.is_world_process_zero():
        write_json(args.output_dir, "metrics.json", metrics)
        write_json(args.output_dir, "fam_config.json", settings)
    if script.save_model:
        trainer.save_model(args.output_dir)
    return settings


def finish(trainer, script, args: FAMConfig, metrics: dict, kappa: FixedBatchKappa, held_out: str,
           saved: str = "model") -> dict:  # fmt: skip
    """A run's tail: κ and the loss on the fixed batches and the world size go into ``metrics``, which is saved
    with the rest (:func:`save_run`); the main process prints ``held_out`` (the recipe's scores), κ at start and
    end, and where the outputs are. ``saved``: what ``save_model`` wrote beside the tokenizer (model, adapter).
    Returns ``metrics``."""
    metrics.update(kappa.metrics())
    metrics["world_size"] = args.world_size
    settings = save_run(trainer, script, args, metrics)  # state, metrics, FAM settings, then the model
    if trainer.is_world_process_zero():
        files = f"{saved} + tokenizer (from_pretrained), " if script.save_model else ""
        pushed = f"; pushed to the Hub: {trainer.hub_model_id}" if args.push_to_hub and script.save_model else ""
        print(
            f"\n{held_out}\n{kappa.summary(settings['fam']['resolved_layer'])}\n"
            f"outputs in {os.path.abspath(args.output_dir)}: {files}metrics.json, fam_config.json{pushed}"
        )
    return metrics

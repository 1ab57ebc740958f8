"""What a recipe run measures and writes: fixed κ batches, the FAM settings, metrics JSON, a safe output dir.

Shared by ``recipes/finetune_classification.py``, ``recipes/finetune_clm.py`` and ``recipes/study.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, fields

import numpy as np
import torch

from .config import FAMConfig
from .layers import resolve_layer


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
    from .callback import measure_batches  # imports transformers' Trainer machinery: only when measuring

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


def flatness_callback(trainer, batches: dict[str, list], args: FAMConfig, script):
    """A :class:`~fam_hf.FlatnessCallback` on the fixed ``train``/``test`` batches, added to ``trainer``.

    Logs ``script.flatness_measures`` of ``args.fam_layer`` every ``script.flatness_every_n_steps`` optimizer
    steps and after each evaluation; None when the recipe asks for no measures.
    """
    if not script.flatness_measures:
        return None
    from .callback import FlatnessCallback

    callback = FlatnessCallback(
        batches["train"],
        batches["test"],
        measures=script.flatness_measures,
        layer=args.fam_layer,
        every_n_steps=script.flatness_every_n_steps,
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
    """The FAM fields of the config, what they resolved to, and the recipe's own arguments.

    ``args``: the FAM config κ is measured with, used where the trainer is not a ``FAMTrainer`` (the study's SAM
    runs); a ``FAMTrainer`` records its own (the study's FAM-body runs train another layer than κ is measured on).
    """
    flatness = getattr(trainer, "flatness", None)
    args = trainer.args if flatness is not None or args is None else args
    settings = {key: value for key, value in asdict(args).items() if key.startswith("fam_")}
    if flatness is not None:
        settings.update(resolved_layer=flatness.layer.name, resolved_estimator=flatness.estimator)
        if getattr(trainer, "fam_base_lambda", None) is not None:
            settings["resolved_lambda"] = trainer.fam_base_lambda  # fam_lambda, or as fam_lambda_relative set it
        if hasattr(flatness, "description"):  # how κ was computed, where the estimator's name does not say it all
            settings["resolved_estimator_detail"] = flatness.description
    else:  # trained without the penalty: κ is only measured, on the same layer
        settings["resolved_layer"] = resolve_layer(trainer.model, args.fam_layer).name
    settings["trainer"] = type(trainer).__name__
    return {"fam": settings, "script": asdict(script)}


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise FileExistsError(
            f"output_dir '{output_dir}' is not empty (an earlier run?); choose another --output_dir, or pass "
            "--overwrite_output true to write into it (or --resume_from_checkpoint to continue it)"
        )


def write_json(folder: str, name: str, values: dict) -> None:
    with open(os.path.join(folder, name), "w") as f:
        json.dump(values, f, indent=2, default=str)


def save_run(trainer, script, args: FAMConfig, metrics: dict) -> dict:
    """Write a recipe's outputs into ``args.output_dir``; return its FAM settings (``fam_config.json``).

    ``trainer_state.json`` (the log history), ``metrics.json`` and ``fam_config.json`` first, then the model
    (or adapter) and tokenizer if ``script.save_model``: the model card (README.md) reads the files before it,
    and ``--push_to_hub`` uploads them all.
    """
    trainer.save_state()
    settings = fam_settings(trainer, script, args)
    if trainer.is_world_process_zero():
        write_json(args.output_dir, "metrics.json", metrics)
        write_json(args.output_dir, "fam_config.json", settings)
    if script.save_model:
        trainer.save_model(args.output_dir)
    return settings


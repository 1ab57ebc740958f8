"""What a recipe run measures and writes: fixed κ batches, the FAM settings, metrics JSON, a safe output dir.

Shared by ``recipes/finetune_classification.py`` and ``recipes/finetune_clm.py``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import numpy as np
import torch

from .config import FAMConfig
from .flatness import relative_flatness


def fixed_batches(dataset, collator, args: FAMConfig, count: int) -> list[dict[str, torch.Tensor]]:
    """The first ``count`` batches of ``dataset`` in order, so κ is measured on the same data every time."""
    size = args.per_device_eval_batch_size
    rows = [dataset[i] for i in range(min(len(dataset), count * size))]
    return [collator(rows[i : i + size]) for i in range(0, len(rows), size)]


def mean_kappa(model, batches, args: FAMConfig, probes: int) -> float:
    """Mean relative flatness of ``args.fam_layer`` over ``batches``, in eval mode (no dropout)."""
    model.eval()
    values = [
        relative_flatness(
            model,
            {key: value.to(args.device) for key, value in batch.items()},
            layer=args.fam_layer,
            estimator=args.fam_estimator,
            probes=probes,
            scale=args.fam_scale,
            generator=torch.Generator().manual_seed(args.seed),
        ).value.item()
        for batch in batches
    ]
    return float(np.mean(values))


def fam_settings(trainer, script) -> dict:
    """The FAM fields of the config, what they resolved to, and the recipe's own arguments."""
    settings = {key: value for key, value in asdict(trainer.args).items() if key.startswith("fam_")}
    settings.update(resolved_layer=trainer.flatness.layer.name, resolved_estimator=trainer.flatness.estimator)
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

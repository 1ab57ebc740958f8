"""The recipes' script kit: what ``recipes/*.py`` share and users of ``fam_hf`` never import (not in the wheel).

* :mod:`kit.config`: a recipe's dataclasses from ``--config file.yaml`` plus command-line flags, ``base:`` configs;
* :mod:`kit.load`: the data set checked and carved into splits, the LoRA fields and adapter;
* :mod:`kit.runs`: κ on fixed batches at start and end, ``metrics.json``/``fam_config.json``, the summary.

A recipe run as ``python recipes/x.py`` (or under ``accelerate launch``) has ``recipes/`` first on ``sys.path``,
so ``from kit import …`` finds it; the tests and ``study/run.py`` put ``recipes/`` on ``sys.path`` themselves.
"""

from .config import load_config, parse_config, parse_recipe_config
from .load import LoraArguments, carve, load_checked, peft_config, with_lora
from .runs import (
    KAPPA_SPLITS,
    FixedBatchKappa,
    as_config,
    check_output_dir,
    fam_settings,
    finish,
    fixed_batch_measures,
    fixed_batches,
    flatness_callback,
    model_loss,
    save_run,
    start_run,
    write_json,
)

__all__ = [
    "KAPPA_SPLITS",
    "FixedBatchKappa",
    "LoraArguments",
    "as_config",
    "carve",
    "check_output_dir",
    "fam_settings",
    "finish",
    "fixed_batch_measures",
    "fixed_batches",
    "flatness_callback",
    "load_checked",
    "load_config",
    "model_loss",
    "parse_config",
    "parse_recipe_config",
    "peft_config",
    "save_run",
    "start_run",
    "with_lora",
    "write_json",
]

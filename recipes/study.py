"""The study: plain fine-tuning vs FAM vs SAM on a real task, over seeds (STUDY.md).

    python recipes/study.py --config configs/study_minilm_quick.yaml         # quick: fewer seeds/steps (CPU)
    python recipes/study.py --config configs/study_minilm.yaml               # full: 5 seeds (GPU advised)
    python recipes/study.py --config configs/study_smollm2_lora.yaml --study_seeds 0 1 2 --max_steps 100

A study config is a recipe config (``study_recipe`` names the recipe: ``finetune_classification`` or
``finetune_clm``) plus the ``study_*`` keys below; any key can be overridden on the command line. Every run
is the recipe's own ``run(script, args)`` — same data, model, schedule and measurements — with:

* ``plain``: ``FAMTrainer`` with ``fam_lambda=0`` (trains exactly as ``Trainer``; κ only logged);
* ``fam``: ``FAMTrainer`` with ``fam_lambda=λ``;
* ``sam``: ``SAMTrainer`` with ``sam_rho=ρ`` (its ``SAMConfig`` carries the same training settings).

λ (and ρ, where ``study_sam_rhos`` has several values) is chosen on the validation split: on the first seed
every grid value is trained and the best ``validation_<study_metric>`` wins; the other seeds use it. For
every run the recipe records the test metric, the loss on fixed train and test batches in eval mode (gap =
test − train), κ of ``fam_layer`` on the same fixed batches with the same estimator for every method, and
(``flatness_measures``) the FlatnessCallback's measures at checkpoints. Outputs in ``output_dir``:
``runs/<run>/`` (each run's recipe outputs and ``result.json``; a finished run is never redone, so a killed
study resumes), ``runs.jsonl``, ``runs.csv``, ``checkpoints.csv``, ``summary.json``, ``results.md`` (mean ±
95% t-interval over seeds; Kendall τ between κ and the gap across runs and checkpoints) and ``plots/``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import time
from pathlib import Path

import yaml

from fam_hf import FAMConfig
from fam_hf.assets import parse_config
from fam_hf.plots import load_log_history, pyplot
from fam_hf.runs import as_config
from fam_hf.study import METHODS, StudyArguments, aggregate, best_value

RESULT_NAME = "result.json"


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = load_recipe(argv)
    study, script, args = parse_config([StudyArguments, recipe.ScriptArguments, FAMConfig], argv)
    check_study(study)
    out = Path(args.output_dir)
    started = time.time()
    if not study.study_only_aggregate:
        run_study(recipe, study, argv, out)
    records = [json.loads(p.read_text()) for p in sorted((out / "runs").glob(f"*/{RESULT_NAME}"))]
    records = [r for r in records if r["seed"] in study.study_seeds]  # --study_seeds can aggregate a subset
    if not records:
        raise FileNotFoundError(f"no finished runs under {out / 'runs'}; run the study without --study_only_aggregate")
    summary = aggregate(records, study, out, wall_s=time.time() - started)
    print(f"\n{(out / 'results.md').read_text()}\nstudy outputs in {out.resolve()}")
    return summary


# -- runs -------------------------------------------------------------------------------------------------


def load_recipe(argv: list[str]):
    """The recipe module named by ``study_recipe`` (command line, else the config file)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--study_recipe")
    known = pre.parse_known_args(argv)[0]
    name = known.study_recipe
    if name is None and known.config is not None and Path(known.config).is_file():
        name = (yaml.safe_load(Path(known.config).read_text()) or {}).get("study_recipe")
    path = Path(__file__).resolve().parent / f"{name}.py"
    if name is None or name == "study" or not path.is_file():
        choices = sorted(p.stem for p in path.parent.glob("finetune_*.py"))
        raise ValueError(f"study_recipe={name!r} is not a recipe; set it in the config to one of {', '.join(choices)}")
    module_name = f"recipe_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def check_study(study: StudyArguments) -> None:
    pyplot("the study's plots")  # before hours of training, not after them
    unknown = [m for m in study.study_methods if m not in METHODS]
    if unknown or not study.study_methods:
        raise ValueError(f"study_methods {study.study_methods}: choose from {', '.join(METHODS)}")
    if not study.study_seeds or not study.study_fam_lambdas or not study.study_sam_rhos:
        raise ValueError("study_seeds, study_fam_lambdas and study_sam_rhos each need at least one value")
    if min(study.study_fam_lambdas) <= 0:
        raise ValueError(f"study_fam_lambdas {study.study_fam_lambdas}: FAM's λ must be > 0 (plain is λ = 0)")


def run_name(method: str, value: float | None, seed: int) -> str:
    return (
        f"{method}-seed{seed}"
        if value is None
        else f"{method}-{'lambda' if method == 'fam' else 'rho'}{value:g}-seed{seed}"
    )


def run_study(recipe, study: StudyArguments, argv: list[str], out: Path) -> None:
    """Train every run that has no ``result.json`` yet: the grid on the first seed, then the other seeds."""
    first, *others = study.study_seeds
    grids = {"plain": [None], "fam": study.study_fam_lambdas, "sam": study.study_sam_rhos}
    methods = [m for m in METHODS if m in study.study_methods]
    for method in methods:  # selection on the first seed
        for value in grids[method]:
            train_one(recipe, study, argv, out, method, value, first, selection=len(grids[method]) > 1)
    chosen = {method: select(out, study, method, grids[method], first) for method in methods}
    for seed in others:  # seed by seed, so that a study stopped early has every method on the seeds it did
        for method in methods:
            train_one(recipe, study, argv, out, method, chosen[method], seed, selection=False)


def select(out: Path, study: StudyArguments, method: str, grid: list, seed: int):
    """The grid value with the best validation metric on ``seed`` (ties: the first in the grid)."""
    if len(grid) == 1:
        return grid[0]
    return best_value([read_result(out, method, value, seed) for value in grid], study, method)


def read_result(out: Path, method: str, value, seed: int) -> dict:
    return json.loads((out / "runs" / run_name(method, value, seed) / RESULT_NAME).read_text())


def train_one(recipe, study, argv, out: Path, method: str, value, seed: int, selection: bool) -> dict:
    folder = out / "runs" / run_name(method, value, seed)
    if (folder / RESULT_NAME).is_file():  # finished earlier: a resumed study does not redo it
        return json.loads((folder / RESULT_NAME).read_text())
    lam = value if method == "fam" else 0.0
    overrides = [
        "--seed",
        str(seed),
        "--fam_lambda",
        str(lam),
        "--output_dir",
        str(folder),
        "--overwrite_output",
        "true",
    ]
    _, script, args = parse_config([StudyArguments, recipe.ScriptArguments, FAMConfig], argv + overrides)
    trainer_class, training_args = None, None
    if method == "sam":
        from fam_hf import SAMConfig, SAMTrainer

        trainer_class = SAMTrainer
        training_args = as_config(args, SAMConfig, sam_rho=value, sam_adaptive=study.study_sam_adaptive)
    print(f"\n== {study.study_name}{' [QUICK]' if study.study_quick else ''}: {folder.name} ==", flush=True)
    started = time.time()
    if trainer_class is None:
        metrics = recipe.run(script, args)
    else:
        metrics = recipe.run(script, args, trainer_class=trainer_class, training_args=training_args)
    wall_s = time.time() - started
    history = load_log_history(folder)
    record = {
        "task": study.study_name,
        "quick": study.study_quick,
        "run": folder.name,
        "method": method,
        "lambda": lam,
        "rho": value if method == "sam" else None,
        "seed": seed,
        "selection": selection,
        "metric": study.study_metric,
        "validation_metric": metrics[f"validation_{study.study_metric}"],
        "test_metric": metrics[f"test_{study.study_metric}"],
        "kappa": metrics["kappa_train_end"],
        "gap": metrics["loss_test_end"] - metrics["loss_train_end"],
        "wall_s": wall_s,
        **{k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "checkpoints": checkpoints(history),
    }
    (folder / RESULT_NAME).write_text(json.dumps(record, indent=2))
    gc.collect()
    print(f"   {folder.name}: test {study.study_metric} {record['test_metric']:.4f}, κ {record['kappa']:.4g}, gap {record['gap']:.4f}, {wall_s:.0f} s", flush=True)  # fmt: skip
    return record


def checkpoints(history: list[dict]) -> list[dict]:
    """The FlatnessCallback's entries of a log history: ``[{step, kappa_train, gap, …}, …]`` by step."""
    points = []
    for entry in history:
        if "flatness/gap" in entry:
            point = {"step": entry["step"]}
            for key, value in entry.items():
                if key.startswith("flatness/"):
                    split, _, name = key.removeprefix("flatness/").partition("/")
                    point[f"{name}_{split}" if name else split] = value
            points.append(point)
    return points


if __name__ == "__main__":
    main()

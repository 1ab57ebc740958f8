"""The study (STUDY.md): when does FAM improve held-out performance, against what users would do instead?

    python study/run.py --config configs/study_minilm_rt.yaml                 # task (a): MiniLM, Rotten Tomatoes
    python study/run.py --config configs/study_minilm_quick.yaml              # the smoke version (make study-quick)
    python study/run.py --config configs/study_minilm_rt.yaml --study_only_aggregate true   # tables from records

A study config is a recipe config (``study_recipe`` names the recipe in ``recipes/``: ``finetune_classification``
or ``finetune_clm``) plus the ``study_*`` keys of :class:`study.harness.StudyArguments`; any key can be overridden
on the command line. Every run is the recipe's own ``run(script, args)`` — same data, model, schedule and
measurements — for one (regime, method, grid value, seed):

* ``plain``: ``FAMTrainer`` with ``fam_lambda=0`` (trains exactly as ``Trainer``; κ only logged);
* ``weight_decay``: the same with AdamW's ``weight_decay`` from the grid;
* ``label_smoothing``: ``transformers.Trainer`` with ``label_smoothing_factor`` from the grid (FAMTrainer would
  switch its κ to the probe of the smoothed loss; a baseline has no penalty, so plain ``Trainer`` trains it);
* ``sam``: ``SAMTrainer`` with ``sam_rho`` from the grid (its ``SAMConfig`` carries the same training settings);
* ``fam``: ``FAMTrainer`` with ``fam_lambda`` from the grid, on the config's ``fam_layer`` (the head);
* ``fam_body``: ``FAMTrainer`` with ``fam_lambda`` from the grid on ``study_fam_body_layer`` (``study_fam_body_estimator``);
* ``fam_multi``: ``FAMTrainer`` over the set ``study_fam_multi_layer`` (κ summed, one probe a step), λ set at the first
  step from the loss share in the grid (``fam_lambda_relative``);
* ``flat_lora``: ``FlatLoRATrainer`` with ``flat_lora_sigma`` from the grid (the cosine schedule).

κ, the fixed-batch losses (gap = test − train) and the FlatnessCallback's measures are always those of the
config's ``fam_layer``/estimator with the model's own loss, whatever trained the run. Regimes
(``study_train_sizes`` × ``study_epochs``) run one after the other; in each, every grid value is trained on the
first seed, the best ``validation_<study_metric>`` is chosen, then the chosen values run on the other seeds.
Each finished run writes its record, ``<study_records_dir>/runs/<regime>/<run>.json`` (small: no weights), and a
run whose record exists is never redone — so a study resumes from committed records. Each run's recipe outputs
(logs, trainer state) go to ``<output_dir>/<regime>/<run>/`` (not tracked). The tables (``results.md``,
``summary.json``, ``runs.jsonl``, ``runs.csv``, ``checkpoints.csv``) are rebuilt from the records after every run.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
for folder in (RECIPES, ROOT):  # the recipes and their kit; the study package (run as `python study/run.py`)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from kit import as_config, load_config, parse_config  # noqa: E402

from fam_hf import FAMConfig  # noqa: E402
from fam_hf.distributed import leave_process_group  # noqa: E402
from fam_hf.plots import load_log_history  # noqa: E402
from study import data  # noqa: E402
from study.harness import StudyArguments, check_study, chosen_values, grid, methods, regimes, run_name  # noqa: E402
from study.tables import RESCALING_NAME, write_tables  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    data.register()  # the study's own data sets: debates-2016, conventions-2012
    recipe = load_recipe(argv)
    study, script, args = parse_config([StudyArguments, recipe.ScriptArguments, FAMConfig], argv)
    check_study(study)
    if args.fam_lambda_relative is not None:
        raise ValueError(
            f"fam_lambda_relative={args.fam_lambda_relative} would set λ in every run, plain ones included; a study "
            "sets λ per run from study_fam_lambdas / study_fam_body_lambdas: set fam_lambda_relative to null"
        )
    records_dir = Path(study.study_records_dir or args.output_dir)
    restore_records(records_dir)
    if not study.study_only_aggregate:
        run_study(recipe, study, script, args, argv, records_dir)
    records = load_records(records_dir, study)
    if not records:
        raise FileNotFoundError(
            f"no run records under {records_dir / 'runs'}; run the study without --study_only_aggregate"
        )
    summary = write_tables(records, study, records_dir)
    print(f"\n{(records_dir / 'results.md').read_text()}\nstudy tables in {records_dir.resolve()}")
    return summary


def restore_records(records_dir: Path) -> int:
    """Write back every record of ``runs.jsonl`` whose file under ``runs/`` is missing (a checkout where only the
    tables were committed still resumes); returns how many were restored."""
    jsonl = records_dir / "runs.jsonl"
    restored = 0
    for line in jsonl.read_text().splitlines() if jsonl.is_file() else []:
        record = json.loads(line)
        path = record_path(records_dir, record["regime"], record["method"], record["value"], record["seed"])
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
            restored += 1
    return restored


def load_records(records_dir: Path, study: StudyArguments) -> list[dict]:
    """Every record under ``records_dir/runs`` of this study's seeds and methods (``--study_seeds`` can
    aggregate a subset)."""
    records = [json.loads(p.read_text()) for p in sorted((records_dir / "runs").glob("*/*.json"))]
    return [r for r in records if r["seed"] in study.study_seeds and r["method"] in study.study_methods]


def load_recipe(argv: list[str]):
    """The recipe module named by ``study_recipe`` (command line, else the config file)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--study_recipe")
    known = pre.parse_known_args(argv)[0]
    name = known.study_recipe
    if name is None and known.config is not None:
        name = load_config(known.config).get("study_recipe")
    path = RECIPES / f"{name}.py"
    if name is None or not path.is_file():
        choices = sorted(p.stem for p in path.parent.glob("finetune_*.py"))
        raise ValueError(f"study_recipe={name!r} is not a recipe; set it in the config to one of {', '.join(choices)}")
    module_name = f"recipe_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def run_study(recipe, study: StudyArguments, script, args, argv: list[str], records_dir: Path) -> None:
    """Train every run that has no record yet: per regime, each grid on the first seed, then the other seeds."""
    from fam_hf.plots import pyplot  # noqa: F401  (nothing to check: the study writes tables, not plots)

    rescaling_check(study, script, args, records_dir)
    first, *others = study.study_seeds
    for order, (regime, size, epochs) in enumerate(regimes(study, script.max_train_samples, args.num_train_epochs)):
        context = dict(regime=regime, order=order, size=size, epochs=epochs)
        for method in methods(study):
            for value in grid(study, method):
                train_one(recipe, study, argv, records_dir, method, value, first, **context)
            refresh(records_dir, study)
        for seed in others:  # seed by seed: a study stopped early has every method on the seeds it did
            chosen = chosen_values(load_records(records_dir, study), study, regime)
            for method in methods(study):
                train_one(recipe, study, argv, records_dir, method, chosen[method], seed, **context)
            refresh(records_dir, study)


def rescaling_check(study: StudyArguments, script, args, records_dir: Path) -> dict | None:
    """The rescaling control (``study.rescaling``) on the pretrained model with a fresh head (seed
    ``study_seeds[0]``) and the first ``per_device_eval_batch_size`` training rows of the data set: each of
    ``flatness_measures`` on the rescaled linear layer and on ``fam_layer``. Written once, to
    ``<records_dir>/rescaling.json``; None when the config names no LayerNorm."""
    path = records_dir / RESCALING_NAME
    if not study.study_rescaling_norm or path.is_file():
        return None
    from transformers import DataCollatorWithPadding, set_seed

    from fam_hf.assets import load_model_and_tokenizer
    from fam_hf.data import load_source
    from fam_hf.layers import resolve_layer
    from study.rescaling import rescaling_control

    seed = study.study_seeds[0]
    set_seed(seed)
    train = load_source(script.dataset)["train"]
    classes = sorted({str(v) for v in train[script.label_column]})
    rows = train.select(range(min(len(train), args.per_device_eval_batch_size)))
    model, tokenizer = load_model_and_tokenizer(script.model_name_or_path, "sequence-classification",
                                                num_labels=len(classes))  # fmt: skip
    encoded = [{**tokenizer(row[script.text_column], truncation=True, max_length=script.max_length),
                "labels": classes.index(str(row[script.label_column]))} for row in rows]  # fmt: skip
    control = rescaling_control(
        model,
        [DataCollatorWithPadding(tokenizer)(encoded)],
        norm=study.study_rescaling_norm,
        linear=study.study_rescaling_linear,
        alphas=study.study_rescaling_alphas,
        layers=[study.study_rescaling_linear, resolve_layer(model, args.fam_layer).name],  # 'auto': the head's name
        measures=script.flatness_measures,
        probes=script.kappa_probes,
        scale=args.fam_scale,
        seed=seed,
    )
    record = {"model": script.model_name_or_path, "seed": seed, "examples": len(encoded), **control}
    records_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record


def refresh(records_dir: Path, study: StudyArguments) -> None:
    records = load_records(records_dir, study)
    if records:
        write_tables(records, study, records_dir)


def record_path(records_dir: Path, regime: str, method: str, value, seed: int) -> Path:
    return records_dir / "runs" / regime / f"{run_name(method, value, seed)}.json"


def run_arguments(recipe, study, argv, method: str, value, seed: int, folder: Path, size, epochs):
    """``(script, args, trainer_class, training_args)`` of one run: ``args`` is what κ is measured with (the
    config's layer, λ = 0 unless the run is ``fam``), ``training_args`` (None: ``args``) what trains."""
    overrides = ["--seed", str(seed), "--output_dir", str(folder), "--overwrite_output", "true",
                 "--num_train_epochs", str(epochs), "--max_steps", "-1",
                 "--max_train_samples", "null" if size is None else str(size)]  # fmt: skip
    if study.study_train_sizes == []:
        overrides = overrides[:6]  # one regime: the config's own schedule and size
    lam = value if method == "fam" else 0.0
    if method == "weight_decay":
        overrides += ["--weight_decay", str(value)]
    if method == "label_smoothing":
        overrides += ["--label_smoothing_factor", str(value)]
    parse = [StudyArguments, recipe.ScriptArguments, FAMConfig]
    _, script, args = parse_config(parse, argv + overrides + ["--fam_lambda", str(lam)])
    if method == "label_smoothing":
        from transformers import Trainer, TrainingArguments

        return script, args, Trainer, as_config(args, TrainingArguments)
    if method == "sam":
        from fam_hf import SAMConfig, SAMTrainer

        return (
            script,
            args,
            SAMTrainer,
            as_config(args, SAMConfig, sam_rho=value, sam_adaptive=study.study_sam_adaptive),
        )
    if method == "fam_body":
        from fam_hf import FAMTrainer

        body = ["--fam_lambda", str(value), "--fam_layer", study.study_fam_body_layer,
                "--fam_estimator", study.study_fam_body_estimator]  # fmt: skip
        return script, args, FAMTrainer, parse_config(parse, argv + overrides + body)[2]
    if method == "fam_multi":
        from fam_hf import FAMTrainer

        multi = ["--fam_lambda_relative", str(value), "--fam_layer", study.study_fam_multi_layer,
                 "--fam_estimator", study.study_fam_multi_estimator]  # fmt: skip
        return script, args, FAMTrainer, parse_config(parse, argv + overrides + multi)[2]
    if method == "flat_lora":
        from fam_hf import FlatLoRAConfig, FlatLoRATrainer

        return script, args, FlatLoRATrainer, as_config(args, FlatLoRAConfig, flat_lora_sigma=value)
    return script, args, None, None


def train_one(recipe, study, argv, records_dir: Path, method: str, value, seed: int, *, regime: str, order: int,
              size, epochs: float) -> dict:  # fmt: skip
    path = record_path(records_dir, regime, method, value, seed)
    run = run_name(method, value, seed)
    folder = Path(parse_config([StudyArguments, recipe.ScriptArguments, FAMConfig], argv)[2].output_dir) / regime / run
    script, args, trainer_class, training_args = run_arguments(recipe, study, argv, method, value, seed, folder,
                                                               size, epochs)  # fmt: skip
    wanted = {"train_size": size, "epochs": epochs, "settings": shared_settings(script, args)}
    if method in METHOD_SETTINGS:
        wanted["trained_with"] = method_settings(method, training_args or args)
    if path.is_file():  # finished earlier (perhaps in another session): never redone
        record = json.loads(path.read_text())
        changed = {k: (record[k], v) for k, v in wanted.items() if k in record and record[k] != v}
        if changed:
            raise ValueError(
                f"{path} was trained with other settings than this study asks for (recorded, now): {changed}; "
                "give the changed study another study_records_dir, or restore the settings"
            )
        return record
    import torch

    print(f"\n== {study.study_name}{' [QUICK]' if study.study_quick else ''}: {regime}/{run} ==", flush=True)
    started = time.time()
    if trainer_class is None:
        metrics = recipe.run(script, args)
    else:
        metrics = recipe.run(script, args, trainer_class=trainer_class, training_args=training_args)
    wall_s = time.time() - started
    history = load_log_history(folder)
    first = next((e for e in history if "fam/kappa" in e), None)
    lam = value if method in ("fam", "fam_body") else 0.0
    if method == "fam_multi" and first:  # λ was set at the first step from the share
        lam = first["fam/lambda"]
    record = {
        "task": study.study_name,
        "quick": study.study_quick,
        "regime": regime,
        "regime_order": order,
        "train_size": size,
        "epochs": epochs,
        "run": run,
        "run_id": f"{regime}/{run}",
        "method": method,
        "value": value,
        "seed": seed,
        "metric": study.study_metric,
        "validation_metric": metrics[f"validation_{study.study_metric}"],
        "test_metric": metrics[f"test_{study.study_metric}"],
        "gap": metrics["loss_test_end"] - metrics["loss_train_end"],
        # λ·κ₀/L₀ at the first logged step: the penalty's share of the loss (fam/task_loss: without the penalty)
        "lambda_share_start": lam * first["fam/kappa"] / first["fam/task_loss"] if lam and first else None,
        "lambda_share_start_fixed": lam * metrics["kappa_train_start"] / metrics["loss_train_start"]
        if method == "fam"
        else None,  # fmt: skip
        "wall_s": wall_s,
        "machine": f"{platform.machine()} {platform.system()}, Python {platform.python_version()}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} torch thread(s)",
        **{k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        **{k: wanted[k] for k in ("settings", "trained_with") if k in wanted},
        "checkpoints": checkpoints(history),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    gc.collect()
    print(f"   {regime}/{run}: validation {record['validation_metric']:.4f}, test {record['test_metric']:.4f}, "
          f"gap {record['gap']:.4f}, {wall_s:.0f} s", flush=True)  # fmt: skip
    return record


SHARED = ("model_name_or_path", "dataset", "group_column", "test_size", "validation_size", "max_length",
          "max_eval_samples", "kappa_batches", "kappa_probes", "flatness_measures", "flatness_every_n_steps",
          "learning_rate", "lr_scheduler_type", "warmup_steps", "per_device_train_batch_size",
          "per_device_eval_batch_size", "gradient_accumulation_steps", "fam_layer", "fam_estimator", "fam_scale")  # fmt: skip


def shared_settings(script, args) -> dict:
    """What every run of a regime shares (data, schedule, measurement), recorded so that a resumed study cannot
    mix runs made with other settings (the method's own knob and the seed are not in it)."""
    return {name: getattr(script, name, getattr(args, name, None)) for name in SHARED}


# A method's own settings besides its grid knob: a run made with another estimator (or SAM variant) at the same
# grid value has the same record path, so they are recorded and checked too (records older than this key are not).
# As written ('auto' stays 'auto'), so an equivalent explicit setting also stops a resume: the safe side.
FAM_SETTINGS = ("fam_layer", "fam_estimator", "fam_probes", "fam_hessian_grad", "fam_scale", "fam_every_n_steps",
                "fam_warmup_steps", "fam_token_fraction", "fam_seed")  # fmt: skip
METHOD_SETTINGS = {"fam": FAM_SETTINGS, "fam_body": FAM_SETTINGS, "fam_multi": FAM_SETTINGS,
                   "sam": ("sam_adaptive", "sam_eta"), "flat_lora": ("flat_lora_schedule", "flat_lora_seed")}  # fmt: skip


def method_settings(method: str, training_args) -> dict:
    """``{name: value}`` of ``METHOD_SETTINGS[method]`` in the arguments the run trains with."""
    return {name: getattr(training_args, name) for name in METHOD_SETTINGS[method]}


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
    leave_process_group()  # under accelerate launch: before the interpreter exits

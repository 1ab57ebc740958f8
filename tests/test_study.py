"""The study pipeline end to end on a tiny random BERT (seconds): runs, selection, tables, statistics, plots."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
STUDY_CONFIGS = sorted((ROOT / "configs").glob("study_*.yaml"))


def study_module():
    if "recipe_study" not in sys.modules:
        spec = importlib.util.spec_from_file_location("recipe_study", ROOT / "recipes" / "study.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["recipe_study"] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules["recipe_study"]


def sam_available() -> bool:
    try:
        from fam_hf import SAMTrainer  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    from models import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_bert):
    """A whole tiny study: plain, FAM (two λ), SAM (if present) over two seeds, two optimizer steps each."""
    out = tmp_path_factory.mktemp("study")
    methods = ["plain", "fam", "sam"] if sam_available() else ["plain", "fam"]
    argv = [
        "--config", str(ROOT / "configs" / "study_minilm_quick.yaml"),
        "--model_name_or_path", tiny_bert,
        "--output_dir", str(out),
        "--study_seeds", "0", "1",
        "--study_methods", *methods,
        "--study_fam_lambdas", "0.1", "10",
        "--study_sam_rhos", "0.05",
        "--max_train_samples", "48",
        "--max_eval_samples", "32",
        "--max_steps", "2",
        "--per_device_train_batch_size", "16",
        "--per_device_eval_batch_size", "16",
        "--kappa_batches", "1",
        "--flatness_measures", "kappa", "sam_sharpness",
        "--flatness_every_n_steps", "1",
        "--logging_steps", "1",
        "--use_cpu", "true",
    ]  # fmt: skip
    summary = study_module().main(argv)
    records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    return out, argv, summary, records, methods


def test_study_writes_runs_tables_and_plots(study):
    out, _, summary, records, methods = study
    for name in ("runs.jsonl", "runs.csv", "checkpoints.csv", "summary.json", "results.md"):
        assert (out / name).is_file(), name
    for name in ("gap_vs_kappa.png", "test_metric.png", "curves/kappa.png", "curves/gap.png"):
        assert (out / "plots" / name).stat().st_size > 1000, name
    # plain: 2 seeds; FAM: 2 λ on seed 0 + 1 seed; SAM: 2 seeds
    assert len(records) == 2 + 3 + (2 if "sam" in methods else 0)
    with open(out / "runs.csv") as f:
        assert len(list(csv.DictReader(f))) == len(records)
    results = (out / "results.md").read_text()
    assert "QUICK" in results and "plain (λ = 0)" in results and "Kendall τ" in results
    for record in records:
        assert record["quick"] and record["checkpoints"], record["run"]
        assert {"step", "kappa_train", "gap", "sam_sharpness_train"} <= set(record["checkpoints"][-1])
        assert record["gap"] == pytest.approx(record["loss_test_end"] - record["loss_train_end"])
        assert record["kappa"] == record["kappa_train_end"] > 0
        fam_config = json.loads((out / "runs" / record["run"] / "fam_config.json").read_text())
        assert fam_config["fam"]["resolved_layer"] == "classifier"  # κ of the same layer for every method
        assert not (out / "runs" / record["run"] / "model.safetensors").exists()  # save_model: false
    if "sam" in methods:
        sam = next(r for r in records if r["method"] == "sam")
        state = json.loads((out / "runs" / sam["run"] / "trainer_state.json").read_text())
        assert any("sam/sharpness" in entry for entry in state["log_history"])  # trained by SAMTrainer
    assert set(summary["methods"]) == set(methods)


def test_lambda_is_selected_on_the_first_seeds_validation_metric(study):
    _, _, summary, records, _ = study
    grid = {r["lambda"]: r["validation_metric"] for r in records if r["method"] == "fam" and r["seed"] == 0}
    assert set(grid) == {0.1, 10.0}
    best = max(grid, key=lambda lam: (grid[lam], -lam))  # ties: the first of the grid
    assert summary["methods"]["fam"]["value"] == best
    assert [r["lambda"] for r in records if r["method"] == "fam" and r["seed"] == 1] == [best]


def test_confidence_intervals_and_kendall_tau_match_a_hand_computation(study):
    _, _, summary, records, methods = study
    for method in methods:
        info = summary["methods"][method]
        chosen = [
            r["test_metric"]
            for r in sorted(records, key=lambda r: r["seed"])
            if r["method"] == method
            and (method == "plain" or r["lambda" if method == "fam" else "rho"] == info["value"])
        ]
        n = len(chosen)
        mean = sum(chosen) / n
        sd = math.sqrt(sum((x - mean) ** 2 for x in chosen) / (n - 1))
        stat = info["stats"]["test_metric"]
        assert stat["n"] == n == 2
        assert stat["mean"] == pytest.approx(mean, abs=1e-12)
        assert stat["ci95"] == pytest.approx(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n), abs=1e-12)

    def tau_b(x, y):  # Kendall's τ-b from the pair counts
        concordant = discordant = ties_x = ties_y = 0
        for i in range(len(x)):
            for j in range(i + 1, len(x)):
                dx, dy = x[i] - x[j], y[i] - y[j]
                if dx == 0 and dy == 0:
                    continue
                if dx == 0:
                    ties_x += 1
                elif dy == 0:
                    ties_y += 1
                elif dx * dy > 0:
                    concordant += 1
                else:
                    discordant += 1
        return (concordant - discordant) / math.sqrt(
            (concordant + discordant + ties_x) * (concordant + discordant + ties_y)
        )

    across_runs = summary["kendall"]["across_runs"]["kappa"]
    assert across_runs["n"] == len(records)
    assert across_runs["tau"] == pytest.approx(tau_b([r["kappa"] for r in records], [r["gap"] for r in records]))
    # checkpoints: the recipe's measures before training (step 0), then the callback's, pooled over runs
    kappas = [x for r in records for x in [r["kappa_train_start"]] + [c["kappa_train"] for c in r["checkpoints"]]]
    gaps = [
        x
        for r in records
        for x in [r["loss_test_start"] - r["loss_train_start"]] + [c["gap"] for c in r["checkpoints"]]
    ]
    pooled = summary["kendall"]["across_checkpoints"]["kappa"]
    assert pooled["n"] == len(kappas) == 3 * len(records)
    assert pooled["tau"] == pytest.approx(tau_b(kappas, gaps))
    sharpness = [c["sam_sharpness_train"] for r in records for c in r["checkpoints"]]  # no step-0 value
    pooled = summary["kendall"]["across_checkpoints"]["sam_sharpness"]
    assert pooled["n"] == len(sharpness)
    assert pooled["tau"] == pytest.approx(tau_b(sharpness, [c["gap"] for r in records for c in r["checkpoints"]]))


def test_a_finished_run_is_not_redone(study):
    out, argv, _, records, _ = study
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/result.json")}
    study_module().main(argv)  # everything is finished: only the tables are rebuilt
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/result.json")} == stamps
    assert len((out / "runs.jsonl").read_text().splitlines()) == len(records)


def test_bad_study_settings_name_the_fix(tmp_path, tiny_bert):
    base = ["--config", str(ROOT / "configs" / "study_minilm_quick.yaml"), "--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match=r"study_methods .*choose from plain, fam, sam"):
        study_module().main([*base, "--study_methods", "fam", "adam"])
    with pytest.raises(ValueError, match=r"FAM's λ must be > 0"):
        study_module().main([*base, "--study_fam_lambdas", "0", "0.1"])
    with pytest.raises(ValueError, match=r"study_recipe='nope' is not a recipe; .*finetune_classification"):
        study_module().main([*base, "--study_recipe", "nope"])


@pytest.mark.parametrize("path", STUDY_CONFIGS, ids=lambda p: p.name)
def test_study_configs_parse_and_label_quick_runs(path):
    module = study_module()
    recipe = module.load_recipe(["--config", str(path)])
    from fam_hf import FAMConfig
    from fam_hf.assets import parse_config

    study, script, args = parse_config(
        [module.StudyArguments, recipe.ScriptArguments, FAMConfig], ["--config", str(path)]
    )
    quick = "quick" in path.stem
    assert study.study_quick == quick and ("quick" in args.output_dir) == quick
    assert (len(study.study_seeds) == 5 or quick) and not script.save_model
    assert yaml.safe_load(path.read_text())["fam_lambda"] == 0.0  # set per run by the study


def test_make_targets_parse():
    make = shutil.which("make") or pytest.skip("make not installed")
    stub = "PYTHON := python3\nPIP := python3 -m pip\ninstall:\n\t@true\ninstall-assets:\n\t@true\n"
    for target, config in (("study-quick", "study_minilm_quick.yaml"), ("study", "study_smollm2_lora.yaml")):
        proc = subprocess.run(
            [make, "-n", "-f", "-", "-f", "mk/study.mk", target], input=stub, cwd=ROOT, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        assert "recipes/study.py --config" in proc.stdout and config in proc.stdout

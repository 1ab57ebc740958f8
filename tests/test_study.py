"""The study harness (study/run.py, study/harness.py, study/tables.py, study/stats.py) on a tiny random BERT: runs of
every method, selection on validation only, an equal grid budget, records that resume, byte-identical
aggregation, and the statistics against hand computations. No test asserts a study outcome."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from fam_hf.data import load_splits

ROOT = Path(__file__).resolve().parents[1]
STUDY_CONFIGS = sorted((ROOT / "configs").glob("study_*.yaml"))
TABLES = ("runs.jsonl", "runs.csv", "checkpoints.csv", "summary.json", "results.md")


def study_module():
    from study import run  # study/run.py (tests/conftest.py puts the repository root on sys.path)

    return run


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    from models import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def write_reviews(path: Path) -> str:
    """A small two-class CSV with a group column (the recipe splits by group), instead of the real corpus."""
    rng = np.random.default_rng(0)
    words = {0: ["dull", "flat", "tedious", "bad"], 1: ["fine", "sharp", "warm", "good"]}
    rows = ["text,label,movie"]
    for i in range(240):
        label = int(rng.integers(0, 2))
        text = " ".join(rng.choice(words[label] + words[1 - label][:1], 6))
        rows.append(f"{text},{'fresh' if label else 'rotten'},movie{i % 40}")
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_bert):
    """A whole tiny study: six methods, two grid points each on seed 0, the chosen ones on seed 1."""
    out = tmp_path_factory.mktemp("study")
    argv = [
        "--config", str(ROOT / "configs" / "study_minilm_rt.yaml"),
        "--model_name_or_path", tiny_bert,
        "--dataset", write_reviews(out / "reviews.csv"),
        "--group_column", "movie",
        "--output_dir", str(out / "outputs"),
        "--study_records_dir", str(out / "records"),
        "--study_seeds", "0", "1",
        "--study_train_sizes", "24",
        "--study_epochs", "1",
        "--study_weight_decays", "0.1", "1",
        "--study_label_smoothings", "0.1", "0.2",
        "--study_sam_rhos", "0.05", "0.1",
        "--study_fam_lambdas", "0.1", "10",
        "--study_fam_body_layer", "bert.encoder.layer.0.output.dense",
        "--study_fam_body_lambdas", "0.01", "0.1",
        "--study_bootstrap", "50",
        "--study_rescaling_norm", "bert.encoder.layer.0.output.LayerNorm",
        "--study_rescaling_linear", "bert.pooler.dense",
        "--max_eval_samples", "32",
        "--per_device_train_batch_size", "12",
        "--per_device_eval_batch_size", "16",
        "--flatness_measures", "kappa", "sam_sharpness",
        "--warmup_steps", "0",
        "--use_cpu", "true",
    ]  # fmt: skip
    summary = study_module().main(argv)
    records = [json.loads(line) for line in (out / "records" / "runs.jsonl").read_text().splitlines()]
    return out, argv, summary, records


def test_every_method_runs_and_records_what_the_tables_need(study):
    out, _, summary, records = study
    for name in TABLES:
        assert (out / "records" / name).is_file(), name
    assert len(records) == 1 + 5 * 2 + 6  # plain once; 5 grids of 2 on seed 0; every method's choice on seed 1
    assert {r["method"] for r in records} == set(study_module().methods(study_module_args(study)))
    for r in records:
        folder = out / "outputs" / r["regime"] / r["run"]
        assert (out / "records" / "runs" / r["regime"] / f"{r['run']}.json").is_file()
        assert not (folder / "model.safetensors").exists()  # records and logs, no weights
        assert r["gap"] == pytest.approx(r["loss_test_end"] - r["loss_train_end"])
        assert r["checkpoints"] and r["checkpoints"][-1]["step"] > 0  # the end of training
        assert {"kappa_train", "kappa_eval", "sam_sharpness_train", "gap"} <= set(r["checkpoints"][-1])
        settings = json.loads((folder / "fam_config.json").read_text())["fam"]
        history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
        if r["method"] == "label_smoothing":  # a baseline: plain Trainer, no penalty, κ still measured
            assert settings["trainer"] == "Trainer" and not any("fam/kappa" in e for e in history)
        elif r["method"] == "sam":
            assert any("sam/sharpness" in e for e in history)
        elif r["method"] == "fam_body":  # the trainer's own settings, not those κ is measured with
            assert settings["resolved_layer"] == settings["fam_layer"] == "bert.encoder.layer.0.output.dense"
            assert settings["fam_lambda"] == settings["resolved_lambda"] == r["value"]
            assert settings["fam_estimator"] == settings["resolved_estimator"] == "probe"  # the config's; κ: "auto"
        else:
            assert settings["resolved_layer"] == "classifier"
        if r["method"] in ("fam", "fam_body"):  # λ·κ₀/L₀ from the first logged step
            first = next(e for e in history if "fam/kappa" in e)
            assert r["lambda_share_start"] == pytest.approx(r["value"] * first["fam/kappa"] / first["fam/task_loss"])
        else:
            assert r["lambda_share_start"] is None
    assert set(summary["regimes"]["n24"]["methods"]) == {r["method"] for r in records}


def study_module_args(study):
    from kit import parse_config

    from fam_hf import FAMConfig
    from study.harness import StudyArguments

    argv = study[1]
    recipe = study_module().load_recipe(argv)
    return parse_config([StudyArguments, recipe.ScriptArguments, FAMConfig], argv)[0]


def test_each_grid_value_is_chosen_on_the_first_seeds_validation_metric(study):
    _, _, summary, records = study
    for method in ("weight_decay", "label_smoothing", "sam", "fam", "fam_body"):
        grid = [(r["value"], r["validation_metric"]) for r in records if r["method"] == method and r["seed"] == 0]
        assert len(grid) == 2
        best = max(grid, key=lambda g: g[1])[0]  # max keeps the first of equals: the grid's order
        assert summary["regimes"]["n24"]["methods"][method]["value"] == best
        assert [r["value"] for r in records if r["method"] == method and r["seed"] == 1] == [best]


def test_selection_reads_validation_never_test():
    from study.harness import StudyArguments, chosen_values

    study = StudyArguments("finetune_classification", "t", "accuracy", [0.1, 1.0], study_seeds=[0, 1],
                           study_methods=["plain", "fam"])  # fmt: skip
    base = dict(regime="n100", method="fam", seed=0)
    records = [
        {**base, "value": 0.1, "validation_metric": 0.70, "test_metric": 0.90},
        {**base, "value": 1.0, "validation_metric": 0.80, "test_metric": 0.10},
        {**base, "method": "plain", "value": None, "validation_metric": 0.5, "test_metric": 0.5},
    ]
    assert chosen_values(records, study, "n100") == {"plain": None, "fam": 1.0}
    assert "fam" not in chosen_values(records[:1] + records[2:], study, "n100")  # grid unfinished: no choice
    study.study_higher_is_better = False
    assert chosen_values(records, study, "n100")["fam"] == 0.1


def test_every_method_gets_the_same_grid_budget():
    from study.harness import StudyArguments, check_study, grid, methods

    study = StudyArguments("finetune_classification", "t", "accuracy", [0.1, 0.3], study_methods=["plain", "fam", "sam"],
                           study_sam_rhos=[0.05])  # fmt: skip
    with pytest.raises(ValueError, match=r"same grid budget.*'sam': 1, 'fam': 2"):
        check_study(study)
    module = study_module()
    for path in STUDY_CONFIGS:  # every shipped config tunes its methods alike
        recipe = module.load_recipe(["--config", str(path)])
        from kit import parse_config

        from fam_hf import FAMConfig

        args = parse_config([StudyArguments, recipe.ScriptArguments, FAMConfig], ["--config", str(path)])[0]
        check_study(args)
        assert len({len(grid(args, m)) for m in methods(args) if m != "plain"}) <= 1, path.name  # 0: plain alone


def test_a_second_metric_is_paired_with_plain_by_hand_and_never_selected_on(study):
    from study.tables import markdown, summarize

    _, _, _, records = study
    args = study_module_args(study)
    args.study_second_metric = ""
    summary = summarize(records, args)
    args.study_second_metric = "f1"
    second = summarize(records, args)
    rows = second["regimes"]["n24"]["methods"]
    for method, row in rows.items():
        assert row["value"] == summary["regimes"]["n24"]["methods"][method]["value"]  # selection unchanged
        runs = {r["seed"]: r for r in records if r["method"] == method and r["value"] == row["value"]}
        assert row["test_second"]["mean"] == pytest.approx(np.mean([r["test_f1"] for r in runs.values()]))
        if method == "plain":
            assert "second_vs_plain" not in row
            continue
        plain = {r["seed"]: r["test_f1"] for r in records if r["method"] == "plain"}
        by_hand = [runs[s]["test_f1"] - plain[s] for s in sorted(runs)]
        assert row["second_vs_plain"]["values"] == pytest.approx(by_hand)
    table = markdown(second)
    assert "| test f1 | Δ f1 vs plain |" in table and "| test f1 |" not in markdown(summary)
    args.study_second_metric = "recall"
    with pytest.raises(ValueError, match=r"study_second_metric='recall'.*no test_recall.*'accuracy', 'f1'"):
        summarize(records, args)


def test_aggregation_from_the_records_is_byte_identical(study):
    out, argv, _, _ = study
    records = out / "records"
    written = {name: (records / name).read_bytes() for name in TABLES}
    for _ in range(2):
        study_module().main([*argv, "--study_only_aggregate", "true"])
        assert {name: (records / name).read_bytes() for name in TABLES} == written
    # from the records alone: a copy without the outputs folder gives the same bytes
    copy = out / "copy"
    shutil.copytree(records / "runs", copy / "runs")
    shutil.copy(records / "rescaling.json", copy / "rescaling.json")
    study_module().main([*argv, "--study_only_aggregate", "true", "--study_records_dir", str(copy),
                         "--output_dir", str(out / "nowhere")])  # fmt: skip
    assert {name: (copy / name).read_bytes() for name in TABLES} == written
    # records lost but runs.jsonl kept (a commit of the tables only): they are written back, byte for byte
    record = next((records / "runs").glob("*/*.json"))
    content = record.read_bytes()
    record.unlink()
    study_module().main([*argv, "--study_only_aggregate", "true"])
    assert record.read_bytes() == content
    assert {name: (records / name).read_bytes() for name in TABLES} == written


def test_a_study_resumes_from_its_records(study):
    out, argv, _, records = study
    runs = sorted((out / "records" / "runs").glob("*/*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in runs}
    study_module().main(argv)  # everything is finished: nothing trains
    assert {p: p.stat().st_mtime_ns for p in runs} == stamps
    missing = next(p for p in runs if p.name.startswith("plain-seed1"))
    missing.unlink()
    study_module().main(argv)  # only the missing run trains again
    assert missing.is_file() and {p: p.stat().st_mtime_ns for p in runs if p != missing} == {
        p: s for p, s in stamps.items() if p != missing
    }
    assert len((out / "records" / "runs.jsonl").read_text().splitlines()) == len(records)
    with pytest.raises(ValueError, match=r"other settings than this study asks for .*learning_rate"):
        study_module().main([*argv, "--learning_rate", "0.001"])  # a changed schedule cannot mix with the records
    with pytest.raises(ValueError, match=r"other settings than this study asks for .*'fam_estimator': 'probe'"):
        study_module().main([*argv, "--study_fam_body_estimator", "gauss_newton"])  # nor another body estimator


def test_the_rescaling_control_preserves_the_function_and_flags_what_moves(study):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from study.rescaling import rescale_norm_and_next, rescaling_control

    config = BertConfig(vocab_size=40, hidden_size=12, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=16, num_labels=3, attn_implementation="eager")  # fmt: skip
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).double().eval()
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 40, (8, 10), generator=generator),
             "attention_mask": torch.ones(8, 10, dtype=torch.long), "labels": torch.randint(0, 3, (8,), generator=generator)}  # fmt: skip
    norm, linear = "bert.encoder.layer.0.output.LayerNorm", "bert.pooler.dense"
    rescaled = rescale_norm_and_next(model, norm, linear, 3.0)
    assert torch.allclose(rescaled(**batch).logits, model(**batch).logits, rtol=0, atol=1e-12)  # same function
    assert torch.allclose(rescaled.bert.pooler.dense.weight * 3, model.bert.pooler.dense.weight)  # other weights
    measures = ["kappa", "hessian_trace", "top_eigenvalue", "sam_sharpness", "jacobian_norm"]
    control = rescaling_control(model, [batch], norm=norm, linear=linear, alphas=[3.0], layers=[linear, "classifier"],
                                measures=measures, probes=4)  # fmt: skip
    ratio = {(r["layer"], r["measure"]): r["ratio"] for r in control["rows"]}
    assert control["max_output_change"] < 1e-12
    assert ratio[linear, "hessian_trace"] == pytest.approx(9.0) and ratio[linear, "top_eigenvalue"] == pytest.approx(
        9.0
    )
    assert ratio[linear, "kappa"] == pytest.approx(1.0) and ratio[linear, "jacobian_norm"] == pytest.approx(1.0)
    flagged = {(r["layer"], r["measure"]) for r in control["rows"] if r["flagged"]}
    assert {(linear, "hessian_trace"), (linear, "top_eigenvalue"), (linear, "sam_sharpness")} <= flagged
    assert not {(linear, "kappa"), (linear, "jacobian_norm")} & flagged
    # the study's own control: written beside the records and tabled
    out = study[0] / "records"
    assert {r["layer"] for r in json.loads((out / "rescaling.json").read_text())["rows"]} == {linear, "classifier"}
    assert "Rescaling control" in (out / "results.md").read_text()


# -- the study's data sets (study/data.py) --------------------------------------------------------------


@pytest.fixture
def study_data():
    """study/data.py, its aliases registered with fam_hf.data as the study registers them."""
    from study import data

    data.register()
    return data


def test_debates_test_split_is_the_vp_debate_with_speakers_never_seen_in_training(study_data):
    splits = load_splits("debates-2016", seed=0, test_size=0.2, validation_size=0.2)
    assert [len(splits[k]) for k in ("train", "validation", "test")] == [382, 95, 406]  # 883 statements
    assert set(splits["test"]["debate"]) == {"VP"} and "VP" not in set(splits["train"]["debate"])
    assert not set(splits["train"]["speaker"]) & set(splits["test"]["speaker"])
    assert splits["test"].features["label"].names == ["Democratic", "Republican", "Moderator"]
    speakers = dict(zip(splits["test"]["speaker"], splits["test"]["label"]))
    assert speakers == {"KAINE": 0, "PENCE": 1, "QUIJANO": 2}
    assert min(len(t.split()) for s in splits.values() for t in s["text"]) >= 5
    other = load_splits("debates-2016", seed=1, test_size=0.2, validation_size=0.2)
    assert other["test"]["text"] == splits["test"]["text"]  # fixed; validation is carved by row per seed
    assert set(other["validation"]["text"]) != set(splits["validation"]["text"])


def test_conventions_split_by_speaker_with_paragraphs_as_rows(study_data):
    rows = study_data.conventions_2012()
    assert len(rows) == 3_032 and len(set(rows["text"])) == 3_032
    assert rows.features["label"].names == ["democrat", "republican"]
    assert sum(rows["label"]) == 1_242  # 41.0% republican
    assert min(len(t.split()) for t in rows["text"]) >= 5 and not any("\n" in t for t in rows["text"])
    assert len(set(rows["speaker"])) == 183  # 180 named, 3 unnamed speeches each on their own
    splits = load_splits("conventions-2012", seed=0, test_size=0.2, validation_size=0.1)
    speakers = {name: set(split["speaker"]) for name, split in splits.items()}
    assert [len(s) for s in speakers.values()] == [128, 18, 37]
    assert not speakers["train"] & speakers["test"] and not speakers["train"] & speakers["validation"]
    assert not speakers["validation"] & speakers["test"]
    assert sum(len(s) for s in splits.values()) == 3_032
    other = load_splits("conventions-2012", seed=1, test_size=0.2, validation_size=0.1)
    assert set(other["test"]["speaker"]) != speakers["test"]


# -- statistics against hand computations ------------------------------------------------------------------


def tau_b(x, y):
    """Kendall's τ-b from the pair counts."""
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


def percentile(values, q):
    """numpy's default (linear) percentile, by hand."""
    v = sorted(values)
    position = (len(v) - 1) * q / 100
    low = math.floor(position)
    return v[low] + (v[min(low + 1, len(v) - 1)] - v[low]) * (position - low)


def test_kendall_tau_and_its_bootstrap_over_runs_match_a_hand_computation():
    from study.stats import bootstrap_tau, kendall_tau

    x = [0.1, 0.4, 0.35, 0.8, 0.2, 0.9, float("nan"), 0.5]
    y = [1.0, 2.0, 2.5, 3.0, 0.5, 2.0, 1.0, 2.2]
    groups = ["a", "a", "b", "b", "c", "c", "c", "d"]
    kept = [i for i in range(len(x)) if math.isfinite(x[i])]
    xs, ys, gs = [x[i] for i in kept], [y[i] for i in kept], [groups[i] for i in kept]
    assert kendall_tau(x, y)[0] == pytest.approx(tau_b(xs, ys))
    assert kendall_tau(x, y)[2] == 7

    result = bootstrap_tau(x, y, groups, resamples=200, seed=3)
    names = ["a", "b", "c", "d"]  # in order of first appearance
    rng = np.random.default_rng(3)
    taus = []
    for _ in range(200):
        index = [i for g in rng.integers(0, 4, 4) for i in range(len(xs)) if gs[i] == names[g]]
        bx, by = [xs[i] for i in index], [ys[i] for i in index]
        if len(set(bx)) > 1 and len(set(by)) > 1 and len(bx) >= 3:
            taus.append(tau_b(bx, by))
    assert result["resamples"] == len(taus) and result["groups"] == 4 and result["n"] == 7
    assert result["lo"] == pytest.approx(percentile(taus, 2.5))
    assert result["hi"] == pytest.approx(percentile(taus, 97.5))
    assert result["tau"] == pytest.approx(tau_b(xs, ys))
    assert bootstrap_tau(x, y, groups, resamples=200, seed=3) == result  # fixed seed: the same interval


def test_mean_ci_and_paired_differences_match_a_hand_computation():
    from study.stats import mean_ci, paired

    values, reference = {0: 0.70, 1: 0.74, 2: 0.69, 4: 0.80}, {0: 0.72, 1: 0.70, 2: 0.69, 3: 0.5, 4: 0.75}
    diffs = [0.70 - 0.72, 0.74 - 0.70, 0.69 - 0.69, 0.80 - 0.75]  # seeds 0, 1, 2, 4 (seed 3 unpaired)
    mean = sum(diffs) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3)
    result = paired(values, reference)
    assert result["n"] == 4 and result["seeds"] == [0, 1, 2, 4] and result["in_favour"] == 2
    assert result["mean"] == pytest.approx(mean, abs=1e-12)
    assert result["ci95"] == pytest.approx(stats.t.ppf(0.975, 3) * sd / 2, abs=1e-12)
    assert paired(values, reference, higher_is_better=False)["in_favour"] == 1
    assert math.isnan(mean_ci([0.5])[1]) and paired({0: 1.0}, {1: 1.0}) is None


def test_bad_study_settings_name_the_fix(tmp_path):
    base = ["--config", str(ROOT / "configs" / "study_minilm_quick.yaml"), "--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match=r"study_methods .*choose from plain, weight_decay"):
        study_module().main([*base, "--study_methods", "fam", "adam"])
    with pytest.raises(ValueError, match=r"FAM's λ must be > 0"):
        study_module().main([*base, "--study_fam_lambdas", "0", "0.1"])
    with pytest.raises(ValueError, match=r"study_epochs .* one value per regime"):
        study_module().main([*base, "--study_train_sizes", "100", "300", "--study_epochs", "3"])
    with pytest.raises(ValueError, match=r"study_recipe='nope' is not a recipe; .*finetune_classification"):
        study_module().main([*base, "--study_recipe", "nope"])
    with pytest.raises(ValueError, match=r"fam_lambda_relative=0.02 would set λ in every run.*set .* to null"):
        study_module().main([*base, "--fam_lambda_relative", "0.02"])


@pytest.mark.parametrize("path", STUDY_CONFIGS, ids=lambda p: p.name)
def test_study_configs_parse_and_label_quick_runs(path):
    module = study_module()
    recipe = module.load_recipe(["--config", str(path)])
    from kit import load_config, parse_config

    from fam_hf import FAMConfig

    study, script, args = parse_config(
        [module.StudyArguments, recipe.ScriptArguments, FAMConfig], ["--config", str(path)]
    )
    quick = "quick" in path.stem
    assert study.study_quick == quick and ("quick" in args.output_dir) == quick
    enough = 3 if study.study_recipe == "finetune_clm" else 5  # the study's minimum: 5 seeds for (a), (b); 3 for (c)
    assert len(study.study_seeds) >= enough or quick
    # no run saves its weights, except LoRA adapters kept to measure after training (a few MB each)
    assert not script.save_model or getattr(script, "use_lora", False)
    assert load_config(path)["fam_lambda"] == 0.0  # set per run by the study


def test_make_targets_parse():
    make = shutil.which("make") or pytest.skip("make not installed")
    stub = "PYTHON := python3\nPIP := python3 -m pip\ninstall:\n\t@true\ninstall-assets:\n\t@true\n"
    for target, config in (("study-quick", "study_minilm_quick.yaml"), ("study", "study_minilm.yaml")):
        proc = subprocess.run(
            [make, "-n", "-f", "-", "-f", "mk/study.mk", target], input=stub, cwd=ROOT, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        assert "study/run.py --config" in proc.stdout and config in proc.stdout


def summary_of(metric, higher, methods):
    """A summary.json as study.tables.summarize writes it, with only what the decision table reads."""
    stat = lambda mean, ci=0.01, n=5: {"mean": mean, "ci95": ci, "n": n}  # noqa: E731
    rows = {m: {"value": v, "seeds": [0, 1, 2, 3, 4], "test_metric": stat(t),
                **({"vs_plain": {**stat(d, c), "in_favour": 4}} if d is not None else {})}
            for m, (v, t, d, c) in methods.items()}  # fmt: skip
    tau = {"tau": -0.25, "lo": -0.4, "hi": -0.1, "n": 12, "groups": 12}
    nan = {"tau": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 2, "groups": 2}
    return {"task": "(x) a task", "metric": metric, "higher_is_better": higher,
            "regimes": {"n100": {"best_cheap": "plain", "methods": rows}},
            "measures": [{"regime": "n100", "label": "κ (train batches)", "across_runs": tau},
                         {"regime": "all", "label": "κ (train batches)", "across_runs": tau},
                         {"regime": "all", "label": "SAM sharpness", "across_runs": nan}]}  # fmt: skip


def test_the_decision_table_reads_each_interval_the_right_way_round():
    from study.tables import decision_markdown, verdict

    assert verdict({"mean": 0.02, "ci95": 0.01, "n": 5}, True) == "better"
    assert verdict({"mean": 0.02, "ci95": 0.01, "n": 5}, False) == "worse"  # perplexity up
    assert verdict({"mean": -0.02, "ci95": 0.03, "n": 5}, True) == "no difference"
    assert verdict({"mean": -0.02, "ci95": float("nan"), "n": 1}, True) == "–" and verdict(None, True) == "–"
    accuracy = summary_of("accuracy", True, {"sam": (0.05, 0.74, -0.02, 0.01), "plain": (None, 0.76, None, 0)})
    perplexity = summary_of("perplexity", False, {"fam": (1e-5, 50.0, -1.5, 0.5), "plain": (None, 51.5, None, 0)})
    table = decision_markdown({"studies/a": accuracy, "studies/c": perplexity}).splitlines()
    rows = [line for line in table if line.startswith("| (x)")]
    assert rows[0].startswith("| (x) [a](studies/a/results.md) | n100 | plain | 5 | accuracy 0.7600 ± 0.0100 | – | – |")
    assert "| SAM (ρ = 0.05) | 5 | accuracy 0.7400 ± 0.0100 | -0.0200 ± 0.0100 (4/5) | worse |" in rows[1]
    assert "| FAM head (λ = 1e-05) | 5 | perplexity 50.0000 ± 0.0100 | -1.5000 ± 0.5000 (4/5) | better |" in rows[3]
    measures = [line for line in table if line.startswith("| (x)") and "[-0.40, -0.10]" in line]
    assert len(measures) == 2 and not any("SAM sharpness" in line for line in table)  # "all" only; NaN τ left out


def test_one_command_rebuilds_every_table_of_study_md(study, tmp_path):
    from kit import load_config

    from study.tables import REPORT_BEGIN, REPORT_END

    out, argv, summary, _ = study
    config = load_config(ROOT / "configs" / "study_minilm_rt.yaml")
    key = None
    for token in argv[2:]:  # the fixture's overrides, as config keys
        if token.startswith("--"):
            key = token[2:]
            config[key] = None
        else:
            value = yaml.safe_load(token)
            config[key] = value if config[key] is None else [*np.atleast_1d(config[key]).tolist(), value]
    for key in ("study_seeds", "study_train_sizes", "study_epochs", "flatness_measures"):
        config[key] = list(np.atleast_1d(config[key]).tolist())
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    document = tmp_path / "STUDY.md"
    document.write_text(f"# Study\n\nreading\n\n{REPORT_BEGIN}\nold tables\n{REPORT_END}\n\nmore reading\n")
    results = (out / "records" / "results.md").read_bytes()
    report = module_from(ROOT / "study" / "report.py")
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({**config, "study_records_dir": str(tmp_path / "none")}, allow_unicode=True))
    report.main([str(path), str(missing), "--document", str(document)])
    first = document.read_text()
    assert first.startswith("# Study\n\nreading\n\n" + REPORT_BEGIN) and first.endswith(
        REPORT_END + "\n\nmore reading\n"
    )
    assert "old tables" not in first and (out / "records" / "results.md").read_bytes() == results
    for label in ("| plain |", "| weight decay (wd = ", "| SAM (ρ = ", "| FAM head (λ = ", "| FAM body (λ = "):
        assert label in first, label
    report.main([str(path), str(missing), "--document", str(document)])
    assert document.read_text() == first  # byte-identical when rebuilt
    document.write_text("no markers\n")
    with pytest.raises(ValueError, match="needs one <!-- study-tables:begin -->"):
        report.main([str(path), "--document", str(document)])


def module_from(path: Path):
    spec = importlib.util.spec_from_file_location(f"recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_tables_are_what_the_committed_records_rebuild(tmp_path, monkeypatch):
    """Reproducibility: `make study-tables` on the tracked records rewrites every tracked table byte for byte
    (each task's results.md, CSV and JSON, and STUDY.md's decision and measure tables). Records committed without
    their tables, or tables edited by hand, fail here."""
    make = shutil.which("make") or pytest.skip("make not installed")
    stub = "PYTHON := python3\n"
    proc = subprocess.run(
        [make, "-n", "-f", "-", "-f", "mk/study.mk", "study-tables"],
        input=stub,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    configs = [token for token in proc.stdout.split() if token.endswith(".yaml")]
    assert configs and all((ROOT / config).is_file() for config in configs), proc.stdout
    for name in ("configs", "studies"):
        shutil.copytree(ROOT / name, tmp_path / name)
    shutil.copy(ROOT / "STUDY.md", tmp_path / "STUDY.md")
    monkeypatch.chdir(tmp_path)  # the configs name their records folders relative to the repository root
    module_from(ROOT / "study" / "report.py").main([*configs, "--document", "STUDY.md"])
    tracked = [p.relative_to(ROOT) for p in (ROOT / "studies").rglob("*") if p.is_file()] + [Path("STUDY.md")]
    changed = [str(p) for p in tracked if (tmp_path / p).read_bytes() != (ROOT / p).read_bytes()]
    assert not changed, f"rebuilt tables differ from the committed ones (run `make study-tables`): {changed}"


def test_fam_multi_layer_and_flat_lora_run_as_study_methods(tiny_bert, tmp_path):
    """The two methods of issue 32 through the harness on the tiny BERT: FAM over a set of layers with λ from the
    loss share, and Flat-LoRA's σ; records and the trainers' own settings (no outcome asserted)."""
    argv = [
        "--config", str(ROOT / "configs" / "study_minilm_rt_flatness_sets.yaml"),
        "--model_name_or_path", tiny_bert,
        "--dataset", write_reviews(tmp_path / "reviews.csv"),
        "--group_column", "movie",
        "--output_dir", str(tmp_path / "outputs"),
        "--study_records_dir", str(tmp_path / "records"),
        "--study_methods", "plain", "fam_multi", "flat_lora",
        "--study_seeds", "0",
        "--study_train_sizes", "24",
        "--study_epochs", "1",
        "--study_fam_multi_shares", "0.01",
        "--study_flat_lora_sigmas", "0.05",
        "--study_bootstrap", "20",
        "--max_eval_samples", "16",
        "--per_device_train_batch_size", "12",
        "--per_device_eval_batch_size", "16",
        "--flatness_measures", "kappa",
        "--warmup_steps", "0",
        "--logging_steps", "1",
        "--use_cpu", "true",
    ]  # fmt: skip
    summary = study_module().main(argv)
    records = {r["method"]: r for r in map(json.loads, (tmp_path / "records" / "runs.jsonl").read_text().splitlines())}
    assert set(records) == {"plain", "fam_multi", "flat_lora"} == set(summary["regimes"]["n24"]["methods"])
    folder = tmp_path / "outputs" / "n24"
    multi = json.loads((folder / records["fam_multi"]["run"] / "fam_config.json").read_text())["fam"]
    assert multi["resolved_layer"] == "bert.encoder.* (6 layers)" and multi["resolved_estimator"] == "gauss_newton"
    assert multi["fam_lambda_relative"] == 0.01 and multi["resolved_lambda"] > 0
    # λ was set so that the penalty is that share of the first micro-batch's loss (logged every step here)
    assert records["fam_multi"]["lambda_share_start"] == pytest.approx(0.01, rel=1e-4)
    assert records["fam_multi"]["trained_with"]["fam_layer"] == "bert.encoder.*"
    flat = json.loads((folder / records["flat_lora"]["run"] / "trainer_state.json").read_text())["log_history"]
    sigmas = [e["flat_lora/sigma"] for e in flat if "flat_lora/sigma" in e]
    assert sigmas[0] == 0 and 0 < sigmas[-1] <= 0.05  # the cosine schedule, from 0 toward σ
    assert records["flat_lora"]["trained_with"] == {"flat_lora_schedule": "cosine", "flat_lora_seed": None}
    assert records["flat_lora"]["value"] == 0.05 and records["flat_lora"]["lambda_share_start"] is None

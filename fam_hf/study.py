"""What the study recipe (``recipes/study.py``) needs beyond training: its arguments, the methods and their grids,
the data-size regimes, selection on validation, and the aggregation of the run records into tables (statistics in
``fam_hf.study_stats``). Aggregation reads only the records, sorts them, and writes no clock or machine of its own,
so rebuilding the tables from the same records gives the same bytes."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .study_stats import bootstrap_tau, mean_ci, paired

# the methods, in the order they run and are tabled; CHEAP: what a user would turn instead of FAM
METHODS = ("plain", "weight_decay", "label_smoothing", "sam", "fam", "fam_body")
CHEAP = ("plain", "weight_decay", "label_smoothing")
RESCALING_NAME = "rescaling.json"  # the rescaling control's record, beside runs/
PARAMETER = {"weight_decay": "wd", "label_smoothing": "ls", "sam": "rho", "fam": "lambda", "fam_body": "lambda"}
LABEL = {"plain": "plain", "weight_decay": "weight decay", "label_smoothing": "label smoothing", "sam": "SAM",
         "fam": "FAM head", "fam_body": "FAM body"}  # fmt: skip
SYMBOL = {"weight_decay": "wd", "label_smoothing": "ε", "sam": "ρ", "fam": "λ", "fam_body": "λ"}
# measures compared with the gap: (key in a checkpoint, label); *_train on the fixed train batches
MEASURES = (
    ("kappa_train", "κ (train batches)"),
    ("kappa_eval", "κ (test batches)"),
    ("hessian_trace_train", "Hessian trace"),
    ("top_eigenvalue_train", "top eigenvalue"),
    ("sam_sharpness_train", "SAM sharpness"),
    ("jacobian_norm_train", "Jacobian norm"),
)


@dataclass
class StudyArguments:
    study_recipe: str = field(
        metadata={"help": "The recipe every run goes through: finetune_classification | finetune_clm."}
    )
    study_name: str = field(metadata={"help": "Title of the task in results.md."})
    study_metric: str = field(
        metadata={"help": "Metric compared and selected on: test_<m>, validation_<m> (accuracy, perplexity)."}
    )
    study_fam_lambdas: list[float] = field(metadata={"help": "fam: λ grid (FAM on fam_layer, the config's estimator)."})
    study_seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "Seeds; the first one also selects each grid value."}
    )
    study_methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"help": f"Any of {', '.join(METHODS)}."})  # fmt: skip
    study_higher_is_better: bool = field(default=True, metadata={"help": "True for accuracy, False for perplexity."})
    study_second_metric: str = field(default="", metadata={"help": "A second test metric tabled beside study_metric, paired with plain (test_<m> in the records; e.g. f1: macro-F1 with 3+ classes, which a shift toward the majority class does not raise as it raises accuracy). Same direction as study_metric; never selected on. Empty: none."})  # fmt: skip
    study_sam_rhos: list[float] = field(default_factory=lambda: [0.05], metadata={"help": "sam: ρ grid."})
    study_sam_adaptive: bool = field(default=False, metadata={"help": "ASAM instead of SAM."})
    study_weight_decays: list[float] = field(default_factory=list, metadata={"help": "weight_decay: AdamW's weight decay grid (plain runs keep the config's)."})  # fmt: skip
    study_label_smoothings: list[float] = field(default_factory=list, metadata={"help": "label_smoothing: label_smoothing_factor grid (trained by transformers.Trainer; κ measured as in every run)."})  # fmt: skip
    study_fam_body_lambdas: list[float] = field(default_factory=list, metadata={"help": "fam_body: λ grid for FAM on study_fam_body_layer."})  # fmt: skip
    study_fam_body_layer: str = field(default="", metadata={"help": "fam_body: the body layer penalised (probe estimator)."})  # fmt: skip
    study_fam_body_estimator: str = field(default="auto", metadata={"help": "fam_body: the estimator of κ in training ('auto': FAMTrainer's choice, Gauss–Newton on a body layer under the model's own loss)."})  # fmt: skip
    study_train_sizes: list[int] = field(default_factory=list, metadata={"help": "Data-size regimes: training examples per regime (0: all); empty: the config's max_train_samples."})  # fmt: skip
    study_epochs: list[float] = field(default_factory=list, metadata={"help": "Epochs per regime (same length as study_train_sizes): the same schedule for every method of a regime."})  # fmt: skip
    study_records_dir: str = field(default="", metadata={"help": "Where the run records and tables go (a tracked folder, e.g. studies/<task>); empty: output_dir. A run whose record is there is finished."})  # fmt: skip
    study_rescaling_norm: str = field(default="", metadata={"help": "Rescaling control: a LayerNorm whose weight and bias are × α (empty: no control)."})  # fmt: skip
    study_rescaling_linear: str = field(default="", metadata={"help": "Rescaling control: the linear layer it feeds, weight × 1/α (the function is unchanged)."})  # fmt: skip
    study_rescaling_alphas: list[float] = field(default_factory=lambda: [0.1, 10.0], metadata={"help": "Rescaling control: the factors α."})  # fmt: skip
    study_bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples (over runs) for the τ intervals."})  # fmt: skip
    study_quick: bool = field(
        default=False, metadata={"help": "A reduced study (fewer seeds/steps): labelled QUICK everywhere."}
    )
    study_note: str = field(
        default="", metadata={"help": "What the settings are, for results.md (e.g. what quick mode cut)."}
    )
    study_only_aggregate: bool = field(default=False, metadata={"help": "Train nothing; rebuild the tables from the records."})  # fmt: skip


def grid(study: StudyArguments, method: str) -> list:
    """The method's grid values (``[None]`` for plain)."""
    return {
        "plain": [None],
        "weight_decay": study.study_weight_decays,
        "label_smoothing": study.study_label_smoothings,
        "sam": study.study_sam_rhos,
        "fam": study.study_fam_lambdas,
        "fam_body": study.study_fam_body_lambdas,
    }[method]


def methods(study: StudyArguments) -> list[str]:
    return [m for m in METHODS if m in study.study_methods]


def check_study(study: StudyArguments) -> None:
    """Bad settings stop the study before any training, naming the fix."""
    unknown = [m for m in study.study_methods if m not in METHODS]
    if unknown or not study.study_methods:
        raise ValueError(f"study_methods {study.study_methods}: choose from {', '.join(METHODS)}")
    if not study.study_seeds:
        raise ValueError("study_seeds needs at least one seed")
    sizes = {m: len(grid(study, m)) for m in methods(study) if m != "plain"}
    if any(n == 0 for n in sizes.values()):
        empty = [m for m, n in sizes.items() if n == 0]
        raise ValueError(f"methods {empty} have an empty grid; set their study_* grid or drop them from study_methods")
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"every method gets the same grid budget, but the grids have {sizes} points; give each the same number"
        )
    for method in ("fam", "fam_body"):
        if method in study.study_methods and min(grid(study, method)) <= 0:
            raise ValueError(f"study grid of {method} {grid(study, method)}: FAM's λ must be > 0 (plain is λ = 0)")
    if "fam_body" in study.study_methods and not study.study_fam_body_layer:
        raise ValueError("fam_body needs study_fam_body_layer (e.g. bert.encoder.layer.5.output.dense)")
    if study.study_train_sizes and len(study.study_epochs) != len(study.study_train_sizes):
        raise ValueError(
            f"study_epochs {study.study_epochs} needs one value per regime of study_train_sizes {study.study_train_sizes}"
        )


def regimes(study: StudyArguments, max_train_samples: int | None, epochs: float) -> list[tuple[str, int | None, float]]:
    """``[(name, max_train_samples or None for all, epochs)]``: ``n100``, ``nall``, … in the order given."""
    if not study.study_train_sizes:
        return [(f"n{max_train_samples or 'all'}", max_train_samples, epochs)]
    return [(f"n{n or 'all'}", n or None, e) for n, e in zip(study.study_train_sizes, study.study_epochs)]


def run_name(method: str, value, seed: int) -> str:
    return f"{method}-seed{seed}" if value is None else f"{method}-{PARAMETER[method]}{value:g}-seed{seed}"


def best_value(runs: list[dict], study: StudyArguments):
    """The grid value of the run with the best ``validation_metric``; ``runs`` in grid order (ties: the first)."""
    sign = 1 if study.study_higher_is_better else -1
    return max(runs, key=lambda r: sign * r["validation_metric"])["value"]


def chosen_values(records: list[dict], study: StudyArguments, regime: str) -> dict[str, object]:
    """Per method, the value selected on the first seed's validation metric in ``regime`` (only validation is
    read; a method whose grid is not finished on the first seed has no choice yet)."""
    chosen = {}
    for method in methods(study):
        values = grid(study, method)
        first = {r["value"]: r for r in records if r["regime"] == regime and r["method"] == method
                 and r["seed"] == study.study_seeds[0]}  # fmt: skip
        if all(v in first for v in values):
            chosen[method] = values[0] if len(values) == 1 else best_value([first[v] for v in values], study)
    return chosen


# -- aggregation ----------------------------------------------------------------------------------------------


def sort_key(record: dict) -> tuple:
    return (record["regime_order"], METHODS.index(record["method"]), record["value"] or 0.0, record["seed"])


def trajectory(record: dict) -> list[dict]:
    """The run's checkpoints, starting with step 0: the recipe's κ and loss before training (same fixed batches,
    same estimator as the callback's), then the FlatnessCallback's (the last one at the end of training)."""
    start = {
        "step": 0,
        "kappa_train": record["kappa_train_start"],
        "kappa_eval": record["kappa_test_start"],
        "loss_train": record["loss_train_start"],
        "loss_eval": record["loss_test_start"],
        "gap": record["loss_test_start"] - record["loss_train_start"],
    }
    return [start] + [c for c in record["checkpoints"] if c["step"] > 0]


def final(record: dict) -> dict:
    """The run's last checkpoint (the callback's end-of-training measures; step 0 if it has none)."""
    return trajectory(record)[-1]


def measure_table(records: list[dict], study: StudyArguments) -> list[dict]:
    """Kendall τ-b of each measure with the gap, per regime and over all regimes: across runs (each run's last
    checkpoint, grid runs included) and across checkpoints (every checkpoint of every run, step 0 included where
    the measure exists), each with a bootstrap interval that resamples runs."""
    rows = []
    for regime in [*dict.fromkeys(r["regime"] for r in records), "all"]:
        runs = [r for r in records if regime in ("all", r["regime"])]
        for key, label in MEASURES:
            ends = [final(r) for r in runs]
            across = bootstrap_tau([e.get(key) for e in ends], [e["gap"] for e in ends],
                                   resamples=study.study_bootstrap)  # fmt: skip
            points = [(r["run_id"], c) for r in runs for c in trajectory(r)]
            pooled = bootstrap_tau([c.get(key) for _, c in points], [c["gap"] for _, c in points],
                                   [g for g, _ in points], resamples=study.study_bootstrap)  # fmt: skip
            if across["n"] or pooled["n"]:
                rows.append({"regime": regime, "measure": key, "label": label, "across_runs": across,
                             "across_checkpoints": pooled})  # fmt: skip
    return rows


def second_metric(record: dict, name: str) -> float:
    """The run's ``test_<name>``; a record without it is an error that lists the test metrics it has."""
    if f"test_{name}" not in record:
        metrics = sorted(k[5:] for k in record if k.startswith("test_") and isinstance(record[k], float))
        raise ValueError(f"study_second_metric={name!r}: run {record['run_id']} has no test_{name}; its record has "
                         f"test metrics {metrics}: choose one of them or set study_second_metric to ''")  # fmt: skip
    return record[f"test_{name}"]


def summarize(records: list[dict], study: StudyArguments) -> dict:
    """Everything the tables show, from the records alone."""
    records = sorted(records, key=sort_key)
    metric, higher, second = study.study_metric, study.study_higher_is_better, study.study_second_metric
    summary: dict = {"task": study.study_name, "quick": study.study_quick, "note": study.study_note, "metric": metric,
                     "higher_is_better": higher, "seeds": study.study_seeds, "regimes": {}, "selection": [],
                     "measures": []}  # fmt: skip
    if second:
        summary["second_metric"] = second
    summary["machines"] = sorted({r.get("machine", "?") for r in records})
    for regime in dict.fromkeys(r["regime"] for r in records):
        runs = [r for r in records if r["regime"] == regime]
        chosen = chosen_values(records, study, regime)
        finals = {m: {r["seed"]: r for r in runs if r["method"] == m and r["value"] == v} for m, v in chosen.items()}
        cheap = [m for m in CHEAP if m in finals and finals[m]]
        # the best cheap baseline: by the mean *validation* metric over its seeds
        sign = 1 if higher else -1
        best_cheap = max(cheap, key=lambda m: sign * mean_ci([r["validation_metric"] for r in finals[m].values()])[0],
                         default=None)  # fmt: skip
        table = {}
        for method, by_seed in finals.items():
            if not by_seed:
                continue
            row = {"value": chosen[method], "seeds": sorted(by_seed), "epochs": next(iter(by_seed.values()))["epochs"]}
            for key in ("test_metric", "validation_metric", "loss_train_end", "test_loss", "loss_test_end", "gap",
                        "kappa_train_end", "kappa_test_end", "lambda_share_start", "wall_s"):  # fmt: skip
                xs = [r[key] for r in by_seed.values() if r.get(key) is not None]
                if xs:
                    row[key] = dict(zip(("mean", "ci95"), mean_ci(xs)), n=len(xs))
            test = {s: r["test_metric"] for s, r in by_seed.items()}
            for name, reference in (("vs_plain", "plain"), ("vs_best_cheap", best_cheap)):
                if reference and reference != method and reference in finals:
                    ref = {s: r["test_metric"] for s, r in finals[reference].items()}
                    row[name] = paired(test, ref, higher)
            if second:
                seconds = {s: second_metric(r, second) for s, r in by_seed.items()}
                row["test_second"] = dict(zip(("mean", "ci95"), mean_ci(list(seconds.values()))), n=len(seconds))
                if method != "plain" and "plain" in finals:
                    ref = {s: second_metric(r, second) for s, r in finals["plain"].items()}
                    row["second_vs_plain"] = paired(seconds, ref, higher)
            table[method] = row
        summary["regimes"][regime] = {"best_cheap": best_cheap, "methods": table}
        for r in runs:
            if r["seed"] == study.study_seeds[0] and len(grid(study, r["method"])) > 1:
                summary["selection"].append({k: r.get(k) for k in ("regime", "method", "value", "validation_metric",
                    "test_metric", "loss_train_end", "gap", "kappa_train_end", "lambda_share_start")})  # fmt: skip
                summary["selection"][-1]["chosen"] = chosen.get(r["method"]) == r["value"]
    summary["measures"] = measure_table(records, study)
    return summary


def _f(value, spec: str = ".4f") -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:{spec}}"


def _stat(stat: dict | None, spec: str = ".4f", mean_spec: str | None = None) -> str:
    if not stat:
        return "–"
    mean = _f(stat["mean"], mean_spec or spec)
    return f"{mean} (n=1)" if stat["n"] < 2 else f"{mean} ± {_f(stat['ci95'], spec)}"


def _diff(stat: dict | None) -> str:
    if not stat:
        return "–"
    return f"{_stat(stat, '.4f', '+.4f')} ({stat['in_favour']}/{stat['n']})"


def _label(method: str, value) -> str:
    return LABEL[method] if value is None else f"{LABEL[method]} ({SYMBOL[method]} = {value:g})"


def markdown(summary: dict) -> str:
    metric, second = summary["metric"], summary.get("second_metric")
    quick = " — QUICK (reduced; not the full study)" if summary["quick"] else ""
    lines = [f"# {summary['task']}{quick}", "", "Rebuilt from the run records by `recipes/study.py --study_only_aggregate true`; do not edit.", ""]  # fmt: skip
    if summary["note"]:
        lines += [summary["note"], ""]
    lines += [
        f"Mean ± half-width of the 95% t-interval over seeds (selection on seed {summary['seeds'][0]}'s validation "
        f"split). Δ: paired by seed, test {metric} − the reference's, with the seeds in favour. Train/test loss and "
        "gap (= test − train) on the fixed batches in eval mode; κ of the same layer (the config's fam_layer) for "
        "every method. Share = λ·κ₀/L₀, the penalty's share of the loss at the first logged step."
        + (f" Test {second}: a second metric, paired with plain the same way, never selected on." if second else ""),
        "",
    ]
    for regime, info in summary["regimes"].items():
        best = info["best_cheap"]
        lines += [f"## Regime {regime}", "", f"Best cheap baseline (by mean validation {metric}): "
                  f"{LABEL.get(best, '–') if best else '–'}.", ""]  # fmt: skip
        header = ["method", "epochs", "seeds", f"test {metric}", "Δ vs plain", "Δ vs best cheap",
                  *([f"test {second}", f"Δ {second} vs plain"] if second else []), "train loss",
                  "test loss", "gap", "κ end (train)", "κ end (test)", "share λκ₀/L₀"]  # fmt: skip
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for method, row in info["methods"].items():
            cells = [_label(method, row["value"]), f"{row['epochs']:g}", str(len(row["seeds"])),
                     _stat(row.get("test_metric")), _diff(row.get("vs_plain")), _diff(row.get("vs_best_cheap")),
                     *([_stat(row.get("test_second")), _diff(row.get("second_vs_plain"))] if second else []),
                     _stat(row.get("loss_train_end")), _stat(row.get("loss_test_end")), _stat(row.get("gap")),
                     _stat(row.get("kappa_train_end"), ".4g"), _stat(row.get("kappa_test_end"), ".4g"),
                     _stat(row.get("lambda_share_start"), ".3g")]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if summary["selection"]:
        lines += [f"## Selection (seed {summary['seeds'][0]}; validation picks, test for reference only)", "",
                  f"| regime | method | value | chosen | validation {metric} | test {metric} | train loss | gap | κ end | share |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for s in summary["selection"]:
            lines.append(f"| {s['regime']} | {LABEL[s['method']]} | {s['value']:g} | {'✓' if s['chosen'] else ''} | "
                         f"{_f(s['validation_metric'])} | {_f(s['test_metric'])} | {_f(s['loss_train_end'])} | "
                         f"{_f(s['gap'])} | {_f(s['kappa_train_end'], '.4g')} | {_f(s['lambda_share_start'], '.3g')} |")  # fmt: skip
        lines.append("")
    if summary["measures"]:
        lines += ["## Which measure tracks the gap? Kendall τ-b [95% bootstrap interval over runs]", "",
                  "| regime | measure | across runs (last checkpoint) | across checkpoints (pooled) |",
                  "| --- | --- | --- | --- |"]  # fmt: skip
        for m in summary["measures"]:
            cells = []
            for k in ("across_runs", "across_checkpoints"):
                t = m[k]
                cells.append(f"{_f(t['tau'], '.3f')} [{_f(t['lo'], '.2f')}, {_f(t['hi'], '.2f')}] "
                             f"(n = {t['n']}, {t['groups']} runs)" if t["n"] else "–")  # fmt: skip
            lines.append(f"| {m['regime']} | {m['label']} | {cells[0]} | {cells[1]} |")
        lines.append("")
    control = summary.get("rescaling")
    if control:
        lines += ["## Rescaling control: a function-preserving reparameterisation", "",
                  f"`{control['norm']}` weight and bias × α, `{control['linear']}` weight × 1/α, on "
                  f"{control['examples']} training examples, the pretrained model with its seed-{control['seed']} "
                  f"head: the largest change of a logit is {control['max_output_change']:.2g}. Flagged: the measure "
                  f"moved by more than {control['tolerance']:g} relative.", "",
                  "| layer | measure | α | before | after | after / before | flagged |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for row in control["rows"]:
            lines.append(f"| `{row['layer']}` | {row['measure']} | {row['alpha']:g} | {_f(row['before'], '.4g')} | "
                         f"{_f(row['after'], '.4g')} | {_f(row['ratio'], '.4g')} | {'**changes**' if row['flagged'] else 'no'} |")  # fmt: skip
        lines.append("")
    lines += ["Machines: " + "; ".join(summary["machines"]), ""]
    return "\n".join(lines)


def verdict(stat: dict | None, higher_is_better: bool) -> str:
    """``better`` / ``worse`` when the paired difference's 95% interval excludes 0, ``no difference`` when it
    holds 0, ``–`` without an interval (fewer than two seeds)."""
    if not stat or stat["n"] < 2 or not math.isfinite(stat["ci95"]):
        return "–"
    lo, hi = stat["mean"] - stat["ci95"], stat["mean"] + stat["ci95"]
    if lo <= 0 <= hi:
        return "no difference"
    return "better" if (lo > 0) == higher_is_better else "worse"


def decision_markdown(summaries: dict[str, dict]) -> str:
    """The decision table across tasks and the measure table, from each task's ``summary.json``
    (``{records folder: summary}``): every method at its chosen setting, per task and regime, and each
    measure's Kendall τ with the gap over all of a task's runs."""
    lines = ["Each method at the setting chosen on validation, paired by seed with plain (and with the best cheap "
             "baseline: plain, weight decay or label smoothing, by validation); verdict: the paired 95% interval "
             "excludes 0 (better / worse) or holds it (no difference). Gap = test − train loss on the fixed batches; "
             "κ of the config's fam_layer (the head) for every method; share = λκ₀/L₀ at the first step.", "",
             "| task | regime | method | seeds | test metric | Δ vs plain | verdict | Δ vs best cheap | gap | "
             "κ end (train) | share λκ₀/L₀ |", "|" + " --- |" * 11]  # fmt: skip
    for folder, summary in summaries.items():
        higher = summary["higher_is_better"]
        task = _task_link(folder, summary)
        for regime, info in summary["regimes"].items():
            for method in sorted(info["methods"], key=METHODS.index):
                row = info["methods"][method]
                cells = [task, regime, _label(method, row["value"]), str(len(row["seeds"])),
                         f"{summary['metric']} {_stat(row.get('test_metric'))}", _diff(row.get("vs_plain")),
                         verdict(row.get("vs_plain"), higher) if method != "plain" else "–",
                         _diff(row.get("vs_best_cheap")), _stat(row.get("gap")),
                         _stat(row.get("kappa_train_end"), ".4g"), _stat(row.get("lambda_share_start"), ".3g")]  # fmt: skip
                lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Kendall τ-b of each measure with the gap across a task's runs (last checkpoint, grid runs included), "
              "95% bootstrap interval over runs:", "", "| task | runs | measure | τ across runs |", "| --- | --- | --- | --- |"]  # fmt: skip
    for folder, summary in summaries.items():
        task = _task_link(folder, summary)
        for m in summary["measures"]:
            t = m["across_runs"]
            if m["regime"] == "all" and math.isfinite(t["tau"]):
                tau = f"{_f(t['tau'], '.3f')} [{_f(t['lo'], '.2f')}, {_f(t['hi'], '.2f')}]"
                lines.append(f"| {task} | {t['groups']} | {m['label']} | {tau} |")
    return "\n".join(lines) + "\n"


def _task_link(folder: str, summary: dict) -> str:
    """``(a) [minilm_rt](studies/minilm_rt/results.md)``: the task's letter and its records folder."""
    return f"{summary['task'].split(' ')[0]} [{Path(folder).name}]({folder}/results.md)"


REPORT_BEGIN, REPORT_END = "<!-- study-tables:begin -->", "<!-- study-tables:end -->"


def splice_report(document: str, report: str) -> str:
    """``document`` with the text between its ``REPORT_BEGIN`` and ``REPORT_END`` markers replaced by ``report``."""
    if document.count(REPORT_BEGIN) != 1 or document.count(REPORT_END) != 1:
        raise ValueError(f"the document needs one {REPORT_BEGIN} and one {REPORT_END} line to put the tables between")
    head, rest = document.split(REPORT_BEGIN)
    _, tail = rest.split(REPORT_END)
    return f"{head}{REPORT_BEGIN}\n{report}{REPORT_END}{tail}"


def write_tables(records: list[dict], study: StudyArguments, folder: Path) -> dict:
    """``runs.jsonl``, ``runs.csv``, ``checkpoints.csv``, ``summary.json`` and ``results.md`` in ``folder``,
    from ``records`` alone (same records → same bytes)."""
    records = sorted(records, key=sort_key)
    summary = summarize(records, study)
    if (folder / RESCALING_NAME).is_file():
        summary["rescaling"] = json.loads((folder / RESCALING_NAME).read_text())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "runs.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    flat = [{k: v for k, v in sorted(r.items()) if k != "checkpoints"} for r in records]
    (folder / "runs.csv").write_text(_csv(flat))
    points = [{"run_id": r["run_id"], **c} for r in records for c in trajectory(r)]
    (folder / "checkpoints.csv").write_text(_csv(points))
    (folder / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    (folder / "results.md").write_text(markdown(summary))
    return summary


def _csv(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row)) or ["run_id"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()

"""The study's tables, from its run records alone: per task ``results.md``, ``summary.json``, ``runs.jsonl``,
``runs.csv`` and ``checkpoints.csv`` (:func:`write_tables`), and STUDY.md's decision and measure tables across tasks
(:func:`decision_markdown`, :func:`splice_report`); statistics in :mod:`study.stats`. Aggregation reads only the
records, sorts them, and writes no clock or machine of its own, so rebuilding the tables from the same records gives
the same bytes."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from .harness import CHEAP, LABEL, MEASURES, METHODS, RESCALING_NAME, SYMBOL, StudyArguments, chosen_values, grid
from .stats import bootstrap_tau, mean_ci, paired


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
    # The committed results.md files carry this line; it names the study's old path (now study/run.py) so that
    # they still rebuild byte for byte (`make study-tables`). Changing it means rebuilding and committing them all.
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

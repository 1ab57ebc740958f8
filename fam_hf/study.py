"""What the study recipe (``recipes/study.py``) needs beyond training: its arguments, and the aggregation of
finished runs into tables (mean ± 95% t-interval over seeds, paired differences, Kendall τ between κ and the
generalization gap across runs and checkpoints) and plots."""

from __future__ import annotations

import csv
import json
import math
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .plots import plot_runs, pyplot

METHODS = ("plain", "fam", "sam")


@dataclass
class StudyArguments:
    study_recipe: str = field(
        metadata={"help": "The recipe every run goes through: finetune_classification | finetune_clm."}
    )
    study_name: str = field(metadata={"help": "Title of the task in results.md."})
    study_metric: str = field(
        metadata={"help": "Metric compared and selected on: test_<m>, validation_<m> (accuracy, perplexity)."}
    )
    study_fam_lambdas: list[float] = field(
        metadata={"help": "FAM's λ grid, searched on the first seed's validation split."}
    )
    study_seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "Seeds; the first one also selects λ/ρ."}
    )
    study_methods: list[str] = field(
        default_factory=lambda: list(METHODS), metadata={"help": "Any of plain, fam, sam."}
    )
    study_higher_is_better: bool = field(default=True, metadata={"help": "True for accuracy, False for perplexity."})
    study_sam_rhos: list[float] = field(
        default_factory=lambda: [0.05], metadata={"help": "SAM's ρ grid (one value: no search)."}
    )
    study_sam_adaptive: bool = field(default=False, metadata={"help": "ASAM instead of SAM."})
    study_quick: bool = field(
        default=False, metadata={"help": "A reduced study (fewer seeds/steps): labelled QUICK everywhere."}
    )
    study_note: str = field(
        default="", metadata={"help": "What the settings are, for results.md (e.g. what quick mode cut)."}
    )
    study_only_aggregate: bool = field(default=False, metadata={"help": "Train nothing; rebuild the tables and plots from runs/."})  # fmt: skip


def best_value(runs: list[dict], study: StudyArguments, method: str):
    """λ (FAM) or ρ (SAM) of the run with the best ``validation_metric``; ``runs`` in grid order."""
    sign = 1 if study.study_higher_is_better else -1
    best = max(runs, key=lambda r: sign * r["validation_metric"])  # max keeps the first of equals
    return best["lambda" if method == "fam" else "rho"]


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its two-sided t-interval: ``t_{(1+c)/2, n−1} · s / √n`` (``s``: n−1 std).

    NaN half-width for fewer than two values (no spread to estimate).
    """
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return (float(x.mean()) if len(x) else float("nan")), float("nan")
    half = stats.t.ppf((1 + confidence) / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return float(x.mean()), float(half)


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, int]:
    """Kendall's τ-b between ``x`` and ``y`` (``scipy.stats.kendalltau``), its two-sided p-value, and n.

    Pairs with a NaN are dropped; NaN τ for fewer than three pairs.
    """
    from scipy import stats

    pairs = [(a, b) for a, b in zip(x, y) if np.isfinite(a) and np.isfinite(b)]
    if len(pairs) < 3:
        return float("nan"), float("nan"), len(pairs)
    result = stats.kendalltau([a for a, _ in pairs], [b for _, b in pairs])
    return float(result.statistic), float(result.pvalue), len(pairs)


# -- aggregation: tables, statistics, plots ---------------------------------------------------------------


def trajectory(record: dict) -> list[dict]:
    """The run's checkpoints, starting with step 0: the recipe's measures before training (same fixed
    batches, same estimator as the callback's)."""
    start = {
        "step": 0,
        "kappa_train": record["kappa_train_start"],
        "kappa_eval": record["kappa_test_start"],
        "loss_train": record["loss_train_start"],
        "loss_eval": record["loss_test_start"],
        "gap": record["loss_test_start"] - record["loss_train_start"],
    }
    return [start] + [c for c in record["checkpoints"] if c["step"] > 0]


def compared_runs(records: list[dict], study: StudyArguments) -> dict[str, list[dict]]:
    """Per method, one run per seed: every plain run; FAM at the selected λ and SAM at the selected ρ, i.e.
    the grid value with the best validation metric on the first seed (the value the other seeds ran with)."""
    chosen = {}
    grids = {"fam": study.study_fam_lambdas, "sam": study.study_sam_rhos}
    for method in METHODS:
        runs = [r for r in records if r["method"] == method]
        if not runs:
            continue
        if method != "plain":
            key = "lambda" if method == "fam" else "rho"
            order = {value: i for i, value in enumerate(grids[method])}
            first = sorted(
                (r for r in runs if r["seed"] == study.study_seeds[0]), key=lambda r: order.get(r[key], len(order))
            )
            value = best_value(first or runs, study, method)
            runs = [r for r in runs if r[key] == value]
        chosen[method] = sorted(runs, key=lambda r: r["seed"])
    return chosen


QUANTITIES = [  # (key in a record, label, format)
    ("test_metric", "test {metric}", ".4f"),
    ("test_f1", "test F1", ".4f"),
    ("test_loss", "test loss (all test)", ".4f"),
    ("loss_train_end", "train loss (fixed batches)", ".4f"),
    ("loss_test_end", "test loss (fixed batches)", ".4f"),
    ("gap", "gap = test − train", ".4f"),
    ("kappa", "κ end (train batches)", ".4g"),
    ("sam_sharpness_train", "SAM sharpness end", ".4g"),
    ("hessian_trace_train", "Hessian trace end", ".4g"),
    ("train_runtime", "train time (s)", ".0f"),
]


def final_measures(record: dict) -> dict:
    """The record's scalars plus the callback's measures at its last checkpoint."""
    last = record["checkpoints"][-1] if record["checkpoints"] else {}
    return {**last, **{k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}}


def aggregate(records: list[dict], study: StudyArguments, out: Path, wall_s: float) -> dict:
    compared = compared_runs(records, study)
    summary: dict = {
        "task": study.study_name,
        "quick": study.study_quick,
        "note": study.study_note,
        "metric": study.study_metric,
        "seeds": study.study_seeds,
        "study_wall_s_this_invocation": wall_s,
        "runs_wall_s_total": sum(r["wall_s"] for r in records),
        "machine": f"{platform.machine()}, {platform.system()}, Python {platform.python_version()}, torch threads "
        f"{_threads()}",
        "selection": selection_table(records, study),
        "methods": {},
        "paired_vs_plain": {},
        "kendall": kendall_summary(records),
    }
    for method, runs in compared.items():
        values = [final_measures(r) for r in runs]
        stats = {}
        for key, _, _ in QUANTITIES:
            xs = [v[key] for v in values if key in v]
            if xs:
                mean, half = mean_ci(xs)
                stats[key] = {"mean": mean, "ci95": half, "n": len(xs), "values": xs}
        value = runs[0]["lambda"] if method == "fam" else runs[0]["rho"]
        summary["methods"][method] = {"value": value, "seeds": [r["seed"] for r in runs], "stats": stats}
    if "plain" in compared:
        plain = {r["seed"]: final_measures(r) for r in compared["plain"]}
        for method, runs in compared.items():
            if method == "plain":
                continue
            paired = {}
            for key in ("test_metric", "gap", "kappa"):
                diffs = [final_measures(r)[key] - plain[r["seed"]][key] for r in runs if r["seed"] in plain]
                if diffs:
                    mean, half = mean_ci(diffs)
                    paired[key] = {"mean": mean, "ci95": half, "n": len(diffs), "values": diffs}
            summary["paired_vs_plain"][method] = paired
    write_tables(records, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["plots"] = [str(p.relative_to(out)) for p in write_plots(records, compared, summary, study, out)]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(markdown(summary, study))
    return summary


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def selection_table(records: list[dict], study: StudyArguments) -> list[dict]:
    rows = [r for r in records if r["selection"]]
    return [
        {
            "method": r["method"],
            "value": r["lambda"] if r["method"] == "fam" else r["rho"],
            "seed": r["seed"],
            "validation_metric": r["validation_metric"],
            "test_metric": r["test_metric"],
            "kappa": r["kappa"],
        }
        for r in sorted(rows, key=lambda r: (r["method"], r["lambda"], r["rho"] or 0))
    ]


def kendall_summary(records: list[dict]) -> dict:
    """Kendall τ between each flatness measure and the gap: across runs (final values of every run, grid
    runs included) and across checkpoints (every run's every checkpoint, step 0 included, pooled; and per run,
    then the median over runs)."""
    finals = [final_measures(r) for r in records]
    measures = ["kappa"] + sorted(
        {k.removesuffix("_train") for f in finals for k in f if k.endswith("_train") and k not in ("loss_train",)}
        - {"kappa"}
    )
    result: dict = {"across_runs": {}, "across_checkpoints": {}, "within_run_median": {}}
    for name in measures:
        key = "kappa" if name == "kappa" else f"{name}_train"
        xs = [f.get(key, math.nan) for f in finals]
        tau, p, n = kendall_tau(xs, [f["gap"] for f in finals])
        result["across_runs"][name] = {"tau": tau, "p": p, "n": n}
        points = [c for r in records for c in trajectory(r)]
        tau, p, n = kendall_tau([c.get(f"{name}_train", math.nan) for c in points], [c["gap"] for c in points])
        result["across_checkpoints"][name] = {"tau": tau, "p": p, "n": n}
        within = [
            kendall_tau([c.get(f"{name}_train", math.nan) for c in trajectory(r)], [c["gap"] for c in trajectory(r)])[0]
            for r in records
        ]
        within = [t for t in within if np.isfinite(t)]
        result["within_run_median"][name] = {
            "tau": float(np.median(within)) if within else math.nan,
            "runs": len(within),
        }
    return result


def write_tables(records: list[dict], out: Path) -> None:
    with open(out / "runs.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    flat = [{k: v for k, v in r.items() if k != "checkpoints"} for r in records]
    columns = list(dict.fromkeys(k for r in flat for k in r))
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(flat)
    points = [{"run": r["run"], "method": r["method"], "seed": r["seed"], **c} for r in records for c in trajectory(r)]
    columns = list(dict.fromkeys(k for p in points for k in p)) or ["run"]
    with open(out / "checkpoints.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(points)


def _fmt(stat: dict | None, spec: str) -> str:
    if stat is None:
        return "–"
    if stat["n"] < 2:
        return f"{stat['mean']:{spec}} (n=1)"
    return f"{stat['mean']:{spec}} ± {stat['ci95']:{spec}}"


def _label(method: str, info: dict) -> str:
    if method == "fam":
        return f"FAM (λ = {info['value']:g})"
    if method == "sam":
        return f"SAM (ρ = {info['value']:g})"
    return "plain (λ = 0)"


def markdown(summary: dict, study: StudyArguments) -> str:
    metric = summary["metric"]
    quick = " — QUICK (reduced seeds/steps; not the full study)" if summary["quick"] else ""
    lines = [f"# {summary['task']}{quick}", ""]
    if summary["note"]:
        lines += [summary["note"], ""]
    seeds = ", ".join(map(str, summary["seeds"]))
    lines += [
        f"Seeds {seeds}. Mean ± half-width of the 95% t-interval over seeds. Gap and κ on fixed train/test batches "
        f"in eval mode; κ of the same layer with the same estimator for every method. Runs took "
        f"{summary['runs_wall_s_total'] / 60:.1f} min in all ({summary['machine']}).",
        "",
    ]
    present = [q for q in QUANTITIES if any(q[0] in m["stats"] for m in summary["methods"].values())]
    header = ["method", "n"] + [label.format(metric=metric) for _, label, _ in present]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for method, info in summary["methods"].items():
        cells = [_label(method, info), str(len(info["seeds"]))]
        cells += [_fmt(info["stats"].get(key), spec) for key, _, spec in present]
        lines.append("| " + " | ".join(cells) + " |")
    if summary["paired_vs_plain"]:
        lines += [
            "",
            "Paired by seed, method − plain:",
            "",
            f"| method | Δ test {metric} | Δ gap | Δ κ |",
            "| --- | --- | --- | --- |",
        ]
        for method, paired in summary["paired_vs_plain"].items():
            label = _label(method, summary["methods"][method])
            lines.append(
                f"| {label} | " + " | ".join(_fmt(paired.get(k), ".4g") for k in ("test_metric", "gap", "kappa")) + " |"
            )
    if summary["selection"]:
        lines += [
            "",
            f"Selection on seed {summary['seeds'][0]} (validation {metric}; test shown for reference only):",
            "",
        ]
        lines += [
            f"| method | λ or ρ | validation {metric} | test {metric} | κ end |",
            "| --- | --- | --- | --- | --- |",
        ]
        for row in summary["selection"]:
            lines.append(
                f"| {row['method']} | {row['value']:g} | {row['validation_metric']:.4f} | {row['test_metric']:.4f} | {row['kappa']:.4g} |"
            )
    lines += ["", "Kendall τ with the gap (test − train loss on the fixed batches):", ""]
    lines += [
        "| measure (train batches) | across runs (final) | across checkpoints (pooled) | within a run (median) |",
        "| --- | --- | --- | --- |",
    ]
    kendall = summary["kendall"]
    for name in kendall["across_runs"]:
        a, c, w = (kendall[k][name] for k in ("across_runs", "across_checkpoints", "within_run_median"))
        lines.append(
            f"| {name} | {a['tau']:.3f} (p = {a['p']:.2g}, n = {a['n']}) | {c['tau']:.3f} (p = {c['p']:.2g}, n = {c['n']}) "
            f"| {w['tau']:.3f} ({w['runs']} runs) |"
        )
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in summary.get("plots", [])), ""]
    return "\n".join(lines)


def write_plots(records, compared, summary, study: StudyArguments, out: Path) -> list[Path]:
    plt = pyplot("the study's plots")

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    quick = " [QUICK]" if study.study_quick else ""
    colors = {"plain": "tab:gray", "fam": "tab:blue", "sam": "tab:orange"}
    written = []

    # gap vs κ: every run's final values; every checkpoint of every run
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
    kendall = summary["kendall"]
    for method in METHODS:
        runs = [r for r in records if r["method"] == method]
        if not runs:
            continue
        axes[0].scatter(
            [r["kappa"] for r in runs], [r["gap"] for r in runs], color=colors[method], label=method, alpha=0.8
        )
        points = [c for r in runs for c in trajectory(r)]
        axes[1].scatter(
            [c["kappa_train"] for c in points],
            [c["gap"] for c in points],
            color=colors[method],
            label=method,
            s=12,
            alpha=0.6,
        )
    for ax, key, what in ((axes[0], "across_runs", "runs (final)"), (axes[1], "across_checkpoints", "checkpoints")):
        k = kendall[key]["kappa"]
        ax.set_title(f"{what}: Kendall τ = {k['tau']:.2f} (p = {k['p']:.2g}, n = {k['n']})")
        ax.set_xlabel("κ (train batches)")
        ax.set_ylabel("gap = test − train loss")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"{study.study_name}{quick}: generalization gap vs relative flatness")
    fig.tight_layout()
    written.append(plots / "gap_vs_kappa.png")
    fig.savefig(written[-1])
    plt.close(fig)

    # test metric per method: each seed, and the mean ± 95% interval
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for i, (method, runs) in enumerate(compared.items()):
        stat = summary["methods"][method]["stats"]["test_metric"]
        ax.scatter([i] * len(runs), stat["values"], color=colors[method], alpha=0.6)
        half = stat["ci95"] if np.isfinite(stat["ci95"]) else 0.0
        ax.errorbar([i + 0.15], [stat["mean"]], yerr=[half], fmt="s", color="black", capsize=4)
    ax.set_xticks(range(len(compared)), [_label(m, summary["methods"][m]) for m in compared])
    ax.set_ylabel(f"test {study.study_metric}")
    ax.set_title(
        f"{study.study_name}{quick}\ntest {study.study_metric}: dots = seeds, bar = mean ± 95% CI", fontsize="small"
    )
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    written.append(plots / "test_metric.png")
    fig.savefig(written[-1])
    plt.close(fig)

    # flatness over training of each compared method's first seed (fam_hf.plots, as `fam-hf plot`)
    firsts = [runs[0] for runs in compared.values()]
    written += plot_runs([out / "runs" / r["run"] for r in firsts], plots / "curves", names=[r["run"] for r in firsts])
    return written

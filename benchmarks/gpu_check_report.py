"""The GPU check's Markdown report, rendered from the same dict that is written as JSON."""

from __future__ import annotations

from typing import Any

MARK = {"pass": "✅ pass", "fail": "❌ fail", "error": "💥 error", "skipped": "⏭ skipped"}


def render(report: dict[str, Any]) -> str:
    """Markdown: verdict, command, machine, model, one table of checks, step times, then details and errors."""
    m, model = report["machine"], report["model"]
    gpu = (
        f"{m['gpu']} (compute capability {m.get('capability')}, {m.get('gpu_memory_gib')} GiB, CUDA {m.get('cuda')}, "
        f"{m.get('gpus')} GPU(s))"
        if m.get("gpu")
        else "no GPU"
    )
    versions = ", ".join(f"{k} {m.get(k) or 'not installed'}" for k in ("torch", "transformers", "peft", "accelerate",
                                                                        "bitsandbytes", "datasets"))  # fmt: skip
    lines = [
        f"# GPU check{' (dry run, CPU)' if report['dry_run'] else ''}: {report['started']}",
        "",
        f"**{report['verdict']}** in {report['wall_s']:.0f} s (budget {report['budget_s']:.0f} s).",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {gpu}; {m['cpu']}, {m['nproc']} CPUs; Python {m['python']}, {versions}"
        f"{'; commit ' + m['commit'] if m.get('commit') else ''}{' + uncommitted changes' if m.get('dirty') else ''}.",
        "",
        f"Model: {model['note']}{'' if model['real_weights'] else ' (random tokens as data)'}.",
        "",
        "| check | status | judged on | measured | tolerance | s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["checks"]:
        criteria = r.get("criteria") or []
        first = True
        if not criteria or r["status"] in ("error", "skipped"):
            why = r.get("reason") or r.get("error") or ""
            lines.append(f"| `{r['name']}` | {MARK[r['status']]} | {_cell(why)} | | | {r['seconds']:.0f} |")
            first = False
        for c in criteria:
            head = f"`{r['name']}` | {MARK[r['status']]}" if first else " | "
            limit = "yes" if c["limit"] is None else f"≤ {c['limit']:.3g}"
            mark = "" if c["ok"] else " ❌"
            seconds = f"{r['seconds']:.0f}" if first else ""
            lines.append(f"| {head} | {_cell(c['label'])} | {_value(c['value'])}{mark} | {limit} | {seconds} |")
            first = False
    for name in report.get("pending", []):
        lines.append(f"| `{name}` | not run yet | | | | |")
    lines += ["", "What each check compares:", ""]
    lines += [f"- `{r['name']}` ({r['group']}): {r['compares']}" for r in report["checks"]]
    timing = [r for r in report["checks"] if r["group"] == "speed" and r.get("values", {}).get("variants")]
    if timing:
        lines += ["", "## Step times and peak memory (bf16 autocast)", ""]
        for r in timing:
            lines += _timing_table(r)
    lines += ["", "## Details", ""]
    for r in report["checks"]:
        if r["status"] == "skipped":
            continue
        values = {k: v for k, v in (r.get("values") or {}).items() if k != "variants"}
        lines.append(f"- `{r['name']}`: " + ("; ".join(f"{k} = {_value(v)}" for k, v in values.items()) or "–"))
        lines += [f"  - note: {n}" for n in r.get("notes") or []]
    errors = [r for r in report["checks"] if r["status"] == "error"]
    if errors:
        lines += ["", "## Errors", ""]
        for r in errors:
            lines += [
                f"### `{r['name']}`: {r.get('error', '')}",
                "",
                "```",
                (r.get("traceback") or "").rstrip(),
                "```",
                "",
            ]
    return "\n".join(lines).rstrip() + "\n"


def _timing_table(r: dict[str, Any]) -> list[str]:
    v = r["values"]
    lines = [
        f"### `{v['case']}`: model `{v['model']}`, {v['parameters'] / 1e6:.1f}M parameters ({v['trainable'] / 1e6:.2f}M "
        f"trained), batch {v['batch'][0]} × {v['batch'][1]} tokens of {v['data']} data; {v['warmup']} warm-up steps per "
        f"variant, {v['repeats']} interleaved rounds; synchronised around each step.",
        "",
        f"| variant | step ms, median [IQR] | ratio to plain, median [IQR] | peak MiB ({v.get('memory_counter')}) | "
        "peak / plain | targets |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in v["variants"]:
        targets = ", ".join(
            f"{what} ≤ {t:g}×" for what, t in (("time", row["time_target"]), ("memory", row["memory_target"])) if t
        )
        ratio = f"{row['ratio']:.3f}× [{row['ratio_iqr'][0]:.3f}–{row['ratio_iqr'][1]:.3f}]"
        if row["ratio_kind"] == "amortized":
            ratio += " amortized"
        peak = "–" if row["peak_mib"] is None else f"{row['peak_mib']:,.0f}"
        peak_ratio = "–" if row["peak_ratio"] is None else f"{row['peak_ratio']:.3f}×"
        lines.append(f"| {row['label']} | {row['ms']:.1f} [{row['ms_iqr'][0]:.1f}–{row['ms_iqr'][1]:.1f}] | {ratio} | "
                     f"{peak} | {peak_ratio} | {targets} |")  # fmt: skip
    for name, why in (v.get("failed") or {}).items():
        lines.append(f"| {name} | {_cell(why)} | | | | |")
    return lines + [""]


def _value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(x)}" for k, x in value.items()) + "}"
    return str(value)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:300]

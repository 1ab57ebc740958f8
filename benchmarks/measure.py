"""How a step is timed and its memory measured (see ``bench_steps.py`` for what the numbers mean)."""

from __future__ import annotations

import contextlib
import gc
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cases import Case, Variant, load_batch, load_model, make_trainer

# glibc malloc: hand every block ≥ 128 KiB straight back to the system, so the resident size follows the
# live tensors (by default the threshold grows with freed blocks and freed memory stays resident).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
MIB = 2**20


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def quiet() -> None:
    """Silence transformers' and fam_hf's per-trainer messages and progress bars."""
    import logging
    import warnings

    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    logging.getLogger("fam_hf").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


class Stepper:
    """One variant's optimizer step, as ``Trainer`` runs it per optimizer step (no accumulation)."""

    def __init__(self, trainer, model, batch: dict[str, torch.Tensor], device: str, bf16: bool) -> None:
        self.trainer, self.model, self.batch, self.device, self.bf16 = trainer, model, batch, device, bf16
        get_items = getattr(trainer, "_get_num_items_in_batch", None)
        self.num_items = get_items([batch], trainer.args.device) if get_items else None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.penalty: list[bool] = []  # per step: whether a lazy FAM schedule ran the penalty

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def step(self) -> tuple[float, float]:
        """Run one step; return its wall time and this process's CPU time (all threads), in seconds."""
        trainer = self.trainer
        schedule = getattr(trainer, "fam_lambda_at", None)
        self.penalty.append(schedule is None or schedule(trainer.state.global_step) is not None)
        autocast = trainer.accelerator.autocast() if self.bf16 else contextlib.nullcontext()
        self._sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        with autocast:
            trainer.training_step(self.model, dict(self.batch), self.num_items)
        if trainer.args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, trainer.args.max_grad_norm)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        self._sync()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        trainer.state.global_step += 1
        return elapsed, cpu


# -- timing ------------------------------------------------------------------------------------------------


def time_case(case: Case, variants: list[Variant], args) -> dict[str, Any]:
    """Interleaved step times of ``variants`` (the plain step first in the list) on one shared model."""
    model, tokenizer = load_model(case, args.device, _dtype(args))
    batch = load_batch(case, tokenizer, _vocab_size(model), args.device)
    with tempfile.TemporaryDirectory() as output_dir:
        steppers, failed = {}, {}
        for variant in variants:
            try:
                trainer = make_trainer(case, variant, model, output_dir, args.device, args.bf16)
            except Exception as error:  # noqa: BLE001 - a variant another change broke must not stop the bench
                if variant.name == "plain":
                    raise
                failed[variant.name] = f"failed to build: {type(error).__name__}: {error}"
                log(f"  {case.name}/{variant.name}: {failed[variant.name]}")
                continue
            steppers[variant.name] = Stepper(trainer, model, batch, args.device, args.bf16)
        optimizer = steppers["plain"].trainer.create_optimizer()
        for stepper in steppers.values():  # one optimizer: the same update work for all, one copy of its state
            stepper.trainer.optimizer = optimizer
        times: dict[str, list[float]] = {name: [] for name in steppers}
        cpu_times: dict[str, list[float]] = {name: [] for name in steppers}
        for name, stepper in steppers.items():
            for _ in range(args.warmup):
                stepper.step()
            stepper.penalty.clear()
            log(f"  {case.name}/{name}: warmed up")
        order = list(steppers)
        shuffle = random.Random(0)
        for round_ in range(args.repeats):
            shuffle.shuffle(order)
            for name in order:
                wall, cpu = steppers[name].step()
                times[name].append(wall)
                cpu_times[name].append(cpu)
            log(f"  {case.name} round {round_ + 1}/{args.repeats}: " + ", ".join(
                f"{name} {times[name][-1] * 1e3:.0f} ms (CPU {cpu_times[name][-1] * 1e3:.0f})"
                for name in steppers))  # fmt: skip
        penalty = {name: stepper.penalty for name, stepper in steppers.items()}
        del steppers, optimizer
    info = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "tokens": int(batch["input_ids"].numel()),
    }
    del model
    gc.collect()
    return {"times": times, "cpu_times": cpu_times, "penalty": penalty, "failed": failed, **info}


def _dtype(args) -> torch.dtype:
    return torch.float32  # bf16 runs under autocast with float32 weights, as Trainer's bf16=True does


def _vocab_size(model) -> int:
    config = getattr(model, "config", None)
    return getattr(config, "vocab_size", 64) or 64


def summarize_times(raw: dict[str, Any], variants: list[Variant]) -> dict[str, dict[str, Any]]:
    """Per variant and clock (``wall``, ``cpu``): ms and ratios to the plain step of the same round, as quartiles."""
    return {
        variant.name: {
            clock: _summarize_clock(raw[key], raw["penalty"][variant.name], variant)
            for clock, key in (("wall", "times"), ("cpu", "cpu_times"))
        }
        for variant in variants
    }


def _summarize_clock(times: dict[str, list[float]], penalty: list[bool], variant: Variant) -> dict[str, Any]:
    t, plain = np.asarray(times[variant.name]), np.asarray(times["plain"])
    ratio = t / plain
    row: dict[str, Any] = {"ms": _quartiles(t * 1e3), "ratio": _quartiles(ratio), "n": len(t)}
    if variant.every_n > 1:
        on, k = np.asarray(penalty, dtype=bool), variant.every_n
        row["n_penalty"] = int(on.sum())
        row["ratio_penalty"] = _quartiles(ratio[on]) if on.any() else None
        row["ratio_other"] = _quartiles(ratio[~on]) if (~on).any() else None
        if on.any() and (~on).any():
            row["ratio_amortized"] = [(row["ratio_penalty"][i] + (k - 1) * row["ratio_other"][i]) / k for i in range(3)]
    if variant.reference_speedup_target is not None and "reference" in times:
        row["reference_speedup"] = _quartiles(np.asarray(times["reference"]) / t)
    return row


def _quartiles(values: np.ndarray) -> list[float]:
    """``[q1, median, q3]``."""
    return [float(v) for v in np.percentile(values, [25, 50, 75])]


# -- memory ------------------------------------------------------------------------------------------------


def _rss() -> tuple[int, int]:
    """``(current, high-water mark)`` resident set size in bytes, from /proc/self/status."""
    status = Path("/proc/self/status").read_text()
    values = {key: int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) * 1024 for key in ("VmRSS", "VmHWM")}
    return values["VmRSS"], values["VmHWM"]


def _reset_peak(device: str) -> bool:
    """Reset the peak counter; False where it cannot be (the peak then covers the whole process)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux ≥ 4.0)
        return True
    except OSError:
        return False


def _memory_now(device: str) -> tuple[int, int]:
    """``(current, peak)`` bytes: allocated on a GPU, resident on the CPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    return _rss()


def measure_memory(case: Case, variant: Variant, args, steps: int = 2) -> dict[str, Any]:
    """Peak memory of ``variant`` alone (call in a fresh process: it reads the process's own counters).

    Steps: ``steps`` warm-up steps (the first creates AdamW's state), then ``max(steps, k)`` more, where a
    lazy variant's ``k = fam_every_n_steps``, so that a penalty step is among them.
    """
    model, tokenizer = load_model(case, args.device, _dtype(args))
    batch = load_batch(case, tokenizer, _vocab_size(model), args.device)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = make_trainer(case, variant, model, output_dir, args.device, args.bf16)
        trainer.create_optimizer()
        stepper = Stepper(trainer, model, batch, args.device, args.bf16)
        gc.collect()
        exact = _reset_peak(args.device)
        before, _ = _memory_now(args.device)
        for _ in range(steps):
            stepper.step()
        gc.collect()
        between, first_peak = _memory_now(args.device)
        _reset_peak(args.device)
        for _ in range(max(steps, variant.every_n)):
            stepper.step()
        _, later_peak = _memory_now(args.device)
    peak = max(first_peak, later_peak)
    return {
        "peak": peak,
        "growth": peak - before,
        "transient": later_peak - between,
        "before": before,
        "between": between,
        "counter": "cuda.max_memory_allocated" if args.device.startswith("cuda") else "VmHWM",
        "peak_reset": exact,
    }


_FORKSERVER = None


def _forkserver():
    """A multiprocessing context whose server process has imported the libraries (and nothing else).

    Each memory measurement forks a fresh child from it: a new process with its own model and counters,
    without paying ~10 s of imports each time. The server starts with :data:`MALLOC_ENV`, so every child's
    malloc returns large blocks to the system and its resident size follows the live tensors.
    """
    global _FORKSERVER
    if _FORKSERVER is None:
        import multiprocessing

        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["torch", "transformers", "transformers.trainer", "peft", "datasets",
                                        "fam_hf", "fam_hf.trainer", "benchmarks.measure"])  # fmt: skip
        _FORKSERVER = context
    return _FORKSERVER


def _memory_child(connection, case: Case, variant: Variant, args) -> None:
    try:
        torch.set_num_threads(args.threads)
        quiet()
        connection.send(("ok", measure_memory(case, variant, args)))
    except BaseException as error:  # noqa: BLE001 - report anything to the parent
        import traceback

        connection.send(("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()[-2000:]}"))
    finally:
        connection.close()


def memory_in_subprocess(case: Case, variant: Variant, args) -> dict[str, Any]:
    """Run :func:`measure_memory` in a fresh process (its own model, its own counters)."""
    context = _forkserver()
    saved = {key: os.environ.get(key) for key in MALLOC_ENV}
    os.environ.update(MALLOC_ENV if args.device == "cpu" else {})  # read when the server starts
    try:
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=_memory_child, args=(send, case, variant, args))
        child.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    send.close()
    try:
        status, payload = receive.recv()
    except EOFError:
        status, payload = "error", f"the process died (exit code {child.join() or child.exitcode})"
    child.join()
    if status != "ok":
        raise RuntimeError(f"memory measurement of {case.name}/{variant.name} failed: {payload}")
    return payload


def summarize_memory(runs: dict[str, list[dict]]) -> dict[str, Any]:
    """Per variant and quantity: median bytes over the runs, min–max, and the ratio of medians to plain."""
    out: dict[str, Any] = {}
    for name, results in runs.items():
        row = {}
        for key in ("peak", "growth", "transient"):
            values = np.asarray([r[key] for r in results], dtype=float)
            plain = np.median([r[key] for r in runs["plain"]])
            row[key] = {
                "median": float(np.median(values)),
                "min": float(values.min()),
                "max": float(values.max()),
                "ratio": float(np.median(values) / plain) if plain > 0 else float("nan"),
                "ratio_min": float(values.min() / plain) if plain > 0 else float("nan"),
                "ratio_max": float(values.max() / plain) if plain > 0 else float("nan"),
            }
        row["runs"] = len(results)
        out[name] = row
    return out


# -- profiling ---------------------------------------------------------------------------------------------


def profile_case(case: Case, variants: list[Variant], args) -> str:
    """torch.profiler tables of one step of each of ``variants`` (after warm-up), most expensive ops first,
    and for each variant the ops whose self time differs most from the plain step's (where its extra time goes).
    """
    from torch.profiler import ProfilerActivity, profile

    model, tokenizer = load_model(case, args.device, _dtype(args))
    batch = load_batch(case, tokenizer, _vocab_size(model), args.device)
    gpu = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    sort = "self_cuda_time_total" if gpu else "self_cpu_time_total"
    parts, self_times = [], {}
    with tempfile.TemporaryDirectory() as output_dir:
        for variant in variants:
            trainer = make_trainer(case, variant, model, output_dir, args.device, args.bf16)
            trainer.create_optimizer()
            stepper = Stepper(trainer, model, batch, args.device, args.bf16)
            for _ in range(args.warmup):
                stepper.step()
            trainer.state.global_step = 0  # a lazy variant's penalty step
            with profile(activities=activities, record_shapes=args.profile_shapes) as prof:
                seconds, _ = stepper.step()
            averages = prof.key_averages(group_by_input_shape=args.profile_shapes)
            self_times[variant.name] = {
                event.key: (getattr(event, sort) / 1e3, event.count) for event in averages
            }  # ms, calls
            table = averages.table(sort_by=sort, row_limit=args.profile_rows, max_name_column_width=70)
            parts.append(f"## {case.name} / {variant.name}: {seconds * 1e3:.0f} ms under the profiler\n\n{table}")
            del trainer, stepper
            gc.collect()
    plain = self_times.get("plain", {})
    for name, times in self_times.items():
        if name != "plain" and plain:
            parts.append(_profile_difference(case.name, name, plain, times, args.profile_rows))
    return "\n\n".join(parts)


def _profile_difference(case: str, name: str, plain: dict, times: dict, rows: int) -> str:
    total_plain = sum(ms for ms, _ in plain.values())
    total = sum(ms for ms, _ in times.values())
    keys = sorted(set(plain) | set(times), key=lambda k: -abs(times.get(k, (0, 0))[0] - plain.get(k, (0, 0))[0]))
    lines = [
        f"## {case} / {name} − plain: self time {total:.0f} ms vs {total_plain:.0f} ms "
        f"({total / total_plain:.2f}×, +{total - total_plain:.0f} ms)",
        "",
        "| op | plain ms (calls) | this ms (calls) | difference ms | share of the difference |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key in keys[:rows]:
        (a, ca), (b, cb) = plain.get(key, (0.0, 0)), times.get(key, (0.0, 0))
        share = (b - a) / (total - total_plain) if total != total_plain else float("nan")
        lines.append(f"| `{key}` | {a:.1f} ({ca}) | {b:.1f} ({cb}) | {b - a:+.1f} | {share:.0%} |")
    return "\n".join(lines)

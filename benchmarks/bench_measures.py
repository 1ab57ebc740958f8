"""Time and memory of the Hessian measures on SmolLM2-135M against a plain training step, each in a fresh process.

    python benchmarks/bench_measures.py --threads 1 --out BENCHMARKS.md            # every job (~1 h on 1 core)
    python benchmarks/bench_measures.py --jobs step,hvp-head,hvp-head-forward       # a few of them
    python benchmarks/bench_measures.py --all-batch-size 2                           # whole-model jobs on 2 × 128

The model is SmolLM2-135M (the packaged GGUF, de-quantized to float32), the batch ``--batch-size`` blocks of
``--seq-len`` tokens of *Hamlet* (as in bench_steps.py). Every job runs alone in a fresh process forked from a
server that has only imported the libraries (``benchmarks/measure.py``), with glibc told to return freed blocks, and
reports its CPU time (``time.process_time``; run ``--threads 1`` on a shared machine), its wall time, and its peak
resident memory (``VmHWM``, reset right before the job's work, after the model and batch are loaded). Jobs:

* ``step``, ``step-all``: a plain ``Trainer`` step (forward, backward, clipping, AdamW), 1 warm-up + ``--steps``
  timed, median, on the batch of the LM-head jobs and of the whole-model jobs (the reference of each row);
* ``hvp-{head,all}[-forward]``: ``LossHessian`` built (one forward and backward pass) and ``--hvps`` products,
  by double backward or (``-forward``) forward-over-reverse; the time per product;
* ``hvp-all-checkpoint``: ``hvp-all`` under transformers' non-reentrant activation checkpointing (in training mode,
  where transformers checkpoints; SmolLM2 has no dropout), to see whether it lowers the peak (it does not: the first
  backward keeps the recomputed activations in the graph, docs/measures.md#memory-over-the-whole-model);
* ``trace-{head,all}``: Hutchinson ``hessian_trace`` with ``--probes`` probes (memory ``O(n·block)``);
* ``eig{1,5}-{head,all}``: ``top_eigenvalues`` with ``k`` = 1 or 5, ``tol=--tol``: ARPACK keeping ``k + 2`` vectors
  on the LM head, the streaming Lanczos (no basis) on all parameters;
* ``gn-{head,all}``: ``gauss_newton_trace`` with ``--probes`` probes (forward-mode products, no backward);
* ``sam-{head,all}``: ``sam_sharpness`` at ρ = 0.05 (a gradient, then a forward pass at ``w + ε̂``);
* ``closed-head``: ``hessian_trace(method="closed_form")``, the exact trace of the head from one forward pass (no
  HVP; its row's time over the step's is the whole measure's, not a product's).

``head`` is the LM head's own use of the tied matrix (``W: 49,152 × 576``, n = 28.3M); ``all`` every parameter
(n = 134.5M) on ``--all-batch-size`` sequences, with ``--micro-batches`` > 1 as a ``MicroBatchedHessian`` (each product
one part of the batch at a time).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.cases import PLAIN, build_cases, load_batch, load_model, make_trainer  # noqa: E402
from benchmarks.measure import MALLOC_ENV, MIB, Stepper, _forkserver, _reset_peak, _rss, log, quiet  # noqa: E402
from benchmarks.report import machine, write_section  # noqa: E402

JOBS = (
    "step", "step-all",
    "hvp-head", "hvp-head-forward", "hvp-all", "hvp-all-forward", "hvp-all-checkpoint",
    "trace-head", "gn-head", "closed-head", "eig1-head", "eig5-head",
    "trace-all", "gn-all", "eig1-all", "eig5-all", "sam-head", "sam-all",
)  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated (default: all): {', '.join(JOBS)}")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default: 8)")
    parser.add_argument("--all-batch-size", type=int, help="sequences for the whole-model jobs (default: --batch-size)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: 128)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (default: 3)")
    parser.add_argument("--hvps", type=int, default=2, help="products timed by the hvp jobs (default: 2)")
    parser.add_argument("--probes", type=int, default=8, help="probes of the trace jobs (default: 8)")
    parser.add_argument("--tol", type=float, default=1e-3, help="eigsh's relative tolerance (default: 1e-3)")
    parser.add_argument("--maxiter", type=int, default=300, help="streaming Lanczos steps at most (default: 300)")
    parser.add_argument("--micro-batches", type=int, default=1,
                        help="whole-model jobs: products over this many parts of the batch, one at a time (default: 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default: 1)")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--out", help="write the table into this markdown file (section bench:measures)")
    parser.add_argument("--render", nargs="+", metavar="JSON", help="only render the table from saved --json files")
    return parser.parse_args(argv)


def run_job(job: str, args) -> dict:
    """One job, in this (fresh) process: load, reset the peak, run, read the counters."""
    torch.set_num_threads(args.threads)
    quiet()
    from fam_hf.measures import (
        LossHessian,
        MicroBatchedHessian,
        estimate_top_eigenpairs,
        estimate_trace,
        gauss_newton_trace,
        hessian_trace,
        resolve_subset,
        sam_sharpness,
    )

    whole = "-all" in job  # step-all: a step on the whole-model batch
    batch_size = (args.all_batch_size or args.batch_size) if whole else args.batch_size
    case = dataclasses.replace(build_cases(False, "cpu")["smollm2-full-head"], batch_size=batch_size,
                               seq_len=args.seq_len)  # fmt: skip
    model, tokenizer = load_model(case, "cpu")
    batch = load_batch(case, tokenizer, model.config.vocab_size, "cpu")
    wrt = None if whole else "lm_head"
    result: dict = {"job": job, "batch": [batch_size, args.seq_len]}
    with tempfile.TemporaryDirectory() as output_dir:
        if job.startswith("step"):
            trainer = make_trainer(case, PLAIN, model, output_dir, "cpu", False)
            trainer.create_optimizer()
            stepper = Stepper(trainer, model, batch, "cpu", False)
        gc.collect()
        _reset_peak("cpu")
        before, _ = _rss()
        start, start_cpu = time.perf_counter(), time.process_time()
        if job.startswith("step"):
            stepper.step()  # warm-up: creates AdamW's state
            times = [stepper.step() for _ in range(args.steps)]
            result.update(step_cpu=statistics.median(c for _, c in times), step_wall=statistics.median(w for w, _ in times))
        elif job.startswith("closed"):  # no Hessian: one forward pass
            model.eval()
            trace = hessian_trace(model, batch, wrt, method="closed_form")
            result.update(value=float(trace.value), std_error=None, matvecs=0, n=trace.dim, build_cpu=0.0)
        elif job.startswith("gn"):  # no Hessian: forward-mode products of the logits
            model.eval()
            trace = gauss_newton_trace(model, batch, wrt, probes=args.probes, disable_tqdm=True)
            result.update(value=float(trace.value), std_error=float(trace.std_error), matvecs=trace.matvecs,
                          n=trace.dim, build_cpu=0.0)  # fmt: skip
            result["per_matvec_cpu"] = (time.process_time() - start_cpu) / trace.matvecs
        elif job.startswith("sam"):  # no Hessian: a gradient and a second forward pass at w + ε̂
            model.eval()
            sharpness = sam_sharpness(model, batch, wrt, rho=0.05)
            result.update(value=float(sharpness.value), std_error=None, matvecs=0, build_cpu=0.0,
                          n=resolve_subset(model, wrt).dim)  # fmt: skip
        else:
            model.eval()
            if job.endswith("-checkpoint"):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.train()  # transformers checkpoints only in training mode
            hvp = "forward_over_reverse" if job.endswith("-forward") else "double_backward"
            if whole and args.micro_batches > 1 and not job.startswith("gn") and hvp == "double_backward":
                hessian = MicroBatchedHessian(model, batch, wrt, micro_batches=args.micro_batches)
                result["micro_batches"] = args.micro_batches
            else:
                hessian = LossHessian(model, batch, wrt, hvp=hvp)
            result.update(build_cpu=time.process_time() - start_cpu, n=hessian.dim, hvp=hvp)
            work_cpu = time.process_time()
            if job.startswith("hvp"):
                generator = torch.Generator().manual_seed(0)
                for _ in range(args.hvps):
                    hessian.matvec(torch.randn(hessian.dim, generator=generator))
                result.update(matvecs=hessian.matvecs)
            elif job.startswith("trace"):
                trace = estimate_trace(hessian, probes=args.probes, disable_tqdm=True)
                result.update(value=float(trace.value), std_error=float(trace.std_error), matvecs=trace.matvecs,
                              block=hessian.default_block)  # fmt: skip
            elif job.startswith("eig"):
                k = int(job[3])
                if whole:  # ARPACK's float64 basis of n = 134.5M would not fit: the streaming Lanczos keeps none
                    eig = estimate_top_eigenpairs(hessian, k, method="streaming", tol=args.tol, maxiter=args.maxiter,
                                                  disable_tqdm=True)  # fmt: skip
                    result["converged"] = eig.matvecs < args.maxiter
                else:
                    eig = estimate_top_eigenpairs(hessian, k, tol=args.tol, block=k + 2, disable_tqdm=True)
                result.update(values=eig.values.tolist(), matvecs=eig.matvecs, method=eig.method)
            result["per_matvec_cpu"] = (time.process_time() - work_cpu) / max(result.get("matvecs", 1), 1)
        result.update(cpu=time.process_time() - start_cpu, wall=time.perf_counter() - start)
        current, peak = _rss()
        result.update(before=before, peak=peak, growth=peak - before)
    return result


def _child(connection, job, args) -> None:
    try:
        connection.send(("ok", run_job(job, args)))
    except BaseException as error:  # noqa: BLE001 - report anything to the parent
        import traceback

        connection.send(("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()[-2000:]}"))
    finally:
        connection.close()


def in_fresh_process(job: str, args) -> dict:
    context = _forkserver()
    os.environ.update(MALLOC_ENV)
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(send, job, args))
    child.start()
    send.close()
    try:
        status, payload = receive.recv()
    except EOFError:
        child.join()
        status, payload = "error", f"the process died (exit code {child.exitcode})"
    child.join()
    if status != "ok":
        raise RuntimeError(f"{job} failed: {payload}")
    return payload


LABELS = {
    "step": "plain training step (forward, backward, AdamW)",
    "hvp": "one Hessian-vector product (double backward)",
    "hvp-forward": "one Hessian-vector product (forward-over-reverse)",
    "hvp-checkpoint": "one Hessian-vector product (double backward, activation checkpointing)",
    "trace": "`hessian_trace`, Hutchinson, {probes} probes",
    "gn": "`gauss_newton_trace`, {probes} probes",
    "sam": "`sam_sharpness`, ρ = 0.05",
    "closed": "`hessian_trace`, closed form (exact, one forward pass)",
    "eig1": "`top_eigenvalues`, k = 1",
    "eig5": "`top_eigenvalues`, k = 5",
}


def render(results: dict[str, dict], args, info: dict) -> str:
    lines = [
        f"SmolLM2-135M (float32), batch {args.batch_size} × {args.seq_len} tokens of *Hamlet*"
        + (f" ({args.all_batch_size} × {args.seq_len} for all parameters)" if args.all_batch_size else "")
        + f"; {info['cpu']}, torch {info['torch']}, {args.threads} thread(s), CPU-time clock; commit "
        f"{info.get('commit', '?')}{' (dirty)' if info.get('dirty') else ''}. Each row alone in a fresh process.",
        "",
        "| quantity | wrt | n | HVPs | time (CPU s) | per HVP (CPU s) | per HVP / step | peak memory | peak / step's | value |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for job, r in results.items():
        batch = "" if r["batch"][0] == args.batch_size else f" ({r['batch'][0]} × {r['batch'][1]})"
        if job.startswith("step"):
            lines.append(f"| {LABELS['step']} | all{batch} | 134.5M | – | {r['step_cpu']:.1f} | – | – | "
                         f"{r['peak'] / MIB / 1024:.2f} GiB | 1.00 | – |")  # fmt: skip
            continue
        step = results.get("step-all" if "-all" in job else "step") or results.get("step")
        step_cpu, step_peak = (step["step_cpu"], step["peak"]) if step else (None, None)
        kind, wrt = job.split("-")[0], "LM head" if "-head" in job else "all"
        variant = next((v for v in ("-forward", "-checkpoint") if job.endswith(v)), "")
        label = LABELS[kind + variant].format(probes=args.probes)
        if r.get("method") == "streaming":
            label += " (streaming Lanczos)"
        if r.get("micro_batches"):
            label += f", {r['micro_batches']} parts of the batch"
        elif kind.startswith("eig"):
            label += f" (ARPACK, {int(kind[3]) + 2} vectors)"
        per = r.get("per_matvec_cpu")
        value = ""
        if "value" in r:
            value = f"{r['value']:.4g}" + (f" ± {r['std_error']:.2g}" if r.get("std_error") is not None else "")
            value += " (exact)" if kind == "closed" else ""
        if per is None:  # no products: the whole measure's time against the step's
            lines.append(
                f"| {label} | {wrt}{batch} | {r['n'] / 1e6:.1f}M | 0 | {r['cpu']:.1f} | – | "
                f"{r['cpu'] / step_cpu if step_cpu else float('nan'):.2f} (whole measure) | "
                f"{r['peak'] / MIB / 1024:.2f} GiB | {r['peak'] / step_peak if step_peak else float('nan'):.2f} | {value} |"
            )
            continue
        elif "values" in r:
            value = ", ".join(f"{v:.4g}" for v in r["values"])
            if r.get("converged") is False:
                value += f" (Ritz values after {r['matvecs']} steps, not converged to `--tol`)"
        lines.append(
            f"| {label} | {wrt}{batch} | {r['n'] / 1e6:.1f}M | {r.get('matvecs', '–')} | {r['cpu']:.1f} | "
            f"{per:.1f} | {per / step_cpu if step_cpu else float('nan'):.2f} | {r['peak'] / MIB / 1024:.2f} GiB | "
            f"{r['peak'] / step_peak if step_peak else float('nan'):.2f} | {value} |"
        )
    lines += ["", "Command: `python benchmarks/bench_measures.py " + " ".join(sys.argv[1:]) + "`"]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        results = {}
        for path in args.render:
            results.update(json.loads(Path(path).read_text()))
        order = {job: i for i, job in enumerate(JOBS)}
        results = dict(sorted(results.items(), key=lambda item: order[item[0]]))
        text = render(results, args, machine())
        print(text)
        if args.out:
            write_section(Path(args.out), "measures", text)
        return 0
    jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    unknown = set(jobs) - set(JOBS)
    if unknown:
        raise SystemExit(f"unknown jobs {sorted(unknown)}; choose from {', '.join(JOBS)}")
    torch.set_num_threads(args.threads)
    results = {}
    for job in jobs:
        log(f"[bench_measures] {job} …")
        results[job] = in_fresh_process(job, args)
        r = results[job]
        log(f"[bench_measures] {job}: {r['cpu']:.1f} CPU s, peak {r['peak'] / MIB:.0f} MiB, "
            f"{ {k: v for k, v in r.items() if k in ('matvecs', 'per_matvec_cpu', 'value', 'values', 'step_cpu')} }")  # fmt: skip
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    text = render(results, args, machine())
    print(text)
    if args.out:
        write_section(Path(args.out), "measures", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

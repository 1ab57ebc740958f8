"""benchmarks/gpu_check.py: its CPU dry run reports every check, and a broken check turns the report red.

The dry run runs as the GPU run will: a fresh process of ``python benchmarks/gpu_check.py``, here with the
``datasets`` package made unimportable, as it is on the GPU machine. No time or memory figure is asserted
(they are measured and reported, never asserted by a test); the numeric checks that the CPU can run must pass
with their numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check  # noqa: E402
from benchmarks.gpu_check_core import STATUSES, Check, Context, Skip, run_checks  # noqa: E402

# `datasets` is not on the GPU machine: find_spec answers None and `import datasets` fails, as there
WITHOUT_DATASETS = (
    "import sys, runpy; sys.modules['datasets'] = None; sys.argv = ['benchmarks/gpu_check.py', *sys.argv[1:]]; "
    "runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')"
)
# what the CPU runs in the dry run, and must pass there
CPU_NUMERIC = ("kappa-bf16-products", "kappa-bf16-autocast", "kappa-fp16-autocast", "fused-head-bf16",
               "fp16-gradscaler-overflow", "probe-kernels-fp32", "probe-kernels-bf16")  # fmt: skip


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", WITHOUT_DATASETS, "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    seconds = time.monotonic() - start
    print(f"dry run: {seconds:.0f} s")
    return proc, out, seconds


def test_dry_run_reports_every_check(dry_run):
    proc, out, _ = dry_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    markdown = (out / "gpu_check.md").read_text()
    assert report["dry_run"] and report["ok"] and report["verdict"].startswith("PASS")
    assert report["machine"]["datasets"] is None  # it ran without `datasets`
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == [c.name for c in gpu_check.CHECKS]
    for name, check in checks.items():
        assert check["status"] in STATUSES, name
        assert f"`{name}`" in markdown
    for name in CPU_NUMERIC:
        check = checks[name]
        assert check["status"] == "pass", (name, check)
        assert check["criteria"] and all(c["ok"] for c in check["criteria"]), (name, check["criteria"])
        numbers = [c for c in check["criteria"] if c["limit"] is not None]
        assert all(0 <= c["value"] <= c["limit"] for c in numbers), (name, numbers)
        assert numbers or name == "fp16-gradscaler-overflow", name  # the others are judged on numbers
    assert checks["ddp-nccl"]["status"] == "skipped" and "≥ 2 GPUs" in checks["ddp-nccl"]["reason"]
    for name in ("kbit-closed-form-head", "kbit-probe-adapter"):
        if checks[name]["status"] == "skipped":  # bitsandbytes is not among the test dependencies
            assert checks[name]["reason"].startswith("bitsandbytes not installed")
            assert "bitsandbytes not installed" in markdown
    assert "fails: derivative for" in checks["probe-kernels-fp32"]["values"]["fused_double_backward"]


def test_dry_run_times_the_bench_cases(dry_run):
    _, out, _ = dry_run
    checks = {c["name"]: c for c in json.loads((out / "gpu_check.json").read_text())["checks"]}
    for case in ("smollm2-full-head", "smollm2-lora", "smollm2-clm-lora"):
        name = f"timing-{case}"
        check = checks[name]
        assert check["status"] == "pass", check
        rows = {row["name"]: row for row in check["values"]["variants"]}
        from benchmarks.cases import build_cases

        assert set(rows) == {v.name for v in build_cases(False, "cpu")[case].variants}
        assert all(row["ms"] > 0 and row["peak_mib"] > 0 for row in rows.values())
        assert rows["plain"]["ratio"] == 1.0


def test_a_wrong_tolerance_fails_the_report(tmp_path):
    argv = ["--dry-run", "--only", "kappa-bf16-autocast", "--out", str(tmp_path),
            "--tolerance", "kappa-bf16-autocast.kappa_rel_err=1e-12"]  # fmt: skip
    assert gpu_check.main(argv) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    (check,) = report["checks"]
    assert check["status"] == "fail" and not report["ok"] and report["verdict"].startswith("FAIL")
    judged = {c["key"]: c for c in check["criteria"]}["kappa_rel_err"]
    assert judged["limit"] == 1e-12 and judged["value"] > 1e-12 and not judged["ok"]
    assert "❌ fail" in (tmp_path / "gpu_check.md").read_text()


def _context(tmp_path, budget_s: float) -> Context:
    return Context(device="cpu", dry_run=True, model="tiny-llama", model_note="", real_weights=False, batch_size=2,
                   seq_len=8, repeats=1, warmup=1, deadline=time.monotonic() + budget_s, workdir=tmp_path)  # fmt: skip


def test_crashes_overruns_and_the_budget_are_reported_and_the_rest_still_run(tmp_path):
    def crash(ctx, out):
        out.values["before"] = 1.5
        raise ValueError("boom in the check")

    def good(ctx, out):
        out.within("x", "x", 0.5, 1.0)

    def overrun(ctx, out):
        time.sleep(60)

    def skip(ctx, out):
        raise Skip("not here")

    def silent(ctx, out):
        pass

    checks = [Check("crash", "t", "", crash, (0, 0)), Check("good", "t", "", good, (0, 0)),
              Check("skip", "t", "", skip, (0, 0)), Check("silent", "t", "", silent, (0, 0)),
              Check("overrun", "t", "", overrun, (0, 0)), Check("late", "t", "", good, (0, 0.5))]  # fmt: skip
    seen = []
    # 6 s: the runner collects garbage after each check, ~0.5 s in a process that has loaded transformers
    results = {
        r["name"]: r for r in run_checks(checks, _context(tmp_path, 6.0), on_result=lambda r: seen.append(len(r)))
    }
    assert seen == [1, 2, 3, 4, 5, 6]  # the report is rewritten after every check
    assert results["crash"]["status"] == "error" and "boom in the check" in results["crash"]["traceback"]
    assert results["crash"]["values"] == {"before": 1.5}  # what it measured before it broke is kept
    assert results["good"]["status"] == "pass"
    assert results["skip"]["status"] == "skipped" and results["skip"]["reason"] == "not here"
    assert results["silent"]["status"] == "error"  # judged nothing: not a pass
    assert results["overrun"]["status"] == "error" and "--budget-s" in results["overrun"]["error"]
    assert results["overrun"]["seconds"] < 20
    assert results["late"]["status"] == "skipped" and results["late"]["reason"].startswith("budget")


def test_nan_fails_a_tolerance():
    from benchmarks.gpu_check_core import Outcome

    out = Outcome("c", {"c.y": 2.0})
    assert not out.within("x", "x", float("nan"), 1.0)
    assert out.within("y", "y", 1.5, 1.0)  # the override replaces the default
    assert not out.ok


def test_unknown_check_and_missing_weights(tmp_path):
    with pytest.raises(SystemExit, match="unknown check.*kappa-bf16-autocast"):
        gpu_check.main(["--dry-run", "--only", "no-such-check", "--out", str(tmp_path)])
    model, note, real = gpu_check.resolve_model(str(tmp_path / "missing"), dry_run=False)
    assert model == gpu_check.RANDOM_MODEL and not real and "random" in note and "missing" in note

"""benchmarks/: the FAMSFTTrainer-vs-SFTTrainer and FAMTrainer-vs-Trainer (causal LM) cases run through the harness (tiny random Llama, seconds).

No time or memory figure is asserted (speed and memory are measured into BENCHMARKS.md, never asserted by a
test); this only checks that the case builds, steps and is tabled.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_steps  # noqa: E402
from benchmarks.cases import build_cases  # noqa: E402


@pytest.mark.parametrize("case", ["tiny-llama-sft", "tiny-llama-clm"])
def test_the_fused_kernel_cases_are_timed_and_tabled(case):
    argv = ["--cases", case, "--repeats", "2", "--warmup", "1", "--memory-runs", "0", "--threads", "1"]
    text = bench_steps.main(argv)
    for variant in build_cases(False, "cpu")[case].variants:
        assert f"| {variant.label} |" in text
    assert "skipped" not in text and "failed" not in text


def test_the_smollm2_sft_cases_carry_their_targets():
    cases = build_cases(False, "cpu")
    for name in ("smollm2-sft-full", "smollm2-sft-lora"):
        variants = {v.name: v for v in cases[name].variants}
        assert variants["plain"].kind == "sft" and variants["trainer"].kind == "plain"
        assert (variants["famsft"].time_target, variants["famsft"].memory_target) == (1.20, 1.00)
        assert variants["famsft"].fused and not variants["famsft-beside"].fused
        assert variants["famsft-tf0.25"].time_target == 1.08
    assert cases["smollm2-sft-lora"].lora and not cases["smollm2-sft-full"].lora
    for name in ("smollm2-clm-full", "smollm2-clm-lora"):
        variants = {v.name: v for v in cases[name].variants}
        assert (variants["fam"].time_target, variants["fam"].memory_target) == (1.20, 1.00)
        assert variants["fam"].fused and not variants["fam-beside"].fused
        assert variants["loss-from-hidden"].kind == "hidden-loss"
    assert cases["smollm2-clm-lora"].lora and not cases["smollm2-clm-full"].lora

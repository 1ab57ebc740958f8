"""benchmarks/: the reference method agrees with fam_hf's closed form, and the harness produces its tables.

No time or memory figure is asserted here (speed is measured in benchmarks/, never asserted by a timed
test); the harness runs on tiny random models only to check that it works end to end.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from models import tiny_bert

import fam_hf

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_steps  # noqa: E402
from benchmarks.cases import build_cases  # noqa: E402
from benchmarks.measure import measure_memory  # noqa: E402
from benchmarks.reference_fam import hessian_bytes, reference_hessian, reference_kappa  # noqa: E402
from benchmarks.report import write_section  # noqa: E402


def _batch(num_labels=3):
    g = torch.Generator().manual_seed(4)
    return {
        "input_ids": torch.randint(0, 40, (6, 7), generator=g),
        "labels": torch.randint(0, num_labels, (6,), generator=g),
    }


def test_reference_kappa_equals_closed_form_float64():
    model = tiny_bert()
    batch = _batch()
    reference = reference_kappa(model, batch)
    closed = fam_hf.relative_flatness(model, batch, estimator="closed_form").value
    torch.testing.assert_close(reference, closed, rtol=1e-12, atol=0)


def test_reference_hessian_matches_fam_hf_brute_force():
    model = tiny_bert()
    batch = _batch()
    reference = reference_hessian(model, batch, "classifier.weight")
    flatness = fam_hf.RelativeFlatness(model, "classifier", "exact")
    with flatness.record(batch, differentiable=False) as recording:
        loss = model(**batch).loss
    brute = fam_hf.layer_hessian(loss, recording.perturbation)
    flatness.close()
    torch.testing.assert_close(reference, brute, rtol=1e-10, atol=1e-14)


def test_reference_gradient_is_fam_hf_detached_gradient():
    # The reference holds the Hessian constant: its κ-gradient w.r.t. W is fam_hf's `detached` one.
    model = tiny_bert()
    batch = _batch()
    weight = model.classifier.weight
    (reference,) = torch.autograd.grad(reference_kappa(model, batch), weight)
    flatness = fam_hf.RelativeFlatness(model, "classifier", "closed_form", hessian_grad="detached")
    with flatness.record(batch) as recording:
        outputs = model(**batch)
    kappa = recording.result(outputs.loss, logits=outputs.logits).value
    flatness.close()
    (detached,) = torch.autograd.grad(kappa, weight)
    torch.testing.assert_close(reference, detached, rtol=1e-10, atol=1e-16)


def test_reference_memory_on_an_lm_head():
    assert hessian_bytes(49152, 576) == (49152 * 576) ** 2 * 4  # SmolLM2's head: ~3.2 PB in float32
    assert "3.2 PB" in " ".join(build_cases(False, "cpu")["smollm2-full-head"].notes)


def test_harness_writes_its_tables(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nhand-written analysis\n")
    argv = ["--cases", "tiny-bert,tiny-llama-lora", "--repeats", "2", "--warmup", "1", "--memory-runs", "0"]
    text = bench_steps.main([*argv, "--threads", "1", "--out", str(out), "--section", "smoke"])
    written = out.read_text()
    assert "hand-written analysis" in written  # the rest of the file is kept
    assert "<!-- bench:smoke:start -->" in written and text.strip() in written
    assert "Command: `python benchmarks/bench_steps.py --cases tiny-bert,tiny-llama-lora" in text
    assert "Load average" in text and "torch.set_num_threads(1)" in text
    for case in ("tiny-bert", "tiny-llama-lora"):
        for variant in build_cases(False, "cpu")[case].variants:
            assert f"| {variant.label} |" in text  # timed, or listed with why it was skipped
    assert "reference step / this step" in text


def test_write_section_replaces_only_its_section(tmp_path):
    out = tmp_path / "B.md"
    write_section(out, "quick", "first")
    write_section(out, "full", "other")
    write_section(out, "quick", "second")
    text = out.read_text()
    assert "second" in text and "first" not in text and "other" in text


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status")
def test_memory_measurement_runs():
    case = build_cases(False, "cpu")["tiny-bert"]
    plain = case.variants[0]
    args = SimpleNamespace(device="cpu", bf16=False)
    result = measure_memory(case, plain, args)
    assert result["peak"] >= result["before"] > 0
    assert result["growth"] == result["peak"] - result["before"]

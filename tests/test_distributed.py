"""Two real gloo ranks through `accelerate launch` against one process on the same global batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ddp_worker import VARIANTS, train
from models import launch

HERE = Path(__file__).parent
pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    launch(
        "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        "29517",
        str(HERE / "ddp_worker.py"),
        str(out),
    )
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_ranks_equal_one_process_on_the_global_batch(ddp_run, tmp_path, variant):
    """Closed form and Gauss–Newton: the penalty follows Trainer's token averaging across ranks. Probe and
    Gauss–Newton: every rank draws the same Rademacher matrices (same seed), so the all-reduced estimate is the
    single-process one."""
    ranks = [torch.load(ddp_run / f"{variant}-rank{r}.pt") for r in range(2)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert all(r["fused"] == (variant in ("closed_form", "relative")) for r in ranks)
    single = train(tmp_path, variant, per_device_batch=16)
    single_logs = [h for h in single.state.log_history if "fam/kappa" in h]
    for rank in ranks:
        for name, value in single.model.state_dict().items():
            torch.testing.assert_close(rank["params"][name], value, rtol=0, atol=1e-6, msg=name)
        stderr = ("fam/kappa_stderr",) if "fam/kappa_stderr" in single_logs[0] else ()  # the probe's, P = 2
        for key in ("fam/kappa", "fam/penalty", "fam/lambda", "loss", *stderr):
            assert [h[key] for h in rank["logs"]] == pytest.approx([h[key] for h in single_logs], rel=1e-5), key


@pytest.mark.skipif(
    not hasattr(torch.cpu.Stream, "record_event"),
    reason="this torch's fully_shard cannot run on the CPU ('Stream' object has no attribute 'record_event'; torch 2.6)",
)
def test_fsdp2_closed_form_equals_one_process(tmp_path):
    out = tmp_path / "fsdp.pt"
    launch("torchrun", "--nproc_per_node", "2", "--master_port", "29518", str(HERE / "fsdp_worker.py"), str(out))
    result = torch.load(out)
    assert "FSDP frees after the forward pass" in result["probe_refused"]
    torch.testing.assert_close(result["kappa"], result["ref_kappa"], rtol=1e-6, atol=0)
    for name, grad in result["ref_grads"].items():
        torch.testing.assert_close(result["grads"][name], grad, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_closed_form_equals_one_process(tmp_path, stage):
    """DeepSpeed's CPU accelerator (gloo): κ reads the head's weight inside its forward, where ZeRO-3 has gathered
    it. The probe is refused: DeepSpeed reduces gradients at the end of every backward pass, the probe's too."""
    pytest.importorskip("deepspeed")
    from deepspeed_worker import train

    launch("torchrun", "--nproc_per_node", "2", "--master_port", "29519", str(HERE / "deepspeed_worker.py"),
           str(tmp_path), str(stage))  # fmt: skip
    single = train(tmp_path / "single", per_device_batch=16, stage=None)
    single_logs = [h for h in single.state.log_history if "fam/kappa" in h]
    for rank in range(2):
        result = torch.load(tmp_path / f"zero{stage}-rank{rank}.pt")
        assert result["world_size"] == 2 and result["logs"][0]["fam/penalty"] > 0
        for name, value in single.model.named_parameters():
            torch.testing.assert_close(result["params"][name], value.detach(), rtol=0, atol=1e-6, msg=name)
        for key in ("fam/kappa", "fam/penalty", "fam/lambda", "loss"):
            assert [h[key] for h in result["logs"]] == pytest.approx([h[key] for h in single_logs], rel=1e-5), key
        assert "DeepSpeed runs its gradient reduction at the end of every backward" in result["trainer_refusal"]
        if stage == 3:
            assert "DeepSpeed ZeRO-3 frees" in result["module_refusal"]

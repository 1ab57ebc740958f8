"""FAMSFTTrainer on two real gloo ranks (`accelerate launch`, tests/trl_ddp_worker.py) against one process on the
global batch: assistant-masked chat rows, padded, packed, padding-free and with gradient accumulation."""

from __future__ import annotations

import pytest
import torch
from models import launch
from test_distributed import HERE

pytest.importorskip("trl")

from test_trl import LAM, LR, llama, model_inputs  # noqa: E402
from trl_ddp_worker import PER_DEVICE, VARIANTS, train  # noqa: E402

from fam_hf import relative_flatness  # noqa: E402

EQUAL_TO_ONE_PROCESS = [v for v in VARIANTS if v != "local_tokens"]
pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trl_ddp")
    launch("accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "29561",
           str(HERE / "trl_ddp_worker.py"), str(out))  # fmt: skip
    return {v: [torch.load(out / f"{v}-rank{r}.pt") for r in range(2)] for v in VARIANTS}


def counted(batch) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


@pytest.mark.parametrize("variant", EQUAL_TO_ONE_PROCESS)
def test_two_ranks_equal_one_process_on_the_global_batch(ddp_run, tmp_path, variant):
    """``average_tokens_across_devices`` (the default): Trainer sums the counted tokens of both ranks into
    ``num_items_in_batch``, TRL's fused loss divides by it and multiplies by the number of processes, DDP averages;
    κ is normalised and scaled the same way, so the all-reduced penalty is κ of the global batch."""
    ranks = ddp_run[variant]
    assert all(r["world_size"] == 2 and r["fused"] for r in ranks)
    for (a, n), (b, n_other) in zip(ranks[0]["seen"], ranks[1]["seen"]):
        # the ranks saw different rows, and num_items_in_batch is the global count of the accumulated micro-batches
        assert not torch.equal(a["input_ids"], b["input_ids"]) and int(n) == int(n_other)
    accumulate = VARIANTS[variant].get("gradient_accumulation_steps", 1)
    for step in range(len(ranks[0]["seen"]) // accumulate):
        micro = slice(step * accumulate, (step + 1) * accumulate)
        total = sum(counted(batch) for r in ranks for batch, _ in r["seen"][micro])
        assert all(int(n) == total for r in ranks for _, n in r["seen"][micro])

    single = train(tmp_path, variant, per_device_batch=2 * PER_DEVICE)
    single_logs = [h for h in single.state.log_history if "fam/kappa" in h]
    assert len(single_logs) == 2 and all(h["fam/penalty"] > 0 for h in single_logs)
    assert [int(n) for _, n in single.seen] == [int(n) for _, n in ranks[0]["seen"]]
    for rank in ranks:
        for name, value in single.model.state_dict().items():
            torch.testing.assert_close(rank["params"][name], value, rtol=0, atol=1e-6, msg=name)
        for key in ("fam/kappa", "fam/penalty", "loss"):
            assert [h[key] for h in rank["logs"]] == pytest.approx([h[key] for h in single_logs], rel=1e-5), key


def test_without_token_averaging_each_rank_penalises_its_own_mean_as_its_loss_does(ddp_run):
    """``average_tokens_across_devices=False``: each rank's loss is the mean over its own counted tokens and DDP
    averages the gradients, so 2 ranks are not one process; the penalty must follow the loss: the step is
    ``-lr · mean_r ∇(L_r + λ κ_r)``, replayed here by hand from each rank's micro-batch."""
    ranks = ddp_run["local_tokens"]
    grads, objectives, kappas = [], [], []
    for rank in ranks:
        ((batch, n),) = rank["seen"]
        assert int(n) == counted(batch)  # the rank's own count
        reference = llama()
        reference.load_state_dict(rank["initial"])
        reference.train()
        inputs = model_inputs(batch)
        kappa = relative_flatness(reference, inputs, differentiable=True).value
        objective = reference(**inputs).loss + LAM * kappa
        grads.append(torch.autograd.grad(objective, list(reference.parameters())))
        objectives.append(float(objective.detach()))
        kappas.append(float(kappa.detach()))
    counts = [int(rank["seen"][0][1]) for rank in ranks]
    assert counts[0] != counts[1]  # so the mean of the ranks' means is not the global mean
    names = [name for name, _ in reference.named_parameters()]
    initial = ranks[0]["initial"]
    for rank in ranks:
        for name, g0, g1 in zip(names, *grads):
            expected = initial[name] - LR * (g0 + g1) / 2
            torch.testing.assert_close(rank["params"][name], expected, rtol=0, atol=1e-6, msg=name)
        (log,) = rank["logs"]
        assert log["fam/kappa"] == pytest.approx(sum(kappas) / 2, rel=1e-5)
        assert log["loss"] == pytest.approx(sum(objectives) / 2, rel=1e-5)

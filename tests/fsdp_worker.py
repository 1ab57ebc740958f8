"""Run under `torchrun --nproc_per_node 2` (gloo, CPU): FSDP2 `fully_shard` on a tiny GPT-2 with the FAM
closed form on its (tied) LM head; saves κ and the full gradients next to a one-process reference.

accelerate turns an FSDP config into plain multi-CPU when `use_cpu` is set, so this drives torch's
`fully_shard` directly: the point is that κ reads the head's weight inside its forward, where FSDP has
gathered it."""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).parent))
from models import gpt2, lm_data  # noqa: E402

from fam_hf import RelativeFlatness  # noqa: E402

LAMBDA = 0.3


def step(model, batch, num_items):
    flatness = RelativeFlatness(model, "auto", "closed_form")
    with flatness.record(batch, num_items_in_batch=num_items) as recording:
        loss = model(**batch, num_items_in_batch=num_items).loss
    kappa = recording.result(loss).value
    return loss, kappa


def run(path: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = {k: torch.tensor(v) for k, v in lm_data(16)[:16].items()}
    local = {k: v[rank * 8 : (rank + 1) * 8] for k, v in batch.items()}
    num_items = (batch["labels"][:, 1:] != -100).sum()  # global count, as Trainer's token averaging

    model = gpt2()
    mesh = init_device_mesh("cpu", (world,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    try:
        RelativeFlatness(model, "transformer.h.0.mlp.c_fc", "probe").record(local).__enter__()
        probe_refused = ""
    except ValueError as error:
        probe_refused = str(error)
    loss, kappa = step(model, local, num_items)
    (world * (loss + LAMBDA * kappa)).backward()  # FSDP averages gradients over ranks
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    kappa = kappa.detach() * world
    dist.all_reduce(kappa)

    reference = gpt2()
    ref_loss, ref_kappa = step(reference, batch, num_items)
    (ref_loss + LAMBDA * ref_kappa).backward()
    if rank == 0:
        torch.save(
            {
                "kappa": kappa / world,
                "grads": grads,
                "ref_kappa": ref_kappa.detach(),
                "ref_grads": {n: p.grad for n, p in reference.named_parameters()},
                "probe_refused": probe_refused,
            },
            path,
        )


if __name__ == "__main__":
    dist.init_process_group("gloo")
    run(sys.argv[1])
    # Unlike DDP (tests/ddp_worker.py), the sharded model outlives run(): FSDP2's hooks stay referenced from
    # tensors the collector cannot reach, and DTensor's sharding caches keep its mesh (torch 2.13), so the group's
    # gloo threads outlive destroy_process_group and can abort the interpreter's finalization when one frees a
    # finished collective (pytorch/pytorch#190489; fam_hf.distributed.leave_process_group). Skip the finalization.
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

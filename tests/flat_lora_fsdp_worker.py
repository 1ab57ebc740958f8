"""Run under `torchrun --nproc_per_node 2` (gloo, CPU): Flat-LoRA's perturbation on a tiny GPT-2 sharded with FSDP2
`fully_shard`, two SGD steps on 8 examples per rank; saves the gathered weights and losses next to a one-process
reference on the 16. Two models: LoRA on `c_attn`/`c_fc`, and a full fine-tune (every `Conv1D` and the tied head).

The perturbation is `fam_hf.perturbation.PerturbedLayers`, opened around each step as `FlatLoRAMixin.training_step`
opens it, its hooks registered before sharding as `FlatLoRATrainer.__init__` registers them before `Trainer`
prepares the model. The sharding is what `Trainer` makes of a model under FSDP2: the block, then the root; for the
LoRA model also every `A` and `B` as an FSDP unit of its own (PEFT's `fsdp_auto_wrap_policy`). accelerate turns an FSDP
config into plain multi-CPU on the CPU, so this drives `fully_shard` directly (as tests/fsdp_worker.py does)."""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).parent))
from models import gpt2, lm_data  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from fam_hf.perturbation import PerturbedLayers, perturbed_layers  # noqa: E402

SEED, SIGMA, LR, STEPS = 7, 0.2, 0.5, 2
LORA = dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], lora_dropout=0.0, fan_in_fan_out=True,
            init_lora_weights=False)  # fmt: skip


def lora_gpt2():
    model = gpt2().double()
    torch.manual_seed(100)
    return get_peft_model(model, LoraConfig(**LORA))


def full_gpt2():
    return gpt2().double()


MODELS = {"lora": lora_gpt2, "full": full_gpt2}


def train(model, perturbed: PerturbedLayers, batches, num_items, scale: int = 1, sigma=SIGMA) -> list[torch.Tensor]:
    """``STEPS`` SGD steps on ``L(W + ε_t)``; ``scale``: the world size, since FSDP averages gradients over ranks
    while each rank's loss is its share of the global sum (``num_items`` is the global token count)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for step in range(STEPS):
        with perturbed.active(SEED, step, sigma):
            loss = model(**batches[step], num_items_in_batch=num_items[step]).loss
            (scale * loss).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses


def run(variant: str) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    make = MODELS[variant]
    data = lm_data(32)
    batches = [{k: torch.tensor(v) for k, v in data[16 * s : 16 * (s + 1)].items()} for s in range(STEPS)]
    num_items = [(b["labels"][:, 1:] != -100).sum() for b in batches]  # global counts, as Trainer's averaging
    local = [{k: v[rank * 8 : (rank + 1) * 8] for k, v in b.items()} for b in batches]

    model = make()
    perturbed = PerturbedLayers(perturbed_layers(model))
    sharded_in_hook = []  # whether the first layer's A was resharded (a DTensor) when its forward hook ran
    mesh = init_device_mesh("cpu", (world,))
    if variant == "lora":
        perturbed.layers[0].module.register_forward_hook(
            lambda module, *_: sharded_in_hook.append(isinstance(module.lora_A["default"].weight, DTensor))
        )
        for layer in perturbed.layers:
            fully_shard(layer.module.lora_A["default"], mesh=mesh)
            fully_shard(layer.module.lora_B["default"], mesh=mesh)
    for block in (model.base_model.model if variant == "lora" else model).transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    losses = train(model, perturbed, local, num_items, scale=world)
    for loss in losses:
        dist.all_reduce(loss)  # each rank's share of the global mean
    params = {n: p.full_tensor() if isinstance(p, DTensor) else p.detach() for n, p in model.named_parameters()}

    reference = make()
    ref_losses = train(reference, PerturbedLayers(perturbed_layers(reference)), batches, num_items)
    plain = make()  # the same steps without noise, to show that the noise mattered
    train(plain, PerturbedLayers(perturbed_layers(plain)), batches, num_items, sigma=0.0)
    return {
        "params": params,
        "losses": torch.stack(losses),
        "ref_params": {n: p.detach() for n, p in reference.named_parameters()},
        "ref_losses": torch.stack(ref_losses),
        "sharded_in_hook": sharded_in_hook,
        "plain_params": {n: p.detach() for n, p in plain.named_parameters()},
    }


if __name__ == "__main__":
    dist.init_process_group("gloo")
    results = {variant: run(variant) for variant in MODELS}
    if dist.get_rank() == 0:
        torch.save(results, sys.argv[1])
    # As tests/fsdp_worker.py: the sharded model's hooks and DTensor caches keep gloo threads alive past
    # destroy_process_group, which can abort the interpreter's finalization (pytorch/pytorch#190489); skip it.
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

"""Run under `torchrun --nproc_per_node 2` (gloo, CPU, DeepSpeed's CPU accelerator): FAMTrainer with DeepSpeed
ZeRO stage 2 or 3 and the closed form on the tiny GPT-2's tied LM head; saves each rank's full parameters
and FAM logs, to compare with one process on the global batch."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from models import COMMON, gpt2, lm_data  # noqa: E402

from fam_hf import FAMConfig, FAMTrainer, RelativeFlatness  # noqa: E402
from fam_hf.distributed import leave_process_group  # noqa: E402


def deepspeed_config(stage: int) -> dict:
    return {
        "zero_optimization": {"stage": stage},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }


def train(output_dir: Path, per_device_batch: int, stage: int | None, **fam) -> FAMTrainer:
    args = FAMConfig(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=per_device_batch,
        fam_lambda=0.3,
        deepspeed=None if stage is None else deepspeed_config(stage),
        **{**COMMON, "max_grad_norm": 0.0, **fam},
    )
    trainer = FAMTrainer(model=gpt2(), args=args, train_dataset=lm_data(16))
    trainer.train()
    return trainer


def refusal(make) -> str:
    try:
        make()
    except ValueError as error:
        return str(error)
    return ""


def run(out: Path, stage: int) -> None:
    trainer = train(out / f"zero{stage}", per_device_batch=8, stage=stage)
    engine = trainer.model_wrapped
    if stage == 3:
        from deepspeed.utils import safe_get_full_fp32_param

        params = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}
    else:
        params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    probe = dict(fam_layer="transformer.h.0.mlp.c_fc", fam_estimator="probe")
    torch.save(
        {
            "params": params,
            "logs": [h for h in trainer.state.log_history if "fam/kappa" in h],
            "world_size": trainer.accelerator.num_processes,
            "trainer_refusal": refusal(lambda: train(out / "probe", 8, stage, **probe)),
            "module_refusal": refusal(
                lambda: RelativeFlatness(engine.module, probe["fam_layer"], "probe").record({}).__enter__()
            ),
        },
        out / f"zero{stage}-rank{trainer.accelerator.process_index}.pt",
    )


if __name__ == "__main__":
    run(Path(sys.argv[1]), int(sys.argv[2]))  # no trainer or engine outlives it
    # Not asserted, unlike the DDP workers: whether DeepSpeed's own group registry lets the group go has not been
    # checked (the test is slow and needs the deepspeed extra); leave_process_group warns if the threads survive.
    leave_process_group()

"""Run under `accelerate launch --multi_gpu --num_processes 2` (two gloo ranks on CPU): trains the tiny
models of test_trainer.py with FAMTrainer and saves each rank's parameters and FAM logs."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from models import COMMON, gpt2, lm_data  # noqa: E402

from fam_hf import FAMConfig, FAMTrainer  # noqa: E402
from fam_hf.distributed import leave_process_group  # noqa: E402

VARIANTS = {
    "closed_form": {},
    "probe": dict(fam_layer="transformer.h.0.mlp.c_fc", fam_estimator="probe", fam_probes=2),
    "gauss_newton": dict(fam_layer="transformer.h.0.mlp.c_fc", fam_estimator="gauss_newton", fam_probes=2),
    "relative": dict(fam_lambda_relative=0.05),  # λ from L₀ and κ₀ averaged over the ranks
    "gauss_newton_set": dict(fam_layer="transformer.h.0.mlp.*", fam_estimator="gauss_newton", fam_probes=2),
}


def train(output_dir: Path, variant: str, per_device_batch: int) -> FAMTrainer:
    args = FAMConfig(
        output_dir=str(output_dir / variant),
        max_steps=2,
        per_device_train_batch_size=per_device_batch,
        fam_lambda=0.3,
        **COMMON,
        **VARIANTS[variant],
    )
    trainer = FAMTrainer(model=gpt2(), args=args, train_dataset=lm_data(16))
    trainer.train()
    return trainer


def save(trainer: FAMTrainer, out: Path, variant: str) -> None:
    torch.save(
        {
            "params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "logs": [h for h in trainer.state.log_history if "fam/kappa" in h],
            "world_size": trainer.accelerator.num_processes,
            "fused": trainer.fam_fused is not None,  # the loss and κ from the fused LM-head kernel
        },
        out / f"{variant}-rank{trainer.accelerator.process_index}.pt",
    )


if __name__ == "__main__":
    out = Path(sys.argv[1])
    for variant in VARIANTS:
        save(train(out, variant, per_device_batch=8), out, variant)  # no trainer outlives its variant
    assert not leave_process_group()

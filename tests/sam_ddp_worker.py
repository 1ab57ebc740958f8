"""Run under `accelerate launch --multi_gpu --num_processes 2` (two gloo ranks on CPU): trains the tiny float64
GPT-2 with SAMTrainer and saves each rank's parameters, SAM logs and every micro-batch it was handed (with the
loss denominator), so that tests/test_sam_trainer.py can replay the run in one process."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from models import COMMON, gpt2, lm_data  # noqa: E402

from fam_hf import SAMConfig, SAMTrainer  # noqa: E402
from fam_hf.distributed import leave_process_group  # noqa: E402

VARIANTS = {"sam": dict(sam_rho=0.1), "asam": dict(sam_rho=0.5, sam_adaptive=True)}
STEPS = 2


class RecordingSAMTrainer(SAMTrainer):
    seen: list

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append(({k: v.detach().clone() for k, v in inputs.items()}, num_items_in_batch))
        return super().training_step(model, inputs, num_items_in_batch)


def train_and_save(out: Path, variant: str) -> None:
    args = SAMConfig(
        output_dir=str(out / variant), max_steps=STEPS, per_device_train_batch_size=8, **COMMON, **VARIANTS[variant]
    )
    trainer = RecordingSAMTrainer(model=gpt2().double(), args=args, train_dataset=lm_data(32))
    trainer.seen = []
    trainer.train()
    torch.save(
        {
            "params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "logs": [h for h in trainer.state.log_history if "sam/rho" in h],
            "seen": trainer.seen,
            "world_size": trainer.accelerator.num_processes,
            "loss_scale": trainer.accelerator.num_processes  # Trainer's token averaging across ranks
            if trainer.model_accepts_loss_kwargs and args.average_tokens_across_devices
            else 1,
        },
        out / f"{variant}-rank{trainer.accelerator.process_index}.pt",
    )


if __name__ == "__main__":
    out = Path(sys.argv[1])
    for variant in VARIANTS:
        train_and_save(out, variant)
    assert not leave_process_group()

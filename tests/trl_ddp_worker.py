"""Run under `accelerate launch --multi_gpu --num_processes 2` (two gloo ranks on CPU): trains the tiny random
Llama of test_trl.py with FAMSFTTrainer on assistant-masked chat rows and saves each rank's parameters, FAM logs
and the micro-batches it was handed (with ``num_items_in_batch``), so that tests/test_trl_distributed.py can
compare the run with one process on the global batch, or replay it by hand."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_trl import LAM, SFT_COMMON, chat_data, llama, tokenizer  # noqa: E402

from fam_hf.distributed import leave_process_group  # noqa: E402
from fam_hf.trl import FAMSFTConfig, FAMSFTTrainer  # noqa: E402

PER_DEVICE = 8  # the one-process run takes 2 × 8
ROWS = 96  # enough for two global batches of 16 after packing
VARIANTS = {
    "padded": dict(max_steps=2),
    "packed": dict(max_steps=2, packing=True),  # bfd: padding-free rows with position_ids
    "padding_free": dict(max_steps=2, padding_free=True, max_length=None),
    "accumulate": dict(max_steps=2, gradient_accumulation_steps=2),
    # Each rank's loss is the mean over its own tokens; DDP averages: no single-process equal, replayed by hand
    "local_tokens": dict(max_steps=1, average_tokens_across_devices=False),
}


class RecordingFAMSFTTrainer(FAMSFTTrainer):
    """Keeps every training micro-batch with the loss denominator Trainer handed compute_loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            batch = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in inputs.items()}
            self.seen.append((batch, num_items_in_batch))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def train(output_dir: Path, variant: str, per_device_batch: int) -> RecordingFAMSFTTrainer:
    args = FAMSFTConfig(
        output_dir=str(output_dir / variant),
        per_device_train_batch_size=per_device_batch,
        fam_lambda=LAM,
        **{**SFT_COMMON, **VARIANTS[variant]},
    )
    trainer = RecordingFAMSFTTrainer(
        model=llama(), args=args, train_dataset=chat_data(ROWS), processing_class=tokenizer()
    )
    trainer.seen = []
    trainer.initial_state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    return trainer


def save(trainer: RecordingFAMSFTTrainer, out: Path, variant: str) -> None:
    torch.save(
        {
            "params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "initial": trainer.initial_state,
            "logs": [h for h in trainer.state.log_history if "fam/kappa" in h],
            "seen": trainer.seen,
            "world_size": trainer.accelerator.num_processes,
            "fused": trainer.fam_fused is not None,  # the loss and κ from the fused LM-head kernel
        },
        out / f"{variant}-rank{trainer.accelerator.process_index}.pt",
    )


if __name__ == "__main__":
    out = Path(sys.argv[1])
    for variant in VARIANTS:
        save(train(out, variant, per_device_batch=PER_DEVICE), out, variant)  # no trainer outlives its variant
    assert not leave_process_group()

"""Run under `accelerate launch --multi_gpu --num_processes 2` (two gloo ranks on CPU): trains a tiny LoRA GPT-2 with
FlatLoRATrainer and saves each rank's parameters and losses (tests/test_flat_lora.py compares one process)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from models import COMMON, gpt2, lm_data  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from fam_hf import FlatLoRAConfig, FlatLoRATrainer  # noqa: E402
from fam_hf.distributed import leave_process_group  # noqa: E402


def train(output_dir: Path, per_device_batch: int) -> FlatLoRATrainer:
    model = get_peft_model(gpt2(), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], lora_dropout=0.0,
                                              fan_in_fan_out=True, init_lora_weights=False))  # fmt: skip
    args = FlatLoRAConfig(output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=per_device_batch,
                          flat_lora_sigma=0.1, flat_lora_schedule="constant", **COMMON)  # fmt: skip
    trainer = FlatLoRATrainer(model=model, args=args, train_dataset=lm_data(32))
    trainer.train()
    return trainer


if __name__ == "__main__":
    out = Path(sys.argv[1])
    trainer = train(out / "ddp", per_device_batch=8)
    torch.save(
        {
            "params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "losses": [h["loss"] for h in trainer.state.log_history if "flat_lora/sigma" in h],
            "world_size": trainer.accelerator.num_processes,
        },
        out / f"rank{trainer.accelerator.process_index}.pt",
    )
    del trainer
    assert not leave_process_group()

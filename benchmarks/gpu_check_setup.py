"""Models, batches and trainers for the GPU checks, and the comparisons they judge with.

Every check builds its model with ``benchmarks.cases.load_model`` (seed 0) and a batch of random token ids
(labels = inputs) with ``benchmarks.cases.load_batch``; the checks live in ``gpu_check_precision.py``,
``gpu_check_kernels.py`` and ``gpu_check_timing.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from .cases import PLAIN, Case, load_batch, load_model
from .gpu_check_core import Context


def check_case(ctx: Context, *, lora: bool = False, batch_size: int | None = None) -> Case:
    """A :class:`~benchmarks.cases.Case` for ``ctx.model`` on random tokens (LoRA r = 8 on q/v if ``lora``)."""
    return Case("gpu-check", "GPU check", ctx.model, "random", batch_size or ctx.batch_size, ctx.seq_len, [PLAIN],
                lora=lora, learning_rate=1e-4)  # fmt: skip


def model_and_batch(ctx: Context, *, lora: bool = False, batch_size: int | None = None):
    """``(model, batch)`` on ``ctx.device``: float32 weights, ``batch`` with ``input_ids``/``labels``: (B, T)."""
    case = check_case(ctx, lora=lora, batch_size=batch_size)
    model, _ = load_model(case, ctx.device)
    batch = load_batch(case, None, model.config.vocab_size, ctx.device)
    return model, batch


def last_q_proj(model) -> str:
    """The last block's ``q_proj`` (LoRA-adapted in the LoRA cases): a probe there goes through one attention."""
    return f"model.layers.{model.config.num_hidden_layers - 1}.self_attn.q_proj"


@contextlib.contextmanager
def float32_matmuls() -> Iterator[None]:
    """True float32 products (no TF32) for the reference side of a comparison."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def relative(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    """``‖a − b‖ / ‖b‖`` (Frobenius; scalars: relative error), in float64."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def max_prob(logits: torch.Tensor) -> float:
    """Mean over positions of the largest softmax probability (1/vocab: uniform; 1: one-hot)."""
    return float(torch.softmax(logits.float(), -1).amax(-1).mean())


def sharpen(logits: torch.Tensor, target: float, steps: int = 30) -> torch.Tensor:
    """``logits`` scaled about their row means so that :func:`max_prob` is ``target`` (bisection on log scale)."""
    centred = logits.float() - logits.float().mean(-1, keepdim=True)
    low, high = -4.0, 8.0  # log10 of the scale
    for _ in range(steps):
        mid = (low + high) / 2
        low, high = (mid, high) if max_prob(centred * 10**mid) < target else (low, mid)
    return (centred * 10 ** ((low + high) / 2)).to(logits.dtype)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class Rows(torch.utils.data.Dataset):
    """A batch as a map-style dataset of rows, for ``Trainer.train`` without the ``datasets`` package."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = {k: v.cpu() for k, v in batch.items()}

    def __len__(self) -> int:
        return next(iter(self.batch.values())).shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.batch.items()}


def fam_config(ctx: Context, name: str, **kw: Any):
    from fam_hf import FAMConfig

    common = dict(output_dir=str(ctx.workdir / name), report_to=[], use_cpu=not ctx.cuda, save_strategy="no",
                  logging_steps=1, optim="adamw_torch", lr_scheduler_type="constant", learning_rate=1e-4,
                  per_device_train_batch_size=ctx.batch_size, seed=0, disable_tqdm=True, dataloader_num_workers=0,
                  fam_estimator="closed_form", fam_lambda=1e-3)  # fmt: skip
    return FAMConfig(**{**common, **kw})


def without_printer(trainer):
    """``trainer`` without the callback that prints every log line (``disable_tqdm`` puts it there)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def fam_logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "fam/kappa" in h]

"""Tiny randomly initialised models and datasets shared by the tests (built from configs; no downloads)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
)

from fam_hf import FAMConfig, FAMTrainer


def console_script(name: str) -> str:
    """The ``accelerate`` / ``torchrun`` of the Python running the tests (also from a virtualenv that is not
    activated), else the one on PATH. Both come with declared dependencies, so a missing one is a failure."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{name} is not installed beside {sys.executable} nor on PATH"
    return found


def launch(launcher: str, *args: str) -> None:
    """Run a two-process job with ``launcher`` (accelerate or torchrun) and fail with its stderr."""
    tests = Path(__file__).resolve().parent
    # the checkout's fam_hf first (the worker's own folder puts tests/ first, not the repository root)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)])}
    proc = subprocess.run([console_script(launcher), *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def save_tiny_bert(folder: Path) -> str:
    """A 1-layer random BERT with MiniLM's (packaged) tokenizer saved in ``folder``: recipe plumbing in seconds."""
    from transformers import AutoTokenizer, BertModel

    from fam_hf.assets import model_path

    config = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_path("minilm-l6")).save_pretrained(folder)
    return str(folder)


# -- float64 models in eval mode, for checks against brute-force Hessians -----------------------------------


def tiny_bert(num_labels=3, problem_type=None):
    cfg = BertConfig(
        vocab_size=40,
        hidden_size=12,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=num_labels,
        problem_type=problem_type,
        attn_implementation="eager",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg).double().eval()


def tiny_gpt2():
    cfg = GPT2Config(
        vocab_size=24,
        n_positions=16,
        n_embd=8,
        n_layer=1,
        n_head=2,
        attn_implementation="eager",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg).double().eval()


# -- float32 models and data for Trainer runs ----------------------------------------------------------------

COMMON = dict(
    report_to=[],
    use_cpu=True,
    save_strategy="no",
    optim="sgd",
    lr_scheduler_type="constant",
    learning_rate=0.5,
    logging_steps=1,
    seed=3,
    dataloader_drop_last=True,
    disable_tqdm=True,
)


def gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return GPT2LMHeadModel(cfg)


def bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg)


def lm_data(n=32, length=10):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32, (n, length), generator=g)
    labels = ids.clone()
    prompt = torch.randint(0, length - 2, (n,), generator=g)
    labels[torch.arange(length) < prompt[:, None]] = -100  # uneven token counts across micro-batches
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def cls_data(n=32, length=8):
    g = torch.Generator().manual_seed(2)
    return Dataset.from_dict(
        {
            "input_ids": torch.randint(0, 32, (n, length), generator=g).tolist(),
            "labels": torch.randint(0, 3, (n,), generator=g).tolist(),
        }
    )


def fam_trainer(model, data, tmp_path, **kw):
    args = FAMConfig(output_dir=str(tmp_path), **{**COMMON, **kw})
    return FAMTrainer(model=model, args=args, train_dataset=data)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def fam_logs(trainer):
    return [h for h in trainer.state.log_history if "fam/kappa" in h]

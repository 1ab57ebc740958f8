"""Fine-tune a causal language model (full or LoRA) with a relative-flatness penalty (FAM).

    python recipes/finetune_clm.py --config configs/clm_smollm2.yaml                # full, FAM on lm_head
    python recipes/finetune_clm.py --config configs/clm_smollm2_lora.yaml           # LoRA, FAM on a q_proj
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml \\
        recipes/finetune_clm.py --config configs/clm_smollm2.yaml --bf16 true

Every knob is in the YAML config; any key can be overridden on the command line. The text is cut into
fixed-length blocks; validation and test are held-out documents (for Shakespeare: whole plays).
Writes the model (or the LoRA adapter, which reloads with ``peft.PeftModel.from_pretrained``), the
tokenizer, ``metrics.json`` (held-out perplexity, κ at start and end) and ``fam_config.json`` into
``output_dir``.
A user's own documents are checked before the model is loaded (README, "Your own data"), and a split with
less text than one block stops the run with its token count.

``main(argv)`` parses the config; ``run(script, args)`` is the job itself, which ``study/run.py`` also
calls with another Trainer (its SAM baseline), κ still measured on ``args.fam_layer``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kit import (
    FixedBatchKappa,
    LoraArguments,
    finish,
    flatness_callback,
    load_checked,
    model_loss,
    parse_recipe_config,
    start_run,
    with_lora,
)
from transformers import Trainer, TrainingArguments, default_data_collator

from fam_hf import FAMConfig, FAMTrainer
from fam_hf.assets import load_model_and_tokenizer
from fam_hf.data import chunk_texts, slice_splits
from fam_hf.data_checks import check_blocks, check_overlap, check_sizes
from fam_hf.distributed import leave_process_group


@dataclass
class ScriptArguments(LoraArguments):  # use_lora, lora_r, lora_alpha, lora_dropout, lora_target_modules
    model_name_or_path: str = field(metadata={"help": "Alias (smollm2-135m), local folder or Hub id."})
    dataset: str = field(metadata={"help": "Alias (shakespeare), local txt/csv/json/parquet file, or Hub id."})
    text_column: str = field(default="text", metadata={"help": "Column holding the documents."})
    group_column: str | None = field(
        default=None, metadata={"help": "Keep rows sharing this column's value in one split (aliases bring their own)."}
    )
    test_size: float = field(default=0.15, metadata={"help": "Fraction of groups (plays) held out as test."})
    validation_size: float = field(default=0.1, metadata={"help": "Fraction of groups (plays) for validation."})
    block_size: int = field(default=256, metadata={"help": "Tokens per training block."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on a seeded random slice of blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on a slice of the blocks."})
    drop_empty: bool = field(
        default=False,
        metadata={"help": "Drop documents whose text or group cell is missing (null/NaN; logs how many, per split); "
                  "false: such rows are an error that names them. Blank text is kept: it adds no tokens."},
    )  # fmt: skip
    kappa_batches: int = field(default=2, metadata={"help": "Fixed train/test batches on which κ is reported."})
    kappa_probes: int = field(default=8, metadata={"help": "Probes per batch when κ is measured with the probe."})
    flatness_measures: list[str] = field(
        default_factory=list,
        metadata={"help": "FlatnessCallback measures logged on the κ batches while training (kappa, hessian_trace, "
                  "top_eigenvalue, sam_sharpness, jacobian_norm, hessian_spectrum); empty: none."},
    )  # fmt: skip
    flatness_every_n_steps: int | None = field(
        default=None, metadata={"help": "Log flatness_measures every n optimizer steps (and after evaluation)."}
    )
    flatness_trace_method: str = field(
        default="hutchinson",
        metadata={"help": "hessian_trace's method: hutchinson, or auto (exact in closed form on an output head)."},
    )
    save_model: bool = field(default=True, metadata={"help": "Save the trained model (or adapter) and tokenizer."})
    overwrite_output: bool = field(default=False, metadata={"help": "Write into a non-empty output_dir."})


def main(argv: list[str] | None = None) -> dict[str, float]:
    script, args = parse_recipe_config([ScriptArguments, FAMConfig], argv)
    return run(script, args)


def run(
    script: ScriptArguments,
    args: FAMConfig,
    trainer_class: type[Trainer] = FAMTrainer,
    training_args: TrainingArguments | None = None,
) -> dict[str, float]:
    """Train and evaluate; ``trainer_class``/``training_args`` replace FAMTrainer/``args`` (the study's SAM)."""
    start_run(script, args)  # LoRA's matrices are seeded too

    # -- data: documents checked as loaded (row numbers are the file's), split by group (play) -------------
    columns = dict(text_column=script.text_column, group_column=script.group_column)
    splits = load_checked(script, args.seed, columns, blank_text_is_empty=False)
    check_sizes({name: len(split) for name, split in splits.items()}, script.dataset, "documents", warn_below=1)
    check_overlap(splits, script.dataset, script.text_column)  # a warning with the counts

    # -- model; blocks: documents tokenized and cut into block_size tokens (never padded: no pad token needed)
    model, tokenizer = load_model_and_tokenizer(script.model_name_or_path, "causal-lm")
    model = with_lora(model, script)  # when use_lora
    with args.main_process_first(desc="tokenizing"):
        blocks = {name: chunk_texts(split, tokenizer, script.text_column, script.block_size)
                  for name, split in splits.items()}  # fmt: skip
    check_blocks(blocks, splits, tokenizer, script.text_column, script.block_size, script.dataset)
    blocks = slice_splits(blocks, max_train_samples=script.max_train_samples,
                          max_eval_samples=script.max_eval_samples, seed=args.seed, unit="blocks")  # fmt: skip

    # -- train --------------------------------------------------------------------------------------------
    trainer = trainer_class(
        model=model, args=args if training_args is None else training_args, train_dataset=blocks["train"],
        eval_dataset=blocks["validation"], processing_class=tokenizer, data_collator=default_data_collator,
    )  # fmt: skip
    kappa = FixedBatchKappa(blocks, default_data_collator, args, script)  # κ and the loss on fixed batches
    kappa.measure("start", trainer.model)
    flatness_callback(trainer, kappa.batches, args, script)  # logs flatness/* during training, if asked for
    train_metrics = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint).metrics

    # -- evaluate: perplexity on held-out documents; κ on the same fixed batches; save --------------------
    with model_loss(trainer):  # not the label-smoothed objective: perplexity is the model's
        metrics = {**train_metrics, **trainer.evaluate(metric_key_prefix="validation")}
        metrics.update(trainer.evaluate(blocks["test"], metric_key_prefix="test"))
    for split in ("validation", "test"):
        metrics[f"{split}_perplexity"] = math.exp(min(metrics[f"{split}_loss"], 50.0))
    kappa.measure("end", trainer.model)
    held_out = (f"held-out perplexity: test {metrics['test_perplexity']:.2f} ({len(blocks['test'])} blocks of "
                f"{script.block_size} tokens), validation {metrics['validation_perplexity']:.2f}")  # fmt: skip
    return finish(trainer, script, args, metrics, kappa, held_out, saved="adapter" if script.use_lora else "model")


if __name__ == "__main__":
    main()
    leave_process_group()  # under accelerate launch: before the interpreter exits

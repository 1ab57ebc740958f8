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

``main(argv)`` parses the config; ``run(script, args)`` is the job itself, which ``recipes/study.py`` also
calls with another Trainer (its SAM baseline), κ still measured on ``args.fam_layer``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments, default_data_collator, set_seed

from fam_hf import FAMConfig, FAMTrainer
from fam_hf.assets import load_model_and_tokenizer, parse_config
from fam_hf.data import carve_splits, chunk_texts, load_source, require_columns, slice_splits
from fam_hf.data_checks import check_blocks, check_cells, check_overlap, check_sizes
from fam_hf.distributed import leave_process_group
from fam_hf.runs import (
    check_output_dir,
    fixed_batch_measures,
    fixed_batches,
    flatness_callback,
    model_loss,
    save_run,
)

KAPPA_SPLITS = ("train", "test")  # κ is reported on fixed batches of these splits


@dataclass
class ScriptArguments:
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
    use_lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of every weight."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"], metadata={"help": "Module names LoRA adapts."}
    )
    kappa_batches: int = field(default=2, metadata={"help": "Fixed train/test batches on which κ is reported."})
    kappa_probes: int = field(default=8, metadata={"help": "Probes per batch when κ is measured with the probe."})
    flatness_measures: list[str] = field(
        default_factory=list,
        metadata={"help": "FlatnessCallback measures logged on the κ batches while training (kappa, hessian_trace, "
                  "top_eigenvalue, sam_sharpness, jacobian_norm); empty: none."},
    )  # fmt: skip
    flatness_every_n_steps: int | None = field(
        default=None, metadata={"help": "Log flatness_measures every n optimizer steps (and after evaluation)."}
    )
    save_model: bool = field(default=True, metadata={"help": "Save the trained model (or adapter) and tokenizer."})
    overwrite_output: bool = field(default=False, metadata={"help": "Write into a non-empty output_dir."})


def main(argv: list[str] | None = None) -> dict[str, float]:
    if int(os.environ.get("LOCAL_RANK", -1)) >= 0 and not torch.cuda.is_available():
        # ranks without GPUs (configs/accelerate/cpu_2proc.yaml): DDP over gloo on the CPU
        os.environ["ACCELERATE_USE_CPU"] = "true"
    script, args = parse_config([ScriptArguments, FAMConfig], argv)
    return run(script, args)


def run(
    script: ScriptArguments,
    args: FAMConfig,
    trainer_class: type[Trainer] = FAMTrainer,
    training_args: TrainingArguments | None = None,
) -> dict[str, float]:
    """Train and evaluate; ``trainer_class``/``training_args`` replace FAMTrainer/``args`` (the study's SAM)."""
    check_output_dir(args.output_dir, script.overwrite_output or args.resume_from_checkpoint is not None)
    set_seed(args.seed)  # what is initialised before Trainer seeds: LoRA matrices

    # -- data: documents checked as loaded (row numbers are the file's), split by group (play) -------------
    source = load_source(script.dataset)
    columns = dict(text_column=script.text_column, group_column=script.group_column)
    require_columns(source, script.dataset, **columns)
    source = check_cells(source, script.dataset, **columns, drop_empty=script.drop_empty, blank_text_is_empty=False)
    splits = carve_splits(
        source,
        script.dataset,
        seed=args.seed,
        test_size=script.test_size,
        validation_size=script.validation_size,
        group_column=script.group_column,
    )
    check_sizes({name: len(split) for name, split in splits.items()}, script.dataset, "documents", warn_below=1)
    check_overlap(splits, script.dataset, script.text_column)  # a warning with the counts

    # -- model --------------------------------------------------------------------------------------------
    model, tokenizer = load_model_and_tokenizer(script.model_name_or_path, "causal-lm")
    if script.use_lora:
        lora = LoraConfig(
            r=script.lora_r,
            lora_alpha=script.lora_alpha,
            lora_dropout=script.lora_dropout,
            target_modules=script.lora_target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)

    # -- blocks: documents tokenized and cut into block_size tokens (never padded: no pad token needed) ----
    with args.main_process_first(desc="tokenizing"):
        blocks = {
            name: chunk_texts(split, tokenizer, script.text_column, script.block_size) for name, split in splits.items()
        }
    check_blocks(blocks, splits, tokenizer, script.text_column, script.block_size, script.dataset)
    blocks = slice_splits(
        blocks,
        max_train_samples=script.max_train_samples,
        max_eval_samples=script.max_eval_samples,
        seed=args.seed,
        unit="blocks",
    )

    # -- train --------------------------------------------------------------------------------------------
    trainer = trainer_class(
        model=model,
        args=args if training_args is None else training_args,
        train_dataset=blocks["train"],
        eval_dataset=blocks["validation"],
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    batches = {
        split: fixed_batches(blocks[split], default_data_collator, args, script.kappa_batches) for split in KAPPA_SPLITS
    }
    start = {split: fixed_batch_measures(trainer.model, b, args, script.kappa_probes) for split, b in batches.items()}
    flatness_callback(trainer, batches, args, script)  # logs flatness/* during training, if asked for
    train_metrics = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint).metrics

    # -- evaluate: perplexity on held-out documents; κ on the same fixed batches --------------------------
    with model_loss(trainer):  # not the label-smoothed objective: perplexity is the model's
        metrics = {**train_metrics, **trainer.evaluate(metric_key_prefix="validation")}
        metrics.update(trainer.evaluate(blocks["test"], metric_key_prefix="test"))
    for split in ("validation", "test"):
        metrics[f"{split}_perplexity"] = math.exp(min(metrics[f"{split}_loss"], 50.0))
    end = {split: fixed_batch_measures(trainer.model, b, args, script.kappa_probes) for split, b in batches.items()}
    for split in batches:  # eval mode, no dropout: the loss gap on these batches is test − train
        for name in ("kappa", "loss"):
            metrics[f"{name}_{split}_start"], metrics[f"{name}_{split}_end"] = start[split][name], end[split][name]
    kappa_start = {split: start[split]["kappa"] for split in batches}
    kappa_end = {split: end[split]["kappa"] for split in batches}
    metrics["world_size"] = args.world_size

    # -- save ---------------------------------------------------------------------------------------------
    settings = save_run(trainer, script, args, metrics)  # state, metrics, FAM settings, then the model
    if trainer.is_world_process_zero():
        layer = settings["fam"]["resolved_layer"]
        saved = (
            f"{'adapter' if script.use_lora else 'model'} + tokenizer (from_pretrained), " if script.save_model else ""
        )
        print(
            f"\nheld-out perplexity: test {metrics['test_perplexity']:.2f} ({len(blocks['test'])} blocks of "
            f"{script.block_size} tokens), validation {metrics['validation_perplexity']:.2f}\n"
            f"κ({layer}) on {script.kappa_batches} fixed batches — train: {kappa_start['train']:.4g} → "
            f"{kappa_end['train']:.4g}; test: {kappa_start['test']:.4g} → {kappa_end['test']:.4g}\n"
            f"outputs in {os.path.abspath(args.output_dir)}: {saved}metrics.json, fam_config.json"
            + (f"; pushed to the Hub: {trainer.hub_model_id}" if args.push_to_hub and script.save_model else "")
        )
    return metrics


if __name__ == "__main__":
    main()
    leave_process_group()  # under accelerate launch: before the interpreter exits

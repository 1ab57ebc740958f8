"""Chat fine-tuning (SFT) of an instruct model with TRL's SFTTrainer and a relative-flatness penalty (FAM).

    python recipes/sft.py --config configs/sft_smollm2_lora.yaml                  # LoRA, FAM on the LM head
    python recipes/sft.py --config configs/sft_smollm2.yaml                       # full fine-tuning
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml \\
        recipes/sft.py --config configs/sft_smollm2_lora.yaml --bf16 true

Every knob is in the YAML config (ScriptArguments below, fam_* of FAMFields, and trl.SFTConfig's own: max_length,
packing, assistant_only_loss, …); any key can be overridden on the command line. With ``dataset: shakespeare``
the conversations are consecutive speeches of a scene as user/assistant turns (fam_hf.chat_data), built after
the plays are split, so validation and test are plays the model never trained on. A user's own data is a
file or Hub data set with a column of conversations (``messages_column``), checked before the model loads.
The loss counts the assistant's tokens only (the model's own chat template, with generation markers added).
Writes the model (or the LoRA adapter), the tokenizer, ``metrics.json`` (held-out loss and perplexity, κ of the
LM head at start and end on fixed batches), ``fam_config.json`` and the model card into ``output_dir``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kit import FixedBatchKappa, LoraArguments, carve, finish, model_loss, parse_recipe_config, start_run, with_lora

from fam_hf.assets import load_model_and_tokenizer
from fam_hf.chat_data import (
    check_conversations,
    dialogue_conversations,
    training_chat_template,
    with_counted_positions,
)
from fam_hf.data import load_source, slice_splits
from fam_hf.data_checks import check_sizes
from fam_hf.distributed import leave_process_group
from fam_hf.trl import FAMSFTConfig, FAMSFTTrainer


@dataclass
class ScriptArguments(LoraArguments):  # use_lora, lora_r, lora_alpha, lora_dropout, lora_target_modules
    model_name_or_path: str = field(metadata={"help": "Alias (smollm2-135m), local folder or Hub id of a chat model."})
    dataset: str = field(
        metadata={"help": "shakespeare (dialogue as conversations), or a local json/jsonl/parquet file or Hub id "
                  "with a column of conversations."}
    )  # fmt: skip
    messages_column: str = field(
        default="messages", metadata={"help": "Column of [{'role', 'content'}, …] conversations (own data)."}
    )
    group_column: str | None = field(
        default=None, metadata={"help": "Keep rows sharing this column's value in one split (shakespeare: play)."}
    )
    test_size: float = field(default=0.15, metadata={"help": "Fraction of groups (plays) held out as test."})
    validation_size: float = field(default=0.1, metadata={"help": "Fraction of groups (plays) for validation."})
    turns: int = field(default=2, metadata={"help": "shakespeare: consecutive speeches per conversation (even)."})
    system_prompt: str | None = field(
        default=None, metadata={"help": "shakespeare: a system message first (null: the chat template's default)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on a seeded random slice."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on a seeded random slice."})
    kappa_batches: int = field(default=2, metadata={"help": "Fixed train/test batches on which κ is reported."})
    kappa_probes: int = field(default=8, metadata={"help": "Probes per batch when κ is measured with the probe."})
    save_model: bool = field(default=True, metadata={"help": "Save the trained model (or adapter) and tokenizer."})
    overwrite_output: bool = field(default=False, metadata={"help": "Write into a non-empty output_dir."})


def main(argv: list[str] | None = None) -> dict[str, float]:
    script, args = parse_recipe_config([ScriptArguments, FAMSFTConfig], argv)
    start_run(script, args)  # LoRA's matrices are seeded too

    # -- data: split by group (play) first, then conversations; checked before the model loads ------------
    splits = conversations(script, args.seed)
    check_sizes({name: len(split) for name, split in splits.items()}, script.dataset, "conversations", warn_below=1)
    splits = slice_splits(splits, max_train_samples=script.max_train_samples,
                          max_eval_samples=script.max_eval_samples, seed=args.seed, unit="conversations")  # fmt: skip
    splits = {name: split.select_columns([script.messages_column]) for name, split in splits.items()}
    if script.messages_column != "messages":
        splits = {name: split.rename_column(script.messages_column, "messages") for name, split in splits.items()}

    # -- model: its own chat template, with the assistant's tokens marked for the loss -------------------
    model, tokenizer = load_model_and_tokenizer(script.model_name_or_path, "causal-lm")
    if args.assistant_only_loss:
        tokenizer.chat_template = training_chat_template(tokenizer, check=splits["train"]["messages"][:8])
    model = with_lora(model, script)  # when use_lora

    # -- train: SFTTrainer tokenizes (and packs, if asked); FAM adds λ·κ of the LM head -------------------
    trainer = FAMSFTTrainer(model=model, args=args, train_dataset=splits["train"], processing_class=tokenizer,
                            eval_dataset={"validation": splits["validation"], "test": splits["test"]})  # fmt: skip
    # tokenized, masked, truncated (and packed) as trained; rows whose reply max_length cut off count nothing
    prepared = {"train": trainer.train_dataset, **trainer.eval_dataset}
    prepared = {name: with_counted_positions(split, name, args.max_length) for name, split in prepared.items()}
    trainer.train_dataset, trainer.eval_dataset = prepared["train"], {k: prepared[k] for k in ("validation", "test")}
    kappa = FixedBatchKappa(prepared, trainer.data_collator, args, script)  # κ and the loss on fixed batches
    kappa.measure("start", trainer.model)
    train_metrics = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint).metrics

    # -- evaluate: loss and perplexity of the assistant's turns on unseen plays; κ on the fixed batches ---
    metrics = dict(train_metrics)
    with model_loss(trainer):  # the model's loss, not the label-smoothed objective
        for split in ("validation", "test"):
            evaluated = trainer.evaluate(split, metric_key_prefix=split)  # the prepared split, by name
            # TRL reports its own metrics (entropy, token accuracy) as eval_*, whatever the prefix
            metrics.update({key.replace("eval_", f"{split}_", 1): value for key, value in evaluated.items()})
            metrics[f"{split}_perplexity"] = math.exp(min(metrics[f"{split}_loss"], 50.0))
    kappa.measure("end", trainer.model)
    held_out = (f"held-out assistant turns: test loss {metrics['test_loss']:.3f}, perplexity "
                f"{metrics['test_perplexity']:.2f} ({len(splits['test'])} conversations of unseen plays); validation "
                f"perplexity {metrics['validation_perplexity']:.2f}")  # fmt: skip
    return finish(trainer, script, args, metrics, kappa, held_out, saved="adapter" if script.use_lora else "model")


def conversations(script: ScriptArguments, seed: int):
    """The data set's ``train``/``validation``/``test`` conversations. ``shakespeare``: plays split by play, then
    consecutive speeches as user/assistant turns; a user's own conversations are checked as loaded."""
    source = load_source(script.dataset)
    if script.dataset != "shakespeare":  # a user's conversations, as loaded: row numbers are the file's
        check_conversations(source, script.dataset, script.messages_column)  # no assistant turn: loss and κ 0/0
    splits = carve(source, script, seed)
    if script.dataset == "shakespeare":
        splits = {
            name: dialogue_conversations(plays, turns=script.turns, system_prompt=script.system_prompt)
            for name, plays in splits.items()
        }
    return splits


if __name__ == "__main__":
    main()
    leave_process_group()  # under accelerate launch: before the interpreter exits

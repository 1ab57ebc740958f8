"""Fine-tune a sequence classifier with a relative-flatness penalty (FAM) on its classifier head.

    python recipes/finetune_classification.py --config configs/classification_minilm.yaml
    python recipes/finetune_classification.py --config configs/classification_minilm.yaml --fam_lambda 0 --max_steps 20
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml \\
        recipes/finetune_classification.py --config configs/classification_minilm.yaml

Every knob is in the YAML config; any key can be overridden on the command line. Writes the model and
tokenizer (reload with ``AutoModelForSequenceClassification.from_pretrained(output_dir)``),
``metrics.json`` (accuracy and F1 on validation and held-out test, κ at start and end) and
``fam_config.json`` (the FAM settings and the layer they resolved to) into ``output_dir``.
A user's own data is checked before the model is loaded (README, "Your own data"): empty cells, mixed label
types, a class train lacks, empty splits … stop the run with the rows and the fix (``drop_empty`` drops empty cells).

``main(argv)`` parses the config; ``run(script, args)`` is the job itself, which ``study/run.py`` also
calls with another Trainer (its SAM baseline), κ still measured on ``args.fam_layer``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from kit import FixedBatchKappa, finish, flatness_callback, load_checked, model_loss, parse_recipe_config, start_run
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from fam_hf import FAMConfig, FAMTrainer
from fam_hf.assets import load_metric, load_model_and_tokenizer
from fam_hf.data import encode_labels, slice_splits
from fam_hf.data_checks import check_classes, check_overlap, check_sizes, require_pad_token
from fam_hf.distributed import leave_process_group

AVERAGED_METRICS = ("f1", "precision", "recall")  # given average="binary" (2 classes) or "macro"


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(metadata={"help": "Alias (minilm-l6, smollm2-135m), local folder or Hub id."})
    dataset: str = field(metadata={"help": "Alias (rotten-tomatoes), local csv/json/parquet file, or Hub id."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    label_column: str = field(default="label", metadata={"help": "Column holding the class (ints or strings)."})
    group_column: str | None = field(
        default=None, metadata={"help": "Keep rows sharing this column's value in one split (aliases bring their own)."}
    )
    test_size: float = field(default=0.2, metadata={"help": "Fraction of groups held out as test (if no test split)."})
    validation_size: float = field(default=0.1, metadata={"help": "Fraction of groups for validation."})
    max_length: int = field(default=128, metadata={"help": "Truncate texts to this many tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on a seeded random slice."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on a slice of validation/test."})
    metrics: list[str] = field(
        default_factory=lambda: ["accuracy", "f1"],
        metadata={"help": "Scores on validation and test. accuracy and f1 are built in (no network); any other name "
                  "goes to evaluate.load: a local metric script or folder works offline, a Hub metric downloads."},
    )  # fmt: skip
    drop_empty: bool = field(
        default=False,
        metadata={"help": "Drop rows whose text, label or group cell is empty (logs how many, per split); "
                  "false: such rows are an error that names them."},
    )  # fmt: skip
    kappa_batches: int = field(default=4, metadata={"help": "Fixed train/test batches on which κ is reported."})
    kappa_probes: int = field(default=16, metadata={"help": "Probes per batch when κ is measured with the probe."})
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
    save_model: bool = field(default=True, metadata={"help": "Save the trained model and tokenizer."})
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
    start_run(script, args)  # the new head's initialisation is seeded too

    # -- data: checked as loaded (row numbers are the file's), split by group (movie), checked again --------
    columns = dict(text_column=script.text_column, label_column=script.label_column, group_column=script.group_column)
    splits = load_checked(script, args.seed, columns)
    check_sizes({name: len(split) for name, split in splits.items()}, script.dataset)  # what the data gives
    labels = encode_labels(splits, script.label_column, script.dataset)
    splits = slice_splits(
        splits, max_train_samples=script.max_train_samples, max_eval_samples=script.max_eval_samples, seed=args.seed
    )
    check_classes(splits, script.dataset, script.label_column, labels, script.max_train_samples)
    check_overlap(splits, script.dataset, script.text_column)  # a warning with the counts
    compute_metrics = scorer(script.metrics, len(labels))  # loaded before the model: a bad metric fails in seconds

    # -- model --------------------------------------------------------------------------------------------
    model, tokenizer = load_model_and_tokenizer(
        script.model_name_or_path, "sequence-classification", num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)},
    )  # fmt: skip
    require_pad_token(tokenizer, script.model_name_or_path)
    tokenized = splits.map(
        lambda batch: tokenizer(batch[script.text_column], truncation=True, max_length=script.max_length),
        batched=True,
        remove_columns=[c for c in splits["train"].column_names if c != script.label_column],
    ).rename_column(script.label_column, "labels")

    # -- train --------------------------------------------------------------------------------------------
    collator = DataCollatorWithPadding(tokenizer)
    trainer = trainer_class(
        model=model, args=args if training_args is None else training_args, train_dataset=tokenized["train"],
        eval_dataset=tokenized["validation"], processing_class=tokenizer, data_collator=collator,
        compute_metrics=compute_metrics,
    )  # fmt: skip
    kappa = FixedBatchKappa(tokenized, collator, args, script)  # κ and the loss on fixed train/test batches
    kappa.measure("start", trainer.model)
    flatness_callback(trainer, kappa.batches, args, script)  # logs flatness/* during training, if asked for
    train_metrics = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint).metrics

    # -- evaluate: validation and held-out test; κ on the same fixed batches; save ------------------------
    with model_loss(trainer):  # held-out loss without label smoothing (accuracy and F1 do not depend on it)
        metrics = {**train_metrics, **trainer.evaluate(metric_key_prefix="validation")}
        metrics.update(trainer.evaluate(tokenized["test"], metric_key_prefix="test"))
    kappa.measure("end", trainer.model)
    return finish(trainer, script, args, metrics, kappa, held_out(metrics, script.metrics, len(tokenized["test"])))


def scorer(names: list[str], classes: int):
    """``compute_metrics`` for ``Trainer``: each metric of ``names`` on the argmax predictions (F1 and the like
    averaged as ``binary`` with two classes, ``macro`` with more)."""
    scorers = {name: load_metric(name) for name in names}
    average = "binary" if classes == 2 else "macro"

    def compute_metrics(prediction) -> dict[str, float]:
        predicted, scores = np.argmax(prediction.predictions, axis=-1), {}
        for name, metric in scorers.items():
            options = {"average": average} if name in AVERAGED_METRICS else {}
            scores.update(metric.compute(predictions=predicted, references=prediction.label_ids, **options))
        return scores

    return compute_metrics


def held_out(metrics: dict[str, float], names: list[str], examples: int) -> str:
    """The summary's first line: the test scores, and validation's first."""
    scores = [name for name in names if f"test_{name}" in metrics]  # a metric may name its keys itself
    test = ", ".join(f"{name} {metrics[f'test_{name}']:.4f}" for name in scores)
    validation = f"validation {scores[0]} {metrics[f'validation_{scores[0]}']:.4f}" if scores else "validation"
    return f"held-out test: {test} ({examples} examples; {validation})"


if __name__ == "__main__":
    main()
    leave_process_group()  # under accelerate launch: before the interpreter exits

"""What the recipes load besides the model itself: their data set, checked and carved, and a LoRA adapter.

:class:`LoraArguments` holds the LoRA fields a recipe's ``ScriptArguments`` inherits (TRL's ``ModelConfig``
idea), :func:`peft_config` turns them into a ``peft.LoraConfig``, :func:`with_lora` wraps a model with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from datasets import DatasetDict

from fam_hf.data import carve_splits, load_source, require_columns
from fam_hf.data_checks import check_cells


@dataclass(kw_only=True)  # keyword-only: a subclass's required fields (model_name_or_path …) may follow
class LoraArguments:
    use_lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of every weight."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"], metadata={"help": "Module names LoRA adapts."}
    )


def peft_config(args: LoraArguments, task_type: str = "CAUSAL_LM"):
    """The ``peft.LoraConfig`` of ``args``; None when ``args.use_lora`` is false (every weight trains)."""
    if not args.use_lora:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules,
        task_type=task_type,
    )


def with_lora(model, args: LoraArguments):
    """``model`` with a LoRA adapter (``peft.get_peft_model``) when ``args.use_lora``, else ``model`` itself."""
    config = peft_config(args)
    if config is None:
        return model
    from peft import get_peft_model

    return get_peft_model(model, config)


def carve(source, script, seed: int) -> DatasetDict:
    """``train``/``validation``/``test`` of ``source``: the splits it lacks carved by the script's ``test_size``,
    ``validation_size`` and ``group_column`` (:func:`fam_hf.data.carve_splits`; an alias brings its own group)."""
    return carve_splits(
        source,
        script.dataset,
        seed=seed,
        test_size=script.test_size,
        validation_size=script.validation_size,
        group_column=script.group_column,
    )


def load_checked(script, seed: int, columns: dict[str, str | None], **cell_options) -> DatasetDict:
    """``script.dataset`` checked as loaded (its ``columns`` exist, their cells are filled: row numbers in the
    messages are the file's; ``script.drop_empty`` drops empty ones instead), then carved (:func:`carve`).

    ``columns``: ``{"text_column": …, "label_column": …, "group_column": …}`` as the recipe names them;
    ``cell_options`` go to :func:`fam_hf.data_checks.check_cells` (``blank_text_is_empty``).
    """
    source = load_source(script.dataset)
    require_columns(source, script.dataset, **columns)
    source = check_cells(source, script.dataset, **columns, drop_empty=script.drop_empty, **cell_options)
    return carve(source, script, seed)

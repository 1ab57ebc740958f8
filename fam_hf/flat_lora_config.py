"""``FlatLoRAConfig``: ``TrainingArguments`` plus the knobs of Flat-LoRA's random weight perturbation (a baseline)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

from transformers import TrainingArguments

from .options import check_types

FlatLoRASchedule = Literal["cosine", "constant"]


@dataclass
class FlatLoRAFields:
    """The ``flat_lora_*`` fields, to mix in front of a ``TrainingArguments`` dataclass (``FlatLoRAConfig`` is
    ``FlatLoRAFields`` + ``TrainingArguments``; ``fam_hf.trl.FlatLoRASFTConfig`` is ``FlatLoRAFields`` + TRL's
    ``SFTConfig``). Each optimizer step trains on ``L(W + ε)``, ``ε`` Gaussian on every perturbed layer's merged
    weight, row ``s`` scaled by ``σ_t ‖w_s‖ / √m`` (Flat-LoRA; Li et al., ICML 2025; docs/mathematics.md#flat-lora).
    """

    flat_lora_sigma: float = field(
        default=0.05,
        metadata={
            "help": "Perturbation strength σ > 0 (default 0.05): each row of a merged weight gets Gaussian noise of "
            "standard deviation σ·‖row‖/√fan_in per entry, so the row's noise has about σ times the row's norm."
        },
    )
    flat_lora_schedule: FlatLoRASchedule = field(
        default="cosine",
        metadata={
            "help": "'cosine' (Flat-LoRA's): σ_t = σ·(1 − cos(π t/T))/2, from 0 at the first step to σ at the last "
            "(T = max_steps); 'constant': σ_t = σ."
        },
    )
    flat_lora_seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed of the noise (default: the training seed); the noise of step t is a function of "
            "(seed, t, layer) only, so ranks and resumed runs draw the same."
        },  # fmt: skip
    )

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        self.check_flat_lora_fields()

    def check_flat_lora_fields(self) -> None:
        """Raise ValueError naming the field when a ``flat_lora_*`` value is out of range (TypeError: of the wrong
        type)."""
        check_types(self, numbers=("flat_lora_sigma",), seeds=("flat_lora_seed",))
        if not (math.isfinite(self.flat_lora_sigma) and self.flat_lora_sigma > 0):
            raise ValueError(
                f"flat_lora_sigma={self.flat_lora_sigma} must be a finite number > 0 (the relative noise scale; the "
                "paper's default is 0.05); to train without the perturbation use transformers.Trainer"
            )
        choices = get_args(FlatLoRASchedule)
        if self.flat_lora_schedule not in choices:
            raise ValueError(
                f"flat_lora_schedule={self.flat_lora_schedule!r} is not one of {', '.join(map(repr, choices))}"
            )


@dataclass
class FlatLoRAConfig(FlatLoRAFields, TrainingArguments):
    """Training arguments for :class:`~fam_hf.FlatLoRATrainer`: everything :class:`transformers.TrainingArguments`
    takes, plus the ``flat_lora_*`` fields of :class:`FlatLoRAFields`."""

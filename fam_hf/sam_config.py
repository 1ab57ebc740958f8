"""``SAMConfig``: ``TrainingArguments`` plus the knobs of Sharpness-Aware Minimization (the SAM baseline)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .options import check_types


@dataclass
class SAMFields:
    """The ``sam_*`` fields, to mix in front of a ``TrainingArguments`` dataclass (``SAMConfig`` is ``SAMFields`` +
    ``TrainingArguments``; ``fam_hf.trl.SAMSFTConfig`` is ``SAMFields`` + TRL's ``SFTConfig``). Each optimizer
    step takes the gradient at ``w + ε̂`` with ``ε̂ = ρ g / ‖g‖`` (SAM; Foret et al., ICLR 2021) or
    ``ε̂ = ρ T² g / ‖T g‖``, ``T = |w| + η`` elementwise (adaptive SAM, ASAM; Kwon et al., ICML 2021): the
    same perturbation as :func:`fam_hf.sam_sharpness`, so the logged ``sam/sharpness`` is the measure's.
    """

    sam_rho: float = field(
        default=0.05,
        metadata={
            "help": "Radius ρ > 0 of the weight perturbation (default 0.05, SAM's). SAM: the Euclidean norm of ε over "
            "all trainable parameters, in the parameters' own units. ASAM: the norm of ε/(|w|+η), i.e. a relative "
            "radius (its papers use 0.5-2)."
        },
    )
    sam_adaptive: bool = field(
        default=False,
        metadata={"help": "Adaptive SAM (ASAM): scale the perturbation elementwise by T = |w| + η (default False)."},
    )
    sam_eta: float = field(
        default=0.0,
        metadata={
            "help": "ASAM's η ≥ 0 in T = |w| + η (default 0, as fam_hf.sam_sharpness; ASAM's code uses 0.01, which "
            "keeps zero weights, e.g. a LoRA B at initialisation, perturbable). Ignored unless sam_adaptive."
        },
    )

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        self.check_sam_fields()

    def check_sam_fields(self) -> None:
        """Raise ValueError naming the field when a ``sam_*`` value is out of range (TypeError: of the wrong type)."""
        check_types(self, numbers=("sam_rho", "sam_eta"), flags=("sam_adaptive",))
        if not (math.isfinite(self.sam_rho) and self.sam_rho > 0):
            raise ValueError(
                f"sam_rho={self.sam_rho} must be a finite number > 0 (the perturbation radius; SAM's default is "
                "0.05); to train without the perturbation use transformers.Trainer"
            )
        if not (math.isfinite(self.sam_eta) and self.sam_eta >= 0):
            raise ValueError(f"sam_eta={self.sam_eta} must be ≥ 0 (ASAM's offset in T = |w| + η; 0 or 0.01)")


@dataclass
class SAMConfig(SAMFields, TrainingArguments):
    """Training arguments for :class:`~fam_hf.SAMTrainer`: everything :class:`transformers.TrainingArguments`
    takes, plus the ``sam_*`` fields of :class:`SAMFields`."""

"""``FAMConfig``: ``TrainingArguments`` plus the knobs of the relative-flatness penalty.

The ``fam_*`` fields are declared once, in :class:`FAMFields`, a plain dataclass that any training-arguments
dataclass can mix in without re-declaring (and so resetting) the other's fields: ``FAMConfig`` is
``FAMFields`` + ``TrainingArguments``, ``fam_hf.trl.FAMSFTConfig`` is ``FAMFields`` + TRL's ``SFTConfig``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .options import (
    ESTIMATORS,
    HESSIAN_GRADS,
    SCALES,
    EstimatorName,
    HessianGrad,
    Scale,
    check_choice,
    check_types,
    is_whole_number,
)


@dataclass
class FAMFields:
    """The ``fam_*`` fields, to mix in front of a ``TrainingArguments`` dataclass:
    ``@dataclass class MyConfig(FAMFields, SFTConfig)`` keeps every default of ``SFTConfig``.

    The training objective is ``L + λ_t · κ`` where ``κ`` is the relative flatness of ``fam_layer`` on the
    current batch (Petzka et al., NeurIPS 2021) and ``λ_t`` follows ``fam_lambda``, ``fam_warmup_steps`` and
    ``fam_every_n_steps``. :meth:`check_fam_fields` validates them (``__post_init__`` calls it; so does
    ``FAMMixin``, whatever the order of the bases).
    """

    fam_lambda: float = field(
        default=0.01,
        metadata={
            "help": "Weight λ ≥ 0 of the relative-flatness penalty. 0 trains as plain Trainer and only logs κ. "
            "κ is in units of the loss; with fam_scale='reference' it is κ/m and λ values published with the "
            "reference code (e.g. 3e6) carry over."
        },
    )
    fam_lambda_relative: float | None = field(
        default=None,
        metadata={
            "help": "Set λ from a share of the loss instead: at the first penalised step, λ = share · L₀ / κ₀ (that "
            "step's loss and κ, averaged over processes), so that the penalty starts as this fraction of the loss "
            "whatever κ's scale on the layer; replaces fam_lambda. null: use fam_lambda."
        },
    )
    fam_layer: str = field(
        default="auto",
        metadata={
            "help": "Layer whose flatness is penalised: 'auto' (the output head: classifier/score/lm_head), or a "
            "module name of one linear layer (nn.Linear, GPT-2 Conv1D, PEFT LoRA layer); or a set whose κ's are "
            "summed with one probe: a glob matching several ('*.q_proj'), 'all-lora', 'all-linear' (all but the "
            "output head), or a comma-separated list of these (docs/mathematics.md#layer-sets)."
        },
    )
    fam_estimator: EstimatorName = field(
        default="auto",
        metadata={
            "help": "How κ is computed: 'closed_form' (exact, output head with cross-entropy/MSE/BCE), 'probe' "
            "(Hutchinson-style with fam_probes Rademacher probes, any layer, any loss), 'gauss_newton' (the probe "
            "with the Hessian's positive semi-definite Gauss–Newton part: κ ≥ 0 on any layer, where the probe's "
            "κ of a body layer can be driven negative; the model's own loss), 'exact' (full layer Hessian, tiny "
            "layers only), or 'auto': the closed form on the output head, Gauss–Newton on any other layer (a penalty "
            "needs κ bounded below), the probe under a custom loss or fam_hessian_grad='detached'."
        },
    )
    fam_probes: int = field(
        default=1, metadata={"help": "Rademacher probes per step for the probe and Gauss–Newton estimators (≥ 1)."}
    )
    fam_hessian_grad: HessianGrad = field(
        default="full",
        metadata={
            "help": "'full': the true gradient of λκ, differentiating the Hessian too. 'detached': the Hessian is "
            "held constant (the reference implementation's gradient)."
        },
    )
    fam_scale: Scale = field(
        default="paper",
        metadata={"help": "'paper': κ as defined; 'reference': each block trace divided by m (reference code)."},
    )
    fam_every_n_steps: int = field(
        default=1,
        metadata={
            "help": "Lazy penalty: compute it only on every k-th optimizer step, multiplied by k so its average "
            "weight stays λ (k ≥ 1)."
        },
    )
    fam_warmup_steps: int = field(
        default=0,
        metadata={"help": "Ramp λ linearly from λ/n to λ over the first n optimizer steps (0: no ramp)."},
    )
    fam_token_fraction: float = field(
        default=1.0,
        metadata={
            "help": "Closed form only: compute κ on this fraction of the positions (tokens) the loss counts, drawn "
            "uniformly each step and reweighted so κ stays unbiased; 1 is exact. Cuts an LM head's penalty cost by "
            "that factor."
        },
    )
    fam_seed: int | None = field(
        default=None, metadata={"help": "Seed of the probe and token-sample RNG (default: the training seed)."}
    )

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        self.check_fam_fields()

    def check_fam_fields(self) -> None:
        """Raise ValueError naming the field and its allowed values when a ``fam_*`` value is out of range
        (TypeError: of the wrong type)."""
        check_types(self, numbers=("fam_lambda", "fam_lambda_relative", "fam_token_fraction"), seeds=("fam_seed",))
        if not math.isfinite(self.fam_lambda):
            raise ValueError(f"fam_lambda={self.fam_lambda} is not a finite number; the penalty weight must be ≥ 0")
        if self.fam_lambda < 0:
            raise ValueError(f"fam_lambda={self.fam_lambda} is negative; the penalty weight must be ≥ 0")
        relative = self.fam_lambda_relative
        if relative is not None and not (math.isfinite(relative) and relative > 0):
            raise ValueError(
                f"fam_lambda_relative={relative} must be a finite number > 0 (the penalty's share of the loss at the "
                "first step, e.g. 0.02); use null to set fam_lambda directly"
            )
        for name, choices in (
            ("fam_estimator", ESTIMATORS),
            ("fam_hessian_grad", HESSIAN_GRADS),
            ("fam_scale", SCALES),
        ):
            check_choice(name, getattr(self, name), choices)
        if not 0 < self.fam_token_fraction <= 1:
            raise ValueError(f"fam_token_fraction={self.fam_token_fraction} must be in (0, 1] (1: every position)")
        for name, minimum in (("fam_probes", 1), ("fam_every_n_steps", 1), ("fam_warmup_steps", 0)):
            value = getattr(self, name)
            if not is_whole_number(value):
                raise ValueError(f"{name}={value!r} must be a whole number ≥ {minimum}")
            if value < minimum:
                raise ValueError(f"{name}={value} must be ≥ {minimum}")


@dataclass
class FAMConfig(FAMFields, TrainingArguments):
    """Training arguments for :class:`~fam_hf.FAMTrainer`: everything :class:`transformers.TrainingArguments`
    takes, plus the ``fam_*`` fields of :class:`FAMFields`."""

"""The choices of κ's options, as ``Literal`` types: shared by the estimators and the training configs, importing
nothing heavy (``HfArgumentParser`` turns a ``Literal`` field into argparse choices)."""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["ESTIMATORS", "FUSED_LOSS_TYPES", "HESSIAN_GRADS", "SCALES", "check_choice", "get_args"]

EstimatorName = Literal["auto", "closed_form", "probe", "gauss_newton", "exact"]
HessianGrad = Literal["full", "detached"]
Scale = Literal["paper", "reference"]
Purpose = Literal["measure", "penalty"]
LossKind = Literal["model", "custom", "fused"]
FusedLossType = Literal["nll", "dft"]  # a fused LM head's per-token term, as TRL's SFTConfig.loss_type names it

ESTIMATORS: tuple[str, ...] = get_args(EstimatorName)
HESSIAN_GRADS: tuple[str, ...] = get_args(HessianGrad)
SCALES: tuple[str, ...] = get_args(Scale)
FUSED_LOSS_TYPES: tuple[str, ...] = get_args(FusedLossType)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ValueError naming the option and its allowed values when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")

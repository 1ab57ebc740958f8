"""The choices of κ's options, as ``Literal`` types: shared by the estimators and the training configs, importing
nothing heavy (``HfArgumentParser`` turns a ``Literal`` field into argparse choices)."""

from __future__ import annotations

import numbers
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


def check_types(fields: object, numbers: tuple[str, ...] = (), flags: tuple[str, ...] = (),
                seeds: tuple[str, ...] = ()) -> None:  # fmt: skip
    """Raise TypeError naming the field when a config value has the wrong type: ``numbers`` int or float (None
    allowed where the default is None), ``flags`` bool, ``seeds`` int or None. ``bool`` is not a number here, and a
    string is never coerced: ``"false"`` would be true, and YAML reads ``5e-2`` (no dot) as a string."""
    for name in numbers:
        value = getattr(fields, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            hint = " (YAML reads 5e-2 as a string: write 5.0e-2 or 0.05)" if isinstance(value, str) else ""
            raise TypeError(f"{name}={value!r} must be a number, not {type(value).__name__}{hint}")
    for name in flags:
        value = getattr(fields, name)
        if not isinstance(value, bool):
            raise TypeError(f"{name}={value!r} must be true or false, not {type(value).__name__}")
    for name in seeds:
        value = getattr(fields, name)
        if value is not None and not is_whole_number(value):
            raise TypeError(f"{name}={value!r} must be a whole number (or None), not {type(value).__name__}")


def is_whole_number(value: object) -> bool:
    """An int (numpy's too), not a bool, not a float however round."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)

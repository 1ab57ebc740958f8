"""Relative flatness κ of one layer of a model, from the model's own forward pass (docs/mathematics.md).

* :class:`RelativeFlatness` — the estimators' common interface; ``RelativeFlatness(model, layer, estimator)``
  returns the chosen estimator: :class:`ClosedFormFlatness`, :class:`ProbeFlatness`, :class:`GaussNewtonFlatness`
  or :class:`ExactFlatness` (:class:`HeadInputFlatness`, for losses that never run the head, is built directly or
  chosen by a trainer; :class:`FusedHeadFlatness` computes a causal LM's loss and κ of its head in one pass);
* :func:`~fam_hf.flatness.registry.choose` — which estimator applies, for measurement or for a penalty;
* :func:`relative_flatness` — the one-call version for measurement.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..options import ESTIMATORS, HESSIAN_GRADS, SCALES
from .base import DEFAULT_MAX_EXACT_ENTRIES, FlatnessResult, LossNorm, Recording, RelativeFlatness, checkpointing
from .closed_form import ClosedFormFlatness, HeadInputFlatness, lm_head_positions
from .exact import ExactFlatness
from .fused import FusedHeadFlatness
from .probe import GaussNewtonFlatness, ProbeFlatness
from .registry import REGISTRY, choose, penalty_estimator

__all__ = [
    "ESTIMATORS",
    "HESSIAN_GRADS",
    "REGISTRY",
    "SCALES",
    "ClosedFormFlatness",
    "ExactFlatness",
    "FlatnessResult",
    "FusedHeadFlatness",
    "GaussNewtonFlatness",
    "HeadInputFlatness",
    "LossNorm",
    "ProbeFlatness",
    "Recording",
    "RelativeFlatness",
    "choose",
    "lm_head_positions",
    "penalty_estimator",
    "relative_flatness",
]


def relative_flatness(
    model: nn.Module,
    batch: Mapping[str, Any],
    layer: str = "auto",
    estimator: str = "auto",
    *,
    probes: int = 16,
    hessian_grad: str = "full",
    scale: str = "paper",
    differentiable: bool = False,
    generator: torch.Generator | None = None,
    max_exact_entries: int = DEFAULT_MAX_EXACT_ENTRIES,
    token_fraction: float = 1.0,
) -> FlatnessResult:
    """Relative flatness κ of ``layer`` on ``batch``: one forward pass of ``model(**batch)``.

    The model is run in whatever mode it is in (call ``model.eval()`` first to measure without dropout).
    ``batch`` must hold the labels, so the model returns its loss. See :class:`RelativeFlatness` for
    the options.

    Example::

        result = fam_hf.relative_flatness(model.eval(), batch)          # closed form on the head
        print(result.value, result.estimator, result.layer)
        fam_hf.relative_flatness(model, batch, layer="model.layers.3.mlp.down_proj", probes=32)
    """
    flatness = RelativeFlatness(
        model,
        layer,
        estimator,
        probes=probes,
        hessian_grad=hessian_grad,
        scale=scale,
        generator=generator,
        max_exact_entries=max_exact_entries,
        token_fraction=token_fraction,
    )
    if differentiable and flatness.second_order and checkpointing(model):
        raise ValueError(
            "relative_flatness(differentiable=True) removes its hook on return, but the backward pass through "
            "activation-checkpointed layers must see the probe again; use RelativeFlatness(...).record() and "
            "call .close() after the backward pass"
        )
    try:
        with flatness.record(
            batch, num_items_in_batch=batch.get("num_items_in_batch"), differentiable=differentiable
        ) as recording:
            outputs = model(**batch)
        result = recording.result(outputs.get("loss"), logits=outputs.get("logits"))
    finally:
        flatness.close()  # a later backward through checkpointed layers needs RelativeFlatness.record directly
    if not differentiable:
        result.value = result.value.detach()
    return result

"""Relative flatness κ of one layer of a model, from the model's own forward pass (docs/mathematics.md).

* :class:`RelativeFlatness` — the estimators' common interface; ``RelativeFlatness(model, layer, estimator)``
  returns the chosen estimator: :class:`ClosedFormFlatness`, :class:`ProbeFlatness`, :class:`GaussNewtonFlatness`
  or :class:`ExactFlatness`; over a set of layers, :class:`ProbeSetFlatness` or :class:`GaussNewtonSetFlatness`
  (:class:`HeadInputFlatness`, for losses that never run the head, is built directly or chosen by a trainer;
  :class:`FusedHeadFlatness` computes a causal LM's loss and κ of its head in one pass);
* :func:`~fam_hf.flatness.registry.choose` — which estimator applies, for measurement or for a penalty;
* :func:`relative_flatness` — the one-call version for measurement.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..head_loss import HeadLoss, LossFn, call_model
from ..options import ESTIMATORS, HESSIAN_GRADS, SCALES
from .base import DEFAULT_MAX_EXACT_ENTRIES, FlatnessResult, LossNorm, Recording, RelativeFlatness, checkpointing
from .closed_form import ClosedFormFlatness, HeadInputFlatness, lm_head_positions
from .exact import ExactFlatness
from .fused import FusedHeadFlatness
from .layer_set import GaussNewtonSetFlatness, ProbeSetFlatness
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
    "GaussNewtonSetFlatness",
    "HeadInputFlatness",
    "LossNorm",
    "ProbeFlatness",
    "ProbeSetFlatness",
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
    loss_fn: LossFn | None = None,
    head_loss: HeadLoss | str | None = None,
    normalize_features: bool = False,
    probes: int = 16,
    hessian_grad: str = "full",
    scale: str = "paper",
    differentiable: bool = False,
    generator: torch.Generator | None = None,
    max_exact_entries: int = DEFAULT_MAX_EXACT_ENTRIES,
    token_fraction: float = 1.0,
) -> FlatnessResult:
    """Relative flatness κ of ``layer`` on ``batch``: one forward pass, ``model(**batch)`` or ``loss_fn(model, batch)``.

    The model is run in whatever mode it is in (call ``model.eval()`` first to measure without dropout). By default
    the loss is the ``loss`` the model returns (a transformers model given ``labels``, or a dict with ``"loss"``);
    a model that returns logits, or takes its inputs positionally, is measured through ``loss_fn``, the same
    ``loss_fn(model, batch) -> scalar loss`` that :mod:`fam_hf.measures` take. The closed form and Gauss–Newton
    mirror the loss from the logits: on a transformers model they recognise its own loss; elsewhere (or with a
    ``loss_fn``) ``head_loss`` says which layer's output the loss reads and which loss it is. See
    :class:`RelativeFlatness` for the other options; ``estimator="auto"`` logs (at INFO) what it chose.

    Example::

        result = fam_hf.relative_flatness(model.eval(), batch)          # closed form on the head
        print(result.value, result.estimator, result.layer)
        fam_hf.relative_flatness(model, batch, layer="model.layers.3.mlp.down_proj", probes=32)
        # a plain torch MLP whose last layer is fc3, trained with mean cross-entropy against batch["y"]
        loss_fn = lambda model, batch: F.cross_entropy(model(batch["x"]), batch["y"])
        fam_hf.relative_flatness(mlp, batch, "fc3", loss_fn=loss_fn, head_loss=HeadLoss("cross_entropy", labels="y"))
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
        head_loss=head_loss,
        normalize_features=normalize_features,
        loss="custom" if loss_fn is not None else "model",
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
            loss, logits = call_model(model, batch) if loss_fn is None else (loss_fn(model, batch), None)
        result = recording.result(loss, logits=logits)
    finally:
        flatness.close()  # a later backward through checkpointed layers needs RelativeFlatness.record directly
    if not differentiable:
        result.value = result.value.detach()
    return result

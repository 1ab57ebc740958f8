"""Which estimator computes κ of a layer: the one table of estimators and the one place that chooses among them.

An estimator is chosen for a *purpose*: ``"measure"`` reports the paper's κ (the closed form on an output head,
else the probe with the full Hessian); ``"penalty"`` trains against it and needs κ bounded below (the closed form,
else Gauss–Newton, whose curvature is positive semi-definite, else the probe). And for a *loss*: ``"model"`` (the
model's own loss through its head), ``"custom"`` (a loss a trainer computes from the logits: compute_loss_func,
label smoothing; only the probe differentiates it), ``"fused"`` (a loss that never runs the head module, TRL's
fused LM head: only the closed form from the head's input). Each estimator says itself why it cannot apply
(:meth:`~fam_hf.RelativeFlatness.refusal`).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from ..layers import Layer, LayerSet, resolve_layer, resolve_spec
from ..options import ESTIMATORS, LossKind, Purpose, check_choice, get_args
from .base import AUTO_EXACT_ENTRIES, RelativeFlatness
from .closed_form import ClosedFormFlatness, HeadInputFlatness
from .exact import ExactFlatness
from .layer_set import choose_for_set
from .probe import GaussNewtonFlatness, ProbeFlatness

logger = logging.getLogger(__name__)

_why_auto = {
    "closed_form": "the output head under a loss it mirrors: exact, a few matrix products",
    "exact": f"at most {AUTO_EXACT_ENTRIES} weights: the full layer Hessian, one double backward per weight",
    "gauss_newton": "a body layer under the model's loss: positive semi-definite curvature",
    "probe": "Rademacher probes, with a standard error",
}

REGISTRY: dict[str, type[RelativeFlatness]] = {
    "closed_form": ClosedFormFlatness,
    "probe": ProbeFlatness,
    "gauss_newton": GaussNewtonFlatness,
    "exact": ExactFlatness,
}
assert ("auto", *REGISTRY) == ESTIMATORS, "fam_hf.options.EstimatorName lists the estimators of this table"

# What "auto" tries, in order, for each purpose: the first that applies. To measure, the exact Hessian is tried on
# layers of at most AUTO_EXACT_ENTRIES weights only (d·m double-backward passes, against the probe's standard error).
AUTO = {"measure": ("closed_form", "exact", "probe"), "penalty": ("closed_form", "gauss_newton", "probe")}


def choose(
    model: nn.Module,
    layer: str | Layer = "auto",
    estimator: str = "auto",
    options: dict[str, Any] | None = None,
    *,
    purpose: str = "measure",
    loss: str = "model",
) -> type[RelativeFlatness]:
    """The estimator class that computes κ of ``layer`` for ``purpose`` under ``loss``.

    Args:
        model: the model (optionally PEFT- or DDP-wrapped).
        layer: a layer spec (see :func:`fam_hf.resolve_layer`; a set of layers, :func:`fam_hf.layers.resolve_layers`)
            or a resolved :class:`~fam_hf.Layer` / :class:`~fam_hf.layers.LayerSet`.
        estimator: ``"auto"`` or an estimator's name.
        options: the estimator's keyword options (``hessian_grad``, ``max_exact_entries`` …), which some
            refusals depend on.
        purpose: ``"measure"`` or ``"penalty"``.
        loss: ``"model"``, ``"custom"`` or ``"fused"``.

    Raises:
        ValueError: an unknown name, or the named estimator cannot apply (the message says why and what to use).
    """
    check_choice("estimator", estimator, ESTIMATORS)
    check_choice("purpose", purpose, get_args(Purpose))
    check_choice("loss", loss, get_args(LossKind))
    options = options or {}
    target = layer if isinstance(layer, (Layer, LayerSet)) else resolve_spec(model, layer)
    if isinstance(target, LayerSet):  # several layers: one probe for the sum of their κ
        return choose_for_set(model, target, estimator, options, purpose=purpose, loss=loss)
    if loss == "fused":
        head = resolve_layer(model, "auto")
        reason = HeadInputFlatness.refusal(model, head)
        if reason is not None:
            raise ValueError(reason)
        if estimator not in ("auto", "closed_form") or target.name != head.name:
            spec = layer if isinstance(layer, str) else layer.name
            raise ValueError(
                f"fam_layer={spec!r} with fam_estimator={estimator!r}: the loss runs through a fused LM head "
                "(TRL's SFTTrainer), which never calls the head module and has no second derivative, so only the LM "
                f"head's closed form (from the head's input) can train; use fam_layer='auto' (or '{head.name}') with "
                "fam_estimator='auto' or 'closed_form', or penalise another layer with FAMTrainer and the full logits"
            )
        return HeadInputFlatness
    if estimator == "auto":  # the last of each AUTO list, the probe, applies to any layer under any loss
        cheap = {"max_exact_entries": min(options.get("max_exact_entries", AUTO_EXACT_ENTRIES), AUTO_EXACT_ENTRIES)}
        chosen = next(
            REGISTRY[name]
            for name in AUTO[purpose]
            if REGISTRY[name].refusal(model, target, loss=loss, **{**options, **(cheap if name == "exact" else {})})
            is None
        )
        d, m = target.shape
        logger.info(
            "estimator='auto' chose %r for κ of '%s' (%d×%d weights; %s)",
            chosen.estimator, target.name, d, m, _why_auto[chosen.estimator],
        )  # fmt: skip
        return chosen
    chosen = REGISTRY[estimator]
    reason = chosen.refusal(model, target, loss=loss, **options)
    if reason is not None:
        raise ValueError(reason)
    return chosen


def penalty_estimator(model: nn.Module, layer: str = "auto", hessian_grad: str = "full") -> str:
    """The name of the estimator ``fam_estimator="auto"`` trains with: the closed form on the output head under
    a loss it mirrors; on any other layer the Gauss–Newton estimator, whose curvature is positive semi-definite,
    so ``λ·κ ≥ 0`` and minimising it cannot run away (a body layer's Hessian is indefinite away from a minimum,
    and the probe's κ there has no lower bound: in this project's study it went to −3,000, STUDY.md); the probe
    otherwise (any other loss, or ``hessian_grad="detached"``, which Gauss–Newton does not take)."""
    return choose(model, layer, "auto", {"hessian_grad": hessian_grad}, purpose="penalty").estimator

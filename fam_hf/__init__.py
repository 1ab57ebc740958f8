"""fam_hf: Relative Flatness Aware Minimization (FAM) for Hugging Face fine-tuning."""

from __future__ import annotations

from .estimators import (
    closed_form,
    gauss_newton_forms,
    kappa_from_hessian,
    layer_hessian,
    logit_tangents,
    probe_quadratic_forms,
)
from .flatness import FlatnessResult, RelativeFlatness, relative_flatness
from .head_loss import HeadLoss, head_loss_for
from .layers import Layer, candidate_layers, output_head_name, resolve_layer
from .measures import (
    activity_weight_duality,
    dual_weight_change,
    hessian_trace,
    jacobian_norm,
    layerwise_flatness,
    sam_sharpness,
    top_eigenvalues,
)

__version__ = "0.1.0"

__all__ = [
    "FAMConfig",
    "FAMFields",
    "FAMMixin",
    "FAMTrainer",
    "FlatnessCallback",
    "FlatnessResult",
    "HeadLoss",
    "Layer",
    "RelativeFlatness",
    "SAMConfig",
    "SAMFields",
    "SAMMixin",
    "SAMTrainer",
    "activity_weight_duality",
    "candidate_layers",
    "closed_form",
    "dual_weight_change",
    "gauss_newton_forms",
    "head_loss_for",
    "hessian_trace",
    "jacobian_norm",
    "kappa_from_hessian",
    "layer_hessian",
    "layerwise_flatness",
    "logit_tangents",
    "output_head_name",
    "probe_quadratic_forms",
    "relative_flatness",
    "resolve_layer",
    "sam_sharpness",
    "top_eigenvalues",
]


def __getattr__(name: str):
    # The Trainer layer imports transformers.Trainer (slow); load it only when asked for.
    if name in ("FAMConfig", "FAMFields"):
        from . import config

        return getattr(config, name)
    if name in ("FAMTrainer", "FAMMixin"):
        from . import trainer

        return getattr(trainer, name)
    if name in ("SAMConfig", "SAMFields"):
        from . import sam_config

        return getattr(sam_config, name)
    if name in ("SAMTrainer", "SAMMixin"):
        from . import sam_trainer

        return getattr(sam_trainer, name)
    if name == "FlatnessCallback":
        from .callback import FlatnessCallback

        return FlatnessCallback
    raise AttributeError(f"module 'fam_hf' has no attribute {name!r}")

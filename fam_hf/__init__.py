"""fam_hf: Relative Flatness Aware Minimization (FAM) for Hugging Face fine-tuning.

``import fam_hf`` is cheap: every public name is imported from its module on first use (the table below), so
the Trainer layer, PEFT and the measures load only when asked for.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it
_IMPORT_STRUCTURE: dict[str, list[str]] = {
    "flatness": ["FlatnessResult", "RelativeFlatness", "relative_flatness"],
    "head_loss": ["HeadLoss", "head_loss_for"],
    "layers": ["Layer", "candidate_layers", "output_head_name", "resolve_layer"],
    "measures": [
        "activity_weight_duality",
        "dual_weight_change",
        "hessian_spectrum",
        "hessian_trace",
        "jacobian_norm",
        "layerwise_flatness",
        "sam_sharpness",
        "top_eigenvalues",
    ],
    "config": ["FAMConfig", "FAMFields"],
    "trainer": ["FAMMixin", "FAMTrainer"],
    "sam_config": ["SAMConfig", "SAMFields"],
    "sam_trainer": ["SAMMixin", "SAMTrainer"],
    "flat_lora_config": ["FlatLoRAConfig", "FlatLoRAFields"],
    "flat_lora_trainer": ["FlatLoRAMixin", "FlatLoRATrainer"],
    "callback": ["FlatnessCallback"],
}
# The estimators' tensor functions, once exported here; they live in fam_hf.curvature now.
_DEPRECATED = {
    name: "curvature"
    for name in (
        "closed_form",
        "gauss_newton_forms",
        "kappa_from_hessian",
        "layer_hessian",
        "logit_tangents",
        "probe_quadratic_forms",
    )
}
_MODULE_OF = {name: module for module, names in _IMPORT_STRUCTURE.items() for name in names}

__all__ = [
    "FAMConfig",
    "FAMFields",
    "FAMMixin",
    "FAMTrainer",
    "FlatLoRAConfig",
    "FlatLoRAFields",
    "FlatLoRAMixin",
    "FlatLoRATrainer",
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
    "hessian_spectrum",
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
assert sorted([*_MODULE_OF, *_DEPRECATED]) == __all__

if TYPE_CHECKING:
    from .callback import FlatnessCallback
    from .config import FAMConfig, FAMFields
    from .curvature import (
        closed_form,
        gauss_newton_forms,
        kappa_from_hessian,
        layer_hessian,
        logit_tangents,
        probe_quadratic_forms,
    )
    from .flat_lora_config import FlatLoRAConfig, FlatLoRAFields
    from .flat_lora_trainer import FlatLoRAMixin, FlatLoRATrainer
    from .flatness import FlatnessResult, RelativeFlatness, relative_flatness
    from .head_loss import HeadLoss, head_loss_for
    from .layers import Layer, candidate_layers, output_head_name, resolve_layer
    from .measures import (
        activity_weight_duality,
        dual_weight_change,
        hessian_spectrum,
        hessian_trace,
        jacobian_norm,
        layerwise_flatness,
        sam_sharpness,
        top_eigenvalues,
    )
    from .sam_config import SAMConfig, SAMFields
    from .sam_trainer import SAMMixin, SAMTrainer
    from .trainer import FAMMixin, FAMTrainer


def __getattr__(name: str):
    if name in _DEPRECATED:
        warnings.warn(
            f"fam_hf.{name} is deprecated: import it from fam_hf.{_DEPRECATED[name]}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(f".{_DEPRECATED[name]}", __name__), name)
    if name in _MODULE_OF:
        value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
        globals()[name] = value  # once
        return value
    raise AttributeError(f"module 'fam_hf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

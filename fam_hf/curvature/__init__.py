"""Pure tensor mathematics of relative flatness: no transformers, no Trainer.

* :mod:`~fam_hf.curvature.heads` — κ of an output head, exactly, from its logits or from its input, and the
  head's Hessian trace;
* :mod:`~fam_hf.curvature.fused_head` — a causal LM's loss and κ of its head in one chunked pass, with the
  gradient of ``L + λκ``;
* :mod:`~fam_hf.curvature.probes` — Rademacher probes through the loss (Hessian) or the logits (Gauss–Newton),
  and the random draws every estimator and measure shares;
* :mod:`~fam_hf.curvature.exact` — the full layer Hessian (tests, small layers);
* :mod:`~fam_hf.curvature.kernels` — the one context in which second derivatives are available and right.

The mathematics is in docs/mathematics.md.
"""

from .exact import kappa_from_hessian, layer_hessian
from .fused_head import FUSED_CHUNK_ELEMENTS, FusedHead, fused_head_loss
from .heads import (
    CHUNK_ELEMENTS,
    LOSS_TYPES,
    closed_form,
    compute_dtype,
    head_hessian_trace,
    logit_curvature_trace,
    softmax_curvature,
    weighted_curvature_from_features,
)
from .kernels import explain_missing_double_backward, second_order_kernels
from .probes import (
    UnusedPerturbationError,
    default_generator,
    gauss_newton_forms,
    host_to_device,
    logit_tangents,
    probe_quadratic_forms,
    rademacher,
    sample_positions,
)

__all__ = [
    "CHUNK_ELEMENTS",
    "FUSED_CHUNK_ELEMENTS",
    "FusedHead",
    "LOSS_TYPES",
    "UnusedPerturbationError",
    "closed_form",
    "compute_dtype",
    "default_generator",
    "explain_missing_double_backward",
    "fused_head_loss",
    "gauss_newton_forms",
    "head_hessian_trace",
    "host_to_device",
    "kappa_from_hessian",
    "layer_hessian",
    "logit_curvature_trace",
    "logit_tangents",
    "probe_quadratic_forms",
    "rademacher",
    "sample_positions",
    "second_order_kernels",
    "softmax_curvature",
    "weighted_curvature_from_features",
]

"""Flatness and sharpness measures from the papers behind fam_hf (docs/measures.md), as plain functions.

Each takes a model and a batch (``model(**batch).loss`` is the loss, or pass ``loss_fn(model, batch)``),
never modifies the model, and returns a small dataclass (value, and standard error where stochastic):

* :func:`hessian_trace` — ``Tr(∇²L)`` w.r.t. a layer's weight or parameters (Hutchinson, Hutch++, exact; on an
  output head also in closed form, from one forward pass).
* :func:`top_eigenvalues` — top-``k`` Hessian eigenpairs by Lanczos; ``λ_max`` is sharpness.
* :func:`gauss_newton_trace` — ``Tr(G)`` of the Gauss–Newton matrix (PSD; forward-mode products only).
* :func:`hessian_spectrum` — the Hessian's eigenvalue density by stochastic Lanczos quadrature.
* :func:`layerwise_flatness` — ``‖W‖²_F·Tr(H_W)`` and ``‖W‖²_F·λ_max(H_W)`` (Petzka et al.'s reference code).
* :func:`sam_sharpness` — ``L(w + ε̂) − L(w)`` for SAM's / ASAM's one-step ascent (Foret et al.; Kwon et al.).
* :func:`jacobian_norm` — input–output Jacobian norm w.r.t. input embeddings (MacDonald et al. 2023).
* :func:`dual_weight_change`, :func:`activity_weight_duality` — activity–weight duality and the
  decomposition of the train→test loss change over Hessian eigendirections (Feng, Zhang, Tu 2023).

:class:`LossHessian` is the Hessian as a matrix-free operator, for anything else (one forward and backward
pass, then one double-backward pass per Hessian-vector product); :class:`MicroBatchedHessian` the same operator
computed one part of the batch at a time (the memory of one part's graph, for whole models on large batches). The relative flatness κ itself is
:func:`fam_hf.relative_flatness`.
"""

from __future__ import annotations

from .duality import (
    DualityDecomposition,
    activity_weight_duality,
    dual_weight_change,
    duality_decomposition,
    layer_inputs,
)
from .eigen import HessianEigenpairs, estimate_top_eigenpairs, top_eigenvalues
from .gauss_newton import gauss_newton_trace
from .hessian import LossHessian, Subset, perturbed_loss, resolve_subset
from .jacobian import JacobianNorm, jacobian_norm
from .layerwise import LayerwiseFlatness, layerwise_flatness
from .micro_batches import MicroBatchedHessian, split_batch
from .sam import SAMSharpness, sam_sharpness
from .spectrum import HessianSpectrum, estimate_spectrum, hessian_spectrum
from .trace import HessianTrace, estimate_trace, hessian_trace

__all__ = [
    "DualityDecomposition",
    "HessianEigenpairs",
    "HessianSpectrum",
    "HessianTrace",
    "JacobianNorm",
    "LayerwiseFlatness",
    "LossHessian",
    "MicroBatchedHessian",
    "SAMSharpness",
    "Subset",
    "activity_weight_duality",
    "dual_weight_change",
    "duality_decomposition",
    "estimate_spectrum",
    "estimate_top_eigenpairs",
    "estimate_trace",
    "gauss_newton_trace",
    "hessian_spectrum",
    "hessian_trace",
    "jacobian_norm",
    "layer_inputs",
    "layerwise_flatness",
    "perturbed_loss",
    "resolve_subset",
    "sam_sharpness",
    "split_batch",
    "top_eigenvalues",
]

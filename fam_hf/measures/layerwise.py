"""Layer-wise relative flatness: ``‖W‖²_F · Tr(H_W)`` and ``‖W‖²_F · λ_max(H_W)``.

The simplest relative-flatness measures, as the reference implementation's ``calculate_measures.py``
(kampmichael/relativeFlatnessGeneralization, accompanying the early arXiv versions of Petzka et al.,
arXiv:2001.00939) computes them: a layer's curvature times its squared weight norm, where ``H_W`` is
the ``(d·m) × (d·m)`` Hessian of the loss w.r.t. the layer's weight ``W: (d, m)``:

* trace measure ``‖W‖²_F · Tr(H_W)``. The reference script prints ``‖W‖²_F · Tr(H_W) / (d·m)`` ("tracial
  flatness", the trace divided by the number of weights); divide :attr:`LayerwiseFlatness.trace_measure`
  by :attr:`LayerwiseFlatness.dim` to get that number.
* eigenvalue measure ``‖W‖²_F · λ_max(H_W)`` (the script's "eigenvalue relative flatness").

Both are invariant to *layer-wise* rescaling (``W → αW`` compensated elsewhere: ``H_W → H_W / α²``) but
not to neuron-wise rescaling (rows of ``W`` scaled by different factors). The NeurIPS 2021 paper's
relative flatness ``κ = Σ_{s,s'} ⟨w_s, w_s'⟩ Tr(H_{s,s'})`` (:func:`fam_hf.relative_flatness`) is the
neuron-wise refinement that is invariant to both; ``‖W‖²_F Tr(H_W)`` keeps only ``‖W‖²_F = Σ_s ⟨w_s, w_s⟩``
against the whole trace: when ``W Wᵀ = c I_d``, ``κ = c Tr(H_W) = ‖W‖²_F Tr(H_W) / d`` (equal for ``d = 1``)
(docs/measures.md#layer-wise-flatness).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .eigen import estimate_top_eigenpairs
from .hessian import LossFn, LossHessian
from .trace import HessianTrace, estimate_trace


@dataclass
class LayerwiseFlatness:
    """Layer-wise relative flatness of one layer on one batch.

    Attributes:
        layer: the layer's module name.
        weight_norm_sq: ``‖W‖²_F`` (squared weight units).
        trace: ``Tr(H_W)`` with its standard error (loss per squared weight unit).
        lambda_max: ``λ_max(H_W)``, the largest algebraic eigenvalue.
        trace_measure: ``‖W‖²_F · Tr(H_W)`` (loss units).
        trace_measure_std_error: ``‖W‖²_F`` times the trace's standard error (None when exact).
        eigenvalue_measure: ``‖W‖²_F · λ_max(H_W)`` (loss units).
        dim: ``d·m``, the number of weights.
        matvecs: Hessian-vector products spent.
    """

    layer: str
    weight_norm_sq: torch.Tensor
    trace: HessianTrace
    lambda_max: torch.Tensor
    trace_measure: torch.Tensor
    trace_measure_std_error: torch.Tensor | None
    eigenvalue_measure: torch.Tensor
    dim: int
    matvecs: int


def layerwise_flatness(
    model: nn.Module,
    batch: Mapping[str, Any],
    layer: str = "auto",
    *,
    probes: int = 64,
    trace_method: str = "hutchinson",
    eigen_method: str = "lanczos",
    loss_fn: LossFn | None = None,
    generator: torch.Generator | None = None,
) -> LayerwiseFlatness:
    """``‖W‖²_F · Tr(H_W)`` and ``‖W‖²_F · λ_max(H_W)`` for ``layer`` (default: the output head) on ``batch``.

    Args:
        model: run as it is (``model.eval()`` to measure without dropout); nothing in it is modified.
        batch: a transformers batch with labels (``model(**batch).loss``), or what ``loss_fn`` takes.
        layer: a layer spec (see :func:`fam_hf.resolve_layer`); ``W`` is its weight map ``(d, m)``
            (LoRA: the effective ``W0 + s·B·A``).
        probes: Hessian-vector products for the trace (see :func:`~fam_hf.measures.estimate_trace`).
        trace_method: ``"hutchinson"``, ``"hutch++"`` or ``"exact"``.
        eigen_method: ``"lanczos"`` or ``"exact"``.
        loss_fn: ``loss_fn(model, batch) -> loss`` for models that do not compute their own loss.
        generator: RNG for the probes and Lanczos' start; default seeded with 0.

    Cost: one forward and one backward pass shared by both, ``probes`` double-backward passes for the
    trace and one per Lanczos step for ``λ_max``.
    """
    hessian = LossHessian(model, batch, layer, loss_fn=loss_fn)
    weight = hessian.subset.values[0]
    norm_sq = weight.pow(2).sum()
    trace = estimate_trace(hessian, probes=probes, method=trace_method, generator=generator)
    top = estimate_top_eigenpairs(hessian, 1, method=eigen_method, generator=generator)
    return LayerwiseFlatness(
        layer=hessian.subset.layer.name,
        weight_norm_sq=norm_sq,
        trace=trace,
        lambda_max=top.values[0],
        trace_measure=norm_sq * trace.value,
        trace_measure_std_error=None if trace.std_error is None else norm_sq * trace.std_error,
        eigenvalue_measure=norm_sq * top.values[0],
        dim=hessian.dim,
        matvecs=hessian.matvecs,
    )

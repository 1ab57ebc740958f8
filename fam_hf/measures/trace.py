"""Trace of the loss Hessian w.r.t. a layer or parameters: the classic "sharpness as curvature" number.

``Tr(H) = Σ_i λ_i`` for ``H = ∇²L`` (``n × n``), estimated from Hessian-vector products:

* Hutchinson (1989): ``Tr(H) = E_v[vᵀ H v]`` for Rademacher ``v``; unbiased, ``Var(vᵀHv) = 2 Σ_{i≠j} H_ij²``.
* Hutch++ (Meyer, Musco, Musco, Woodruff, SOSA 2021): a third of the budget sketches the top of the
  spectrum (``Q = orth(H S)``), whose trace ``Tr(QᵀHQ)`` is exact; Hutchinson handles only the rest,
  ``(I − QQᵀ) H (I − QQᵀ)``. Exact once the sketch spans the space (budget ≥ ``3n``).
* exact: ``Σ_i e_iᵀ H e_i`` over the standard basis, ``n`` HVPs.

Units: loss units per squared parameter unit. Not invariant to reparameterization: scaling a ReLU
layer's input by ``α`` (and the previous layer by ``α``, this one by ``1/α``) multiplies its trace by
``α²`` while the network's function is unchanged — compare :func:`fam_hf.relative_flatness`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..curvature import default_generator, rademacher
from .hessian import LossFn, LossHessian, Operator, Wrt, as_operator

TRACE_METHODS = ("hutchinson", "hutch++", "exact")


@dataclass
class HessianTrace:
    """``Tr(H)`` of the loss Hessian.

    Attributes:
        value: scalar estimate.
        std_error: standard error of a stochastic estimate (std of the per-probe values / √probes, for
            Hutch++ of its Hutchinson part on the residual); None for ``"exact"``.
        method: ``"hutchinson"``, ``"hutch++"`` or ``"exact"``.
        matvecs: Hessian-vector products spent.
        dim: ``n``, the number of variables.
    """

    value: torch.Tensor
    std_error: torch.Tensor | None
    method: str
    matvecs: int
    dim: int

    def __float__(self) -> float:
        return float(self.value)


def estimate_trace(
    operator: Operator,
    *,
    probes: int = 64,
    method: str = "hutchinson",
    generator: torch.Generator | None = None,
) -> HessianTrace:
    """Trace of a symmetric operator from matrix-vector products.

    Args:
        operator: a :class:`~fam_hf.measures.LossHessian` or a dense symmetric ``(n, n)`` tensor.
        probes: the budget of matrix-vector products (Hutchinson: probes; Hutch++: ``probes // 3`` sketch
            vectors, as many for ``QᵀHQ`` and the rest for the residual). Ignored by ``"exact"``.
        method: ``"hutchinson"``, ``"hutch++"`` or ``"exact"`` (``n`` products, the standard basis).
        generator: RNG for the probe vectors (drawn on the CPU); default seeded with 0.

    Cost: ``probes`` matrix-vector products (``n`` for ``"exact"``), plus a QR of ``(n, probes/3)``.
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"method={method!r} is not one of {', '.join(map(repr, TRACE_METHODS))}")
    operator = as_operator(operator)
    matmat, n, dtype, device = operator.matmat, operator.shape[0], operator.dtype, operator.device
    generator = default_generator(generator)
    if method == "exact":
        basis = torch.eye(n, dtype=dtype, device=device)
        return HessianTrace(torch.diagonal(matmat(basis)).sum(), None, method, n, n)
    if probes < (3 if method == "hutch++" else 1):
        raise ValueError(f"probes={probes} is too few for method={method!r} (at least 1; 3 for Hutch++)")
    if method == "hutchinson":
        v = rademacher(n, probes, generator=generator, dtype=dtype, device=device)
        values = (v * matmat(v)).sum(0)
        return HessianTrace(values.mean(), _std_error(values), method, probes, n)
    sketch = probes // 3
    residual = probes - 2 * sketch
    s = rademacher(n, sketch, generator=generator, dtype=dtype, device=device)
    q, _ = torch.linalg.qr(matmat(s))  # (n, min(n, sketch)): an orthonormal basis of the sketched range
    top = (q * matmat(q)).sum()  # Tr(Qᵀ H Q)
    g = rademacher(n, residual, generator=generator, dtype=dtype, device=device)
    g = g - q @ (q.T @ g)  # (I − QQᵀ) g
    values = (g * matmat(g)).sum(0)
    return HessianTrace(top + values.mean(), _std_error(values), method, 2 * sketch + residual, n)


def _std_error(values: torch.Tensor) -> torch.Tensor | None:
    if values.numel() < 2:
        return None
    return values.std() / math.sqrt(values.numel())


def hessian_trace(
    model: nn.Module,
    batch: Mapping[str, Any],
    wrt: Wrt = "auto",
    *,
    probes: int = 64,
    method: str = "hutchinson",
    loss_fn: LossFn | None = None,
    generator: torch.Generator | None = None,
) -> HessianTrace:
    """``Tr(∇²L)`` of the loss on ``batch`` w.r.t. a layer's weight (default: the output head) or parameters.

    Args:
        model: run as it is (``model.eval()`` to measure without dropout); nothing in it is modified.
        batch: a transformers batch with labels (``model(**batch).loss``), or what ``loss_fn`` takes.
        wrt: a layer spec (that layer's ``W: (d, m)``), a parameter, a sequence of parameters, or None
            (every trainable parameter); see :mod:`fam_hf.measures.hessian`.
        probes: budget of Hessian-vector products (see :func:`estimate_trace`).
        method: ``"hutchinson"`` (default), ``"hutch++"`` or ``"exact"``.
        loss_fn: ``loss_fn(model, batch) -> loss`` for models that do not compute their own loss.
        generator: RNG for the probes; default seeded with 0.

    Returns:
        :class:`HessianTrace` (units: loss per squared weight unit).

    Cost: one forward and one backward pass, then ``probes`` double-backward passes (``n`` for
    ``"exact"``). The sum over the batch follows the loss's own normalisation (a mean over examples or
    counted tokens for transformers' losses).
    """
    hessian = LossHessian(model, batch, wrt, loss_fn=loss_fn)
    return estimate_trace(hessian, probes=probes, method=method, generator=generator)

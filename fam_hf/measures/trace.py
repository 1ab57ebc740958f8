"""Trace of the loss Hessian w.r.t. a layer or parameters: the classic "sharpness as curvature" number.

``Tr(H) = Σ_i λ_i`` for ``H = ∇²L`` (``n × n``), estimated from Hessian-vector products:

* Hutchinson (1989): ``Tr(H) = E_v[vᵀ H v]`` for Rademacher ``v``; unbiased, ``Var(vᵀHv) = 2 Σ_{i≠j} H_ij²``.
* Hutch++ (Meyer, Musco, Musco, Woodruff, SOSA 2021): a third of the budget sketches the top of the
  spectrum (``Q = orth(H S)``), whose trace ``Tr(QᵀHQ)`` is exact; Hutchinson handles only the rest,
  ``(I − QQᵀ) H (I − QQᵀ)``. Exact once the sketch spans the space (budget ≥ ``3n``).
* exact: ``Σ_i e_iᵀ H e_i`` over the standard basis, ``n`` HVPs.
* closed form, on an output head only: ``Tr(H_W) = Σ_t c_t ‖φ_t‖² Tr ∇²_z ℓ_t`` from one forward pass, no HVP
  (:mod:`fam_hf.measures.head_trace`).

Memory: the probes are drawn and multiplied ``block`` at a time, so Hutchinson and the exact trace hold
``O(n·block)`` whatever the number of probes (Hutch++ holds its sketch ``Q: (n, probes/3)`` as well, by
construction). Each probe vector is drawn whole, one after the other, from the generator, so the result is the
same, draw for draw, for every ``block``.

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
from ..head_loss import HeadLoss
from .head_trace import closed_form_head_trace, closed_form_refusal
from .hessian import LossFn, Operator, SymmetricOperator, Wrt, as_operator
from .micro_batches import batch_hessian
from .progress import progress

TRACE_METHODS = ("hutchinson", "hutch++", "exact")
MODEL_TRACE_METHODS = (*TRACE_METHODS, "closed_form", "auto")  # what hessian_trace takes: these need the model


@dataclass
class HessianTrace:
    """``Tr(H)`` of the loss Hessian.

    Attributes:
        value: scalar estimate.
        std_error: standard error of a stochastic estimate (std of the per-probe values / √probes, for
            Hutch++ of its Hutchinson part on the residual); None for ``"exact"`` and a closed form.
        method: ``"hutchinson"``, ``"hutch++"``, ``"exact"``, ``"closed_form"``, or the Gauss–Newton trace's
            ``"gauss_newton"``, ``"gauss_newton_exact"``, ``"gauss_newton_closed_form"``.
        matvecs: Hessian-vector products spent (0 for a closed form).
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
    block: int | None = None,
    disable_tqdm: bool | None = None,
) -> HessianTrace:
    """Trace of a symmetric operator from matrix-vector products.

    Args:
        operator: a :class:`~fam_hf.measures.LossHessian` or a dense symmetric ``(n, n)`` tensor.
        probes: the budget of matrix-vector products (Hutchinson: probes; Hutch++: ``probes // 3`` sketch
            vectors, as many for ``QᵀHQ`` and the rest for the residual). Ignored by ``"exact"``.
        method: ``"hutchinson"``, ``"hutch++"`` or ``"exact"`` (``n`` products, the standard basis).
        generator: RNG for the probe vectors (drawn on the CPU); default seeded with 0.
        block: probe vectors drawn and multiplied at a time (memory ``O(n·block)``); default
            ``operator.default_block``: for a :class:`~fam_hf.measures.LossHessian`, as many as fit in the size of
            the model's gradient (``⌊parameters / n⌋``, at least 1). The result does not depend on it.
        disable_tqdm: hide the progress bar over the products (None: shown when there are many of them and
            each is slow; see :func:`fam_hf.measures.progress.progress`).

    Cost: ``probes`` matrix-vector products (``n`` for ``"exact"``), plus a QR of ``(n, probes/3)``.
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"method={method!r} is not one of {', '.join(map(repr, TRACE_METHODS))}")
    operator = as_operator(operator)
    matmat, n, dtype, device = operator.matmat, operator.shape[0], operator.dtype, operator.device
    generator = default_generator(generator)
    block = _block(operator, block)
    if method == "exact":
        total = torch.zeros((), dtype=dtype, device=device)
        with progress(n, "Hessian trace (exact)", disable_tqdm) as bar:
            for start in range(0, n, block):
                columns = torch.arange(min(block, n - start), device=device)
                basis = torch.zeros(n, columns.numel(), dtype=dtype, device=device)
                basis[start + columns, columns] = 1  # e_start, e_start+1, …
                total += (basis * matmat(basis)).sum()
                bar.update(basis.shape[1])
        return HessianTrace(total, None, method, n, n)
    if probes < (3 if method == "hutch++" else 1):
        raise ValueError(f"probes={probes} is too few for method={method!r} (at least 1; 3 for Hutch++)")
    with progress(probes, f"Hessian trace ({method})", disable_tqdm) as bar:
        if method == "hutchinson":
            values = _quadratic_forms(operator, probes, block, generator, bar)
            return HessianTrace(values.mean(), _std_error(values), method, probes, n)
        sketch = probes // 3
        residual = probes - 2 * sketch
        hs = torch.cat([matmat(s) for s in _probe_blocks(n, sketch, block, generator, dtype, device, bar)], dim=1)
        q, _ = torch.linalg.qr(hs)  # (n, min(n, sketch)): an orthonormal basis of the sketched range
        del hs
        top = torch.zeros((), dtype=dtype, device=device)
        for start in range(0, q.shape[1], block):
            columns = q[:, start : start + block]
            top += (columns * matmat(columns)).sum()  # Tr(Qᵀ H Q), a block of columns at a time
            bar.update(columns.shape[1])
        values = _quadratic_forms(operator, residual, block, generator, bar, project=q)
        return HessianTrace(top + values.mean(), _std_error(values), method, 2 * sketch + residual, n)


def _block(operator: SymmetricOperator, block: int | None) -> int:
    block = operator.default_block if block is None else block
    if block < 1:
        raise ValueError(f"block={block} must be at least 1 (the probe vectors multiplied at a time)")
    return block


def _probe_blocks(n, count, block, generator, dtype, device, bar=None):
    """``count`` Rademacher vectors of length ``n`` as ``(n, b)`` blocks of at most ``block`` columns; each vector is
    drawn whole, in order, so the draws do not depend on ``block``."""
    for start in range(0, count, block):
        columns = min(block, count - start)
        yield rademacher(columns, n, generator=generator, dtype=dtype, device=device).T
        if bar is not None:
            bar.update(columns)


def _quadratic_forms(operator, count, block, generator, bar, project=None) -> torch.Tensor:
    """``vᵀ A v`` for ``count`` Rademacher vectors (projected by ``I − QQᵀ`` when ``project`` is ``Q``): ``(count,)``."""
    n, dtype, device = operator.shape[0], operator.dtype, operator.device
    values = []
    for v in _probe_blocks(n, count, block, generator, dtype, device, bar):
        if project is not None:
            v = v - project @ (project.T @ v)
        values.append((v * operator.matmat(v)).sum(0))
    return torch.cat(values)


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
    head_loss: HeadLoss | str | None = None,
    generator: torch.Generator | None = None,
    block: int | None = None,
    micro_batches: int = 1,
    disable_tqdm: bool | None = None,
) -> HessianTrace:
    """``Tr(∇²L)`` of the loss on ``batch`` w.r.t. a layer's weight (default: the output head) or parameters.

    Args:
        model: run as it is (``model.eval()`` to measure without dropout); nothing in it is modified.
        batch: a transformers batch with labels (``model(**batch).loss``), or what ``loss_fn`` takes.
        wrt: a layer spec (that layer's ``W: (d, m)``), a parameter, a sequence of parameters, or None
            (every trainable parameter); see :mod:`fam_hf.measures.hessian`.
        probes: budget of Hessian-vector products (see :func:`estimate_trace`).
        method: ``"hutchinson"`` (default), ``"hutch++"``, ``"exact"``, ``"closed_form"`` or ``"auto"``.
            ``"closed_form"``: exact on an output head (``Tr(H_W) = Σ_t c_t ‖φ_t‖² Tr ∇²_z ℓ_t``,
            :func:`fam_hf.curvature.head_hessian_trace`) from one forward pass, no HVP; ``wrt`` must be the
            model's output head under its own cross-entropy, MSE or BCE loss (a transformers causal LM or sequence
            classifier), or the layer ``head_loss`` names; anything else is refused with the reason.
            ``"auto"``: the closed form where it applies, else Hutchinson. The default stays Hutchinson, so the
            numbers of earlier calls do not change.
        loss_fn: ``loss_fn(model, batch) -> loss`` for models that do not compute their own loss.
        head_loss: for ``"closed_form"`` on a model whose loss fam_hf does not recognise (plain torch, a
            ``loss_fn``): which layer's output the loss reads and which loss it is (:class:`~fam_hf.HeadLoss`, or
            ``"cross_entropy"``, ``"mse"``, ``"bce"`` for ``wrt`` itself with ``batch["labels"]``); the loss
            computed is checked against it. Ignored by the other methods.
        generator: RNG for the probes; default seeded with 0.
        block: probes multiplied at a time (memory ``O(n·block)``; default: as many as fit in the size of the
            model's gradient); the result does not depend on it.
        micro_batches: compute each product over this many parts of the batch, one part's graph at a time
            (:class:`~fam_hf.measures.MicroBatchedHessian`: the model's own loss; the same trace, a fraction of the
            memory over a whole model at the cost of one more forward and backward pass per part and product).
        disable_tqdm: hide the progress bar (shown by default for a measurement of more than a few seconds).

    Returns:
        :class:`HessianTrace` (units: loss per squared weight unit).

    Cost: one forward and one backward pass, then ``probes`` double-backward passes (``n`` for
    ``"exact"``); the closed form, one forward pass without a graph. The sum over the batch follows the loss's
    own normalisation (a mean over examples or counted tokens for transformers' losses).
    """
    if method not in MODEL_TRACE_METHODS:
        raise ValueError(f"method={method!r} is not one of {', '.join(map(repr, MODEL_TRACE_METHODS))}")
    if method == "auto":
        refused = closed_form_refusal(model, wrt, head_loss=head_loss, loss_fn=loss_fn)
        method = "hutchinson" if refused is not None else "closed_form"
    if method == "closed_form":
        value, n = closed_form_head_trace(model, batch, wrt, head_loss=head_loss, loss_fn=loss_fn)
        return HessianTrace(value, None, "closed_form", 0, n)
    hessian = batch_hessian(model, batch, wrt, loss_fn=loss_fn, micro_batches=micro_batches)
    return estimate_trace(
        hessian, probes=probes, method=method, generator=generator, block=block, disable_tqdm=disable_tqdm
    )

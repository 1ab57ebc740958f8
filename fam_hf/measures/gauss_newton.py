"""Trace of the Gauss–Newton matrix of the loss w.r.t. a layer or parameters: the positive semi-definite part of the
Hessian, and cheaper to probe (docs/measures.md#gauss-newton-trace).

With ``z_t(w)`` the logits at position ``t``, ``J_t = ∂z_t/∂w`` and a loss ``L = Σ_t c_t ℓ(z_t)``,

    ∇²L = G + Σ_t c_t Σ_s ∂ℓ/∂z_{t,s} ∇²z_{t,s},        G = Σ_t c_t J_tᵀ ∇²ℓ_t J_t  (PSD: ∇²ℓ_t is),

and ``vᵀ G v = Σ_t c_t (J_t v)ᵀ ∇²ℓ_t (J_t v)``: one Jacobian-vector product of the logits (forward mode,
``torch.func.jvp``) per probe, no second derivative of the network. Hutchinson's estimator on it gives ``Tr(G)``; on
an output head ``∇²z = 0`` and ``G`` is the Hessian.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..curvature import default_generator, explain_missing_double_backward, gauss_newton_forms, second_order_kernels
from ..head_loss import HeadLoss, as_head_loss, call_model, head_loss_for
from ..layers import resolve_layer
from .head_trace import closed_form_head_trace, closed_form_refusal
from .hessian import Subset, Wrt, _LossOf, resolve_subset
from .progress import progress
from .trace import HessianTrace, _probe_blocks, _std_error

GN_METHODS = ("hutchinson", "exact", "closed_form", "auto")


def gauss_newton_trace(
    model: nn.Module,
    batch: Mapping[str, Any],
    wrt: Wrt = "auto",
    *,
    probes: int = 64,
    method: str = "hutchinson",
    head_loss: HeadLoss | str | None = None,
    generator: torch.Generator | None = None,
    block: int | None = None,
    disable_tqdm: bool | None = None,
) -> HessianTrace:
    """``Tr(G)`` of the loss on ``batch`` w.r.t. a layer's weight (default: the output head) or parameters, ``G`` the
    Gauss–Newton matrix ``Σ_t c_t J_tᵀ ∇²ℓ_t J_t`` (positive semi-definite; the Hessian on an output head).

    Args:
        model: run as it is (``model.eval()`` to measure without dropout); nothing in it is modified.
        batch: a transformers batch with labels, or (with ``head_loss``) the keyword arguments of any model.
        wrt: a layer spec, a parameter, a sequence of parameters, or None (every trainable parameter).
        probes: Rademacher probes (Hutchinson on ``G``); ignored by ``"exact"``.
        method: ``"hutchinson"``, ``"exact"`` (``n`` products with the standard basis; small subsets),
            ``"closed_form"`` (an output head only, where ``G = H``: ``Tr(G_W) = Σ_t c_t ‖φ_t‖² Tr ∇²_z ℓ_t`` exactly,
            from one forward pass; the conditions and refusals are :func:`hessian_trace`'s) or ``"auto"`` (the
            closed form where it applies, else Hutchinson). The default stays Hutchinson.
        head_loss: which layer's output is the logits and which loss reads them (see :class:`~fam_hf.HeadLoss`);
            default: the model's own loss (a transformers causal LM or sequence classifier).
        generator: RNG for the probes; default seeded with 0 (the same draws as :func:`hessian_trace`'s).
        block: probes drawn at a time (memory ``O(n·block)``; default as :func:`hessian_trace`'s).
        disable_tqdm: hide the progress bar (shown after 5 s).

    Returns:
        :class:`~fam_hf.measures.HessianTrace` with ``method="gauss_newton"`` (or ``"gauss_newton_exact"``,
        ``"gauss_newton_closed_form"``).

    Cost: one forward pass with its forward-mode tangent per probe (``torch.func.jvp``): no backward pass, no
    graph kept, so about a forward pass's memory. The closed form: one forward pass in all.
    """
    if method not in GN_METHODS:
        raise ValueError(f"method={method!r} is not one of {', '.join(map(repr, GN_METHODS))}")
    if method == "auto":
        method = "hutchinson" if closed_form_refusal(model, wrt, head_loss=head_loss) is not None else "closed_form"
    if method == "closed_form":
        value, n = closed_form_head_trace(model, batch, wrt, head_loss=head_loss)
        return HessianTrace(value, None, "gauss_newton_closed_form", 0, n)
    spec = as_head_loss(head_loss)
    loss = spec or head_loss_for(model)
    if loss is None:
        raise ValueError(
            f"the Gauss–Newton trace needs the curvature of the loss in the logits, and {type(model).__name__}'s loss "
            "is not one fam_hf recognises; name the output layer and its loss: head_loss=HeadLoss('cross_entropy', "
            "head=NAME, labels=KEY)"
        )
    subset = resolve_subset(model, wrt)
    logits_of = _LogitsOf(model, batch, subset, spec)
    labels = batch.get(loss.labels)
    if labels is None:
        raise ValueError(f"the Gauss–Newton trace needs the batch's targets, batch[{loss.labels!r}]")
    labels, loss = loss.aligned(labels, batch)
    n, dtype = subset.dim, subset.values[0].dtype
    parameters = sum(p.numel() for p in model.parameters())
    block = max(1, parameters // n) if block is None else block
    if block < 1:
        raise ValueError(f"block={block} must be at least 1")
    generator = default_generator(generator)

    def forms(vectors: torch.Tensor) -> torch.Tensor:
        """``vᵀ G v`` for each column of ``vectors: (n, b)``."""
        logits, tangents = None, []
        for v in vectors.T:
            logits, tangent = logits_of.jvp(subset.unflatten(v))
            tangents.append(tangent)
        positions, stacked, weights = loss.positions(
            logits, torch.cat(tangents, dim=-1), labels, input_ids=batch.get("input_ids"),
            num_items_in_batch=batch.get("num_items_in_batch"),
        )  # fmt: skip
        stacked = stacked.reshape(positions.shape[0], len(tangents), positions.shape[-1])
        return gauss_newton_forms(positions, stacked, weights, loss.loss_type)

    device = subset.values[0].device
    with torch.no_grad(), second_order_kernels(), explain_missing_double_backward():
        if method == "exact":
            total = torch.zeros((), dtype=torch.float64)
            with progress(n, "Gauss–Newton trace (exact)", disable_tqdm) as bar:
                for start in range(0, n, block):
                    columns = torch.arange(min(block, n - start), device=device)
                    basis = torch.zeros(n, columns.numel(), dtype=dtype, device=device)
                    basis[start + columns, columns] = 1
                    total += forms(basis).double().sum().cpu()
                    bar.update(columns.numel())
            return HessianTrace(total.to(dtype), None, "gauss_newton_exact", n, n)
        values = []
        with progress(probes, "Gauss–Newton trace", disable_tqdm) as bar:
            for v in _probe_blocks(n, probes, block, generator, dtype, device, bar):
                values.append(forms(v))
        values = torch.cat(values)
    return HessianTrace(values.mean(), _std_error(values), "gauss_newton", probes, n)


class _LogitsOf:
    """The logits as a function of a perturbation of the subset, and their Jacobian-vector product."""

    def __init__(self, model: nn.Module, batch: Mapping[str, Any], subset: Subset, spec: HeadLoss | None) -> None:
        self.model, self.batch, self.subset = model, batch, subset
        self.head = None
        if spec is not None:
            self.head = resolve_layer(model, spec.head) if spec.head is not None else subset.layer
            if self.head is None:
                raise ValueError(
                    "head_loss must name the output layer (HeadLoss(..., head=NAME)) when the Gauss–Newton trace is "
                    "taken w.r.t. parameters"
                )

    def __call__(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The logits with a layer's output moved by ``δ φ`` (``tensors = (δ,)``), or with the parameters replaced by
        ``tensors`` for this one call."""
        captured: list[torch.Tensor] = []
        handles = []
        if self.subset.layer is not None:
            (delta,) = tensors

            def add(module, inputs, output):
                return output + F.linear(inputs[0], delta.to(output.dtype))

            handles.append(self.subset.layer.module.register_forward_hook(add))
        if self.head is not None:
            handles.append(self.head.module.register_forward_hook(lambda m, i, o: captured.append(o)))
        try:
            if self.subset.layer is not None:
                _, logits = call_model(self.model, self.batch)
            else:
                swapped = {f"model.{name}": t for name, t in zip(self.subset.names, tensors)}
                _, logits = torch.func.functional_call(_LogitsModule(self.model), swapped, args=(self.batch,))
        finally:
            for handle in handles:
                handle.remove()
        if self.head is not None:
            logits = captured[0]
        if logits is None:
            raise ValueError(
                f"{type(self.model).__name__} returned no logits; name the output layer: head_loss=HeadLoss(..., head=NAME)"
            )
        return logits

    def jvp(self, direction: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and their derivative along ``direction`` (shaped like the subset): ``(z, J v)``."""
        # A layer is differentiated through a zero perturbation at its output; parameters at their own values, so
        # no copy ``w + 0`` of the model (nor the zeros) is made over a whole model.
        primals = (
            tuple(torch.zeros_like(v) for v in self.subset.values) if self.subset.layer is not None
            else tuple(self.subset.values)
        )  # fmt: skip
        return torch.func.jvp(lambda *tensors: self(tensors), primals, tuple(d.to(p.dtype) for d, p in zip(direction, primals)))


class _LogitsModule(_LossOf):
    """``batch ↦ (loss, logits)`` of the model, as a module for ``functional_call``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, call_model)

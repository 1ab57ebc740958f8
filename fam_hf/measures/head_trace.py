"""The exact Hessian trace of an output head in closed form, from one forward pass (docs/measures.md#hessian-trace).

For a head ``z_t = W φ_t (+ b)`` feeding the model's own per-position loss ``L = Σ_t c_t ℓ(z_t)``,

    Tr(H_W) = Σ_t c_t ‖φ_t‖² · Tr ∇²_z ℓ_t        (:func:`fam_hf.curvature.head_hessian_trace`),

which is also the Gauss–Newton trace there (the head is linear). This module reads ``φ``, ``z`` and ``c`` from one
forward pass of the model, recognising the head and its loss as κ's closed form does
(:func:`fam_hf.head_loss.head_loss_for`, or a user's :class:`~fam_hf.HeadLoss`), and refuses, saying why and what
to use instead, where the layer is not an output head or the loss is not one it mirrors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..curvature import head_hessian_trace
from ..flatness.closed_form import loss_refusal
from ..head_loss import HeadLoss, LossFn, as_head_loss, call_model, head_loss_for, head_loss_value
from ..layers import Layer, resolve_layer
from .hessian import Wrt


def closed_form_refusal(
    model: nn.Module,
    wrt: Wrt,
    *,
    head_loss: HeadLoss | str | None = None,
    loss_fn: LossFn | None = None,
    fallback: str = "hutchinson",
) -> str | None:
    """Why the closed-form trace does not apply to ``wrt`` of ``model`` (None: it does).

    It applies to a layer that is the model's output head under its own cross-entropy, MSE or BCE loss (a
    transformers causal LM or sequence classifier), or to the layer a user's ``head_loss`` names (or, when it names
    none, the layer measured) under the loss it states. ``fallback`` is the method the message recommends instead.
    """
    instead = f"or use method={fallback!r}"
    if not isinstance(wrt, str):
        return (
            "method='closed_form' is the trace w.r.t. an output head's weight map, and wrt names parameters (None: "
            "all of them), which can reach the loss through the network; name the head as a layer (wrt='auto' or "
            f"its module name, e.g. 'lm_head'), {instead}"
        )
    reason = loss_refusal(model, resolve_layer(model, wrt), head_loss, custom_loss=loss_fn is not None)
    return None if reason is None else f"method='closed_form' cannot apply: {reason}; {instead}"


def closed_form_head_trace(
    model: nn.Module,
    batch: Mapping[str, Any],
    wrt: Wrt = "auto",
    *,
    head_loss: HeadLoss | str | None = None,
    loss_fn: LossFn | None = None,
) -> tuple[torch.Tensor, int]:
    """``(Tr(H_W), n)`` of an output head's weight map ``W: (d, m)``, ``n = d·m``, exactly, from one forward pass.

    Args:
        model: run as it is, under ``torch.no_grad()``; nothing in it is modified.
        batch: a transformers batch with labels (``model(**batch)``), or what ``loss_fn`` takes.
        wrt: the head, as a layer spec (``"auto"``: the model's output head).
        head_loss: the loss as a function of the head's output, for a model fam_hf does not recognise; the loss
            the pass computes (``loss_fn``'s, or the model's own) is checked against it.
        loss_fn: ``loss_fn(model, batch) -> loss``, run for the forward pass (needs ``head_loss``).

    The positions and their weights are the loss's own (:meth:`HeadLoss.positions`): a causal LM's shifted labels
    (or the batch's ``shift_labels`` where given, as transformers' loss takes them), ``-100`` ignored,
    ``num_items_in_batch`` when the batch carries it and the model divides by it, a decoder classifier's last
    non-padding token. Raises ``ValueError`` with :func:`closed_form_refusal`'s reason where it does not apply.

    Cost: one forward pass without a graph, then ``O(N·(d + m))``; the head's weight is never read.
    """
    refusal = closed_form_refusal(model, wrt, head_loss=head_loss, loss_fn=loss_fn)
    if refusal is not None:
        raise ValueError(refusal)
    layer = resolve_layer(model, wrt)  # type: ignore[arg-type]
    spec = as_head_loss(head_loss)
    features, output, loss, logits = _head_pass(model, batch, layer, loss_fn)
    labels = batch.get(spec.labels if spec is not None else "labels")
    if labels is None:
        raise ValueError(
            f"the closed-form trace reads the loss's counted positions from its targets, and the batch has no "
            f"{spec.labels if spec is not None else 'labels'!r} (its keys: {', '.join(map(repr, batch)) or 'none'})"
        )
    positions = dict(input_ids=batch.get("input_ids"), num_items_in_batch=batch.get("num_items_in_batch"))
    if spec is not None:
        if loss is not None:
            _check_spec(spec, output, labels, loss, layer, batch)
        mirrored = spec
    else:
        mirrored = head_loss_for(model, labels)
        if logits is not None and logits.shape[-1] != output.shape[-1]:
            raise ValueError(
                f"the model's logits ({tuple(logits.shape)}) are not the output of '{layer.name}' "
                f"({tuple(output.shape)}); use method='hutchinson'"
            )
        labels, mirrored = mirrored.aligned(labels, batch)
    output, features = mirrored.scaled(output, features)
    logits_at, features_at, weights = mirrored.positions(output, features, labels, **positions)
    value = head_hessian_trace(features_at, logits_at, weights, mirrored.loss_type)
    d, m = layer.shape
    return value, d * m


def _head_pass(
    model: nn.Module, batch: Mapping[str, Any], layer: Layer, loss_fn: LossFn | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One forward pass without a graph: the head's input ``φ`` and output ``z`` at its first call, the loss, the
    model's logits (None where the pass does not return them)."""
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []

    def capture(module: nn.Module, inputs: tuple, output: Any) -> None:
        if not captured and inputs and torch.is_tensor(inputs[0]) and torch.is_tensor(output):
            captured.append((inputs[0], output))

    handle = layer.module.register_forward_hook(capture)
    try:
        with torch.no_grad():
            loss, logits = (loss_fn(model, batch), None) if loss_fn is not None else call_model(model, batch)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(
            f"'{layer.name}' did not run (or did not take and return a tensor) during the forward pass, so it is not "
            "the layer whose output the loss reads; name the output layer: wrt=NAME, head_loss=HeadLoss(..., head=NAME)"
        )
    features, output = captured[0]
    return features, output, loss, logits


def _check_spec(spec: HeadLoss, output, labels, loss, layer: Layer, batch) -> None:
    """Raise where the user's ``head_loss`` does not describe the loss the pass computed."""
    fix = "correct the spec (loss type, labels key, the layer whose output the loss reads), or use method='hutchinson'"
    try:
        expected = head_loss_value(spec, output, labels, input_ids=batch.get("input_ids"))
    except (RuntimeError, ValueError) as error:  # targets that do not fit the loss type, e.g. classes for BCE
        raise ValueError(
            f"head_loss={spec!r} does not describe the loss computed: on the output of '{layer.name}' "
            f"({tuple(output.shape)}) and the targets ({tuple(labels.shape)}) it fails ({error}); {fix}"
        ) from error
    if not torch.allclose(loss.detach().to(expected.dtype), expected, rtol=1e-4, atol=1e-7):
        raise ValueError(
            f"head_loss={spec!r} does not describe the loss computed ({float(loss):.6g}; the spec on the output of "
            f"'{layer.name}' gives {float(expected):.6g}); {fix}"
        )

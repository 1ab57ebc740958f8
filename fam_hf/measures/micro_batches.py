"""The loss Hessian of a batch as the weighted sum of its parts' Hessians, one part's graph at a time.

A double-backward :class:`~fam_hf.measures.LossHessian` keeps the graph of its first backward pass between products,
and over a whole model that graph grows with the batch several times as fast as a training step's activations
(docs/measures.md#memory-over-the-whole-model). Split the batch's rows into parts ``c``; the model's loss is a
weighted mean over counted targets (transformers' losses), so

    L = Σ_c (N_c / N) L_c,        H v = Σ_c (N_c / N) H_c v,

with ``N_c`` the targets part ``c`` counts (labels that are not ``-100``, after the causal-LM shift; every element
for a regression or multi-label loss) and ``N = Σ_c N_c`` (or every part weighing 1 when the batch gives the
model its ``num_items_in_batch``, by which each part's loss is then divided already). :class:`MicroBatchedHessian`
computes each product as that sum, building each part's graph, adding its product into the output and freeing it
before the next part: memory of one part's graph, time of one extra forward and backward pass per part and
product.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..curvature import explain_missing_double_backward, second_order_kernels
from ..head_loss import IGNORE_INDEX, head_loss_for, model_loss
from .hessian import LossHessian, SymmetricOperator, Wrt, resolve_subset


def split_batch(model: nn.Module, batch: Mapping[str, Any], parts: int) -> list[tuple[dict[str, Any], float]]:
    """``batch``'s rows in ``parts`` contiguous parts, each with its weight ``N_c / N`` in the model's own loss.

    Tensors whose first dimension is the batch's rows are split; anything else goes to every part. Parts that count
    no target (weight 0) are left out.

    Raises:
        ValueError: a model whose loss fam_hf does not recognise (not a transformers causal LM or sequence
            classifier, see :func:`fam_hf.head_loss.head_loss_for`), or a batch without ``labels``.
    """
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    head_loss = head_loss_for(model, labels) if labels is not None else None
    if head_loss is None:
        raise ValueError(
            f"micro_batches needs the weight of each part in the loss, and the loss of {type(model).__name__} on this "
            "batch is not one fam_hf recognises (a transformers causal LM or sequence classifier given its labels): "
            "measure on a smaller batch, or average the measures of several"
        )
    rows = labels.shape[0]
    if not 1 <= parts <= rows:
        raise ValueError(f"micro_batches={parts} must be between 1 and the batch's {rows} rows")
    if head_loss.loss_type == "cross_entropy":
        targets = labels[..., 1:] if head_loss.shift_labels else labels
        counts = (targets != IGNORE_INDEX).reshape(rows, -1).sum(1).double()
    else:  # MSE and BCE average over every element
        counts = torch.full((rows,), float(labels[0].numel()), dtype=torch.float64)
    total = float(counts.sum())
    # a batch that names the denominator (the Trainer's num_items_in_batch): every part's loss is already divided by it
    given = head_loss.honours_num_items and batch.get("num_items_in_batch") is not None
    split = []
    for index in torch.arange(rows).chunk(parts):
        weight = float(counts[index].sum()) / total if total else 0.0
        weight = float(weight > 0) if given else weight
        if weight:
            part = {k: v[index] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows else v
                    for k, v in batch.items()}  # fmt: skip
            split.append((part, weight))
    return split


class MicroBatchedHessian(SymmetricOperator):
    """``H = ∇²L(w)`` of the loss on ``batch`` w.r.t. ``wrt``, as :class:`~fam_hf.measures.LossHessian` is, with
    each product computed one part of the batch at a time (:func:`split_batch`): ``H v = Σ_c (N_c/N) H_c v``.

    Args:
        model, batch, wrt: as for :class:`~fam_hf.measures.LossHessian`; the model's own loss (a transformers
            causal LM or sequence classifier given its labels).
        micro_batches: how many parts the batch's rows are split into.

    Attributes:
        subset, dim, loss, gradient, matvecs: as :class:`~fam_hf.measures.LossHessian`'s (``loss`` and ``gradient``
            summed over the parts).

    Cost: building it is one forward and backward pass per part (no graph kept); each product one forward pass, one
    backward pass with ``create_graph`` and one double-backward pass per part: 1.3–1.7× a
    :class:`~fam_hf.measures.LossHessian` product over the whole batch (SmolLM2-135M, 8 × 128 tokens in 4 parts),
    holding the graph of one part, not of the batch, and the batch's gradient (``n``). The result equals the whole
    batch's up to float rounding (the parts' losses are summed after weighting).
    """

    def __init__(self, model: nn.Module, batch: Mapping[str, Any], wrt: Wrt = "auto", *, micro_batches: int) -> None:
        self._model, self._wrt = model, wrt
        self._parts = split_batch(model, batch, micro_batches)
        self.subset = resolve_subset(model, wrt)
        self.dim = self.subset.dim
        self.matvecs = 0
        self.loss, self._gradient = _first_order(model, *self._parts[0], self.subset)
        for part, weight in self._parts[1:]:
            loss, gradient = _first_order(model, part, weight, self.subset)
            self.loss = self.loss + loss
            self._gradient.add_(gradient)
            del gradient
        self._like = self._gradient[:0]
        self.default_block = max(1, sum(p.numel() for p in model.parameters()) // self.dim)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    @property
    def gradient(self) -> torch.Tensor:
        """``∇L(w)``, ``(n,)``, detached."""
        return self._gradient

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """``H v`` for ``v: (n,)``: one part's graph at a time; returns ``(n,)`` in :attr:`dtype`."""
        return self.add_matvec(vector, torch.zeros(self.dim, dtype=self.dtype, device=self.device))

    def add_matvec(self, vector: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out ← out + H v`` in place; returns ``out``."""
        self.matvecs += 1
        for part, weight in self._parts:
            part_hessian = LossHessian(self._model, part, self._wrt, loss_fn=_weighted(weight))
            part_hessian.add_matvec(vector, out)
            del part_hessian  # its graph goes before the next part's is built
        return out

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        """``H V`` for ``V: (n, k)``: ``k`` products; returns ``(n, k)``."""
        if vectors.shape[1] == 1:
            return self.matvec(vectors[:, 0]).reshape(-1, 1)
        out = torch.empty(self.dim, vectors.shape[1], dtype=self.dtype, device=self.device)
        for j in range(vectors.shape[1]):
            out[:, j] = self.matvec(vectors[:, j])
        return out


def _weighted(weight: float):
    def loss_fn(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        return weight * model_loss(model, batch)

    return loss_fn


def _first_order(model, part, weight, subset) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N_c/N) L_c`` and its gradient ``(n,)``, both detached; no graph kept."""
    variables = subset.variables()
    with torch.enable_grad(), second_order_kernels(), explain_missing_double_backward():
        loss = subset.loss(model, part, variables, _weighted(weight))
        grads = torch.autograd.grad(loss, variables, allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(v) for g, v in zip(grads, variables)]
    return loss.detach(), subset.flatten(grads).detach()


def batch_hessian(
    model: nn.Module, batch: Mapping[str, Any], wrt: Wrt = "auto", *, loss_fn=None, micro_batches: int = 1
) -> SymmetricOperator:
    """The loss Hessian on ``batch`` as the measures take it: a :class:`LossHessian` of the whole batch, or with
    ``micro_batches > 1`` a :class:`MicroBatchedHessian` (the model's own loss only)."""
    if micro_batches == 1:
        return LossHessian(model, batch, wrt, loss_fn=loss_fn)
    if loss_fn is not None:
        raise ValueError("micro_batches splits the model's own loss; with loss_fn= measure on the whole batch")
    return MicroBatchedHessian(model, batch, wrt, micro_batches=micro_batches)

"""The Hessian of a model's loss with respect to a layer or a set of parameters, as a matrix-free operator.

Every Hessian-based measure in :mod:`fam_hf.measures` works through :class:`LossHessian`: one forward pass
and one first-order backward pass with ``create_graph=True`` when it is built, then one double-backward
(a Hessian-vector product, HVP) per :meth:`LossHessian.matvec`. Nothing is written to the model: a layer's
loss is evaluated at ``W + δ`` for a zero perturbation ``δ`` that requires grad, and parameters are swapped, for
the call only, for detached aliases of themselves that require grad (the same storage: no copy), so
parameters, their ``.grad`` and the optimizer state are untouched.

What the Hessian is taken with respect to (``wrt``):

* a layer spec (``"auto"``, ``"classifier"``, ``"model.layers.0.mlp.down_proj"``, a glob; see
  :func:`fam_hf.resolve_layer`): the layer's weight map ``W: (d, m)`` (``out × in``) — the effective
  ``W0 + s·B·A`` for a LoRA layer, ``weight.T`` for GPT-2's ``Conv1D``, the head's own use of a tied
  matrix only. ``δ`` enters as ``z + δ φ`` at the layer's output, exactly as the κ estimators perturb it,
  so these Hessians are the ones κ is built from. ``n = d·m``, flattened row-major (``vec(W)[s·m + i]
  = W[s, i]``).
* a parameter or a sequence of parameters of the model: the loss as a function of those tensors
  everywhere they are used (a tied matrix in both its uses), frozen ones included; flattened in the
  order given, each row-major. ``None``: every parameter with ``requires_grad``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..curvature import explain_missing_double_backward, second_order_kernels
from ..head_loss import LossFn, model_loss
from ..layers import Layer, resolve_layer

Wrt = str | torch.Tensor | Sequence[torch.Tensor] | None
HVP_METHODS = ("double_backward", "forward_over_reverse")


@dataclass
class Subset:
    """What a Hessian is taken with respect to; built by :func:`resolve_subset`.

    Attributes:
        layer: the layer whose weight map is perturbed at its output, or None for parameters.
        names: parameter names in ``model.named_parameters()`` (parameters only).
        values: the current values ``w``, detached: ``[W (d, m)]`` for a layer, else the parameters.
    """

    layer: Layer | None
    names: list[str]
    values: list[torch.Tensor]

    @property
    def shapes(self) -> list[torch.Size]:
        return [v.shape for v in self.values]

    @property
    def dim(self) -> int:
        return sum(v.numel() for v in self.values)

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate tensors shaped like the subset into one ``(n,)`` vector."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, vector: torch.Tensor) -> list[torch.Tensor]:
        """Split an ``(n,)`` vector into tensors shaped like the subset (``[(d, m)]`` for a layer)."""
        return [part.reshape(shape) for part, shape in zip(vector.split([v.numel() for v in self.values]), self.shapes)]

    def variables(self) -> list[torch.Tensor]:
        """What a loss over the subset is differentiated by, as leaves that require grad: a layer's zero perturbation
        ``δ`` (it enters at the layer's output), or the parameters themselves as detached aliases (their storage: a
        copy ``w + δ`` of every parameter would add the model's size again, twice with ``δ``)."""
        if self.layer is not None:
            return [torch.zeros_like(v, requires_grad=True) for v in self.values]
        return [v.detach().requires_grad_(True) for v in self.values]

    def loss(self, model: nn.Module, batch: Mapping[str, Any], variables: Sequence[torch.Tensor],
             loss_fn: LossFn | None = None) -> torch.Tensor:  # fmt: skip
        """The loss at ``variables`` (shaped like :meth:`variables`): a layer's output moved by ``δ φ``
        (:func:`perturbed_loss`), or the parameters replaced by them (:func:`loss_with`)."""
        if self.layer is not None:
            return perturbed_loss(model, batch, self, variables, loss_fn)
        return loss_with(model, batch, self, variables, loss_fn)


def resolve_subset(model: nn.Module, wrt: Wrt = "auto") -> Subset:
    """Resolve ``wrt`` (a layer spec, a parameter, a sequence of parameters, or None for every trainable
    parameter) to a :class:`Subset` of ``model``.

    Raises:
        ValueError: an unknown layer (the message lists the candidates), or a tensor that is not one of
            the model's parameters.
    """
    if isinstance(wrt, str):
        layer = resolve_layer(model, wrt)
        return Subset(layer=layer, names=[], values=[layer.weight().detach()])
    named = {id(p): name for name, p in model.named_parameters()}  # first name of a tied parameter
    if wrt is None:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameter; name a layer or pass parameters as wrt=")
    else:
        params = [wrt] if isinstance(wrt, torch.Tensor) else list(wrt)
    names, values, seen = [], [], set()
    for p in params:
        if id(p) not in named:
            raise ValueError(
                f"a tensor of shape {tuple(p.shape)} in wrt is not a parameter of {type(model).__name__}; pass "
                "tensors from model.parameters(), or a layer name such as 'classifier'"
            )
        if id(p) not in seen:  # a tied parameter listed twice is one variable
            seen.add(id(p))
            names.append(named[id(p)])
            values.append(p.detach())
    return Subset(layer=None, names=names, values=values)


class _LossOf(nn.Module):
    """``batch ↦ loss_fn(model, batch)`` as a module, so ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def perturbed_loss(
    model: nn.Module,
    batch: Mapping[str, Any],
    subset: Subset,
    perturbations: Sequence[torch.Tensor],
    loss_fn: LossFn | None = None,
) -> torch.Tensor:
    """``L(w + δ)``: the loss with the subset moved by ``perturbations`` (shaped like ``subset.values``).

    The model's own tensors are never modified: a layer's output gets ``+ δ φ`` from a forward hook
    that is removed on return; parameters are swapped for ``w + δ`` by ``torch.func.functional_call``
    for this one call.
    """
    loss_fn = loss_fn or model_loss
    if subset.layer is not None:
        (delta,) = perturbations

        def add_perturbation(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            return output + F.linear(inputs[0], delta.to(output.dtype))

        handle = subset.layer.module.register_forward_hook(add_perturbation)
        try:
            return loss_fn(model, batch)
        finally:
            handle.remove()
    moved = [w + delta for w, delta in zip(subset.values, perturbations)]
    return loss_with(model, batch, subset, moved, loss_fn)


def loss_with(
    model: nn.Module,
    batch: Mapping[str, Any],
    subset: Subset,
    tensors: Sequence[torch.Tensor],
    loss_fn: LossFn | None = None,
) -> torch.Tensor:
    """The loss with the subset's parameters replaced by ``tensors`` (shaped like ``subset.values``) for this one
    call (``torch.func.functional_call``; a tied matrix in all its uses). Parameter subsets only."""
    swapped = {f"model.{name}": t for name, t in zip(subset.names, tensors)}
    return torch.func.functional_call(_LossOf(model, loss_fn or model_loss), swapped, args=(batch,))


class SymmetricOperator:
    """A symmetric ``(n, n)`` linear operator known by its products, as curvlinops' operators are: ``A @ v`` for
    ``v: (n,)``, ``A @ V`` for ``V: (n, k)``, :attr:`shape`, :meth:`dense` and :meth:`to_scipy`. The measures take
    one, or a dense tensor, which :func:`as_operator` wraps.

    Attributes:
        matvecs: matrix-vector products computed so far (a product with ``k`` columns counts ``k``).
    """

    matvecs: int = 0
    _like: torch.Tensor  # a tensor of the operator's dtype and device
    default_block: int = 64  # vectors the estimators multiply at a time, unless told otherwise

    @property
    def shape(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return self._like.dtype

    @property
    def device(self) -> torch.device:
        return self._like.device

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        """``A V`` for ``V: (n, k)``; returns ``(n, k)`` in :attr:`dtype`."""
        raise NotImplementedError

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """``A v`` for ``v: (n,)``."""
        return self.matmat(vector.reshape(-1, 1)).reshape(-1)

    def add_matvec(self, vector: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out ← out + A v`` in place, for ``v, out: (n,)``; returns ``out``. An operator that adds its product
        straight into ``out`` (:class:`LossHessian`) holds no other vector of ``n`` beside it."""
        return out.add_(self.matvec(vector).to(out.dtype))

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        return self.matvec(other) if other.dim() == 1 else self.matmat(other)

    def dense(self, block: int | None = None, bar: Any = None) -> torch.Tensor:
        """The whole ``(n, n)`` matrix, symmetrised: the products with the standard basis, ``block`` columns at a
        time (default :attr:`default_block`), ticking ``bar``."""
        n, block = self.shape[0], block or self.default_block
        columns = []
        for start in range(0, n, block):
            basis = torch.zeros(n, min(block, n - start), dtype=self.dtype, device=self.device)
            basis[start + torch.arange(basis.shape[1]), torch.arange(basis.shape[1])] = 1
            columns.append(self.matmat(basis))
            if bar is not None:
                bar.update(basis.shape[1])
        h = torch.cat(columns, dim=1)
        return (h + h.T) / 2

    def to_scipy(self, bar: Any = None):
        """A ``scipy.sparse.linalg.LinearOperator`` in float64 over NumPy arrays (for ``eigsh`` and friends); each
        product ticks ``bar``."""
        from scipy.sparse.linalg import LinearOperator

        def matvec(x):
            v = torch.from_numpy(x.reshape(-1, 1).copy())
            if bar is not None:
                bar.update(1)
            return self.matmat(v.to(self.device, self.dtype)).reshape(-1).to(torch.float64).cpu().numpy()

        return LinearOperator(self.shape, matvec=matvec, dtype="float64")


class DenseOperator(SymmetricOperator):
    """A dense symmetric ``(n, n)`` tensor as a :class:`SymmetricOperator` (products are counted; :meth:`dense`
    computes none)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"a dense operator must be a square matrix; got shape {tuple(matrix.shape)}")
        self.matrix = self._like = matrix
        self.matvecs = 0

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.matrix.shape)  # type: ignore[return-value]

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        self.matvecs += vectors.shape[1]
        return self.matrix @ vectors.to(self.matrix.dtype)

    def dense(self, block: int | None = None, bar: Any = None) -> torch.Tensor:
        return (self.matrix + self.matrix.T) / 2


def as_operator(operator: SymmetricOperator | torch.Tensor) -> SymmetricOperator:
    """``operator`` itself, or a dense tensor wrapped as a :class:`DenseOperator`."""
    return operator if isinstance(operator, SymmetricOperator) else DenseOperator(operator)


class LossHessian(SymmetricOperator):
    """``H = ∇²L(w)``, the Hessian of the loss on ``batch`` w.r.t. ``wrt``, as an ``(n, n)`` :class:`SymmetricOperator`.

    Args:
        model: any ``nn.Module``; run in the mode it is in (``model.eval()`` to measure without dropout).
        batch: what ``loss_fn`` takes; by default a transformers batch with labels (``model(**batch).loss``).
        wrt: a layer spec (the layer's weight map ``W: (d, m)``), a parameter, a sequence of parameters,
            or None (every trainable parameter). See the module docstring.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``; default ``model(**batch).loss``.
        hvp: how a product is computed: ``"double_backward"`` (reverse over reverse: the graph of the first
            backward pass is kept, and each product is one more backward pass through it) or
            ``"forward_over_reverse"`` (``torch.func.jvp`` of ``torch.func.grad``: each product is one forward and
            one backward pass carrying a tangent, nothing kept between products: less memory, more time; see
            docs/measures.md#hessian-vector-products for the measurements on SmolLM2-135M).

    Attributes:
        subset: the resolved :class:`Subset`; ``subset.unflatten(v)`` shapes an ``(n,)`` vector like it.
        dim: ``n``.
        loss: ``L(w)``, detached.
        gradient: ``∇L(w)``, ``(n,)``, detached (flattened anew on each access).
        matvecs: Hessian-vector products computed so far.

    Cost: building it is one forward and one backward pass, keeping the gradient and the graph of that backward
    pass for the double backward (several times a training step's activations); each :meth:`matvec` is one
    double-backward pass, about the cost of a backward pass, and holds ``v`` and ``H v`` besides. No copy of the
    parameters is made: over a whole model an HVP holds four vectors of ``n`` (weights, gradient, ``v``, ``H v``)
    and the graph (docs/measures.md#memory-over-the-whole-model). Valid for the weights it was built at: once they
    change in place, a product raises autograd's in-place error. Units: loss units per squared parameter unit.
    """

    def __init__(
        self,
        model: nn.Module,
        batch: Mapping[str, Any],
        wrt: Wrt = "auto",
        *,
        loss_fn: LossFn | None = None,
        hvp: str = "double_backward",
    ) -> None:
        if hvp not in HVP_METHODS:
            raise ValueError(f"hvp={hvp!r} is not one of {', '.join(map(repr, HVP_METHODS))}")
        self.subset = resolve_subset(model, wrt)
        self.dim = self.subset.dim
        self.matvecs = 0
        self.hvp = hvp
        forward_mode = hvp == "forward_over_reverse"
        self._variables = self.subset.variables()
        with torch.enable_grad(), second_order_kernels(), explain_missing_double_backward():
            loss = self.subset.loss(model, batch, self._variables, loss_fn)
            grads = torch.autograd.grad(loss, self._variables, create_graph=not forward_mode, allow_unused=True)
        self.loss = loss.detach()
        if forward_mode:

            def loss_of(*variables: torch.Tensor) -> torch.Tensor:
                return self.subset.loss(model, batch, variables, loss_fn)

            self._gradient_of = torch.func.grad(loss_of, argnums=tuple(range(len(self._variables))))
        self._grads = [g if g is not None else torch.zeros_like(v) for g, v in zip(grads, self._variables)]
        self._like = torch.cat([g.detach().reshape(-1)[:0] for g in self._grads])  # empty: the gradient's dtype
        # the probes held at a time cost no more than the model's gradient
        self.default_block = max(1, sum(p.numel() for p in model.parameters()) // self.dim)
        # Gradients that do not depend on the variables (the loss is linear in that tensor) have zero curvature.
        self._curved = [i for i, g in enumerate(self._grads) if g.requires_grad]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    @property
    def gradient(self) -> torch.Tensor:
        """``∇L(w)``, ``(n,)``, detached: a new vector on each call (the operator holds only the graph's own copy)."""
        with torch.no_grad():
            return self.subset.flatten([g.detach() for g in self._grads])

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """``H v`` for ``v: (n,)``, one double-backward pass (or one forward-over-reverse pass); returns ``(n,)`` in
        :attr:`dtype`."""
        if self.hvp == "forward_over_reverse":
            self.matvecs += 1
            parts = self.subset.unflatten(vector.to(device=self.device, dtype=self.dtype))
            primals = tuple(v.detach() for v in self._variables)
            with torch.no_grad(), second_order_kernels(), explain_missing_double_backward():
                _, tangents = torch.func.jvp(self._gradient_of, primals, tuple(parts))
            return self.subset.flatten(tangents)
        return self.add_matvec(vector, torch.zeros(self.dim, dtype=self.dtype, device=self.device))

    def add_matvec(self, vector: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out ← out + H v`` in place, for ``v, out: (n,)``, one double-backward pass; returns ``out``. The product
        is added into ``out`` as autograd computes it, so it is never held apart from it."""
        if self.hvp == "forward_over_reverse" or out.dtype != self.dtype or not out.is_contiguous():
            return super().add_matvec(vector, out)
        self.matvecs += 1
        if not self._curved:
            return out
        parts = self.subset.unflatten(vector.to(device=self.device, dtype=self.dtype))
        roots, directions = [self._grads[i] for i in self._curved], [parts[i] for i in self._curved]
        views = self.subset.unflatten(out)
        if any(v.dtype != self.dtype or not v.is_contiguous() for v in self._variables):
            # a .grad must have its variable's dtype, and its strides to be added into as it is (Conv1D's weight.T)
            with torch.enable_grad(), second_order_kernels(), explain_missing_double_backward():
                hv = torch.autograd.grad(roots, self._variables, directions, retain_graph=True, allow_unused=True)
            for view, h in zip(views, hv):
                if h is not None:
                    view.add_(h)
            return out
        # Each variable's .grad is a view of ``out``, and autograd adds into a .grad that exists: the product is
        # never held apart from ``out`` (as autograd's per-tensor results, then concatenated): on a whole model, the
        # model's size less at the peak.
        for variable, view in zip(self._variables, views):
            variable.grad = view
        try:
            with torch.enable_grad(), second_order_kernels(), explain_missing_double_backward():
                torch.autograd.backward(roots, directions, retain_graph=True, inputs=self._variables)
        finally:
            for variable in self._variables:
                variable.grad = None
        return out

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        """``H V`` for ``V: (n, k)``: ``k`` double-backward passes; returns ``(n, k)``."""
        if vectors.shape[1] == 1:
            return self.matvec(vectors[:, 0]).reshape(-1, 1)
        out = torch.empty(self.dim, vectors.shape[1], dtype=self.dtype, device=self.device)
        for j in range(vectors.shape[1]):  # one column at a time: no list of k products beside the (n, k) result
            out[:, j] = self.matvec(vectors[:, j])
        return out


Operator = SymmetricOperator | torch.Tensor

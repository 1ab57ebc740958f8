"""Top eigenvalues and eigenvectors of the loss Hessian w.r.t. a layer or parameters.

``λ_max(∇²L)`` is "sharpness" in the sense of Keskar et al. (2017) and of the edge-of-stability and
progressive-sharpening literature (Cohen et al. 2021; MacDonald, Valmadre, Lucey 2023: λ_max rises during
training together with the input–output Jacobian norm, see :func:`fam_hf.measures.jacobian_norm`). Tracked
over training it shows progressive sharpening. The eigenpairs are also the directions along which the
activity–weight duality (Feng, Zhang, Tu 2023) decomposes the generalization loss
(:func:`fam_hf.measures.activity_weight_duality`).

Computed matrix-free by Lanczos (ARPACK's implicitly restarted Lanczos, ``scipy.sparse.linalg.eigsh``) on
Hessian-vector products, in float64 at the scipy boundary; or densely (``n`` HVPs, then
``torch.linalg.eigh``) for small subsets.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..curvature import default_generator
from .hessian import LossFn, Operator, Wrt, as_operator
from .micro_batches import batch_hessian
from .progress import progress

EIGEN_METHODS = ("lanczos", "streaming", "exact")
WHICH = ("LA", "LM")


@dataclass
class HessianEigenpairs:
    """The top ``k`` eigenpairs of the loss Hessian, largest first.

    Attributes:
        values: ``(k,)`` eigenvalues, descending (by value for ``which="LA"``, by magnitude for ``"LM"``);
            ``values[0]`` is the sharpness ``λ_max``. Units: loss per squared weight unit.
        vectors: ``(n, k)`` orthonormal eigenvectors, column ``j`` for ``values[j]``, in the subset's
            flattening order (``LossHessian.subset.unflatten(vectors[:, j])`` shapes one like the
            subset: ``[(d, m)]`` for a layer). Each is defined up to sign. None for ``"streaming"``.
        method: ``"lanczos"`` or ``"exact"``.
        matvecs: Hessian-vector products spent.
        dim: ``n``.
    """

    values: torch.Tensor
    vectors: torch.Tensor | None
    method: str
    matvecs: int
    dim: int

    @property
    def sharpness(self) -> torch.Tensor:
        """``values[0]``: the largest eigenvalue (``which="LA"``)."""
        return self.values[0]


def estimate_top_eigenpairs(
    operator: Operator,
    k: int = 1,
    *,
    method: str = "lanczos",
    which: str = "LA",
    tol: float = 1e-6,
    maxiter: int | None = None,
    generator: torch.Generator | None = None,
    block: int | None = None,
    disable_tqdm: bool | None = None,
) -> HessianEigenpairs:
    """Top ``k`` eigenpairs of a symmetric operator.

    Args:
        operator: a :class:`~fam_hf.measures.LossHessian` or a dense symmetric ``(n, n)`` tensor.
        k: how many.
        method: ``"lanczos"`` (``eigsh`` on matrix-vector products; needs ``k < n``, and falls back to
            ``"exact"`` otherwise), ``"streaming"`` (Lanczos that keeps no basis: three vectors, ``O(n)`` memory,
            eigenvalues only, ghosts removed by Cullum–Willoughby's test, stopping on ARPACK's residual criterion;
            for subsets too large for ARPACK's float64 basis; the *distinct* top ``k``: one Krylov sequence sees a
            repeated eigenvalue once, so ``λ₁ = λ₂`` gives ``λ₁, λ₃, …``) or ``"exact"`` (the dense matrix from ``n`` products,
            then ``eigh``).
        which: ``"LA"`` largest algebraic (default: sharpness; a Hessian away from a minimum has negative
            eigenvalues too) or ``"LM"`` largest magnitude.
        tol: ``eigsh``'s stopping tolerance, relative: residuals ``‖Hv − λv‖ ≲ tol·|λ|`` (the eigenvalues'
            own error is of order ``‖Hv − λv‖² / gap``, far smaller); 0 means machine precision.
        maxiter: ``eigsh``'s restart limit (default ``10 n``); for ``"streaming"``, the most Lanczos steps
            (default 300).
        generator: RNG for Lanczos' starting vector (drawn on the CPU), so the result is reproducible;
            default seeded with 0.
        block: the Lanczos vectors ARPACK keeps (``eigsh``'s ``ncv``, more than ``k``): memory ``O(n·block)`` in
            float64. Default ``min(n, max(2k + 1, 20))``, ARPACK's own; fewer hold less and restart more often
            (more products for the same ``tol``). The exact method multiplies the basis ``block`` vectors at a time.
        disable_tqdm: hide the progress bar over the products (shown after 5 s).

    Cost: Lanczos: typically a few times ``max(2k + 1, 20)`` matrix-vector products (``matvecs`` says
    how many); exact: ``n`` of them and an ``O(n³)`` eigendecomposition.
    """
    if method not in EIGEN_METHODS:
        raise ValueError(f"method={method!r} is not one of {', '.join(map(repr, EIGEN_METHODS))}")
    if method == "streaming":
        if which != "LA":
            raise ValueError("method='streaming' finds the largest algebraic eigenvalues only (which='LA')")
        return _streaming_top(as_operator(operator), k, tol, maxiter, generator, disable_tqdm)
    if which not in WHICH:
        raise ValueError(f"which={which!r} is not one of {', '.join(map(repr, WHICH))}")
    operator = as_operator(operator)
    n, dtype, device = operator.shape[0], operator.dtype, operator.device
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of variables n={n}")
    if block is not None and method == "lanczos" and k < n and not k < block <= n:
        raise ValueError(f"block={block} must be more than k={k} and at most n={n} (the Lanczos vectors ARPACK keeps)")
    start = operator.matvecs
    if method == "lanczos" and k < n:
        from scipy.sparse.linalg import eigsh

        # Lanczos needs a starting vector; ARPACK's own is drawn from a global RNG, so draw it here instead.
        v0 = torch.randn(n, generator=default_generator(generator), dtype=torch.float64).numpy()
        with progress(None, f"top {k} eigenvalue{'s' if k > 1 else ''} (Lanczos)", disable_tqdm) as bar:
            scipy_operator = operator.to_scipy(bar)
            values, vectors = eigsh(scipy_operator, k=k, which=which, v0=v0, tol=tol, maxiter=maxiter, ncv=block)
        values, vectors = torch.from_numpy(values).to(device, dtype), torch.from_numpy(vectors).to(device, dtype)
    else:
        method = "exact"
        with progress(n, "Hessian (dense)", disable_tqdm) as bar:
            values, vectors = torch.linalg.eigh(operator.dense(block=block, bar=bar))
    order = torch.argsort(values if which == "LA" else values.abs(), descending=True)[:k]
    return HessianEigenpairs(values[order], vectors[:, order], method, operator.matvecs - start, n)


def _streaming_top(operator, k: int, tol: float, maxiter: int | None, generator, disable_tqdm) -> HessianEigenpairs:
    """Top ``k`` eigenvalues by Lanczos without a basis: stop when each of the top ``k`` good Ritz values has a
    residual ``β_m |y_{m,i}|`` of at most ``tol·|θ_i|`` (ARPACK's criterion), or after ``maxiter`` steps."""
    from .spectrum import good_ritz_values, lanczos

    n = operator.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of variables n={n}")
    steps = min(n, maxiter or 300)
    same = torch.finfo(operator.dtype).eps ** 0.5  # Ritz values this close (relative) are copies of one another

    state = {"converged": False}

    def converged(t, beta: float) -> bool:
        good = good_ritz_values(t, same).flip(0)[:k]
        if good.numel() < k:
            return False
        theta, y = torch.linalg.eigh(t.dense())
        residual = beta * y[-1].abs()
        scale = float(theta.abs().max()) or 1.0
        for value in good:
            copies = (theta - value).abs() <= same * scale
            if float(residual[copies].min()) > tol * abs(float(value)):
                return False
        state["converged"] = True
        return True

    start = operator.matvecs
    with progress(steps, f"top {k} eigenvalue{'s' if k > 1 else ''} (streaming Lanczos)", disable_tqdm) as bar:
        # the start drawn in the call: lanczos then holds its only reference, and frees it once normalised
        draw = default_generator(generator)
        t = lanczos(operator, torch.randn(n, generator=draw, dtype=torch.float64).to(operator.dtype), steps, bar=bar,
                    stop=converged)  # fmt: skip
    if not state["converged"]:
        warnings.warn(
            f"the streaming Lanczos stopped after {t.alpha.numel()} steps (maxiter) before the top {k} residuals fell "
            f"below tol={tol}: the values are Ritz values, lower bounds of the eigenvalues; raise maxiter",
            stacklevel=3,
        )
    values = good_ritz_values(t, same).flip(0)[:k]
    if values.numel() < k:
        raise RuntimeError(f"streaming Lanczos found {values.numel()} of the k={k} eigenvalues in {steps} steps; "
                           "raise maxiter")  # fmt: skip
    return HessianEigenpairs(values.to(operator.dtype), None, "streaming", operator.matvecs - start, n)


def top_eigenvalues(
    model: nn.Module,
    batch: Mapping[str, Any],
    wrt: Wrt = "auto",
    k: int = 1,
    *,
    method: str = "lanczos",
    which: str = "LA",
    tol: float = 1e-6,
    loss_fn: LossFn | None = None,
    generator: torch.Generator | None = None,
    block: int | None = None,
    micro_batches: int = 1,
    disable_tqdm: bool | None = None,
) -> HessianEigenpairs:
    """Top ``k`` eigenvalues and eigenvectors of ``∇²L`` on ``batch`` w.r.t. a layer's weight or parameters.

    Args:
        model: run as it is (``model.eval()`` to measure without dropout); nothing in it is modified.
        batch: a transformers batch with labels (``model(**batch).loss``), or what ``loss_fn`` takes.
        wrt: a layer spec (default ``"auto"``: the output head's ``W: (d, m)``), a parameter, a sequence of
            parameters, or None (every trainable parameter); see :mod:`fam_hf.measures.hessian`.
        k: how many eigenpairs.
        method, which, tol, generator, block, disable_tqdm: see :func:`estimate_top_eigenpairs`.
        loss_fn: ``loss_fn(model, batch) -> loss`` for models that do not compute their own loss.
        micro_batches: compute each product over this many parts of the batch, one part's graph at a time
            (:class:`~fam_hf.measures.MicroBatchedHessian`: the memory of one part's graph, about 1.3–1.7× the time per
            product); the model's own loss only (no ``loss_fn``). Default 1: the whole batch's graph, kept.

    Returns:
        :class:`HessianEigenpairs`, largest first; ``.sharpness`` is ``λ_max``.

    Cost: one forward and one backward pass, then one double-backward pass per Lanczos step (``matvecs``).

    Example::

        eig = top_eigenvalues(model.eval(), batch, "classifier", k=3)
        eig.values                                          # tensor([λ1, λ2, λ3])
        eig.vectors[:, 0].reshape(model.classifier.weight.shape)  # top direction as a (d, m) matrix
    """
    hessian = batch_hessian(model, batch, wrt, loss_fn=loss_fn, micro_batches=micro_batches)
    return estimate_top_eigenpairs(
        hessian, k, method=method, which=which, tol=tol, generator=generator, block=block, disable_tqdm=disable_tqdm
    )

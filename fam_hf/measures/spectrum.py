"""The eigenvalue density of the loss Hessian by stochastic Lanczos quadrature (docs/measures.md#spectral-density).

The spectral density of a symmetric ``H: (n, n)`` with eigenvalues ``λ_1 … λ_n`` is ``φ(t) = (1/n) Σ_i δ(t − λ_i)``,
seen through a Gaussian of width ``σ``: ``φ_σ(t) = (1/n) Σ_i g_σ(t − λ_i)``. For a unit vector ``v`` with
i.i.d. symmetric entries, ``E[vᵀ f(H) v] = (1/n) Tr f(H) = ∫ f φ``. ``m`` steps of Lanczos from ``v`` give the
tridiagonal ``T_m``; with its eigenpairs ``(θ_k, y_k)``, the Gauss quadrature ``Σ_k τ_k f(θ_k)`` with
``τ_k = (y_k)_1²`` is exact for every polynomial ``f`` of degree ``≤ 2m − 1``. Averaging over ``runs`` random starts:

    φ_σ(t) ≈ (1/runs) Σ_r Σ_k τ_{r,k} g_σ(t − θ_{r,k})

(Golub & Meurant 2010; Lin, Saad, Yang, SIAM Review 2016; Ubaru, Chen, Saad, SIMAX 2017; for neural networks
Ghorbani, Krishnan, Xiao, ICML 2019, and PyHessian, Yao et al. 2020). Each run costs ``m`` Hessian-vector products.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..curvature import default_generator, rademacher
from .hessian import LossFn, Operator, SymmetricOperator, Wrt, as_operator
from .micro_batches import batch_hessian
from .progress import progress


@dataclass
class Tridiagonal:
    """``T_m`` of one Lanczos run: ``alpha: (m,)`` diagonal, ``beta: (m − 1,)`` off-diagonal, in float64."""

    alpha: torch.Tensor
    beta: torch.Tensor

    def dense(self) -> torch.Tensor:
        return torch.diag(self.alpha) + torch.diag(self.beta, 1) + torch.diag(self.beta, -1)

    def quadrature(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Gauss quadrature nodes ``θ: (m,)`` (the Ritz values, ascending) and weights ``τ: (m,)`` (sum 1)."""
        nodes, vectors = torch.linalg.eigh(self.dense())
        return nodes, vectors[0].square()


def lanczos(
    operator: SymmetricOperator,
    start: torch.Tensor,
    steps: int,
    *,
    reorthogonalize: bool = False,
    bar: Any = None,
    stop: Callable[[Tridiagonal, float], bool] | None = None,
) -> Tridiagonal:
    """``steps`` steps of the symmetric Lanczos recurrence from ``start: (n,)``; returns ``T_m`` (``m ≤ steps``: it
    stops early when the Krylov space is invariant).

    Without ``reorthogonalize`` it holds three vectors (``O(n)`` memory; the product is added into the oldest, in
    place, so a Hessian-vector product runs beside two): the basis loses orthogonality once Ritz
    values converge, which duplicates converged extreme eigenvalues ("ghosts") but leaves the quadrature's
    moments, and so the density, as they are (Paige 1976; Ghorbani et al. 2019). ``reorthogonalize=True`` keeps
    the whole basis (``n × m``) and orthogonalises each new vector against it twice: exact to rounding, for small ``n``.
    The scalars are accumulated in float64; the vectors stay in the operator's dtype. ``stop(T_j, β_j)``, when
    given, is asked after each step whether to stop there (``β_j``: the norm of the next residual, with which
    ``β_j |y_{j,i}|`` is the residual ``‖H x_i − θ_i x_i‖`` of Ritz pair ``i``).
    """
    n, dtype = operator.shape[0], operator.dtype
    q = start.to(operator.device, dtype)
    del start  # a caller that passes a new vector does not hold it beside q (CPython frees it with the last name)
    q = q / math.sqrt(_dot64(q, q))
    basis = [q] if reorthogonalize else None
    previous, beta_prev = None, 0.0
    alpha, beta = [], []
    # Below a few hundred roundings of ‖T‖ (an estimate of ‖H‖ from below) the next residual is rounding, not a new
    # direction: the Krylov space is invariant (a low-rank Hessian, e.g. a classifier head's, rank ≤ N·(C − 1)).
    # Dividing by it would make the basis noise, and Ritz values leave the spectrum (10⁵ × λ_max on a float32 head).
    noise = 100 * torch.finfo(dtype).eps
    norm = 0.0
    for step in range(min(steps, n)):
        if previous is None:
            w = operator.matvec(q)
            if _shares_storage(w, q):  # updated in place below
                w = w.clone()
        else:
            # w = H q − β·previous − α·q in Paige's order (1972), the product added into −β·previous in place (a copy
            # of it when the basis keeps it): the HVP runs beside two vectors of n, q and w, not three.
            w = operator.add_matvec(q, previous.mul_(-beta_prev) if basis is None else previous * -beta_prev)
        if bar is not None:
            bar.update(1)
        a = _dot64(q, w)
        alpha.append(a)
        _subtract_scaled(w, q, a)  # in place, a chunk at a time
        if basis is not None:
            stacked = torch.stack(basis, dim=1)
            for _ in range(2):  # twice is enough (Kahan–Parlett)
                w = w - stacked @ (stacked.T @ w)
        b = math.sqrt(_dot64(w, w))
        norm = max(norm, abs(a), beta_prev)
        if step == min(steps, n) - 1 or b <= max(1e-10 * max(abs(a), beta_prev), noise * norm, 1e-300):
            break
        if stop is not None and stop(_tridiagonal(alpha, beta), b):
            break
        beta.append(b)
        previous, q, beta_prev = q, w.div_(b), b
        if basis is not None:
            basis.append(q)
    return _tridiagonal(alpha, beta)


def _subtract_scaled(w: torch.Tensor, x: torch.Tensor, scale: float, chunk: int = 1 << 20) -> None:
    """``w ← w − scale·x`` in place, a chunk at a time (no second vector of n)."""
    for w_part, x_part in zip(w.split(chunk), x.split(chunk)):
        w_part.sub_(x_part * scale)


def _shares_storage(w: torch.Tensor, other: torch.Tensor) -> bool:
    return w.untyped_storage().data_ptr() == other.untyped_storage().data_ptr()


def _dot64(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 20) -> float:
    """``a · b`` accumulated in float64, a chunk at a time (no float64 copy of a 10⁸-long vector)."""
    return sum(float(torch.dot(x.double(), y.double())) for x, y in zip(a.split(chunk), b.split(chunk)))


def _tridiagonal(alpha: list[float], beta: list[float]) -> Tridiagonal:
    return Tridiagonal(
        torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta[: len(alpha) - 1], dtype=torch.float64)
    )


def good_ritz_values(t: Tridiagonal, tol: float = 1.5e-8, spurious_tol: float = 1e-10) -> torch.Tensor:
    """The Ritz values of ``T_m`` from Lanczos without reorthogonalisation, ghosts removed (Cullum & Willoughby,
    *Lanczos Algorithms for Large Symmetric Eigenvalue Computations*, 1985): copies of one converged eigenvalue are
    kept once, and a simple Ritz value that is also an eigenvalue of ``T̂_m`` (``T_m`` without its first row and
    column) is spurious. Copies are "the same" within ``tol`` relative to the largest value, about the square root
    of the vectors' machine epsilon (1.5e-8 for float64, 3.5e-4 for float32: the copies come from the vectors'
    rounding); the spurious test compares two float64 tridiagonal matrices, within ``spurious_tol``. Ascending."""
    theta = torch.linalg.eigvalsh(t.dense())
    if theta.numel() < 2:
        return theta
    scale = float(theta.abs().max()) or 1.0
    hat = torch.linalg.eigvalsh(t.dense()[1:, 1:])
    good, i = [], 0
    while i < theta.numel():
        j = i
        while j + 1 < theta.numel() and theta[j + 1] - theta[i] <= tol * scale:
            j += 1
        if j > i or torch.min((hat - theta[i]).abs()) > spurious_tol * scale:  # copies, or simple and not spurious
            good.append(float(theta[i : j + 1].mean()))
        i = j + 1
    return torch.tensor(good, dtype=torch.float64)


@dataclass
class HessianSpectrum:
    """The eigenvalue density of the loss Hessian by stochastic Lanczos quadrature.

    Attributes:
        nodes: ``(runs, m)`` Ritz values of each run (loss per squared weight unit), ascending; NaN-padded where a
            run stopped early.
        weights: ``(runs, m)`` their quadrature weights (each run's sum to 1; 0 where padded).
        grid: ``(G,)`` the points the density is given at.
        density: ``(G,)`` ``φ_σ`` on the grid: a probability density over eigenvalues (integrates to ≈ 1; multiply
            by ``dim`` for a density of eigenvalue counts).
        sigma: the Gaussian's width.
        dim: ``n``.
        matvecs: Hessian-vector products spent.
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    grid: torch.Tensor
    density: torch.Tensor
    sigma: float
    dim: int
    matvecs: int

    @property
    def trace(self) -> torch.Tensor:
        """``n · mean_r Σ_k τ_{r,k} θ_{r,k}``: the Hutchinson estimate of ``Tr(H)`` the runs imply."""
        return self.dim * torch.nansum(self.weights * self.nodes, dim=1).mean()

    def top(self, k: int = 1) -> torch.Tensor:
        """``(k,)`` float64, descending: the ``i``-th entry is the largest over the runs of each run's ``i``-th largest
        Ritz value (NaN where no run has ``i`` of them).

        Each run's ``i``-th largest Ritz value is at most ``λ_i``, the ``i``-th largest eigenvalue (Cauchy interlacing,
        for an orthonormal Lanczos basis), so the largest over the runs is the tightest of these lower bounds; they
        converge to ``λ_i`` from below as ``steps`` grows, the top ones first. Without reorthogonalisation (the
        default for ``n·steps > 2²⁴``) a converged top eigenvalue can repeat within a run ("ghosts"), so entry 2
        can then be a copy of ``λ_1``: :func:`~fam_hf.measures.top_eigenvalues` gives the top ``k`` themselves.
        """
        if k < 1:
            raise ValueError(f"k={k} must be at least 1")
        nodes = torch.where(torch.isnan(self.nodes), -math.inf, self.nodes)
        ordered = nodes.sort(dim=1, descending=True).values  # (runs, m)
        top = torch.full((k,), -math.inf, dtype=torch.float64)
        kept = min(k, ordered.shape[1])
        top[:kept] = ordered[:, :kept].max(dim=0).values
        return top.masked_fill(top == -math.inf, math.nan)

    def density_at(self, grid: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
        """``φ_σ`` at ``grid: (G,)`` (default ``σ``: :attr:`sigma`)."""
        return smoothed_density(self.nodes, self.weights, grid, self.sigma if sigma is None else sigma)

    def save(self, path: str | Path, name: str | None = None) -> Path:
        """Write :meth:`as_dict` as JSON (with a legend ``name``), for ``fam-hf plot PATH …``."""
        path = Path(path)
        path.write_text(json.dumps({"name": name, **self.as_dict()}))
        return path

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: what ``fam-hf plot`` reads."""
        return {
            "grid": self.grid.tolist(),
            "density": self.density.tolist(),
            "nodes": [[float(x) for x in row if not math.isnan(x)] for row in self.nodes.tolist()],
            "weights": [
                [float(w) for w, x in zip(ws, xs) if not math.isnan(x)]
                for ws, xs in zip(self.weights.tolist(), self.nodes.tolist())
            ],
            "sigma": self.sigma,
            "dim": self.dim,
            "matvecs": self.matvecs,
        }


def smoothed_density(nodes: torch.Tensor, weights: torch.Tensor, grid: torch.Tensor, sigma: float) -> torch.Tensor:
    """``(1/runs) Σ_r Σ_k τ_{r,k} g_σ(t − θ_{r,k})`` at each ``t`` of ``grid``, ``g_σ`` the normal density."""
    valid = ~torch.isnan(nodes)
    theta, tau = nodes[valid], weights[valid] / nodes.shape[0]
    z = (grid[:, None] - theta[None, :]) / sigma
    return (torch.exp(-0.5 * z.square()) * tau).sum(1) / (sigma * math.sqrt(2 * math.pi))


def estimate_spectrum(
    operator: Operator,
    *,
    runs: int = 4,
    steps: int = 64,
    grid: torch.Tensor | int = 512,
    sigma: float | None = None,
    reorthogonalize: bool | None = None,
    generator: torch.Generator | None = None,
    disable_tqdm: bool | None = None,
) -> HessianSpectrum:
    """The spectral density of a symmetric operator by stochastic Lanczos quadrature.

    Args:
        operator: a :class:`~fam_hf.measures.LossHessian` or a dense symmetric ``(n, n)`` tensor.
        runs: random starts (Rademacher vectors, normalised); the density's variance falls as ``1/runs``.
        steps: Lanczos steps per run (``m``; at most ``n``): ``m`` nodes per run, exact moments to degree ``2m − 1``.
        grid: the points to give the density at, or how many, evenly spaced over the nodes ± 5σ.
        sigma: the Gaussian's width; default 1% of the span of the nodes (PyHessian's variance 1e-5 of a
            spectrum scaled to [−1, 1] is ``σ ≈ 0.16%`` of the span).
        reorthogonalize: keep the Lanczos basis and reorthogonalise against it (``n × m`` memory); default: when
            ``n·m ≤ 2²⁴`` (small subsets), never at scale, where three vectors are held.
        generator: RNG for the starts; default seeded with 0.
        disable_tqdm: hide the progress bar over the ``runs × steps`` products.

    Cost: ``runs × steps`` matrix-vector products; memory ``O(n)`` (``O(n·steps)`` reorthogonalising).
    """
    operator = as_operator(operator)
    n = operator.shape[0]
    if runs < 1 or steps < 1:
        raise ValueError(f"runs={runs} and steps={steps} must both be at least 1")
    generator = default_generator(generator)
    if reorthogonalize is None:
        reorthogonalize = n * min(steps, n) <= 2**24
    start = operator.matvecs
    runs_nodes, runs_weights = [], []
    with progress(runs * min(steps, n), "Hessian spectrum (SLQ)", disable_tqdm) as bar:
        for _ in range(runs):
            # drawn in the call: lanczos then holds the start's only reference, and frees it once normalised
            run = lanczos(operator, rademacher(n, generator=generator, dtype=operator.dtype, device=operator.device),
                          steps, reorthogonalize=reorthogonalize, bar=bar)  # fmt: skip
            nodes, weights = run.quadrature()
            runs_nodes.append(nodes)
            runs_weights.append(weights)
    m = max(x.numel() for x in runs_nodes)
    nodes = torch.full((runs, m), float("nan"), dtype=torch.float64)
    weights = torch.zeros(runs, m, dtype=torch.float64)
    for r, (x, w) in enumerate(zip(runs_nodes, runs_weights)):
        nodes[r, : x.numel()], weights[r, : w.numel()] = x, w
    valid = nodes[~torch.isnan(nodes)]
    low, high = float(valid.min()), float(valid.max())
    if sigma is None:
        sigma = 0.01 * (high - low) if high > low else max(abs(high), 1.0) * 1e-3
    if isinstance(grid, int):
        grid = torch.linspace(low - 5 * sigma, high + 5 * sigma, grid, dtype=torch.float64)
    grid = grid.to(torch.float64)
    density = smoothed_density(nodes, weights, grid, sigma)
    return HessianSpectrum(nodes, weights, grid, density, float(sigma), n, operator.matvecs - start)


def hessian_spectrum(
    model: nn.Module,
    batch: Mapping[str, Any],
    wrt: Wrt = "auto",
    *,
    runs: int = 4,
    steps: int = 64,
    grid: torch.Tensor | int = 512,
    sigma: float | None = None,
    reorthogonalize: bool | None = None,
    loss_fn: LossFn | None = None,
    generator: torch.Generator | None = None,
    micro_batches: int = 1,
    disable_tqdm: bool | None = None,
) -> HessianSpectrum:
    """The eigenvalue density of ``∇²L`` on ``batch`` w.r.t. a layer's weight (default: the output head) or
    parameters, by stochastic Lanczos quadrature: ``runs`` random starts of ``steps`` Lanczos steps each.

    Args:
        model: run as it is (``model.eval()`` to measure without dropout); nothing in it is modified.
        batch: a transformers batch with labels, or what ``loss_fn`` takes.
        wrt: a layer spec, a parameter, a sequence of parameters, or None (every trainable parameter).
        runs, steps, grid, sigma, reorthogonalize, generator, disable_tqdm: see :func:`estimate_spectrum`.
        loss_fn: ``loss_fn(model, batch) -> loss`` for models that do not compute their own loss.
        micro_batches: each product over this many parts of the batch, one part's graph at a time
            (:class:`~fam_hf.measures.MicroBatchedHessian`; the model's own loss).

    Returns:
        :class:`HessianSpectrum`: the density on a grid, and each run's Ritz values and weights.

    Cost: one forward and one backward pass, then ``runs × steps`` double-backward passes.

    Example::

        spectrum = hessian_spectrum(model.eval(), batch, "classifier", runs=8, steps=40)
        plt.semilogy(spectrum.grid, spectrum.density)
    """
    hessian = batch_hessian(model, batch, wrt, loss_fn=loss_fn, micro_batches=micro_batches)
    return estimate_spectrum(
        hessian, runs=runs, steps=steps, grid=grid, sigma=sigma, reorthogonalize=reorthogonalize,
        generator=generator, disable_tqdm=disable_tqdm,
    )  # fmt: skip

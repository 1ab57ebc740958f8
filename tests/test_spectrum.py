"""The Hessian's spectral density by stochastic Lanczos quadrature, against the exact eigenvalues of a small model's
dense Hessian (brute force, tests/test_measures.py's ``params_hessian``) and against the moments it must reproduce."""

from __future__ import annotations

import math

import pytest
import torch
from test_measures import MLP, mlp_batch, mlp_loss, params_hessian

from fam_hf.curvature import rademacher
from fam_hf.measures import estimate_spectrum, hessian_spectrum
from fam_hf.measures.hessian import DenseOperator
from fam_hf.measures.spectrum import _dot64, lanczos, smoothed_density

F64 = torch.float64


def symmetric(n, seed=0):
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return (a + a.T) / 2


@pytest.mark.parametrize("reorthogonalize", [True, False])
def test_lanczos_quadrature_reproduces_the_moments_of_its_start(reorthogonalize):
    """Gauss quadrature with m nodes is exact for polynomials of degree ≤ 2m − 1: Σ τ θ^p = vᵀ A^p v / vᵀv."""
    a = symmetric(40)
    v = rademacher(40, generator=torch.Generator().manual_seed(1), dtype=F64)
    m = 6
    nodes, weights = lanczos(DenseOperator(a), v, m, reorthogonalize=reorthogonalize).quadrature()
    assert nodes.shape == (m,) and abs(float(weights.sum()) - 1) < 1e-12
    power = v.clone()
    for p in range(2 * m):
        torch.testing.assert_close((weights * nodes**p).sum(), (v @ power) / (v @ v), rtol=1e-8, atol=1e-10)
        power = a @ power
    nodes, weights = lanczos(DenseOperator(a), v, 40, reorthogonalize=True).quadrature()  # m = n: every eigenvalue
    torch.testing.assert_close(nodes, torch.linalg.eigvalsh(a), rtol=0, atol=1e-10)


def test_slq_density_matches_the_exact_eigenvalue_histogram_of_a_small_model():
    torch.manual_seed(0)
    model, batch = MLP().double(), mlp_batch(20)
    names = [name for name, _ in model.named_parameters()]
    eigenvalues = torch.linalg.eigvalsh(params_hessian(model, mlp_loss, batch, names))  # n = 119
    spectrum = hessian_spectrum(model, batch, None, loss_fn=mlp_loss, runs=16, steps=40)
    assert spectrum.nodes.shape == (16, 40) and spectrum.matvecs == 16 * 40 and spectrum.dim == 119
    uniform = torch.full((1, 119), 1 / 119, dtype=F64)
    exact = smoothed_density(eigenvalues[None], uniform, spectrum.grid, spectrum.sigma)
    step = float(spectrum.grid[1] - spectrum.grid[0])
    assert abs(float(spectrum.density.sum()) * step - 1) < 1e-3  # a probability density
    l1 = float((spectrum.density - exact).abs().sum()) * step  # 0.09 here; the largest possible is 2
    assert l1 < 0.15
    doubled = smoothed_density(2 * eigenvalues[None], uniform, spectrum.grid, spectrum.sigma)
    assert float((doubled - exact).abs().sum()) * step > 2 * l1  # the comparison tells spectra apart
    # the histogram: the mass the quadrature puts below each point against the exact eigenvalues' share
    points = torch.linspace(float(eigenvalues.min()), float(eigenvalues.max()), 200, dtype=F64)
    valid = ~torch.isnan(spectrum.nodes)
    nodes, weights = spectrum.nodes[valid], spectrum.weights[valid] / 16
    quadrature_cdf = (weights * (nodes[None] <= points[:, None])).sum(1)
    exact_cdf = (eigenvalues[None] <= points[:, None]).to(F64).mean(1)
    assert float((quadrature_cdf - exact_cdf).abs().max()) < 0.1  # 0.057 here
    assert spectrum.nodes[:, -1].max() <= eigenvalues.max() + 1e-8  # Ritz values lie inside the spectrum
    torch.testing.assert_close(spectrum.nodes[:, -1].max(), eigenvalues.max(), rtol=1e-6, atol=0)


def test_spectrum_of_a_layer_is_that_of_its_dense_hessian_and_reproducible():
    torch.manual_seed(0)
    model, batch = MLP().double(), mlp_batch(10)
    from fam_hf.measures import LossHessian

    dense = LossHessian(model, batch, "fc2", loss_fn=mlp_loss).dense()
    by_model = hessian_spectrum(model, batch, "fc2", loss_fn=mlp_loss, runs=3, steps=12, grid=64)
    by_matrix = estimate_spectrum(dense, runs=3, steps=12, grid=64)
    torch.testing.assert_close(by_model.nodes, by_matrix.nodes, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(by_model.density, by_matrix.density, rtol=1e-7, atol=1e-9)
    assert by_model.as_dict()["dim"] == 40 and len(by_model.as_dict()["nodes"]) == 3
    with pytest.raises(ValueError, match="runs=0 and steps=3 must both be at least 1"):
        estimate_spectrum(dense, runs=0, steps=3)


def test_fam_hf_plot_overlays_saved_spectra(tmp_path, capsys):
    from fam_hf.cli import main

    a = symmetric(30, seed=1)
    paths = [
        estimate_spectrum(matrix, runs=2, steps=10, grid=128).save(tmp_path / f"{name}.json", name=name)
        for name, matrix in (("plain", a), ("fam", a / 2))
    ]
    out = tmp_path / "plots"
    assert main(["plot", *map(str, paths), "--out", str(out)]) == 0
    png = out / "spectrum.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert str(png) in capsys.readouterr().out
    assert main(["plot", *map(str, paths), "--out", str(out / "plain_vs_fam.png")]) == 0  # a file name: that file
    assert (out / "plain_vs_fam.png").read_bytes() == png.read_bytes()
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit, match="either runs .* or spectra"):
        main(["plot", str(paths[0]), str(tmp_path / "run"), "--out", str(out)])


def test_streaming_lanczos_finds_the_top_eigenvalues_without_a_basis():
    from fam_hf.measures import estimate_top_eigenpairs, top_eigenvalues
    from fam_hf.measures.spectrum import good_ritz_values

    gen = torch.Generator().manual_seed(5)
    basis, _ = torch.linalg.qr(torch.randn(200, 200, generator=gen, dtype=F64))
    spectrum = torch.cat([torch.tensor([100.0, 50.0, 20.0, 10.0, 5.0], dtype=F64), torch.rand(195, generator=gen, dtype=F64)])
    a = basis @ torch.diag(spectrum) @ basis.T
    top = estimate_top_eigenpairs(a, 5, method="streaming", tol=1e-10)
    assert top.vectors is None and top.method == "streaming"
    torch.testing.assert_close(top.values, spectrum[:5], rtol=1e-8, atol=0)
    # run on past convergence: the recurrence without reorthogonalisation repeats 100 ("ghosts"); the test keeps one
    v = rademacher(200, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = lanczos(DenseOperator(a), v, 120)
    raw = torch.linalg.eigvalsh(t.dense())
    assert int((raw - 100).abs().lt(1e-6).sum()) > 1
    good = good_ritz_values(t)
    assert int((good - 100).abs().lt(1e-6).sum()) == 1
    torch.testing.assert_close(good.flip(0)[:5], spectrum[:5], rtol=1e-8, atol=0)
    torch.manual_seed(0)
    model, batch = MLP().double(), mlp_batch(20)
    names = [name for name, _ in model.named_parameters()]
    truth = torch.linalg.eigvalsh(params_hessian(model, mlp_loss, batch, names)).flip(0)[:3]
    found = top_eigenvalues(model, batch, None, k=3, method="streaming", loss_fn=mlp_loss, tol=1e-10)
    torch.testing.assert_close(found.values, truth, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="largest algebraic eigenvalues only"):
        estimate_top_eigenpairs(a, 2, method="streaming", which="LM")


def test_streaming_lanczos_in_float32_merges_the_ghosts_within_its_precision():
    from fam_hf.measures import estimate_top_eigenpairs
    from fam_hf.measures.spectrum import good_ritz_values

    gen = torch.Generator().manual_seed(5)
    basis, _ = torch.linalg.qr(torch.randn(400, 400, generator=gen, dtype=F64))
    spectrum = torch.cat([torch.tensor([41.0, 40.2, 30.3, 23.2, 14.4], dtype=F64), 3 * torch.randn(395, generator=gen, dtype=F64)])
    a = (basis @ torch.diag(spectrum) @ basis.T).float()
    t = lanczos(DenseOperator(a), torch.randn(400, generator=gen), 100)
    copies = torch.linalg.eigvalsh(t.dense())
    assert int((copies - 30.3).abs().lt(1e-3).sum()) > 1  # float32: the copies differ by ~1e-6, not 1e-15
    good = good_ritz_values(t, torch.finfo(torch.float32).eps ** 0.5).flip(0)[:5]
    torch.testing.assert_close(good, spectrum[:5], rtol=1e-4, atol=0)
    found = estimate_top_eigenpairs(a, 5, method="streaming", tol=1e-4)
    torch.testing.assert_close(found.values.double(), spectrum[:5], rtol=1e-3, atol=0)  # float32 arithmetic


def _out_of_place_lanczos(a, start, steps):
    """The recurrence out of place, in Paige's order (``w = (−β·previous + A q) − α·q``), the same float64 dots."""
    q = start / math.sqrt(_dot64(start, start))
    previous, beta_prev, alpha, beta = None, 0.0, [], []
    for _ in range(steps):
        w = a @ q if previous is None else previous * -beta_prev + a @ q
        alpha.append(_dot64(q, w))
        w = w - alpha[-1] * q
        beta.append(math.sqrt(_dot64(w, w)))
        previous, q, beta_prev = q, w / beta[-1], beta[-1]
    return torch.tensor(alpha, dtype=F64), torch.tensor(beta[: steps - 1], dtype=F64)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_lanczos_updates_in_place_with_the_roundings_of_the_out_of_place_recurrence(dtype):
    a = symmetric(300, seed=3).to(dtype)
    start = torch.randn(300, generator=torch.Generator().manual_seed(2), dtype=dtype)
    kept = start.clone()
    t = lanczos(DenseOperator(a), start, 12)
    alpha, beta = _out_of_place_lanczos(a, start, 12)
    assert torch.equal(t.alpha, alpha) and torch.equal(t.beta, beta)
    assert torch.equal(start, kept)  # the caller's start is not written
    reorthogonalized = lanczos(DenseOperator(a), start, 12, reorthogonalize=True)  # the basis is not written either
    torch.testing.assert_close(reorthogonalized.alpha, alpha, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=0)


def test_lanczos_copes_with_an_operator_that_returns_its_input():
    class Identity(DenseOperator):
        def matvec(self, vector):
            self.matvecs += 1
            return vector

    start = torch.randn(10, generator=torch.Generator().manual_seed(0), dtype=F64)
    t = lanczos(Identity(torch.eye(10, dtype=F64)), start, 5)
    torch.testing.assert_close(t.alpha, torch.ones(1, dtype=F64), rtol=1e-14, atol=0)  # invariant after one step


@pytest.mark.parametrize("reorthogonalize", [True, False])
def test_lanczos_stops_where_a_low_rank_float32_operator_runs_out_of_directions(reorthogonalize):
    """A classifier head's Hessian has rank ≤ N·(C − 1), below the default 64 steps. In float32 the residual after
    the last direction is rounding that shrinks with the recurrence's own α and β: Lanczos must stop there, or it
    divides rounding by rounding and its Ritz values leave the spectrum (they reached 10⁵ × λ_max on a tiny BERT
    head, 10³² on MiniLM's)."""
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(48, 16, generator=g, dtype=F64))
    spectrum = torch.rand(16, generator=g, dtype=F64) * 0.01 + 1e-4
    a = (basis @ torch.diag(spectrum) @ basis.T).float()  # rank 16, λ ∈ [1e-4, 0.0101]
    start = rademacher(48, generator=g, dtype=torch.float32)
    t = lanczos(DenseOperator(a), start, 64, reorthogonalize=reorthogonalize)
    nodes = torch.linalg.eigvalsh(t.dense())
    if reorthogonalize:  # 16 directions, then one or two of rounding in the null space
        assert t.alpha.numel() <= 20, t.alpha.numel()
    assert float(nodes.max()) <= float(spectrum.max()) * (1 + 1e-4) and float(nodes.min()) >= -1e-6
    if reorthogonalize:  # every eigenvalue found, the zero eigenvalue's rounding aside
        torch.testing.assert_close(nodes[-16:], spectrum.sort().values, rtol=1e-4, atol=1e-7)

"""examples/digits_flatness.py: its function-preserving rescalings, the measures it reads off them (κ invariant where
the paper says so, against the exact estimator in float64), its label noise, its granulated τ and its training stop."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import digits_flatness as example  # noqa: E402

from fam_hf import relative_flatness  # noqa: E402


def tiny(seed: int = 0, width: int = 6) -> tuple[example.MLP, dict]:
    torch.manual_seed(seed)
    model = example.MLP(width).double().eval()
    batch = {"x": torch.rand(40, 64, dtype=torch.float64), "y": torch.randint(0, 10, (40,))}
    return model, batch


def kappa(model, batch, layer, **options) -> float:
    estimator = "closed_form" if layer == "fc3" else "exact"
    return float(relative_flatness(model, batch, layer, estimator, loss_fn=example.loss_fn, head_loss=example.HEAD,
                                   **options).value)  # fmt: skip


def test_rescalings_keep_the_function_and_kappa_moves_only_where_the_paper_says():
    model, batch = tiny()
    per_unit = torch.tensor([0.1, 0.5, 2.0, 3.0, 7.0, 10.0], dtype=torch.float64)
    before = {layer: kappa(model, batch, layer) for layer in ("fc2", "fc3")}
    normalized = kappa(model, batch, "fc3", normalize_features=True)
    for first, second in (("fc1", "fc2"), ("fc2", "fc3")):
        for alphas in (torch.full((6,), 10.0, dtype=torch.float64), per_unit):
            after = example.rescaled(model, first, second, alphas)
            torch.testing.assert_close(after(batch["x"]), model(batch["x"]), rtol=1e-12, atol=1e-12)
            layer_wise = bool((alphas == alphas[0]).all())
            # κ of a layer is invariant to rescaling its own units and to layer-wise rescaling; rescaling the units
            # of the layer that feeds it moves it, unless its features are normalised
            for layer in ("fc2", "fc3"):
                moved = not layer_wise and second == layer
                ratio = kappa(after, batch, layer) / before[layer]
                assert (abs(ratio - 1) > 1e-3) if moved else abs(ratio - 1) < 1e-10, (first, second, layer, ratio)
            assert abs(kappa(after, batch, "fc3", normalize_features=True) / normalized - 1) < 1e-10


def test_noisy_labels_change_exactly_the_fraction_asked():
    y = torch.arange(200) % 10
    noisy = example.noisy_labels(y, 0.2, torch.Generator().manual_seed(0))
    assert int((noisy != y).sum()) == 40
    assert bool(((noisy >= 0) & (noisy < 10)).all())
    assert torch.equal(example.noisy_labels(y, 0.0, torch.Generator().manual_seed(0)), y)


def test_granulated_tau_is_one_when_the_measure_orders_every_pair_as_the_gap_does():
    runs = [
        example.Run(lr, bs, width, wd, noise, seed)
        for lr in example.GRID["lr"] for bs in example.GRID["batch_size"] for width in example.GRID["width"]
        for wd in example.GRID["weight_decay"] for noise in example.GRID["label_noise"] for seed in (0, 1)
    ]  # fmt: skip
    gap = {r: r.lr * 3 + r.batch_size / 100 + r.width / 10 + r.weight_decay * 1e3 + r.label_noise * 5 + r.seed
           for r in runs}  # fmt: skip
    records = [{"run": r.__dict__, "gap": gap[r], "same": gap[r], "reversed": -gap[r]} for r in runs]
    assert example.granulated_tau(records, "same") == dict.fromkeys(example.GRID, 1.0)
    assert example.granulated_tau(records, "reversed") == dict.fromkeys(example.GRID, -1.0)


def test_training_stops_when_every_label_is_fitted():
    torch.manual_seed(0)
    data = {"x": torch.rand(30, 64), "y": torch.arange(30) % 10}
    run = example.Run(lr=0.02, batch_size=8, width=32, weight_decay=0.0, label_noise=0.0, seed=0)
    model, labelled, fit = example.train(run, data, target_loss=0.05, max_epochs=2000)
    assert fit["interpolated"] and fit["epochs"] < 2000
    with torch.no_grad():
        assert bool((model(data["x"]).argmax(-1) == labelled["y"]).all())


def test_the_quick_run_writes_its_records_results_and_figure(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="the digits come with scikit-learn (the examples extra)")
    example.main(["--quick", "--out", str(tmp_path), "--probes", "4"])
    assert len(list((tmp_path / "runs").glob("*.json"))) == 4
    results = (tmp_path / "results.md").read_text()
    assert capsys.readouterr().out.endswith(results + "\n")  # printed after each network's line
    assert "| kappa_fc3 |" in results and "| fc2 → fc3 | neuron-wise |" in results
    assert (tmp_path / "kappa_vs_gap.png").stat().st_size > 10_000

"""Relative flatness in the paper's own setting: small ReLU MLPs trained from scratch on scikit-learn's digits.

Petzka et al. (NeurIPS 2021) claim that the relative flatness κ of a layer, unlike the Hessian trace and the top
eigenvalue, is invariant to the rescalings that leave a ReLU network's function unchanged, and that it tracks the
generalization gap of networks trained to interpolation. This example checks both on a grid of training choices
(learning rate, batch size, width, weight decay, label noise; every combination, several seeds):

1. train a 64 → w → w → 10 ReLU MLP with SGD on half the digits until it fits its (possibly noisy) training labels;
2. measure, in float64 on the whole training set, κ of the last layer (closed form) and of the penultimate layer
   (probes), each also with the reference code's neuron-wise feature normalisation, beside the Hessian trace, the
   top eigenvalue, SAM sharpness and the weights' norms (fam_hf.measures);
3. rank-correlate each measure with the generalization gap (Kendall's τ over networks with a bootstrap interval,
   and Jiang et al.'s (ICLR 2020) granulated τ: the agreement when one training choice alone changes);
4. rescale a trained network without changing its function (layer-wise and neuron-wise) and report which
   measures move.

    pip install -e ".[examples]"
    python examples/digits_flatness.py                 # the grid, about 7 CPU minutes; records and results in studies/digits
    python examples/digits_flatness.py --quick         # 4 networks, to see it run (outputs/digits-quick)

Each network's record is a JSON file in ``--out``/runs (rerunning skips the finished ones); ``results.md`` and
``kappa_vs_gap.png`` are rebuilt from the records. docs/measures.md says what each measure is.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau
from torch import nn
from torch.nn import functional as F

from fam_hf import HeadLoss, relative_flatness
from fam_hf.measures import hessian_trace, sam_sharpness, top_eigenvalues

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's study/ (Kendall τ with intervals)
from study.stats import bootstrap_tau  # noqa: E402

GRID = {
    "lr": [0.005, 0.02],
    "batch_size": [32, 256],
    "width": [32, 128],
    "weight_decay": [0.0, 1e-4],
    "label_noise": [0.0, 0.2],
}
QUICK_GRID = {"lr": [0.02], "batch_size": [32], "width": [32], "weight_decay": [0.0, 1e-4], "label_noise": [0.0, 0.2]}
MEASURES = (
    "kappa_fc3", "kappa_fc2", "kappa_fc3_normalized", "kappa_fc2_normalized",
    "hessian_trace", "top_eigenvalue", "sam_sharpness", "weight_norm", "frobenius_product",
)  # fmt: skip
HEAD = HeadLoss("cross_entropy", head="fc3", labels="y")


@dataclass(frozen=True)
class Run:
    lr: float
    batch_size: int
    width: int
    weight_decay: float
    label_noise: float
    seed: int

    @property
    def name(self) -> str:
        return "-".join(f"{k}{v}" for k, v in asdict(self).items())


class MLP(nn.Module):
    """64 → width → width → 10 with ReLU; returns the logits."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, width), nn.Linear(width, width), nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"])


def load_digits_split() -> tuple[dict, dict]:
    """The 1,797 digits (8 × 8 pixels in [0, 16] → [0, 1]), split in half stratified by class, the same split for
    every run: ``({"x": (898, 64), "y": (898,)}, {"x": (899, 64), "y": (899,)})``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.5, stratify=y, random_state=0)
    as_batch = lambda x, y: {"x": torch.tensor(x, dtype=torch.float32), "y": torch.tensor(y)}  # noqa: E731
    return as_batch(x_train, y_train), as_batch(x_test, y_test)


def noisy_labels(y: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """``y`` with a ``fraction`` of its entries (chosen at random) replaced by a different class, also at random."""
    flip = torch.randperm(len(y), generator=generator)[: round(fraction * len(y))]
    noisy = y.clone()
    noisy[flip] = (y[flip] + torch.randint(1, 10, (len(flip),), generator=generator)) % 10
    return noisy


def train(run: Run, train_set: dict, *, target_loss: float, max_epochs: int) -> tuple[MLP, dict, dict]:
    """SGD (momentum 0.9) on the run's training labels until the training loss is below ``target_loss`` with every
    training label fitted, or ``max_epochs``. Returns the model, the training labels it saw, and how it went."""
    generator = torch.Generator().manual_seed(run.seed)
    torch.manual_seed(run.seed)
    model = MLP(run.width)
    labelled = {"x": train_set["x"], "y": noisy_labels(train_set["y"], run.label_noise, generator)}
    optimizer = torch.optim.SGD(model.parameters(), lr=run.lr, momentum=0.9, weight_decay=run.weight_decay)
    n = len(labelled["y"])
    for epoch in range(1, max_epochs + 1):  # noqa: B007 (the count is read after the loop)
        for rows in torch.randperm(n, generator=generator).split(run.batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model, {"x": labelled["x"][rows], "y": labelled["y"][rows]}).backward()
            optimizer.step()
        with torch.no_grad():
            logits = model(labelled["x"])
            loss, fitted = (
                F.cross_entropy(logits, labelled["y"]).item(),
                bool((logits.argmax(-1) == labelled["y"]).all()),
            )
        if not math.isfinite(loss) or (loss < target_loss and fitted):
            break
    return model, labelled, {"epochs": epoch, "final_train_loss": loss, "interpolated": fitted and loss < target_loss}


def measure(model: nn.Module, train_set: dict, *, probes: int) -> dict:
    """Every measure of ``model`` on the whole training set, in float64 (the model is not modified)."""
    model = copy.deepcopy(model).double().eval()
    batch = {"x": train_set["x"].double(), "y": train_set["y"]}
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731  (the same probes for every network)
    kappa = {}
    for layer, normalize in itertools.product(("fc3", "fc2"), (False, True)):
        estimator = "closed_form" if layer == "fc3" else "probe"
        result = relative_flatness(
            model, batch, layer, estimator, loss_fn=loss_fn, head_loss=HEAD, probes=probes,
            normalize_features=normalize, generator=generator(),
        )  # fmt: skip
        key = f"kappa_{layer}" + ("_normalized" if normalize else "")
        kappa[key] = float(result.value)
        if result.std_error is not None:
            kappa[key + "_stderr"] = float(result.std_error)
    trace = hessian_trace(model, batch, None, probes=probes, loss_fn=loss_fn, generator=generator(), disable_tqdm=True)
    weights = [m.weight.detach() for m in (model.fc1, model.fc2, model.fc3)]
    return {
        **kappa,
        "hessian_trace": float(trace.value),
        "hessian_trace_stderr": float(trace.std_error),
        "top_eigenvalue": float(top_eigenvalues(model, batch, None, loss_fn=loss_fn, disable_tqdm=True).values[0]),
        "sam_sharpness": float(sam_sharpness(model, batch, None, rho=0.05, loss_fn=loss_fn).value),
        "weight_norm": float(sum(w.pow(2).sum() for w in weights)),  # Σ_l ‖W_l‖²_F
        "frobenius_product": float(math.prod(float(w.norm()) for w in weights)),  # Π_l ‖W_l‖_F
    }


def errors_and_losses(model: nn.Module, train_labelled: dict, test_set: dict) -> dict:
    with torch.no_grad():
        out = {}
        for split, data in (("train", train_labelled), ("test", test_set)):
            logits = model(data["x"])
            out[f"loss_{split}"] = F.cross_entropy(logits, data["y"]).item()
            out[f"error_{split}"] = (logits.argmax(-1) != data["y"]).double().mean().item()
    return {**out, "gap": out["loss_test"] - out["loss_train"], "error_gap": out["error_test"] - out["error_train"]}


# -- the rescaling control ----------------------------------------------------------------------------------------


def rescaled(model: MLP, first: str, second: str, alphas: torch.Tensor) -> MLP:
    """A copy with unit ``i`` of layer ``first`` (its weight row and bias) × ``alphas[i]`` and the matching input
    column of ``second`` ÷ ``alphas[i]``: the same function, since ReLU(αx) = αReLU(x) for α > 0. One α for every
    unit is the layer-wise rescaling; a different α per unit, the neuron-wise one."""
    copy_ = copy.deepcopy(model)
    a, b = getattr(copy_, first), getattr(copy_, second)
    with torch.no_grad():
        a.weight.mul_(alphas[:, None].to(a.weight))
        a.bias.mul_(alphas.to(a.bias))
        b.weight.div_(alphas[None, :].to(b.weight))
    return copy_


def rescaling_control(model: MLP, train_set: dict, *, probes: int) -> list[dict]:
    """Each measure after/before four function-preserving rescalings of ``model`` (α = 10 layer-wise; α log-uniform
    in [1/10, 10] per unit), with the largest change of any logit, which says the function did not move."""
    before = measure(model, train_set, probes=probes)
    width = model.fc2.weight.shape[0]
    per_unit = torch.exp(
        torch.empty(width).uniform_(-math.log(10), math.log(10), generator=torch.Generator().manual_seed(0))
    )
    rows = []
    for first, second in (("fc1", "fc2"), ("fc2", "fc3")):
        for kind, alphas in (("layer-wise", torch.full((width,), 10.0)), ("neuron-wise", per_unit)):
            after_model = rescaled(model, first, second, alphas)
            with torch.no_grad():
                x = train_set["x"].double()
                change = (after_model.double()(x) - copy.deepcopy(model).double()(x)).abs().max().item()
            after = measure(after_model, train_set, probes=probes)
            ratios = {m: after[m] / before[m] for m in MEASURES}
            rows.append({"rescaled": f"{first} → {second}", "kind": kind, "max_logit_change": change, **ratios})
    return rows


# -- the correlations ---------------------------------------------------------------------------------------------


def kendall_with_interval(x: np.ndarray, y: np.ndarray, *, resamples: int = 2000, seed: int = 0) -> tuple:
    """Kendall's τ of ``x`` and ``y`` and its 95% percentile bootstrap interval, resampling the networks (the
    study's :func:`study.stats.bootstrap_tau`)."""
    result = bootstrap_tau(x, y, resamples=resamples, seed=seed)
    return result["tau"], result["lo"], result["hi"]


def tau_difference(a: np.ndarray, b: np.ndarray, y: np.ndarray, *, resamples: int = 2000, seed: int = 0) -> tuple:
    """τ(a, y) − τ(b, y) and its 95% paired bootstrap interval (the same resampled networks for both)."""
    rng = np.random.default_rng(seed)
    draws = []
    for i in (rng.integers(0, len(y), len(y)) for _ in range(resamples)):
        draws.append(kendalltau(a[i], y[i]).statistic - kendalltau(b[i], y[i]).statistic)
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return kendalltau(a, y).statistic - kendalltau(b, y).statistic, low, high


def granulated_tau(records: list[dict], measure: str, target: str = "gap") -> dict[str, float]:
    """Jiang et al.'s granulated Kendall coefficient: for each training choice, τ between the measure and the gap
    over the networks that differ in that choice alone (same seed and every other choice), averaged over groups.
    With two values per choice each group is a pair and τ is ±1: the fraction of pairs ranked the same way, ×2 − 1."""
    out = {}
    for choice in GRID:
        others = [k for k in (*GRID, "seed") if k != choice]
        groups: dict[tuple, list[dict]] = {}
        for r in records:
            groups.setdefault(tuple(r["run"][k] for k in others), []).append(r)
        taus = [
            kendalltau([r[measure] for r in g], [r[target] for r in g]).statistic for g in groups.values() if len(g) > 1
        ]
        taus = [t for t in taus if not math.isnan(t)]
        out[choice] = float(np.mean(taus)) if taus else float("nan")
    return out


def report(records: list[dict], rescaling: list[dict] | None, out: Path, command: str) -> str:
    fitted = [r for r in records if r["interpolated"]]
    grid = {choice: sorted({r["run"][choice] for r in fitted}) for choice in GRID}  # the values the runs took
    lines = [
        f"{len(fitted)} of {len(records)} networks fitted their training labels (train loss < target, every label "
        f"right); the correlations are over those. Command: `{command}`.",
        "",
        "Kendall's τ with the generalization gap (test loss − train loss), 95% bootstrap interval over networks; "
        "granulated τ per training choice (the networks that differ in that choice alone), and their mean ψ:",
        "",
        "| measure | τ with gap [95% CI] | τ with error gap | "
        + " | ".join(f"τ, label noise {v}" for v in grid["label_noise"])
        + " | "
        + " | ".join(GRID)
        + " | ψ |",
        "| --- | --- | --- | "
        + " | ".join("---" for _ in grid["label_noise"])
        + " | "
        + " | ".join("---:" for _ in GRID)
        + " | ---: |",
    ]
    gaps, error_gaps = (np.array([r[k] for r in fitted]) for k in ("gap", "error_gap"))
    for name in MEASURES:
        values = np.array([r[name] for r in fitted])
        tau, low, high = kendall_with_interval(values, gaps)
        within = []  # label noise separates the gaps in two clusters; τ inside each says more than across them
        for noise in grid["label_noise"]:
            rows = np.array([r["run"]["label_noise"] == noise for r in fitted])
            within.append("{:+.2f} [{:+.2f}, {:+.2f}]".format(*kendall_with_interval(values[rows], gaps[rows])))
        by_choice = granulated_tau(fitted, name)
        cells = " | ".join(f"{by_choice[c]:+.2f}" for c in GRID)
        finite = [t for t in by_choice.values() if not math.isnan(t)]
        psi = float(np.mean(finite)) if finite else float("nan")
        lines.append(
            f"| {name} | {tau:+.2f} [{low:+.2f}, {high:+.2f}] | {kendalltau(values, error_gaps).statistic:+.2f} | "
            f"{' | '.join(within)} | {cells} | {psi:+.2f} |"
        )
    best = np.array([r["kappa_fc3"] for r in fitted])
    differences = (
        "{} {:+.2f} [{:+.2f}, {:+.2f}]".format(name, *tau_difference(best, np.array([r[name] for r in fitted]), gaps))
        for name in MEASURES[1:]
    )
    lines += ["", "τ(κ_fc3, gap) − τ(measure, gap), paired bootstrap interval: " + "; ".join(differences) + "."]
    gap_by_choice = {c: {v: np.mean([r["gap"] for r in fitted if r["run"][c] == v]) for v in grid[c]} for c in GRID}
    lines += ["", "Mean gap by training choice: " + "; ".join(
        f"{c} " + " / ".join(f"{v}: {g:.3f}" for v, g in gaps_.items()) for c, gaps_ in gap_by_choice.items()
    ) + "."]  # fmt: skip
    if rescaling:
        lines += [
            "",
            "Rescaling control (one network; each measure after/before a rescaling that leaves the function "
            "unchanged; κ of fc2 and the trace are estimated with the same probes before and after):",
            "",
            "| rescaled | kind | max logit change | " + " | ".join(MEASURES) + " |",
            "| --- | --- | ---: | " + " | ".join("---:" for _ in MEASURES) + " |",
        ]
        for row in rescaling:
            ratios = " | ".join(f"{row[m]:.3g}" for m in MEASURES)
            lines.append(f"| {row['rescaled']} | {row['kind']} | {row['max_logit_change']:.1e} | {ratios} |")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    plot(fitted, out / "kappa_vs_gap.png")
    return text


def plot(records: list[dict], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ("kappa_fc3", "kappa_fc2", "kappa_fc3_normalized", "hessian_trace", "top_eigenvalue", "weight_norm")
    fig, axes = plt.subplots(2, 3, figsize=(12, 7), constrained_layout=True)
    for ax, name in zip(axes.flat, shown):
        for noise, marker in zip(sorted({r["run"]["label_noise"] for r in records}), "os"):
            chosen = [r for r in records if r["run"]["label_noise"] == noise]
            ax.scatter(
                [r[name] for r in chosen], [r["gap"] for r in chosen], marker=marker, alpha=0.7,
                c=[math.log10(r["run"]["lr"]) for r in chosen], cmap="viridis", label=f"label noise {noise}",
            )  # fmt: skip
        ax.set(xscale="log", xlabel=name, ylabel="gap (test − train loss)")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # the log axis's minor labels overlap
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("ReLU MLPs on digits trained to interpolation (colour: log10 learning rate)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="records and results (default: studies/digits; --quick: outputs/digits-quick)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per grid point (default: %(default)s)")
    parser.add_argument("--probes", type=int, default=64, help="probes for κ of fc2 and the trace")
    parser.add_argument("--target_loss", type=float, default=0.02, help="train until the training loss is below")
    parser.add_argument("--max_epochs", type=int, default=10000)
    parser.add_argument("--quick", action="store_true", help="4 networks of one seed, to see it run")
    args = parser.parse_args(argv)
    grid, seeds = (QUICK_GRID, 1) if args.quick else (GRID, args.seeds)
    torch.set_num_threads(1)  # the same numbers on any machine, and the runs are too small to share cores
    out = Path(args.out or ("outputs/digits-quick" if args.quick else "studies/digits"))
    (out / "runs").mkdir(parents=True, exist_ok=True)
    train_set, test_set = load_digits_split()
    records = []
    runs = [Run(*values, seed) for values in itertools.product(*grid.values()) for seed in range(seeds)]
    for i, run in enumerate(runs, 1):
        path = out / "runs" / f"{run.name}.json"
        if path.exists():
            records.append(json.loads(path.read_text()))
            continue
        start = time.process_time()
        model, labelled, fit = train(run, train_set, target_loss=args.target_loss, max_epochs=args.max_epochs)
        record = {"run": asdict(run), **fit, **errors_and_losses(model, labelled, test_set)}
        record.update(measure(model, labelled, probes=args.probes), cpu_seconds=time.process_time() - start)
        path.write_text(json.dumps(record, indent=1))
        records.append(record)
        print(f"[{i}/{len(runs)}] {run.name}: {fit['epochs']} epochs, gap {record['gap']:.3f}, "
              f"κ(fc3) {record['kappa_fc3']:.3g}, {record['cpu_seconds']:.0f} CPU s", flush=True)  # fmt: skip
    control_path = out / "rescaling.json"
    if not control_path.exists():  # on the first network of the grid, trained again (deterministic)
        model, labelled, _ = train(runs[0], train_set, target_loss=args.target_loss, max_epochs=args.max_epochs)
        control_path.write_text(json.dumps(rescaling_control(model, labelled, probes=args.probes), indent=1))
    command = "python examples/digits_flatness.py" + (" --quick" if args.quick else f" --seeds {seeds}")
    print(report(records, json.loads(control_path.read_text()), out, command))


if __name__ == "__main__":
    main()

"""Plots of flatness over training from the ``trainer_state.json`` that ``Trainer`` saves.

:func:`plot_runs` draws one PNG per quantity found in any run's ``log_history`` (κ, Hessian trace, top
eigenvalue, SAM sharpness, Jacobian norm, the spectrum's largest Ritz values, generalization gap, loss) against the
optimizer step, one colour per run and one line style per series (train / eval probe batches, FAM's own κ), so that a
FAM run and a plain run overlay on the same axes; and, where the runs' folders hold the spectra that
:class:`~fam_hf.FlatnessCallback` saved, each run's last one overlaid per split (:func:`plot_spectra`). ``fam-hf
plot`` is the command-line form.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from .extras import require

STATE_NAME = "trainer_state.json"

# quantity -> (title, y-axis label, [(log key, series label), ...])
QUANTITIES: dict[str, tuple[str, str, list[tuple[str, str]]]] = {
    "kappa": (
        "Relative flatness κ",
        "κ",
        [
            ("fam/kappa", "FAM penalty (training micro-batches)"),
            ("flatness/train/kappa", "train probe batch"),
            ("flatness/eval/kappa", "eval probe batch"),
        ],
    ),
    "hessian_trace": (
        "Hessian trace",
        "Tr(∇²L)",
        [("flatness/train/hessian_trace", "train probe batch"), ("flatness/eval/hessian_trace", "eval probe batch")],
    ),
    "top_eigenvalue": (
        "Top Hessian eigenvalue",
        "λ_max(∇²L)",
        [("flatness/train/top_eigenvalue", "train probe batch"), ("flatness/eval/top_eigenvalue", "eval probe batch")],
    ),
    "sam_sharpness": (
        "SAM sharpness",
        "L(w + ε̂) − L(w)",
        [("flatness/train/sam_sharpness", "train probe batch"), ("flatness/eval/sam_sharpness", "eval probe batch")],
    ),
    "jacobian_norm": (
        "Input–output Jacobian norm",
        "mean ‖∂z/∂x‖²_F per position",
        [("flatness/train/jacobian_norm", "train probe batch"), ("flatness/eval/jacobian_norm", "eval probe batch")],
    ),
    "spectrum_top": (  # the largest only: the next ones are in the spectra themselves (spectrum-{split}.png)
        "Largest Ritz value of the Hessian spectrum",
        "eigenvalue",
        [("flatness/train/spectrum_top1", "train probe batch"), ("flatness/eval/spectrum_top1", "eval probe batch")],
    ),
    "gap": ("Generalization gap (probe batches)", "eval loss − train loss", [("flatness/gap", "gap")]),
    "loss": ("Loss", "loss", [("loss", "train (logged)"), ("eval_loss", "eval")]),
}
_STYLES = ["-", "--", ":", "-."]


def find_trainer_state(run_dir: str | Path) -> Path:
    """The latest ``trainer_state.json`` of a run: the folder's own or its newest ``checkpoint-*``'s.

    ``run_dir`` may also be the JSON file itself. "Latest" is the one with the highest ``global_step``
    (the run folder's own copy, from ``Trainer.save_state``, wins a tie).

    Raises:
        FileNotFoundError: no ``trainer_state.json`` there (the message says how to make Trainer write one).
    """
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    candidates = [run_dir / STATE_NAME, *sorted(run_dir.glob(f"checkpoint-*/{STATE_NAME}"))]
    found = [
        (json.loads(p.read_text()).get("global_step", 0), i == 0, p) for i, p in enumerate(candidates) if p.is_file()
    ]
    if not found:
        raise FileNotFoundError(
            f"no {STATE_NAME} in {run_dir} or its checkpoint-* folders; Trainer writes it at each save "
            "(save_strategy='steps'/'epoch') and with trainer.save_state()"
        )
    return max(found)[2]


def load_log_history(run_dir: str | Path) -> list[dict]:
    """``log_history`` of the run's latest ``trainer_state.json`` (see :func:`find_trainer_state`)."""
    return json.loads(find_trainer_state(run_dir).read_text()).get("log_history", [])


def series(history: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key`` over a ``log_history``, in logging order."""
    points = [(h["step"], h[key]) for h in history if key in h and "step" in h]
    return [s for s, _ in points], [float(v) for _, v in points]


def _run_names(run_dirs: Sequence[Path]) -> list[str]:
    names = [p.name if p.is_dir() else p.parent.name for p in run_dirs]
    if len(set(names)) < len(names):  # same folder name in different places: add the parent
        names = [f"{p.parent.name}/{n}" for p, n in zip(run_dirs, names)]
    return names


def pyplot(feature: str):
    """``matplotlib.pyplot`` on the file-only Agg backend (never needs a display), or an error naming the extra."""
    matplotlib = require("matplotlib", feature)
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", feature)


def is_spectrum_file(path: str | Path) -> bool:
    """Whether ``path`` is a spectrum saved by :meth:`fam_hf.measures.HessianSpectrum.save` (a JSON file with a grid
    and a density)."""
    path = Path(path)
    if not (path.is_file() and path.suffix == ".json"):
        return False
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "grid" in data and "density" in data


def plot_spectra(
    files: Sequence[str | Path],
    out_dir: str | Path,
    *,
    names: Sequence[str] | None = None,
    log_y: bool = True,
    filename: str = "spectrum.png",
) -> Path:
    """Overlay the Hessian eigenvalue densities saved in ``files`` (one line each) in ``out_dir/filename``.

    Args:
        files: JSON files written by :meth:`fam_hf.measures.HessianSpectrum.save`.
        out_dir: created if missing.
        names: legend names (default: the files' ``name`` entries, else their stems).
        log_y: logarithmic density axis (default: the spectrum of a network spans many orders of magnitude; the
            density is floored at 1e-14 of its peak there: an outlying eigenvalue weighs about 1/n).

    Returns:
        the path written.
    """
    plt = pyplot("fam-hf plot")
    spectra = [json.loads(Path(f).read_text()) for f in files]
    names = list(names) if names is not None else [s.get("name") or Path(f).stem for s, f in zip(spectra, files)]
    if len(names) != len(spectra):
        raise ValueError(f"{len(names)} names for {len(spectra)} spectra")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for spectrum, name, style in zip(spectra, names, _STYLES * len(spectra)):
        density = spectrum["density"]
        if log_y:
            floor = max(density) * 1e-14
            density = [max(d, floor) for d in density]
        top = max(max(run) for run in spectrum["nodes"] if run) if spectrum.get("nodes") else None
        label = name if top is None else f"{name} (λ_max ≈ {top:.3g})"
        ax.plot(spectrum["grid"], density, style, label=label)
    if log_y:
        ax.set_yscale("log")
    ax.set_title("Hessian eigenvalue density (stochastic Lanczos quadrature)")
    ax.set_xlabel("eigenvalue (loss per squared weight unit)")
    ax.set_ylabel("density")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = out / filename
    fig.savefig(path)
    plt.close(fig)
    return path


def last_spectra(run_dir: str | Path) -> dict[str, Path]:
    """The last spectrum per split that :class:`~fam_hf.FlatnessCallback` saved in a run's folder
    (``spectrum-step{N}-{split}.json``, the highest ``N``; a split measured on several batches gives its first,
    ``…-batch0.json``): ``{split: path}``, empty if none. ``run_dir`` may also be its ``trainer_state.json``."""
    folder = Path(run_dir)
    folder = folder.parent if folder.is_file() else folder
    found: dict[str, tuple[int, Path]] = {}
    for path in folder.glob("spectrum-step*.json"):
        match = _SPECTRUM_NAME.fullmatch(path.name)
        if match and match["batch"] in (None, "0"):
            step, split = int(match["step"]), match["split"]
            if split not in found or step > found[split][0]:
                found[split] = (step, path)
    return {split: path for split, (_, path) in sorted(found.items())}


_SPECTRUM_NAME = re.compile(r"spectrum-step(?P<step>\d+)-(?P<split>[^-]+)(?:-batch(?P<batch>\d+))?\.json")


def plot_runs(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    names: Sequence[str] | None = None,
    quantities: Sequence[str] | None = None,
    log_y: bool = False,
) -> list[Path]:
    """Write ``<quantity>.png`` into ``out_dir`` for each quantity logged by at least one run.

    Args:
        run_dirs: Trainer output folders (or ``trainer_state.json`` files).
        out_dir: created if missing.
        names: legend names for the runs (default: their folder names).
        quantities: a subset of :data:`QUANTITIES` (default: all that are present).
        log_y: logarithmic y axis (not for the gap, which can be negative).

    Returns:
        the paths written, in :data:`QUANTITIES` order, then ``spectrum-{split}.png`` for each split of which some
        run's folder holds a saved spectrum (each run's last, :func:`last_spectra`; only with ``quantities`` unset or
        naming ``"spectrum"``).
    """
    plt = pyplot("fam-hf plot")
    from matplotlib.ticker import MaxNLocator

    paths = [Path(p) for p in run_dirs]
    histories = [load_log_history(p) for p in paths]
    names = list(names) if names is not None else _run_names(paths)
    if len(names) != len(paths):
        raise ValueError(f"{len(names)} names for {len(paths)} runs")
    unknown = set(quantities or ()) - set(QUANTITIES) - {"spectrum"}
    if unknown:
        raise ValueError(f"unknown quantities {sorted(unknown)}; choose from {', '.join(QUANTITIES)}, spectrum")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []
    for quantity in quantities or QUANTITIES:
        if quantity == "spectrum":
            continue
        title, ylabel, keys = QUANTITIES[quantity]
        lines = [
            (run, key, label, *series(history, key))
            for run, history in enumerate(histories)
            for key, label in keys
            if series(history, key)[0]
        ]
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        for run, key, label, steps, values in lines:
            style = _STYLES[[k for k, _ in keys].index(key) % len(_STYLES)]
            single = len(keys) == 1
            ax.plot(
                steps,
                values,
                style,
                color=colors[run % len(colors)],
                marker="o" if len(steps) <= 30 else None,
                markersize=3,
                label=names[run] if single else f"{names[run]}: {label}",
            )
        if quantity == "gap":
            ax.axhline(0.0, color="grey", linewidth=0.8)
        elif log_y:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out / f"{quantity}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    if quantities is None or "spectrum" in quantities:
        spectra = [last_spectra(p) for p in paths]
        for split in sorted({split for found in spectra for split in found}):
            runs = [(name, found[split]) for name, found in zip(names, spectra) if split in found]
            labels = [f"{name}: {json.loads(path.read_text()).get('name', split)}" for name, path in runs]
            written.append(plot_spectra([path for _, path in runs], out, names=labels, filename=f"spectrum-{split}.png"))
    return written

"""The study's statistics (``study.tables``, ``study/run.py``): t-intervals, paired differences, Kendall τ-b
and its bootstrap interval over runs. Plain functions over lists of numbers; deterministic for a given seed."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its two-sided t-interval: ``t_{(1+c)/2, n−1} · s / √n`` (``s``: n−1 std).

    NaN half-width for fewer than two values (no spread to estimate).
    """
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return (float(x.mean()) if len(x) else float("nan")), float("nan")
    half = stats.t.ppf((1 + confidence) / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return float(x.mean()), float(half)


def paired(
    values: dict[int, float], reference: dict[int, float], higher_is_better: bool = True, confidence: float = 0.95
) -> dict | None:
    """``values − reference`` on the seeds both have: mean, t-interval half-width, n, and the seeds in favour
    (the difference is > 0 where higher is better, < 0 where lower is). None when no seed is shared."""
    seeds = sorted(set(values) & set(reference))
    if not seeds:
        return None
    diffs = [values[s] - reference[s] for s in seeds]
    mean, half = mean_ci(diffs, confidence)
    favour = sum(1 for d in diffs if (d > 0 if higher_is_better else d < 0))
    return {"mean": mean, "ci95": half, "n": len(diffs), "in_favour": favour, "seeds": seeds, "values": diffs}


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, int]:
    """Kendall's τ-b between ``x`` and ``y`` (``scipy.stats.kendalltau``), its two-sided p-value, and n.

    Pairs with a NaN (or None) are dropped; NaN τ for fewer than three pairs or a constant side.
    """
    from scipy import stats

    pairs = [(a, b) for a, b in zip(x, y) if _finite(a) and _finite(b)]
    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return float("nan"), float("nan"), len(pairs)
    result = stats.kendalltau([a for a, _ in pairs], [b for _, b in pairs])
    return float(result.statistic), float(result.pvalue), len(pairs)


def bootstrap_tau(
    x: Sequence[float],
    y: Sequence[float],
    groups: Sequence[Hashable] | None = None,
    *,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Kendall τ-b of ``(x, y)`` with a percentile bootstrap interval that resamples *groups* (runs).

    ``groups[i]`` names the run point ``i`` belongs to (None: every point its own group): each resample draws
    as many groups as there are, with replacement (``numpy.random.default_rng(seed).integers``), and keeps every
    point of each drawn group, so checkpoints of one run stay together. Points with a non-finite side are
    dropped first. The interval is ``numpy.percentile`` (linear) of the resampled τ at ``(1 ∓ c)/2``, over the
    resamples where τ is defined. Returns ``{"tau", "p", "n", "groups", "lo", "hi", "resamples"}``.
    """
    keep = [i for i in range(len(x)) if _finite(x[i]) and _finite(y[i])]
    xs = np.asarray([float(x[i]) for i in keep])
    ys = np.asarray([float(y[i]) for i in keep])
    labels = [i if groups is None else groups[i] for i in keep]
    tau, p, n = kendall_tau(xs, ys)
    names = list(dict.fromkeys(labels))
    members = {name: [i for i, label in enumerate(labels) if label == name] for name in names}
    rng = np.random.default_rng(seed)
    taus = []
    for _ in range(resamples if len(names) >= 2 else 0):
        drawn = rng.integers(0, len(names), len(names))
        index = [i for g in drawn for i in members[names[g]]]
        t = kendall_tau(xs[index], ys[index])[0]
        if math.isfinite(t):
            taus.append(t)
    lo = hi = float("nan")
    if taus:
        lo, hi = (float(v) for v in np.percentile(taus, [100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2]))
    return {"tau": tau, "p": p, "n": n, "groups": len(names), "lo": lo, "hi": hi, "resamples": len(taus)}


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value)

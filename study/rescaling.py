"""The study's reparameterisation control: a function-preserving rescaling of the network, and which flatness
measures change under it (``study/run.py``; the relative-flatness paper's "reparameterization curse").

A LayerNorm followed by a linear layer computes ``W (γ ⊙ n(x) + β) + b``; multiplying ``γ`` and ``β`` by ``α`` and
``W`` by ``1/α`` leaves every output unchanged (up to rounding), so a measure of generalization should not move. In
BERT, the last encoder layer's output LayerNorm feeds the pooler's dense layer, which feeds the classifier through a
tanh: rescaling that pair changes ``bert.pooler.dense``'s weight and input while the model's function stays put.
Measured on that layer, the Hessian trace and top eigenvalue scale by ``α²`` and SAM sharpness moves, κ does not
(same probes: ``WR/α`` against ``α² H``); the Jacobian norm is a property of the function alone."""

from __future__ import annotations

import copy

import torch
from torch import nn


def rescale_norm_and_next(model: nn.Module, norm: str, linear: str, alpha: float) -> nn.Module:
    """A copy of ``model`` with ``norm``'s weight and bias × ``alpha`` and ``linear``'s weight × ``1/alpha``."""
    if not alpha > 0:
        raise ValueError(f"alpha={alpha} must be > 0 (a rescaling by a negative factor is not a LayerNorm's)")
    rescaled = copy.deepcopy(model)
    modules = dict(rescaled.named_modules())
    missing = [name for name in (norm, linear) if name not in modules]
    if missing:
        candidates = [n for n, m in modules.items() if isinstance(m, (nn.LayerNorm, nn.Linear))][-6:]
        raise ValueError(f"no module named {missing} in the model; the last norms/linears are {candidates}")
    with torch.no_grad():
        modules[norm].weight.mul_(alpha)
        if modules[norm].bias is not None:
            modules[norm].bias.mul_(alpha)
        modules[linear].weight.div_(alpha)
    return rescaled


def rescaling_control(
    model: nn.Module,
    batches: list[dict],
    *,
    norm: str,
    linear: str,
    alphas: list[float],
    layers: list[str],
    measures: list[str],
    tolerance: float = 1e-3,
    **options,
) -> dict:
    """Each measure of each of ``layers`` before and after :func:`rescale_norm_and_next` by each ``alpha``.

    Returns ``{"norm", "linear", "max_output_change", "rows": [{layer, measure, alpha, before, after, ratio,
    flagged}]}``: ``max_output_change`` is the largest ``|Δ logit|`` over the batches and alphas (the rescaling
    preserves the function when it is at rounding level); a row is flagged when ``|after/before − 1| > tolerance``.
    ``options`` go to :func:`fam_hf.callback.measure_batches` (estimator, probes, seed …).
    """
    from fam_hf.callback import measure_batches

    model.eval()
    rows, change = [], 0.0
    before = {layer: measure_batches(model, batches, measures, layer=layer, **options) for layer in layers}
    for alpha in alphas:
        rescaled = rescale_norm_and_next(model, norm, linear, alpha).eval()
        with torch.no_grad():
            for batch in batches:
                change = max(change, float((model(**batch).logits - rescaled(**batch).logits).abs().max()))
        for layer in layers:
            after = measure_batches(rescaled, batches, measures, layer=layer, **options)
            for name in measures:
                b, a = sum(before[layer][name]) / len(batches), sum(after[name]) / len(batches)
                ratio = a / b if b else float("nan")
                rows.append({"layer": layer, "measure": name, "alpha": alpha, "before": b, "after": a, "ratio": ratio,
                             "flagged": not abs(ratio - 1) <= tolerance})  # fmt: skip
    return {"norm": norm, "linear": linear, "tolerance": tolerance, "max_output_change": change, "rows": rows}

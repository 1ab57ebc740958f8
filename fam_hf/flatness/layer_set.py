"""κ summed over a set of layers for the price of one probe (docs/mathematics.md#layer-sets).

Each layer ``l`` of the set gets its own Rademacher ``R_l`` and adds ``δ · W_l R_l φ_l`` to its output, under *one*
scalar ``δ`` per probe. That is the weight perturbation ``W_l → W_l + δ W_l R_l`` of every layer at once, so
``d²L/dδ² = vec(WR)ᵀ H vec(WR)`` with ``H`` the joint Hessian of all the layers' weights; its cross blocks
``l ≠ l'`` enter only through ``R_l`` and ``R_l'`` together, which are independent and zero-mean, so they vanish
in expectation and the mean over probes is ``Σ_l κ_l``. The Gauss–Newton form alike, with the joint Gauss–Newton
matrix. One double backward (probe) or one tangent of the logits (Gauss–Newton) per probe, however many layers;
the price is variance (the cross terms are noise).

Only the probe and Gauss–Newton estimators take a set: the closed form is exact for the output head alone, and
the exact estimator builds one layer's Hessian. :func:`choose_for_set` is the registry's choice for a set.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from ..curvature import compute_dtype, rademacher
from ..layers import Layer, LayerSet, resolve_spec
from .base import Recording
from .probe import GaussNewtonFlatness, ProbeFlatness, _directions

__all__ = ["GaussNewtonSetFlatness", "ProbeSetFlatness", "SET_ESTIMATORS", "choose_for_set"]


class _Handles:
    """Several hook handles removed together."""

    def __init__(self, handles: list[torch.utils.hooks.RemovableHandle]) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _LayerSetMixin:
    """What a set estimator adds to its one-layer estimator: the set (``self.layer`` is a
    :class:`~fam_hf.layers.LayerSet`), one hook per layer, and the refusal of ``hessian_grad="detached"``."""

    layer: LayerSet

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("normalize_features"):
            raise ValueError(
                "normalize_features=True is for one layer (each layer's features by their own spread); measure each "
                "layer of the set on its own and add the κ's"
            )
        super().__init__(*args, **kwargs)
        self.description = f"{self.estimator}, one probe over {len(self.layer)} layers (Σ κ_l)"

    @classmethod
    def resolve(cls, model: nn.Module, spec: Any) -> LayerSet:
        target = spec if isinstance(spec, LayerSet) else resolve_spec(model, spec)
        return target if isinstance(target, LayerSet) else LayerSet(spec=target.name, layers=(target,))

    @classmethod
    def refusal(cls, model: nn.Module, layer: Layer | LayerSet, *, loss: str = "model", **options: Any) -> str | None:
        reason = super().refusal(model, layer, loss=loss, **options)
        if reason is None and options.get("head_loss") is not None:
            reason = (
                f"head_loss= with a set of layers ({_spec(layer)}) is not supported: the set's one probe reads the "
                "model's own loss; measure each layer of the set with head_loss=, or give the model its loss"
            )
        if reason is None and options.get("hessian_grad", "full") == "detached":
            reason = (
                f"hessian_grad='detached' on a set of layers ({_spec(layer)}): with one δ for every layer a layer's "
                "direction depends on the layers before it, so the Hessian cannot be held constant per layer; use "
                "hessian_grad='full', or one layer"
            )
        return reason

    def _attach(self) -> _Handles:
        # prepend: run before hooks that release gathered weights after the forward (DeepSpeed ZeRO-3)
        return _Handles([
            layer.module.register_forward_hook(functools.partial(self._layer_hook, index), prepend=True)
            for index, layer in enumerate(self.layer.layers)
        ])  # fmt: skip

    def _layer_hook(self, index: int, module: nn.Module, inputs: tuple, output: Any) -> torch.Tensor | None:
        recording = self._live_recording()
        return None if recording is None else recording.on_layer_forward(index, inputs[0] if inputs else None, output)


class _SetRecording(Recording):
    """One forward pass through every layer of the set: each layer's first call draws its ``R_l: (P, m_l, m_l)``
    (in the order the layers run, which a model fixes: ranks and resumed runs draw alike) and every call adds
    ``Σ_p δ_p W_l R_{l,p} φ_l`` with the set's one ``δ: (P,)``."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        count = len(self.flatness.layer)
        self.layer_calls = [0] * count
        self.layer_with_grad = [False] * count
        self.layer_probes: list[torch.Tensor | None] = [None] * count  # R_l: (P, m_l, m_l)
        self.delta: torch.Tensor | None = None
        # hessian_grad='full' only (the mixin refuses 'detached'): the forms differentiate δ alone, so no output or
        # direction is kept; the list's length is the number of probes
        self.output, self.directions, self.detached_directions = None, [None] * self.flatness.probes, None
        self.fan_in = 1  # fam_scale='reference' divides each layer's κ by its own fan-in, in the directions

    def on_layer_forward(self, index: int, features: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        fam, layer = self.flatness, self.flatness.layer.layers[index]
        first_call = self.layer_calls[index] == 0
        self.layer_calls[index] += 1
        self.calls += 1
        weight = layer.weight()
        if weight.dim() != 2 or weight.numel() == 0:
            raise RuntimeError(
                f"the weight of '{layer.name}' (in the set {fam.layer.spec!r}) is partitioned even inside its forward "
                f"pass ({tuple(weight.shape)}); relative flatness needs the whole matrix: use DDP"
            )
        fan_in = weight.shape[1]
        if first_call:
            self.layer_with_grad[index] = torch.is_grad_enabled()
            self.layer_probes[index] = rademacher(
                fam.probes, fan_in, fan_in, generator=fam.generator, dtype=weight.dtype, device=weight.device
            )
            if self.delta is None:
                self.delta = torch.zeros(
                    fam.probes, dtype=compute_dtype(weight.dtype), device=weight.device, requires_grad=True
                )
        directions = _directions(features, self.layer_probes[index], weight)
        if fam.scale == "reference":  # q is quadratic in u_l: u_l/√m_l makes E[q] = Σ_l κ_l/m_l
            directions = [u / math.sqrt(fan_in) for u in directions]
        return output + sum(d * u for d, u in zip(self.delta.to(output.dtype), directions))

    def check(self) -> None:
        names = self.flatness.layer.names
        spec = self.flatness.layer.spec
        missing = [name for name, calls in zip(names, self.layer_calls) if calls == 0]
        if missing:
            raise RuntimeError(
                f"{len(missing)} of the {len(names)} layers of the set {spec!r} did not run during the forward pass "
                f"inside record(): {', '.join(missing[:5])}{', …' if len(missing) > 5 else ''}; their κ would be left "
                "out of the sum silently. Leave them out of the set, or compute the loss through them"
            )
        no_grad = [name for name, with_grad in zip(names, self.layer_with_grad) if not with_grad]
        if self.differentiable and no_grad:
            raise RuntimeError(
                f"layers of the set {spec!r} ran only under torch.no_grad() inside record(): "
                f"{', '.join(no_grad[:5])}{', …' if len(no_grad) > 5 else ''}; the penalty would train nothing "
                "through them. Run the loss's forward pass with gradients enabled"
            )


class ProbeSetFlatness(_LayerSetMixin, ProbeFlatness):
    """The probe (the loss's Hessian) over a set of layers: unbiased for ``Σ_l κ_l``, any loss."""

    class Recording(_SetRecording, ProbeFlatness.Recording):
        pass


class GaussNewtonSetFlatness(_LayerSetMixin, GaussNewtonFlatness):
    """The Gauss–Newton probe over a set of layers: unbiased for ``Σ_l κ_GN,l``, each ≥ 0 (one tangent of the
    logits per probe); the model's own cross-entropy/MSE/BCE loss."""

    class Recording(_SetRecording, GaussNewtonFlatness.Recording):
        pass


SET_ESTIMATORS: dict[str, type[ProbeFlatness]] = {"probe": ProbeSetFlatness, "gauss_newton": GaussNewtonSetFlatness}
# What "auto" tries on a set, in order, for each purpose (a penalty needs κ bounded below: Gauss–Newton first)
SET_AUTO = {"measure": ("probe",), "penalty": ("gauss_newton", "probe")}


def choose_for_set(
    model: nn.Module, layers: LayerSet, estimator: str, options: dict[str, Any], *, purpose: str, loss: str
) -> type[ProbeFlatness]:
    """The estimator class for ``Σ_l κ_l`` over ``layers`` (the registry's :func:`~fam_hf.flatness.choose` for a
    set). Raises ValueError naming the problem and the fix where none applies."""
    spec = _spec(layers)
    if loss == "fused":
        raise ValueError(
            f"fam_layer={layers.spec!r} names {len(layers)} layers, but the loss runs through a fused LM head (TRL's "
            "SFTTrainer), which never calls the head module and has no second derivative: only the LM head's closed "
            "form can train there. Use fam_layer='auto', or train the set with FAMTrainer (full logits)"
        )
    if estimator in ("closed_form", "exact"):
        why = (
            "the closed form is exact for the model's output head alone (the cross terms between positions vanish "
            "only there)"
            if estimator == "closed_form"
            else "the exact estimator builds one layer's full Hessian"
        )
        raise ValueError(
            f"estimator={estimator!r} on a set of layers ({spec}): {why}; a set takes estimator='gauss_newton' or "
            "'probe' (one probe for the whole set), or name one layer"
        )
    names = SET_AUTO[purpose] if estimator == "auto" else (estimator,)
    reasons = []
    for name in names:
        reason = SET_ESTIMATORS[name].refusal(model, layers, loss=loss, **options)
        if reason is None:
            return SET_ESTIMATORS[name]
        reasons.append(reason)
    raise ValueError(reasons[-1])


def _spec(layer: Layer | LayerSet) -> str:
    return f"{layer.spec!r}, {len(layer)} layers" if isinstance(layer, LayerSet) else repr(layer.name)

"""Relative flatness of one layer of a model, from the model's own forward pass.

:class:`RelativeFlatness` resolves the layer and the estimator once; :meth:`RelativeFlatness.record`
hooks the layer for one forward pass (capturing ``φ`` and ``z``, and adding the probe or exact
perturbation to ``z``), and :meth:`Recording.result` turns the loss (or, for the Gauss–Newton estimator, the
logits) of that pass into κ. No second forward pass is ever run. :func:`relative_flatness` is the one-call
version for measurement.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .estimators import (
    UnusedPerturbationError,
    closed_form,
    compute_dtype,
    explain_missing_double_backward,
    gauss_newton_forms,
    kappa_from_hessian,
    layer_hessian,
    logit_tangents,
    probe_quadratic_forms,
    rademacher,
    sample_positions,
)
from .head_loss import head_loss_for
from .layers import Layer, resolve_layer
from .norms import differentiable_layer_norm

ESTIMATORS = ("auto", "closed_form", "probe", "gauss_newton", "exact")
HESSIAN_GRADS = ("full", "detached")
SCALES = ("paper", "reference")
DEFAULT_MAX_EXACT_ENTRIES = 4096  # d·m; the Hessian has (d·m)² entries and costs d·m double-backwards


@dataclass
class FlatnessResult:
    """κ of one layer on one batch.

    Attributes:
        value: scalar κ (differentiable when requested; its gradient follows ``hessian_grad``).
        std_error: the probe estimators' standard error (std of the per-probe values / √probes), else None.
        estimator: the estimator that produced it: ``"closed_form"``, ``"probe"``, ``"gauss_newton"`` or
            ``"exact"``.
        layer: the layer's module name.
        probes: number of probes (probe and Gauss–Newton estimators only).
    """

    value: torch.Tensor
    std_error: torch.Tensor | None
    estimator: str
    layer: str
    probes: int | None = None

    def __float__(self) -> float:
        return float(self.value)


def penalty_estimator(model: nn.Module, layer: str = "auto", hessian_grad: str = "full") -> str:
    """The estimator ``fam_estimator="auto"`` trains with: what a penalty needs, not what a measurement reports.

    The closed form on the output head under a loss it mirrors; on any other layer under such a loss, the
    Gauss–Newton estimator, whose curvature is positive semi-definite, so ``λ·κ ≥ 0`` and minimising it cannot
    run away (a body layer's Hessian is indefinite away from a minimum, and the probe's κ there has no lower
    bound: issue 13's study drove it to −3,000); the probe otherwise (any other loss, or
    ``hessian_grad="detached"``, which Gauss–Newton does not take). Measurement (``estimator="auto"`` of
    :class:`RelativeFlatness`) keeps the probe on a body layer: the paper's κ, with the full Hessian.
    """
    if _closed_form_applies(model, resolve_layer(model, layer)):
        return "closed_form"
    return "gauss_newton" if head_loss_for(model) is not None and hessian_grad == "full" else "probe"


def _closed_form_applies(model: nn.Module, target: Layer) -> bool:
    """True where κ has a closed form: ``target`` is the output head and the model's loss is one it mirrors."""
    return target.is_output_head and head_loss_for(model) is not None


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


class RelativeFlatness:
    """Relative flatness κ of one layer of ``model`` (Petzka et al., NeurIPS 2021).

    Args:
        model: a transformers model (optionally PEFT- or DDP-wrapped).
        layer: ``"auto"`` (the output head) or a module name/glob; see :func:`fam_hf.resolve_layer`.
        estimator: ``"closed_form"`` (exact, output heads under cross-entropy/MSE/BCE), ``"probe"``
            (Hutchinson-style, any layer, any loss), ``"gauss_newton"`` (the probe with the Hessian's
            positive semi-definite Gauss–Newton part: κ ≥ 0 on any layer; the model's own cross-entropy/MSE/BCE
            loss, as the closed form), ``"exact"`` (full layer Hessian, small layers), or ``"auto"``: the
            closed form where it applies, else the probe (the paper's κ; ``FAMTrainer``'s ``"auto"`` trains a
            body layer with Gauss–Newton instead: :func:`penalty_estimator`).
        probes: Rademacher probes per estimate (probe and Gauss–Newton estimators).
        hessian_grad: ``"full"`` (true gradient of κ, Hessian included) or ``"detached"`` (Hessian held
            constant, as the reference implementation does).
        scale: ``"paper"`` (κ as defined) or ``"reference"`` (each block trace divided by ``m``, as the
            reference implementation's neuron-wise mode does, so its published λ values carry over).
        generator: RNG for the probes and the token sample; default: a fresh ``torch.Generator`` seeded with 0.
        max_exact_entries: largest ``d·m`` the exact estimator accepts.
        token_fraction: closed form only: evaluate κ on ``⌈f·N⌉`` of the ``N`` positions, drawn uniformly
            among those the loss counts and reweighted so the estimate stays unbiased (1: all, exact).

    Raises:
        ValueError: unknown layer (lists candidates), an estimator that cannot apply to this layer or
            model, or a bad option value.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str = "auto",
        estimator: str = "auto",
        *,
        probes: int = 1,
        hessian_grad: str = "full",
        scale: str = "paper",
        generator: torch.Generator | None = None,
        max_exact_entries: int = DEFAULT_MAX_EXACT_ENTRIES,
        token_fraction: float = 1.0,
    ) -> None:
        _check_choice("estimator", estimator, ESTIMATORS)
        _check_choice("hessian_grad", hessian_grad, HESSIAN_GRADS)
        _check_choice("scale", scale, SCALES)
        if probes < 1:
            raise ValueError(f"probes={probes} must be at least 1")
        if not 0 < token_fraction <= 1:
            raise ValueError(f"token_fraction={token_fraction} must be in (0, 1]")
        self.model = model
        self.layer: Layer = resolve_layer(model, layer)
        self.probes = probes
        self.hessian_grad = hessian_grad
        self.scale = scale
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.max_exact_entries = max_exact_entries
        self.estimator = self._choose(estimator)
        self.token_fraction = token_fraction
        if token_fraction < 1 and self.estimator != "closed_form":
            raise ValueError(
                f"token_fraction={token_fraction} subsamples the positions of the closed form, but '{self.layer.name}' "
                f"uses the {self.estimator} estimator; leave token_fraction at 1 (fewer probes make the probe cheaper)"
            )
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._recording: Recording | None = None

    def _choose(self, estimator: str) -> str:
        closed_form_ok = _closed_form_applies(self.model, self.layer)
        if estimator == "auto":
            return "closed_form" if closed_form_ok else "probe"
        if estimator == "gauss_newton":
            if head_loss_for(self.model) is None:
                raise ValueError(
                    f"estimator='gauss_newton' needs the curvature of the loss in the logits, and "
                    f"{type(self.model).__name__}'s loss is not one it mirrors (causal-LM or sequence-classification "
                    "cross-entropy, MSE, BCE, on unmodified logits); use estimator='probe'"
                )
            if self.hessian_grad == "detached":
                raise ValueError(
                    "estimator='gauss_newton' differentiates its curvature in full; hessian_grad='detached' is for "
                    "the probe and the closed form (use hessian_grad='full')"
                )
        if estimator == "closed_form" and not closed_form_ok:
            why = (
                f"'{self.layer.name}' is not the model's output head"
                if not self.layer.is_output_head
                else f"{type(self.model).__name__}'s loss is not one the closed form mirrors "
                "(causal-LM or sequence-classification cross-entropy, MSE, BCE, on unmodified logits)"
            )
            raise ValueError(f"estimator='closed_form' cannot apply: {why}; use estimator='probe' (or 'auto')")
        if estimator == "exact":
            d, m = self.layer.shape
            if d * m > self.max_exact_entries:
                raise ValueError(
                    f"estimator='exact' on '{self.layer.name}' ({d}×{m} = {d * m} weights) would build a "
                    f"{d * m}² Hessian with {d * m} double-backward passes; it is meant for layers of at most "
                    f"{self.max_exact_entries} weights (max_exact_entries). Use estimator='probe' or 'closed_form'"
                )
        return estimator

    @contextmanager
    def record(
        self,
        batch: Mapping[str, Any] | None = None,
        *,
        num_items_in_batch: torch.Tensor | int | None = None,
        differentiable: bool = True,
    ) -> Iterator[Recording]:
        """Hook the layer for the forward pass run inside the ``with`` block.

        Everything that needs the layer's weight is computed inside the layer's forward, where the weight
        is whole even when FSDP or ZeRO-3 shards it between forward passes.

        The hook stays on the layer afterwards (until :meth:`close` or the next ``record``) so that a
        layer inside a non-reentrant activation-checkpointed block, which runs again during the backward
        pass, gets the same perturbation in its recomputation. Forward passes outside ``record`` and
        outside a backward pass (evaluation, say) are left alone.

        Args:
            batch: the inputs of that forward pass; the closed form reads ``labels`` (and ``input_ids``
                for decoder classifiers, which pool the last non-padding token).
            num_items_in_batch: the denominator the model's loss uses, when it is given one.
            differentiable: whether :meth:`Recording.result` must return a κ that can be back-propagated
                (a training penalty) or only its value (measurement; cheaper).
        """
        if self.estimator != "closed_form":
            _refuse_reentrant_checkpointing(self.model)
            _refuse_sharded_parameters(self.model)
        if self._handle is None:
            # prepend: run before hooks that release gathered weights after the forward (DeepSpeed ZeRO-3)
            self._handle = self.layer.module.register_forward_hook(self._hook, prepend=True)
        recording = Recording(self, batch or {}, num_items_in_batch, differentiable)
        self._recording, recording.open = recording, True
        try:
            with self._forward_context(differentiable):
                yield recording
        finally:
            recording.open = False

    def _forward_context(self, differentiable: bool):
        stack = ExitStack()
        if self.estimator != "closed_form":
            stack.enter_context(torch.enable_grad())
        stack.enter_context(self.kernels(differentiable))
        return stack

    def kernels(self, differentiable: bool = False):
        """Context in which the model's kernels have the derivatives the second-order estimators need.

        SDPA's flash and memory-efficient kernels have no double backward; its math kernel has. And when κ
        must be differentiated (``differentiable``: a penalty's gradient is a third derivative), LayerNorm runs
        from primitive ops, since torch's fused kernel gets third derivatives wrong (:mod:`fam_hf.norms`).
        :meth:`record` and the second-order pass use it; under activation checkpointing the backward pass
        recomputes the blocks and must run inside it too (``FAMTrainer`` runs its whole training step inside
        it), or the recomputation takes a different kernel than the forward. A no-op for the closed form.
        """
        if self.estimator == "closed_form":
            return nullcontext()
        stack = ExitStack()
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        if differentiable:
            stack.enter_context(differentiable_layer_norm())
        return stack

    def close(self) -> None:
        """Remove the layer hook."""
        if self._handle is not None:
            self._handle.remove()
        self._handle, self._recording = None, None

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        recording = self._recording
        if recording is None:
            return None
        if not recording.open and torch._C._current_graph_task_id() == -1:
            return None  # an ordinary forward pass after the recorded one: not ours
        return recording._on_forward(inputs[0], output)


def _checkpointing(model: nn.Module) -> list[dict | None]:
    """The keyword arguments of every active activation checkpoint in ``model`` (transformers' layers); None
    where the checkpoint function is not a ``functools.partial`` we can read."""
    return [
        getattr(getattr(module, "_gradient_checkpointing_func", None), "keywords", None)
        for module in model.modules()
        if getattr(module, "gradient_checkpointing", False) is True
    ]


def _refuse_reentrant_checkpointing(model: nn.Module) -> None:
    # torch.utils.checkpoint is reentrant unless told otherwise (peft's prepare_model_for_kbit_training passes
    # no use_reentrant, for instance)
    if any(kwargs is not None and kwargs.get("use_reentrant", True) for kwargs in _checkpointing(model)):
        raise ValueError(
            "the probe and exact estimators take torch.autograd.grad through the model, which reentrant "
            "activation checkpointing does not support; enable it with "
            "gradient_checkpointing_kwargs={'use_reentrant': False} (transformers' default; "
            "prepare_model_for_kbit_training needs it passed explicitly), or put FAM on the output head with the "
            "closed form"
        )


def _refuse_sharded_parameters(model: nn.Module) -> None:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if any(isinstance(module, (FSDPModule, FullyShardedDataParallel)) for module in model.modules()):
        raise ValueError(
            "the probe and exact estimators differentiate twice through layers whose weights FSDP frees after "
            "the forward pass, which FSDP does not support; put FAM on the output head with the closed form "
            "(verified under FSDP2), or train with DDP"
        )
    if any(hasattr(parameter, "ds_id") for parameter in model.parameters()):
        raise ValueError(
            "the probe and exact estimators differentiate twice through layers whose weights DeepSpeed ZeRO-3 frees "
            "after the forward pass; put FAM on the output head with the closed form (verified under ZeRO-3), or "
            "train with DDP"
        )


class Recording:
    """What one forward pass left at the layer; created by :meth:`RelativeFlatness.record`."""

    def __init__(
        self,
        flatness: RelativeFlatness,
        batch: Mapping[str, Any],
        num_items_in_batch: torch.Tensor | int | None,
        differentiable: bool,
    ) -> None:
        self.flatness = flatness
        self.batch = batch
        self.num_items_in_batch = num_items_in_batch
        self.differentiable = differentiable
        self.output: torch.Tensor | None = None  # z as the model saw it (perturbed for probe/exact): (..., d)
        self.calls = 0
        self.with_grad = False  # whether gradients were enabled in the layer's first recorded forward
        self.open = False  # inside the `record` block
        self._fan_in: int | None = None  # m
        self._closed_form: torch.Tensor | None = None  # κ, closed form
        self._weight: torch.Tensor | None = None  # W, exact estimator
        self._perturbation: torch.Tensor | None = None  # E: (d, m), exact estimator
        self._probe_matrices: torch.Tensor | None = None  # (P, m, m)
        self._delta: torch.Tensor | None = None  # (P,)
        self._directions: list[torch.Tensor] = []  # u_p = W R_p φ, shaped like z
        self._detached_directions: list[torch.Tensor] | None = None  # u_p with φ detached ("detached" grads)

    def _on_forward(self, features: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        # Called for the recorded forward and again for any recomputation of it (activation
        # checkpointing), which must see the same perturbation.
        fam, first_call = self.flatness, self.calls == 0
        self.calls += 1
        weight = fam.layer.weight()
        if weight.dim() != 2 or weight.numel() == 0:
            raise RuntimeError(
                f"the weight of '{fam.layer.name}' is partitioned even inside its forward pass ({tuple(weight.shape)});"
                " relative flatness needs the whole matrix: use DDP or FSDP2 (which gathers it per block)"
            )
        if first_call:
            self._fan_in = weight.shape[1]
            self.with_grad = torch.is_grad_enabled()
        if fam.estimator == "closed_form":
            if first_call:
                self.output = output
                self._closed_form = self._closed_form_value(weight, features, output)
            return None
        if fam.estimator == "exact":
            if first_call:
                self._perturbation = torch.zeros_like(weight, requires_grad=True)
                self._weight = weight if self.differentiable else weight.detach()
            perturbed = output + F.linear(features, self._perturbation.to(features.dtype))
        else:
            if first_call:
                self._draw_probes(weight)
            directions = _directions(features, self._probe_matrices, weight)
            perturbed = output + sum(d * u for d, u in zip(self._delta.to(output.dtype), directions))
            detached = None
            if fam.hessian_grad == "detached" and self.differentiable:
                # built on every call: a checkpoint's recomputation must save what its forward saved
                detached = _directions(features.detach(), self._probe_matrices, weight)
            if first_call:
                self._directions, self._detached_directions = directions, detached
        if first_call:
            self.output = perturbed
        return perturbed

    def _draw_probes(self, weight: torch.Tensor) -> None:
        count, m = self.flatness.probes, weight.shape[1]
        self._probe_matrices = rademacher(
            count, m, generator=self.flatness.generator, dtype=weight.dtype, device=weight.device
        )
        self._delta = torch.zeros(count, dtype=compute_dtype(weight.dtype), device=weight.device, requires_grad=True)

    def _closed_form_value(self, weight, features, output) -> torch.Tensor:
        fam = self.flatness
        labels = self.batch.get("labels")
        if labels is None:
            raise ValueError("the closed-form estimator needs the batch's labels: record(batch) with 'labels'")
        head_loss = head_loss_for(fam.model, labels)
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            if fam.hessian_grad == "detached" or not self.differentiable:
                output, features = output.detach(), features.detach()
            output, features, weights = head_loss.positions(
                output,
                features,
                labels,
                input_ids=self.batch.get("input_ids"),
                num_items_in_batch=self.num_items_in_batch,
            )
            if fam.token_fraction < 1:
                output, features, weights = _sample_positions(
                    output, features, weights, fam.token_fraction, fam.generator
                )
            return closed_form(weight, features, output, weights, head_loss.loss_type)

    def result(self, loss: torch.Tensor | None, *, logits: torch.Tensor | None = None) -> FlatnessResult:
        """κ for the recorded forward pass.

        Args:
            loss: the scalar loss of that pass (the probe and exact estimators differentiate it).
            logits: the logits the model returned, to check that the closed form saw the loss's logits.
        """
        fam, layer = self.flatness, self.flatness.layer
        if self.calls == 0:
            raise RuntimeError(
                f"layer '{layer.name}' did not run during the forward pass inside record(), so κ would train nothing. "
                "A loss that multiplies the hidden states by the head's weight itself never calls the head (TRL's "
                "SFTTrainer does, with its fused LM head): use fam_hf.trl.FAMSFTTrainer, which takes κ from the head's "
                "input, or compute the loss through the layer"
            )
        if self.differentiable and not self.with_grad:
            raise RuntimeError(
                f"layer '{layer.name}' ran only under torch.no_grad() inside record(), so the loss was not computed "
                "through it and the penalty would train nothing. TRL's SFTTrainer, for one, runs its LM head only in a "
                "no-grad forward for the logits (its loss uses a fused head): use fam_hf.trl.FAMSFTTrainer there; "
                "elsewhere run the loss's forward pass with gradients enabled"
            )
        scale = 1.0 / self._fan_in if fam.scale == "reference" else 1.0
        std_error = None
        if fam.estimator == "closed_form":
            if logits is not None and logits.shape[-1] != self.output.shape[-1]:
                raise ValueError(
                    f"the model's logits ({tuple(logits.shape)}) are not the output of '{layer.name}' "
                    f"({tuple(self.output.shape)}); use estimator='probe'"
                )
            value = self._closed_form
        else:
            if loss is None:
                raise ValueError("the model returned no loss: the batch needs labels")
            value, std_error = self._second_order(loss, logits)
        return FlatnessResult(
            value=value * scale,
            std_error=None if std_error is None else std_error * scale,
            estimator=fam.estimator,
            layer=layer.name,
            probes=fam.probes if fam.estimator in ("probe", "gauss_newton") else None,
        )

    @explain_missing_double_backward()
    def _second_order(
        self, loss: torch.Tensor, logits: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        with self.flatness.kernels(self.differentiable):  # checkpointed blocks are recomputed here
            return self._second_order_values(loss, logits)

    def _second_order_values(
        self, loss: torch.Tensor, logits: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        fam = self.flatness
        if fam.estimator in ("probe", "gauss_newton"):
            values = self._probe_values(loss) if fam.estimator == "probe" else self._gauss_newton_values(logits)
            std_error = values.detach().std() / math.sqrt(values.numel()) if values.numel() > 1 else None
            return values.mean(), std_error
        full = self.differentiable and fam.hessian_grad == "full"
        if not self.output.requires_grad:
            raise RuntimeError(self._unused_message())
        try:
            hessian = layer_hessian(loss, self._perturbation, create_graph=full)
        except RuntimeError as error:
            if "not have been used in the graph" not in str(error):
                raise
            raise RuntimeError(self._unused_message()) from error
        return kappa_from_hessian(hessian.to(self._weight.dtype), self._weight), None

    def _unused_message(self) -> str:
        return (
            f"the loss does not depend on the output of '{self.flatness.layer.name}' as the recorded forward pass "
            "computed it (the perturbation of the probe/exact estimator never reaches the loss), so κ would be 0 and "
            "train nothing; compute the loss from that forward pass (the layer's output must feed it)"
        )

    def _probe_values(self, loss: torch.Tensor) -> torch.Tensor:
        try:
            return probe_quadratic_forms(
                loss,
                self._delta,
                self.output,
                self._directions,
                hessian_grad=self.flatness.hessian_grad,
                create_graph=self.differentiable,
                detached_directions=self._detached_directions,
                unused_is_zero=not self.differentiable,  # training: a κ that trains nothing is an error
            )
        except UnusedPerturbationError as error:
            raise RuntimeError(self._unused_message()) from error

    def _gauss_newton_values(self, logits: torch.Tensor | None) -> torch.Tensor:
        fam, labels = self.flatness, self.batch.get("labels")
        if logits is None or labels is None:
            raise ValueError(
                "the Gauss–Newton estimator needs the model's logits and the batch's labels: record(batch) with "
                "'labels', and pass the model's logits to result(loss, logits=...)"
            )
        tangents = logit_tangents(logits, self._delta, create_graph=self.differentiable)
        if tangents is None:
            if self.differentiable:
                raise RuntimeError(self._unused_message())
            return torch.zeros_like(self._delta)
        head_loss = head_loss_for(fam.model, labels)
        logits, stacked, weights = head_loss.positions(
            logits,
            torch.cat(tangents, dim=-1),  # (..., P·d): selected and pooled with the logits
            labels,
            input_ids=self.batch.get("input_ids"),
            num_items_in_batch=self.num_items_in_batch,
        )
        stacked = stacked.reshape(logits.shape[0], len(tangents), logits.shape[-1])
        return gauss_newton_forms(logits, stacked, weights, head_loss.loss_type)


def _sample_positions(
    logits: torch.Tensor, features: torch.Tensor, weights: torch.Tensor, fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fam_hf.estimators.sample_positions` applied to the closed form's logits and features."""
    chosen, weights = sample_positions(weights, fraction, generator)
    return logits[chosen], features[chosen], weights


def _directions(features: torch.Tensor, probe_matrices: torch.Tensor, weight: torch.Tensor) -> list[torch.Tensor]:
    """``u_p = W R_p φ`` for every probe, shaped like the layer's output: ``(..., d)``."""
    weight = weight.to(features.dtype)
    return [F.linear(F.linear(features, r.to(features.dtype)), weight) for r in probe_matrices]


def relative_flatness(
    model: nn.Module,
    batch: Mapping[str, Any],
    layer: str = "auto",
    estimator: str = "auto",
    *,
    probes: int = 16,
    hessian_grad: str = "full",
    scale: str = "paper",
    differentiable: bool = False,
    generator: torch.Generator | None = None,
    max_exact_entries: int = DEFAULT_MAX_EXACT_ENTRIES,
    token_fraction: float = 1.0,
) -> FlatnessResult:
    """Relative flatness κ of ``layer`` on ``batch``: one forward pass of ``model(**batch)``.

    The model is run in whatever mode it is in (call ``model.eval()`` first to measure without dropout).
    ``batch`` must hold the labels, so the model returns its loss. See :class:`RelativeFlatness` for
    the options.

    Example::

        result = fam_hf.relative_flatness(model.eval(), batch)          # closed form on the head
        print(result.value, result.estimator, result.layer)
        fam_hf.relative_flatness(model, batch, layer="model.layers.3.mlp.down_proj", probes=32)
    """
    flatness = RelativeFlatness(
        model,
        layer,
        estimator,
        probes=probes,
        hessian_grad=hessian_grad,
        scale=scale,
        generator=generator,
        max_exact_entries=max_exact_entries,
        token_fraction=token_fraction,
    )
    if differentiable and flatness.estimator != "closed_form" and _checkpointing(model):
        raise ValueError(
            "relative_flatness(differentiable=True) removes its hook on return, but the backward pass through "
            "activation-checkpointed layers must see the probe again; use RelativeFlatness(...).record() and "
            "call .close() after the backward pass"
        )
    try:
        with flatness.record(
            batch, num_items_in_batch=batch.get("num_items_in_batch"), differentiable=differentiable
        ) as recording:
            outputs = model(**batch)
        result = recording.result(outputs.get("loss"), logits=outputs.get("logits"))
    finally:
        flatness.close()  # a later backward through checkpointed layers needs RelativeFlatness.record directly
    if not differentiable:
        result.value = result.value.detach()
    return result

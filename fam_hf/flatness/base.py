"""What every estimator of κ shares: the result, the loss's normalisation, the capture on the forward pass.

An estimator is a subclass of :class:`RelativeFlatness` (one per way of computing κ: closed form, head input,
probe, Gauss–Newton, exact) whose class attributes say what it needs, and whose :class:`Recording` subclass
holds what one forward pass leaves at the layer and turns it into κ. :meth:`RelativeFlatness.record` hooks the
layer (or, for the head-input closed form, the backbone) for one forward pass; :meth:`Recording.result` turns
that pass's loss (or logits) into a :class:`FlatnessResult`, already in the loss's normalisation
(:class:`LossNorm`). No second forward pass is ever run. Which estimator applies where is decided in
:mod:`fam_hf.flatness.registry`, and only there.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..curvature import default_generator, second_order_kernels
from ..head_loss import HeadLoss, as_head_loss, head_loss_for, head_loss_value
from ..layers import Layer, LayerSet, resolve_layer, resolve_spec, unwrap_model
from ..options import ESTIMATORS, HESSIAN_GRADS, SCALES, LossKind, check_choice, get_args

DEFAULT_MAX_EXACT_ENTRIES = 4096  # d·m; the Hessian has (d·m)² entries and costs d·m double-backwards
AUTO_EXACT_ENTRIES = 1024  # d·m up to which estimator="auto" measures with the exact Hessian rather than probes
NO_LOSS = (
    "no loss to differentiate: the model returned none (give the batch its labels), or pass the loss: "
    "relative_flatness(..., loss_fn=lambda model, batch: F.cross_entropy(model(batch['x']), batch['y']))"
)


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
        samples: the per-probe values ``(probes,)`` whose mean is ``value``, detached (probe estimators only): what
            the standard error of κ summed over micro-batches that share the probes is computed from.
    """

    value: torch.Tensor
    std_error: torch.Tensor | None
    estimator: str
    layer: str
    probes: int | None = None
    samples: torch.Tensor | None = None

    def __float__(self) -> float:
        return float(self.value)


@dataclass(frozen=True)
class LossNorm:
    """How the training loss of one micro-batch is normalised, so that κ computed beside it matches it: then the
    accumulated and all-reduced penalties equal κ of the global batch (docs/mathematics.md#batches).

    Built once per micro-batch by the trainer; ``LossNorm()`` is a plain mean over the batch's counted positions
    in one process (measurement).

    Attributes:
        num_items_in_batch: ``Trainer``'s count of counted positions over the accumulation window (and, under
            token averaging, over every process), or None.
        model_takes_items: whether the model's own loss is handed ``num_items_in_batch`` and divides its sum by
            it (``Trainer`` passes it to models whose forward accepts loss kwargs).
        world_size: the factor ``Trainer`` multiplies such a loss by when it averages tokens across processes
            (DDP then averages gradients); 1 otherwise.
        accumulation_share: the micro-batch loss's share in the logged loss of its optimizer step:
            ``1 / gradient_accumulation_steps`` where ``Trainer`` divides the loss by them, else 1.
    """

    num_items_in_batch: torch.Tensor | int | None = None
    model_takes_items: bool = True
    world_size: int = 1
    accumulation_share: float = 1.0

    def items(self, loss_takes_items: bool) -> torch.Tensor | int | None:
        """The denominator of a loss's sum over positions: ``num_items_in_batch`` when that loss takes it, else
        None (the loss is a mean over its own counted positions)."""
        return self.num_items_in_batch if loss_takes_items else None

    def scale(self, loss_takes_items: bool) -> int:
        """What ``Trainer`` multiplies a loss by: the world size for a loss divided by a global token count."""
        return self.world_size if loss_takes_items and self.num_items_in_batch is not None else 1


class RelativeFlatness:
    """Relative flatness κ of one layer of ``model`` (Petzka et al., NeurIPS 2021; docs/mathematics.md).

    ``RelativeFlatness(model, layer, estimator)`` returns an instance of the estimator's own class (pathlib's
    ``Path`` does the same): ``"closed_form"`` (exact, output heads under cross-entropy/MSE/BCE), ``"probe"``
    (Hutchinson-style, any layer, any loss), ``"gauss_newton"`` (the probe with the Hessian's positive
    semi-definite Gauss–Newton part: κ ≥ 0 on any layer; the model's own cross-entropy/MSE/BCE loss), ``"exact"``
    (full layer Hessian, small layers), or ``"auto"``: the closed form where it applies, else the probe (the
    paper's κ; ``FAMTrainer``'s ``"auto"`` trains a body layer with Gauss–Newton instead:
    :func:`~fam_hf.flatness.registry.choose`).

    Args:
        model: a transformers model (optionally PEFT- or DDP-wrapped).
        layer: ``"auto"`` (the output head) or a module name/glob; see :func:`fam_hf.resolve_layer`.
        estimator: see above.
        probes: Rademacher probes per estimate (probe and Gauss–Newton estimators).
        hessian_grad: ``"full"`` (true gradient of κ, Hessian included) or ``"detached"`` (Hessian held
            constant, as the reference implementation does).
        scale: ``"paper"`` (κ as defined) or ``"reference"`` (each block trace divided by ``m``, as the
            reference implementation's neuron-wise mode does, so its published λ values carry over).
        generator: RNG for the probes and the token sample; default: a fresh ``torch.Generator`` seeded with 0.
        max_exact_entries: largest ``d·m`` the exact estimator accepts.
        token_fraction: closed form only: evaluate κ on ``⌈f·N⌉`` of the ``N`` positions, drawn uniformly
            among those the loss counts and reweighted so the estimate stays unbiased (1: all, exact).
        head_loss: for a model whose loss fam_hf does not recognise (plain torch, a custom ``loss_fn``): which
            layer is the output layer and which loss it feeds, a :class:`~fam_hf.HeadLoss` or ``"cross_entropy"``,
            ``"mse"``, ``"bce"`` (the layer measured is then the output layer, ``batch["labels"]`` its targets). The
            closed form and Gauss–Newton then apply to it; the loss actually computed is checked against it.
        normalize_features: κ of the layer with each input feature divided by its standard deviation over the
            batch's positions (and the weight's column multiplied by it, the layer's output unchanged), as the
            reference code's neuron-wise measure does: also invariant to rescaling single neurons of the layer
            that feeds this one (docs/mathematics.md#feature-normalisation). Measurement only.
        loss: ``"model"`` (the model's own loss) or ``"custom"`` (a loss computed outside the model, which the
            closed form and Gauss–Newton mirror only when ``head_loss`` says what it is).

    Raises:
        ValueError: unknown layer (lists candidates), an estimator that cannot apply to this layer or
            model, or a bad option value.

    What an estimator class declares:

    Attributes:
        estimator: its name (:attr:`FlatnessResult.estimator`, ``fam_estimator``).
        second_order: it differentiates the loss twice through the model (SDPA's math kernel, no reentrant
            checkpointing, no sharded weights, no DeepSpeed).
        needs_logits: :meth:`Recording.result` reads the model's logits.
        draws_probes: it draws Rademacher probes from :attr:`generator` (a resumed run restores it).
        reports_stderr: ``FAMTrainer`` logs its standard error (``fam/kappa_stderr``) with two probes or more.
        samples_positions: ``token_fraction < 1`` applies to it.
        description: how κ is computed, in words, where the estimator's name does not say it all (logs, model
            cards), else None.
        Recording: the :class:`Recording` subclass one forward pass fills.
    """

    estimator: ClassVar[str]
    second_order: ClassVar[bool] = False
    needs_logits: ClassVar[bool] = False
    draws_probes: ClassVar[bool] = False
    reports_stderr: ClassVar[bool] = False
    samples_positions: ClassVar[bool] = False
    description: ClassVar[str | None] = None
    Recording: ClassVar[type[Recording]]

    def __new__(cls, *args: Any, **kwargs: Any):
        if cls is RelativeFlatness:  # choose the estimator's class (for measurement)
            from .registry import choose

            arguments, loss = _measure_arguments(*args, **kwargs)
            cls = choose(*arguments, purpose="measure", loss=loss)
        return super().__new__(cls)

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
        head_loss: HeadLoss | str | None = None,
        normalize_features: bool = False,
        loss: str = "model",
    ) -> None:
        check_choice("hessian_grad", hessian_grad, HESSIAN_GRADS)
        check_choice("loss", loss, get_args(LossKind))
        check_choice("scale", scale, SCALES)
        if probes < 1:
            raise ValueError(f"probes={probes} must be at least 1")
        if not 0 < token_fraction <= 1:
            raise ValueError(f"token_fraction={token_fraction} must be in (0, 1]")
        check_choice("estimator", estimator, ESTIMATORS)
        if estimator not in ("auto", self.estimator):
            raise ValueError(
                f"{type(self).__name__} is the {self.estimator} estimator, not {estimator!r}; use "
                f"RelativeFlatness(model, layer, {estimator!r}), which returns the estimator of that name"
            )
        self.model = model
        self.layer: Layer = self.resolve(model, layer)
        self.head_loss: HeadLoss | None = as_head_loss(head_loss)
        reason = self.refusal(
            model, self.layer, loss=loss, hessian_grad=hessian_grad, max_exact_entries=max_exact_entries,
            head_loss=self.head_loss,
        )  # fmt: skip
        if reason is not None:  # the registry asked already; an estimator class built directly has not
            raise ValueError(reason)
        # the module whose output the user's head_loss reads (the logits): None for a model's own loss
        self.head: Layer | None = None
        if self.head_loss is not None:
            self.head = self.layer if self.head_loss.head is None else resolve_layer(model, self.head_loss.head)
        self.normalize_features = normalize_features
        self.probes = probes
        self.hessian_grad = hessian_grad
        self.scale = scale
        self.generator = default_generator(generator)
        self.max_exact_entries = max_exact_entries
        self.token_fraction = token_fraction
        if token_fraction < 1 and not self.samples_positions:
            raise ValueError(
                f"token_fraction={token_fraction} subsamples the positions of the closed form, but '{self.layer.name}' "
                f"uses the {self.estimator} estimator; leave token_fraction at 1 (fewer probes make the probe cheaper)"
            )
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._head_handle: torch.utils.hooks.RemovableHandle | None = None
        self._recording: Recording | None = None

    @classmethod
    def resolve(cls, model: nn.Module, spec: Any) -> Layer:
        """The one layer ``spec`` names (:func:`~fam_hf.layers.resolve_spec`); a set of several layers is refused
        here (the set estimators, :mod:`fam_hf.flatness.layer_set`, override this)."""
        target = resolve_spec(model, spec)
        if isinstance(target, LayerSet):
            raise ValueError(
                f"layer spec {spec!r} names {len(target)} layers ({', '.join(target.names[:4])}, …) and {cls.__name__} "
                "takes one; RelativeFlatness(model, spec, 'probe' or 'gauss_newton') sums κ over a set with one probe "
                "(docs/mathematics.md#layer-sets)"
            )
        return target

    @classmethod
    def refusal(cls, model: nn.Module, layer: Layer, *, loss: str = "model", **options: Any) -> str | None:
        """Why this estimator cannot compute κ of ``layer`` under ``loss`` (``"model"``: the model's own loss;
        ``"custom"``: a loss the trainer computes from the logits; ``"fused"``: a loss that never runs the head),
        or None when it can. ``options`` are the constructor's keyword arguments."""
        return None

    @property
    def hooked_module(self) -> nn.Module:
        """The module whose forward hook captures the pass (the layer itself, unless the estimator says otherwise)."""
        return self.layer.module

    @contextmanager
    def record(
        self,
        batch: Mapping[str, Any] | None = None,
        *,
        num_items_in_batch: torch.Tensor | int | None = None,
        norm: LossNorm | None = None,
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
                for decoder classifiers, which pool the last non-padding token). Labels the transformers model
                itself receives replace the batch's (PEFT's prompt learning prepends its virtual tokens' to them).
            num_items_in_batch: the denominator the model's loss uses, when it is given one (short for
                ``norm=LossNorm(num_items_in_batch)``).
            norm: how the loss is normalised (a trainer's micro-batch); overrides ``num_items_in_batch``.
            differentiable: whether :meth:`Recording.result` must return a κ that can be back-propagated
                (a training penalty) or only its value (measurement; cheaper).
        """
        if self.second_order:
            _refuse_reentrant_checkpointing(self.model)
            _refuse_sharded_parameters(self.model)
        if self._handle is None:
            self._handle = self._attach()
        if self.head is not None and self.head.module is not self.hooked_module and self._head_handle is None:
            self._head_handle = self.head.module.register_forward_hook(self._head_hook)
        norm = norm if norm is not None else LossNorm(num_items_in_batch)
        recording = self.Recording(self, batch or {}, norm, differentiable)
        self._recording, recording.open = recording, True
        try:
            with ExitStack() as stack:
                stack.callback(self._watch_labels(recording).remove)
                if self.second_order:
                    stack.enter_context(torch.enable_grad())
                stack.enter_context(self.kernels(differentiable))
                yield recording
        finally:
            recording.open = False

    def _watch_labels(self, recording: Recording) -> torch.utils.hooks.RemovableHandle:
        """Hook the transformers model's forward so that the labels its own loss sees replace the batch's: PEFT's
        prompt tuning and p-tuning prepend their virtual tokens to the input and ``-100`` for them to the labels."""

        def take_labels(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            seen = {key: kwargs[key] for key in ("labels", "shift_labels") if torch.is_tensor(kwargs.get(key))}
            if recording.open and seen:
                recording.batch = {**recording.batch, **seen}

        return unwrap_model(self.model).register_forward_pre_hook(take_labels, with_kwargs=True)

    def kernels(self, differentiable: bool = False):
        """The context in which the model's kernels have the derivatives this estimator needs
        (:func:`fam_hf.curvature.second_order_kernels`; a no-op for the first-order closed forms). :meth:`record`
        and the second-order pass use it; under activation checkpointing the backward pass recomputes the blocks
        and must run inside it too (``FAMTrainer`` runs its whole training step inside it)."""
        return second_order_kernels(differentiable) if self.second_order else nullcontext()

    def close(self) -> None:
        """Remove the layer hook."""
        for handle in (self._handle, self._head_handle):
            if handle is not None:
                handle.remove()
        self._handle, self._head_handle, self._recording = None, None, None

    def _head_hook(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        recording = self._recording
        if recording is not None and recording.open and recording.head_output is None:
            recording.head_output = output

    def _attach(self) -> torch.utils.hooks.RemovableHandle:
        # prepend: run before hooks that release gathered weights after the forward (DeepSpeed ZeRO-3)
        return self.hooked_module.register_forward_hook(self._hook, prepend=True)

    def _live_recording(self) -> Recording | None:
        """The recording a forward pass at the hooked module belongs to, or None: outside ``record``, only a
        backward pass's recomputation (activation checkpointing) of the recorded pass is ours."""
        recording = self._recording
        if recording is None or (not recording.open and torch._C._current_graph_task_id() == -1):
            return None
        return recording

    def _hook(self, module: nn.Module, inputs: tuple, output: Any) -> torch.Tensor | None:
        recording = self._live_recording()
        return None if recording is None else recording.on_forward(inputs[0] if inputs else None, output)


def _measure_arguments(
    model: nn.Module, layer: str = "auto", estimator: str = "auto", **options: Any
) -> tuple[tuple[nn.Module, str, str, dict[str, Any]], str]:
    loss = options.pop("loss", "model")
    return (model, layer, estimator, options), loss


class Recording:
    """What one forward pass left at the layer; created by :meth:`RelativeFlatness.record`. Each estimator's
    subclass implements :meth:`capture` (at the forward hook) and :meth:`value` (after the pass)."""

    def __init__(self, flatness: RelativeFlatness, batch: Mapping[str, Any], norm: LossNorm, differentiable: bool):
        self.flatness = flatness
        self.batch = batch
        self.norm = norm
        self.differentiable = differentiable
        self.output: torch.Tensor | None = None  # z as the model saw it (perturbed for probe/exact): (..., d)
        self.calls = 0
        self.with_grad = False  # whether gradients were enabled in the layer's first recorded forward
        self.open = False  # inside the `record` block
        self.fan_in: int | None = None  # m
        self.head_output: torch.Tensor | None = None  # the output of the user's head_loss layer (its logits)
        self.feature_scale: tuple[torch.Tensor, torch.Tensor] | None = None  # (σ, 1/σ): (m,) each; normalize_features

    def on_forward(self, features: torch.Tensor, output: Any) -> torch.Tensor | None:
        """Called by the hook for the recorded forward and again for any recomputation of it (activation
        checkpointing), which must see the same perturbation. Returns the layer's output as the model should
        see it, or None to leave it."""
        first_call, layer = self.calls == 0, self.flatness.layer
        self.calls += 1
        weight = layer.weight()
        if weight.dim() != 2 or weight.numel() == 0:
            raise RuntimeError(
                f"the weight of '{layer.name}' is partitioned even inside its forward pass ({tuple(weight.shape)});"
                " relative flatness needs the whole matrix: use DDP or FSDP2 (which gathers it per block)"
            )
        if first_call:
            self.fan_in = weight.shape[1]
            self.with_grad = torch.is_grad_enabled()
            if self.flatness.normalize_features:
                self.feature_scale = feature_scale(features)
        perturbed = self.capture(features, output, weight, first_call)
        if first_call and self.flatness.head is not None and self.flatness.head.module is layer.module:
            self.head_output = perturbed if perturbed is not None else output
        return perturbed

    def capture(
        self, features: torch.Tensor, output: torch.Tensor, weight: torch.Tensor, first_call: bool
    ) -> torch.Tensor | None:
        """What the estimator keeps of the layer's forward: ``features`` φ ``(..., m)``, ``output`` z ``(..., d)``,
        ``weight`` W ``(d, m)``. Returns the output the model continues with (perturbed), or None."""
        raise NotImplementedError

    def value(
        self, loss: torch.Tensor | None, logits: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(κ, per-probe values (P,) or None)`` for the recorded pass, in the loss's normalisation (κ the values'
        mean for a probe estimator)."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise where the recorded pass cannot give a κ that trains something."""
        layer = self.flatness.layer
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

    def result(self, loss: torch.Tensor | None = None, *, logits: torch.Tensor | None = None) -> FlatnessResult:
        """κ for the recorded forward pass.

        Args:
            loss: the scalar loss of that pass (the probe and exact estimators differentiate it).
            logits: the logits the model returned (the Gauss–Newton estimator differentiates them; the closed
                form checks that it saw the loss's logits).
        """
        self.check()
        fam = self.flatness
        if fam.head_loss is not None:
            logits = self.head_output
            self.check_head_loss(loss)
        value, samples = self.value(loss, logits)
        scale = 1.0 / self.fan_in if fam.scale == "reference" else 1.0
        samples = None if samples is None else samples.detach() * scale
        std_error = None if samples is None or samples.numel() < 2 else samples.std() / math.sqrt(samples.numel())
        return FlatnessResult(
            value=value * scale,
            std_error=std_error,
            estimator=fam.estimator,
            layer=fam.layer.name,
            probes=fam.probes if fam.draws_probes else None,
            samples=samples,
        )

    def labels(self) -> torch.Tensor:
        """The targets of the loss the closed form and Gauss–Newton mirror: ``batch[head_loss.labels]``."""
        fam = self.flatness
        key = fam.head_loss.labels if fam.head_loss is not None else "labels"
        labels = self.batch.get(key)
        if labels is None:
            raise ValueError(
                f"the {fam.estimator} estimator mirrors the loss from its targets, but the batch has no {key!r} "
                f"(its keys: {', '.join(map(repr, self.batch)) or 'none'}); pass the batch to record(batch)"
                + ("" if fam.head_loss is not None else ", or name the key with head_loss=HeadLoss(..., labels=KEY)")
            )
        return labels

    def mirrored_loss(self) -> tuple[torch.Tensor, HeadLoss]:
        """The targets and the loss the closed form and Gauss–Newton mirror (the user's ``head_loss`` or the model's
        own), with a causal LM's ``shift_labels`` read as transformers' loss reads them (:meth:`HeadLoss.aligned`)."""
        labels = self.labels()
        head_loss = self.flatness.head_loss or head_loss_for(self.flatness.model, labels)
        if head_loss is None:
            raise ValueError(f"{type(self.flatness.model).__name__}'s loss is not one fam_hf mirrors; pass head_loss=")
        return head_loss.aligned(labels, self.batch)

    def check_head_loss(self, loss: torch.Tensor | None) -> None:
        """Raise where the user's ``head_loss`` does not describe the loss the pass computed."""
        fam = self.flatness
        if self.head_output is None:
            raise RuntimeError(
                f"head_loss names '{fam.head.name}' as the output layer, but it did not run during the forward pass "
                "inside record(); name the layer whose output the loss reads: head_loss=HeadLoss(..., head=NAME)"
            )
        if loss is None or not isinstance(self.head_output, torch.Tensor):
            return
        with torch.no_grad():
            labels, spec = fam.head_loss.aligned(self.labels(), self.batch)
            expected = head_loss_value(spec, self.head_output.detach(), labels, input_ids=self.batch.get("input_ids"))
        if not torch.allclose(loss.detach().to(expected.dtype), expected, rtol=1e-4, atol=1e-7):
            spec = fam.head_loss
            raise ValueError(
                f"head_loss says the loss is the mean {spec.loss_type} of the output of '{fam.head.name}' against "
                f"batch[{spec.labels!r}], which is {float(expected):.6g} here, but the loss computed is "
                f"{float(loss.detach()):.6g}: the closed form and Gauss–Newton would mirror the wrong loss. Describe the loss "
                "the model computes (head=, labels=, loss type; a mean, reduction='mean'), or use estimator='probe', "
                "which differentiates whatever loss is computed"
            )

    def unused_message(self) -> str:
        return (
            f"the loss does not depend on the output of '{self.flatness.layer.name}' as the recorded forward pass "
            "computed it (the perturbation of the probe/exact estimator never reaches the loss), so κ would be 0 and "
            "train nothing; compute the loss from that forward pass (the layer's output must feed it)"
        )


def feature_scale(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(σ, 1/σ)``, each ``(m,)``: each feature's standard deviation over every position of ``features: (..., m)``
    (population, ``ddof = 0``), detached, and its inverse, 0 where ``σ = 0``: a constant feature (a dead ReLU) is
    dropped from the normalised layer, ``W' = W diag(σ)`` and ``φ' = φ / σ`` both 0 there, as no rescaling of it
    changes anything the network computes but its bias."""
    flat = features.detach().reshape(-1, features.shape[-1]).to(torch.promote_types(features.dtype, torch.float32))
    std = flat.std(dim=0, correction=0)
    inverse = torch.where(std > 0, 1 / std, torch.zeros_like(std))
    return std.to(features.dtype), inverse.to(features.dtype)


def checkpointing(model: nn.Module) -> list[dict | None]:
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
    if any(kwargs is not None and kwargs.get("use_reentrant", True) for kwargs in checkpointing(model)):
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

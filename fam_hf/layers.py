"""Layer resolution: from a model and a layer spec to the weight ``W`` (d × m) whose flatness is measured.

A *layer* here is a linear map ``z = W φ (+ b)`` inside a model: ``nn.Linear``, transformers' ``Conv1D``
(GPT-2; stores ``W`` transposed), a PEFT LoRA-wrapped linear (the effective map ``W0 + s·B·A``), or an
output head wrapped by PEFT's ``modules_to_save``. The features ``φ`` are whatever enters the module's
forward, so they are captured with a forward hook on :attr:`Layer.module` (see :mod:`fam_hf.flatness`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel
from peft.tuners.lora import LoraLayer
from peft.utils.other import ModulesToSaveWrapper
from torch import nn
from transformers.pytorch_utils import Conv1D

# Attribute paths of sequence-classification heads, most specific first (RoBERTa's head is a small MLP
# whose last linear map is ``out_proj``; BERT/DistilBERT/ELECTRA-style ``classifier``; decoders' ``score``).
_HEAD_PATHS = ("classifier.out_proj", "classifier", "score", "cls.predictions.decoder")

_MAX_LISTED = 25


@dataclass(frozen=True)
class Layer:
    """A resolved layer.

    Attributes:
        name: module path inside the unwrapped (non-DDP, non-PEFT-wrapper) model, e.g. ``"lm_head"`` or
            ``"model.layers.3.self_attn.q_proj"``.
        module: the module whose forward receives ``φ`` and returns ``z``; hooks go here.
        kind: ``"linear"``, ``"conv1d"``, ``"lora"`` or ``"modules_to_save"``.
        is_output_head: whether this is the model's output head (closed forms apply only there).
    """

    name: str
    module: nn.Module
    kind: str
    is_output_head: bool

    def weight(self) -> torch.Tensor:
        """The layer's weight as ``(d, m) = (out_features, in_features)``, differentiable w.r.t. the parameters.

        For LoRA this is the effective weight ``W0 + Σ_active s·B·A`` (only ``A``/``B`` carry gradients
        when ``W0`` is frozen); for ``Conv1D`` it is ``weight.T``.
        """
        return _effective_weight(self.module)

    @property
    def shape(self) -> tuple[int, int]:
        """``(d, m)``: output and input features."""
        return tuple(self.weight().shape)  # type: ignore[return-value]


@dataclass(frozen=True)
class LayerType:
    """One kind of linear map ``z = W φ (+ b)`` that κ can be taken of: how to recognise it and how to read ``W``.

    Attributes:
        kind: the name recorded in :attr:`Layer.kind` (``"linear"``, ``"conv1d"``, ``"lora"``,
            ``"modules_to_save"``).
        matches: whether a module is of this type.
        weight: the module's map as ``W: (d, m)``, differentiable w.r.t. the parameters.
        wrapper: the module stands for the modules inside it (a LoRA layer's base and adapters, the copies of
            ``modules_to_save``), which are not layers of their own.
    """

    kind: str
    matches: Callable[[nn.Module], bool]
    weight: Callable[[nn.Module], torch.Tensor]
    wrapper: bool = False


def layer_type(module: nn.Module) -> LayerType | None:
    """The first entry of :data:`LAYER_TYPES` that matches ``module`` (PEFT's dispatcher rule), or None."""
    return next((entry for entry in LAYER_TYPES if entry.matches(module)), None)


def _effective_weight(module: nn.Module) -> torch.Tensor:
    entry = layer_type(module)
    if entry is None:
        raise TypeError(f"{type(module).__name__} is not a supported layer type")
    return entry.weight(module)


def _modules_to_save_weight(module: ModulesToSaveWrapper) -> torch.Tensor:
    active = (
        module.original_module
        if module.disable_adapters or not module.active_adapters
        else module.modules_to_save[module.active_adapters[0]]
    )
    return _effective_weight(active)


def _lora_weight(module: LoraLayer) -> torch.Tensor:
    """``W0 + Σ_active s·B·A``: only ``A``/``B`` carry gradients when ``W0`` is frozen."""
    base = module.get_base_layer()
    weight = _effective_weight(base)
    if module.merged or module.disable_adapters:
        return weight
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        if module.use_dora.get(adapter, False):
            raise ValueError(
                "relative flatness of a DoRA layer is not supported (its effective weight is normalised per column); "
                "use plain LoRA on it (LoraConfig(use_dora=False)), or put FAM on a layer that DoRA does not adapt"
            )
        # get_delta_weight already applies fan_in_fan_out, so the delta has the base weight's layout
        delta = module.get_delta_weight(adapter)
        weight = weight + (delta.T if isinstance(base, Conv1D) else delta)
    return weight


def _dequantized_weight(module: nn.Linear) -> torch.Tensor:
    # a k-bit base (bitsandbytes Linear4bit/Linear8bitLt, a LoRA's frozen base under QLoRA) stores packed integers;
    # the layer computes with the dequantized float weight, so κ uses that one
    from peft.utils.integrations import dequantize_module_weight

    return dequantize_module_weight(module)


# First match wins. Wrappers come before what they wrap.
LAYER_TYPES: list[LayerType] = [
    LayerType(
        "modules_to_save",
        lambda m: isinstance(m, ModulesToSaveWrapper) and layer_type(m.original_module) is not None,
        _modules_to_save_weight,
        wrapper=True,
    ),
    LayerType(
        "lora",
        lambda m: isinstance(m, LoraLayer) and isinstance(m.get_base_layer(), (nn.Linear, Conv1D)),
        _lora_weight,
        wrapper=True,
    ),
    LayerType("conv1d", lambda m: isinstance(m, Conv1D), lambda m: m.weight.T),  # GPT-2 stores W transposed
    LayerType("linear", lambda m: isinstance(m, nn.Linear) and not m.weight.is_floating_point(), _dequantized_weight),
    LayerType("linear", lambda m: isinstance(m, nn.Linear), lambda m: m.weight),
]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/FSDP-style ``.module`` wrappers and PEFT's ``PeftModel`` to the transformers model.

    PEFT injects its layers into the base model in place, so LoRA layers are still found under their
    ordinary names (``model.layers.0.self_attn.q_proj``).
    """
    model = extract_model_from_parallel(model)
    if hasattr(model, "get_base_model") and callable(model.get_base_model):
        model = model.get_base_model()
    return model


def candidate_layers(model: nn.Module) -> list[str]:
    """Names of every module :func:`resolve_layer` accepts, in model order.

    Modules inside a LoRA layer or a ``modules_to_save`` wrapper (``base_layer``, ``lora_A.default``, the
    copies) are not listed: the wrapper stands for them.
    """
    model = unwrap_model(model)
    names, hidden_prefixes = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in hidden_prefixes):
            continue
        entry = layer_type(module)
        if entry is not None:
            names.append(name)
            if entry.wrapper:
                hidden_prefixes.append(name + ".")
    return names


def output_head_name(model: nn.Module) -> str | None:
    """Name of the model's output head, or None when none is recognised.

    Sequence-classification heads are looked up by the attribute paths transformers uses
    (``classifier.out_proj``, ``classifier``, ``score``); language-model heads via
    ``get_output_embeddings()``, tied to the input embeddings or not.
    """
    model = unwrap_model(model)
    modules = dict(model.named_modules())
    for path in _HEAD_PATHS:
        if path in modules and layer_type(modules[path]) is not None:
            return path
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    head = get_output_embeddings() if callable(get_output_embeddings) else None
    if head is not None:
        for name, module in modules.items():
            # PEFT's modules_to_save wrapper replaces the head; transformers still returns the wrapper
            if module is head or (isinstance(module, ModulesToSaveWrapper) and head is module.original_module):
                return name if layer_type(module) is not None else None
    return None


def resolve_layer(model: nn.Module, spec: str = "auto") -> Layer:
    """Resolve ``spec`` to a :class:`Layer` of ``model``.

    Args:
        model: a transformers model, optionally wrapped by PEFT and/or DDP.
        spec: ``"auto"`` for the output head; else a module name (``"classifier"``,
            ``"model.layers.0.mlp.down_proj"``) or a glob that matches exactly one supported module
            (``"*.layers.0.*.q_proj"``). A ``base_model.model.`` prefix (PEFT's names) is accepted.

    Raises:
        ValueError: the spec matches no supported layer, several, or a module of an unsupported type;
            the message lists the candidates.
    """
    base = unwrap_model(model)
    head = output_head_name(base)
    candidates = candidate_layers(base)
    if spec == "auto":
        if head is None:
            raise ValueError(
                f"fam_layer='auto' found no output head on {type(base).__name__}; name a layer instead. "
                f"Candidates: {_listing(candidates)}"
            )
        name = head
    else:
        spec = spec.removeprefix("base_model.model.")
        if spec in candidates:
            name = spec
        else:
            matches = [c for c in candidates if fnmatch.fnmatchcase(c, spec)]
            if len(matches) != 1:
                modules = dict(base.named_modules())
                if spec in modules:
                    problem = f"layer '{spec}' is a {type(modules[spec]).__name__}, not a linear layer"
                elif matches:
                    problem = f"layer pattern '{spec}' matches {len(matches)} layers ({_listing(matches)})"
                else:
                    problem = f"unknown layer '{spec}'"
                raise ValueError(f"{problem}; name exactly one of: {_listing(candidates)}")
            name = matches[0]
    module = dict(base.named_modules())[name]
    layer = Layer(name=name, module=module, kind=layer_type(module).kind, is_output_head=name == head)
    layer.weight()  # fails now, with its reason, where the layer's type is unsupported (e.g. DoRA)
    return layer


# Layer-set keywords (PEFT's "all-linear" excludes the output head too)
SET_KEYWORDS = ("all-lora", "all-linear")


@dataclass(frozen=True)
class LayerSet:
    """Several resolved layers whose relative flatness is summed: ``κ = Σ_l κ_l`` (docs/mathematics.md#layer-sets).

    Attributes:
        spec: the spec as written (``"all-lora"``, ``"*.q_proj"``, ``"a,b"``, or a list joined by commas).
        layers: the layers, in model order, each once.
    """

    spec: str
    layers: tuple[Layer, ...]
    kind = "set"
    is_output_head = False

    @property
    def name(self) -> str:
        """``"<spec> (<n> layers)"``: what logs, messages and model cards call the set."""
        return f"{self.spec} ({len(self.layers)} layers)"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    def __len__(self) -> int:
        return len(self.layers)


def layer_spec_parts(spec: str | Sequence[str]) -> list[str]:
    """The elements of a layer spec: a list as it is, a string split at commas (YAML and the command line write a
    set as ``"a,b"``; a module name never holds a comma)."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    parts = [piece.strip() for part in parts for piece in str(part).split(",")]
    if not parts or any(not part for part in parts):
        raise ValueError(f"layer spec {spec!r} has an empty element; name layers, globs, 'all-lora' or 'all-linear'")
    return parts


def names_several_layers(spec: str | Sequence[str]) -> bool:
    """Whether ``spec`` is written as a set (a list, a comma, a glob or a set keyword), which may resolve to
    several layers; a plain module name or ``"auto"`` is one layer."""
    parts = layer_spec_parts(spec)
    return len(parts) > 1 or parts[0] in SET_KEYWORDS or any(c in parts[0] for c in "*?[")


def resolve_layers(model: nn.Module, spec: str | Sequence[str]) -> list[Layer]:
    """Resolve a spec that may name several layers to the :class:`Layer` s it names, in model order, each once.

    Args:
        model: a transformers model, optionally wrapped by PEFT and/or DDP.
        spec: one element or a list (or a comma-separated string) of: a module name, ``"auto"`` (the output head),
            a glob (``"*.q_proj"``: every supported module it matches), ``"all-lora"`` (every LoRA-adapted layer)
            or ``"all-linear"`` (every supported linear layer but the output head, as PEFT's ``"all-linear"``).

    Raises:
        ValueError: an element that matches no supported layer (listing the candidates), or a layer in the set whose
            weight cannot be read (naming the layer and why, e.g. DoRA).
    """
    base = unwrap_model(model)
    head = output_head_name(base)
    candidates = candidate_layers(base)
    modules = dict(base.named_modules())
    chosen: set[str] = set()
    for part in layer_spec_parts(spec):
        if part == "all-lora":
            names = [c for c in candidates if layer_type(modules[c]).kind == "lora"]
            if not names:
                raise ValueError(
                    f"fam_layer='all-lora' found no LoRA-adapted linear layer in {type(base).__name__} (wrap the model "
                    f"with peft.get_peft_model and a LoraConfig first), or name layers: {_listing(candidates)}"
                )
        elif part == "all-linear":
            names = [c for c in candidates if c != head]
        elif part == "auto" or part.removeprefix("base_model.model.") in candidates:
            names = [resolve_layer(base, part).name]
        else:
            names = [c for c in candidates if fnmatch.fnmatchcase(c, part.removeprefix("base_model.model."))]
            if not names:
                resolve_layer(base, part)  # raises, naming the problem and the candidates
        chosen.update(names)
    layers = []
    for name in (c for c in candidates if c in chosen):
        module = modules[name]
        layer = Layer(name=name, module=module, kind=layer_type(module).kind, is_output_head=name == head)
        try:
            layer.weight()
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"layer '{name}' in the set {spec!r} cannot be estimated: {error}. Leave it out of the set (list the "
                "layers, or use a narrower glob)"
            ) from error
        layers.append(layer)
    return layers


def resolve_spec(model: nn.Module, spec: str | Sequence[str]) -> Layer | LayerSet:
    """One :class:`Layer` where ``spec`` names one layer (:func:`resolve_layer`; a set spec that resolves to one
    layer too), else a :class:`LayerSet` (:func:`resolve_layers`)."""
    if not names_several_layers(spec):
        return resolve_layer(model, layer_spec_parts(spec)[0])
    layers = resolve_layers(model, spec)
    if len(layers) == 1:
        return layers[0]
    return LayerSet(spec=",".join(layer_spec_parts(spec)), layers=tuple(layers))


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f", … ({more} more)" if more > 0 else "") if names else "(none)"

"""Random weight perturbation of the merged weights, regenerated from a seed (Flat-LoRA; Li et al., ICML 2025).

Flat-LoRA trains on ``L(W + ε)``, with ``ε`` Gaussian on every perturbed layer's *merged* weight ``W: (d, m)``
(``W0 + s·B·A`` for a LoRA layer), each output row ``s`` scaled by that row's norm over the square root of the
fan-in:

    ε_{s,i} = σ_t · ‖w_s‖ / √m · ξ_{s,i},      ξ_{s,i} ~ N(0, 1) i.i.d.,

so a row's perturbation has about the row's own norm times ``σ_t`` (docs/mathematics.md#flat-lora). Nothing is
written into the weights: a forward hook adds ``ε φ`` to the layer's output (``(W + ε) φ = W φ + ε φ``), and the
product with ``ε`` is a custom autograd function that draws ``ξ`` from its seed in the forward pass and draws it
again in the backward pass. So no copy of the weights and no noise is kept between the two, the weights after the
step are exactly the unperturbed ones plus the optimizer's update, and the gradients are those of ``L(W + ε)``
(``ε`` is held constant: its scale does not carry gradient, as in the paper).

``ξ`` depends only on (seed, optimizer step, layer index): every micro-batch of a step and every rank draws the
same noise, an activation-checkpoint recomputation draws it again, and a resumed run reproduces it.

The row scales ``σ_t ‖w_s‖ / √m`` are computed once per :meth:`PerturbedLayers.active` block, before the forward
pass, from the weights as they are then. Under FSDP2 (``fully_shard``) those are ``DTensor`` shards (rows, or the
adapters' ranks, split across ranks): the merged weight is formed on the shards and its row norms gathered
(``full_tensor``), so every rank scales the full ``ξ`` it draws exactly as one process would. Reading the weights
inside the forward hook instead would find a LoRA layer's ``A`` and ``B`` already resharded wherever they are FSDP
units of their own (PEFT's FSDP wrap policy, which ``Trainer`` applies, makes them so).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from .layers import Layer, candidate_layers, layer_type, unwrap_model

__all__ = ["PerturbedLayers", "cosine_sigma", "noise_seed", "perturbed_layers", "row_scaled_noise"]


def cosine_sigma(sigma: float, step: int, total_steps: int) -> float:
    """Flat-LoRA's schedule: ``σ_t = σ · (1 − cos(π t / T)) / 2``, from 0 at the first step (``t = 0``) towards σ,
    reached at ``t = T = total_steps`` (``t ≥ T`` gives σ); the last trained step, ``t = T − 1``, has
    ``σ · (1 + cos(π / T)) / 2``, within a relative ``(π / T)² / 4`` of σ (half of it for ``T = 2``)."""
    if total_steps <= 0:
        return sigma
    return sigma * (1 - math.cos(math.pi * min(step, total_steps) / total_steps)) / 2


def noise_seed(seed: int, step: int, index: int) -> int:
    """The seed of layer ``index``'s noise at optimizer step ``step``: a hash of the three, the same in every
    process (no Python ``hash``, whose salt differs between processes)."""
    digest = hashlib.blake2b(f"flat-lora:{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # < 2**63: a valid manual_seed


def row_scaled_noise(row_scale: torch.Tensor, fan_in: int, seed: int) -> torch.Tensor:
    """``ε = row_scale[:, None] · ξ``, ``ξ: (d, m)`` standard normal drawn from a generator seeded with ``seed`` on
    ``row_scale``'s device, in float32 (the same draw every time, on any rank).

    Args:
        row_scale: ``(d,)``, ``σ_t · ‖w_s‖ / √m`` (float32).
        fan_in: ``m``.
        seed: from :func:`noise_seed`.
    """
    generator = torch.Generator(device=row_scale.device).manual_seed(seed)
    xi = torch.randn(row_scale.shape[0], fan_in, generator=generator, device=row_scale.device, dtype=torch.float32)
    return xi * row_scale[:, None]


class _NoiseProduct(torch.autograd.Function):
    """``ε φ`` (``F.linear(φ, ε)``) with ``ε`` drawn from its seed in forward and drawn again in backward: nothing
    of the size of the weight is kept for the backward pass. Gradient to ``φ`` only (``ε`` is a constant)."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, row_scale: torch.Tensor, seed: int) -> torch.Tensor:
        ctx.save_for_backward(row_scale)
        ctx.seed, ctx.fan_in, ctx.features_dtype = seed, features.shape[-1], features.dtype
        noise = row_scaled_noise(row_scale, features.shape[-1], seed)
        return F.linear(features, noise.to(features.dtype))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (row_scale,) = ctx.saved_tensors
        noise = row_scaled_noise(row_scale, ctx.fan_in, ctx.seed)
        grad_features = grad_output.matmul(noise.to(grad_output.dtype)).to(ctx.features_dtype)
        return grad_features, None, None


def perturbed_layers(model: nn.Module) -> list[Layer]:
    """The layers Flat-LoRA perturbs: every LoRA-adapted layer (its merged weight), and every other linear layer
    whose weight trains (full fine-tuning; an output head in ``modules_to_save``). Frozen layers are left alone.

    Raises:
        ValueError: no layer would be perturbed (everything frozen, or no supported linear layer).
    """
    base = unwrap_model(model)
    modules = dict(base.named_modules())
    layers = []
    for name in candidate_layers(base):
        module = modules[name]
        layer = Layer(name=name, module=module, kind=layer_type(module).kind, is_output_head=False)
        if layer.kind == "lora" and any(module.use_dora.get(a, False) for a in module.active_adapters):
            raise ValueError(
                f"'{name}' is a DoRA layer (its weight is normalised per column, not W0 + s·B·A), which Flat-LoRA "
                "does not perturb; use plain LoRA (LoraConfig(use_dora=False))"
            )
        if layer.kind == "lora" or layer.weight().requires_grad:
            layers.append(layer)
    if not layers:
        raise ValueError(
            f"Flat-LoRA found no trainable linear layer (nn.Linear, Conv1D, LoRA) in {type(base).__name__} to "
            "perturb; train the model's linear layers, or wrap it with peft.get_peft_model"
        )
    return layers


class PerturbedLayers:
    """Forward hooks that add ``ε_l φ`` to each of ``layers``' outputs while :meth:`active` is open.

    Args:
        layers: from :func:`perturbed_layers`.

    Attributes:
        sigma: ``σ_t`` of the open step (0 outside it).
    """

    def __init__(self, layers: list[Layer]) -> None:
        self.layers = layers
        self._step: tuple[int, int, float] | None = None  # (seed, step, σ_t) while active
        self._scales: list[torch.Tensor] = []  # each layer's row scale (d,), for the open block
        self.sigma = 0.0
        self._handles = [
            layer.module.register_forward_hook(self._hook(index), prepend=True) for index, layer in enumerate(layers)
        ]

    @contextmanager
    def active(self, seed: int, step: int, sigma: float) -> Iterator[None]:
        """Perturb every forward pass inside the block (and its backward pass's recomputations) with step
        ``step``'s noise at scale ``sigma``. The row scales are taken here, from the weights as they are on entry
        (under FSDP2 a collective per layer: every rank must enter the block, as every rank runs the step)."""
        with torch.no_grad():
            self._scales = [_row_scale(layer.weight(), sigma) for layer in self.layers] if sigma != 0 else []
        self._step, self.sigma = (seed, step, sigma), sigma
        try:
            yield
        finally:
            self._step, self._scales = None, []

    def noise(self, index: int, seed: int, step: int, sigma: float) -> torch.Tensor:
        """``ε: (d, m)`` of layer ``index`` at ``step``, as the hook adds it (float32, from the current weights)."""
        with torch.no_grad():
            weight = self.layers[index].weight()
            return row_scaled_noise(_row_scale(weight, sigma), weight.shape[1], noise_seed(seed, step, index))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook(self, index: int):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self._step is None or not inputs or self._step[2] == 0:
                return None
            seed, step, _ = self._step
            row_scale = self._scales[index].to(inputs[0].device)
            return output + _NoiseProduct.apply(inputs[0], row_scale, noise_seed(seed, step, index)).to(output.dtype)

        return hook


def _row_scale(weight: torch.Tensor, sigma: float) -> torch.Tensor:
    """``σ · ‖w_s‖ / √m``: ``(d,)`` float32 from the merged ``W: (d, m)``, a plain tensor on every rank where ``W``
    is an FSDP2 ``DTensor`` (its row norms gathered from the shards)."""
    norms = weight.detach().float().norm(dim=1)
    if hasattr(norms, "full_tensor"):  # a DTensor (FSDP2): its row norms are split across ranks
        norms = norms.full_tensor()
    return sigma * norms / math.sqrt(weight.shape[1])

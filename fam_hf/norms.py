"""LayerNorm that autograd differentiates correctly to every order, for the gradients of second-order penalties.

torch's fused ``layer_norm`` is right to the second derivative and silently wrong from the third on
(pytorch/pytorch#175754, still so in torch 2.13: the mean and inverse standard deviation its double backward saves
carry no autograd history, so differentiating through that double backward treats them as constants). The
gradient of a second-order κ — the probe's ``uᵀ H u``, the Gauss–Newton form ``(J u)ᵀ ∇²ℓ (J u)``, the exact
layer Hessian — is a third derivative of everything between the layer and the loss, and every transformer block
puts a LayerNorm there (BERT after each sub-layer, GPT-2 before them and at the end). Measured: on a float64 tiny
BERT, an entry of the Gauss–Newton penalty's gradient (a LayerNorm weight before the layer) 73% off finite
differences; for the probe on MiniLM-L6's ``bert.encoder.layer.5.output.dense``, 2.6% of the whole gradient's
norm (cosine 0.9998). RMSNorm (``F.rms_norm``, transformers' Llama-family norms) and GroupNorm are correct; BatchNorm in
training mode has the same fault (pytorch/pytorch#186256) and is not handled here (text models do not use it).

Inside :func:`differentiable_layer_norm` every ``torch.nn.functional.layer_norm`` / ``torch.layer_norm`` call
(``nn.LayerNorm`` included) is computed from primitive ops instead: the same function (to rounding), with
derivatives autograd gets right at every order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode


def layer_norm(
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *_: object,
) -> torch.Tensor:
    """``F.layer_norm`` from primitive ops: ``(x − mean) · rsqrt(var + eps) · weight + bias`` over the last
    ``len(normalized_shape)`` dimensions (biased variance, as torch's).

    Computed in float32 or wider, like the fused kernel; returns float32 under autocast (layer_norm is on
    autocast's float32 list), else the input's dtype.
    """
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    dtype = torch.promote_types(input.dtype, torch.float32)
    x = input.to(dtype)
    centered = x - x.mean(dims, keepdim=True)
    out = centered * torch.rsqrt(centered.square().mean(dims, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.to(dtype)
    if bias is not None:
        out = out + bias.to(dtype)
    autocast = input.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(input.device.type)
    return out if autocast else out.to(input.dtype)


class _ComposedLayerNorm(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.layer_norm or func is torch.layer_norm:
            return layer_norm(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def differentiable_layer_norm() -> TorchFunctionMode:
    """Context manager: ``layer_norm`` calls inside it run :func:`layer_norm` (primitive ops), so derivatives of
    third order and beyond through them are right. Costs a few more kernels per LayerNorm and Python dispatch per
    op; ``fam_hf`` enters it only where a penalty's gradient needs a third derivative."""
    return _ComposedLayerNorm()

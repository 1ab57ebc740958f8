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
See docs/measures.md#layernorm-third-derivatives.

Inside :func:`differentiable_layer_norm` every ``torch.nn.functional.layer_norm`` call (``nn.LayerNorm`` and
transformers' models included) is computed from primitive ops instead: the same function (to rounding), with
derivatives autograd gets right at every order. It swaps the function on ``torch.nn.functional`` rather than
installing a ``TorchFunctionMode``: a mode is suspended while it runs a call, ``Tensor.backward`` included, so an
activation-checkpointed block recomputed during the backward pass would get the fused kernel back (and a
different set of saved tensors). The swap is process-wide while the context is open (nested uses count).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch.nn import functional as F


def layer_norm(
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
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


_depth = 0  # open differentiable_layer_norm contexts (FAMTrainer nests the step's and the forward's)
_outer = None  # the F.layer_norm found when the outermost context opened, put back when it closes


@contextmanager
def differentiable_layer_norm() -> Iterator[None]:
    """Context manager: ``F.layer_norm`` is :func:`layer_norm` (primitive ops) inside it, so derivatives of third
    order and beyond through LayerNorm are right. A few more kernels per LayerNorm; ``fam_hf`` enters it only
    where a penalty's gradient needs a third derivative."""
    global _depth, _outer
    if _depth == 0:
        _outer, F.layer_norm = F.layer_norm, layer_norm
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            F.layer_norm, _outer = _outer, None

"""The one context in which second derivatives through a transformer are available and right.

SDPA's flash and memory-efficient kernels have no double backward; its math kernel has. A penalty's gradient
through a second-order κ is a third derivative, which torch's fused LayerNorm gets wrong (:mod:`fam_hf.norms`).
Every second-order estimator and measure runs inside :func:`second_order_kernels`
(docs/mathematics.md#kernels-for-second-derivatives).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from torch.nn.attention import SDPBackend, sdpa_kernel

from ..norms import differentiable_layer_norm


@contextmanager
def second_order_kernels(differentiable: bool = False) -> Iterator[None]:
    """SDPA's math kernel, and with ``differentiable`` (a penalty's gradient: a third derivative) LayerNorm from
    primitive ops. The second-order passes themselves also run inside :func:`explain_missing_double_backward`.

    Under activation checkpointing the backward pass recomputes the blocks and must run inside it too, or the
    recomputation takes a different kernel than the forward (``FAMTrainer`` runs its whole step inside it).
    """
    with ExitStack() as stack:
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        if differentiable:
            stack.enter_context(differentiable_layer_norm())
        yield


@contextmanager
def explain_missing_double_backward():
    """Re-raise autograd's "derivative for X is not implemented" (and TRL's fused LM head's out= kernel error)
    with what to do about it."""
    try:
        yield
    except RuntimeError as error:
        message = str(error)
        if "arguments don't support automatic differentiation" in message:  # out=... kernels: TRL's fused LM head
            raise RuntimeError(
                f"{error}. The probe/exact estimators need a second derivative through everything after the layer, "
                "and the loss runs through a kernel that has none: TRL's fused LM head (its chunked log-prob kernel "
                "writes with out=). Penalise the LM head, whose closed form needs only a first derivative "
                "(fam_hf.trl.FAMSFTTrainer takes it from the head's input), or compute the loss from the full logits"
            ) from error
        if "derivative for" not in message or "not implemented" not in message:
            raise
        raise RuntimeError(
            f"{error}. The probe/exact estimators need a second derivative through everything after the layer, "
            "and a kernel there has none (typically a fused attention kernel: flash-attention, or SDPA's fused "
            "kernels under activation checkpointing). Load the model with attn_implementation='eager', or put FAM "
            "on a layer after the attention blocks (the output head takes the closed form)"
        ) from error

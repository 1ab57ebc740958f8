"""Input–output Jacobian norm of a model (MacDonald, Valmadre, Lucey 2023).

MacDonald et al. ("On progressive sharpening, flat minima and generalisation") tie the loss Hessian's top
eigenvalue to the norm of the network's input–output Jacobian — they rise together during training — and
bound the generalization gap in terms of the Jacobian norm on the data. Here, for a batch of ``B``
sequences with inputs ``x_i: (L, h)`` (the input embeddings for a token model: the output of
``model.get_input_embeddings()``, before position embeddings are added inside the model) and outputs
``z_{i,t} ∈ R^C`` (the logits at position ``t``; one position for a sequence classifier),

    value = (1/T) Σ_i Σ_t ‖∂z_{i,t} / ∂x_i‖²_F,

the squared Frobenius norm of the Jacobian of one output position w.r.t. its whole input sequence, averaged
over the ``T`` counted output positions (``attention_mask == 1`` when the batch has one and the logits are
per position, else all). Units: squared logit per squared embedding unit. ``rms = √value``.

Estimated from vector–Jacobian products: for ``v`` with i.i.d. zero-mean unit-variance entries (Rademacher),
``E_v ‖vᵀ J‖² = ‖J‖²_F``. Because examples do not interact (no batch norm, eval mode), one backward pass
with ``v`` over the whole batch's logits gives one unbiased estimate for every sequence at once, the
positions' cross terms vanishing in expectation. ``method="exact"`` uses the standard basis of one
sequence's outputs instead (``L·C`` backward passes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..curvature import default_generator

JACOBIAN_METHODS = ("projection", "exact")
_NOT_INPUTS = ("labels", "num_items_in_batch")


@dataclass
class JacobianNorm:
    """Mean squared Frobenius norm of the input–output Jacobian per output position.

    Attributes:
        value: ``(1/T) Σ_{i,t} ‖∂z_{i,t}/∂x_i‖²_F`` (squared logit per squared input unit).
        std_error: the projection estimate's standard error (std over probes / √probes); None when exact.
        method: ``"projection"`` or ``"exact"``.
        backward_passes: vector–Jacobian products spent.
        positions: ``T``, the number of counted output positions.
    """

    value: torch.Tensor
    std_error: torch.Tensor | None
    method: str
    backward_passes: int
    positions: int

    @property
    def rms(self) -> torch.Tensor:
        """``√value``: the root-mean-square Frobenius norm per output position."""
        return self.value.sqrt()

    def __float__(self) -> float:
        return float(self.value)


def jacobian_norm(
    model: nn.Module,
    batch: Mapping[str, Any],
    *,
    inputs: str = "input_ids",
    probes: int = 16,
    method: str = "projection",
    generator: torch.Generator | None = None,
) -> JacobianNorm:
    """Input–output Jacobian norm of ``model`` on ``batch`` (see the module docstring for the formula).

    Args:
        model: a transformers model returning ``.logits`` (or any module returning a tensor), run as it is
            (``model.eval()``: dropout would make the Jacobian random).
        batch: the model's inputs; ``labels`` and ``num_items_in_batch`` are dropped.
        inputs: the batch key to differentiate w.r.t.: integer token ids are embedded with
            ``model.get_input_embeddings()`` and passed as ``inputs_embeds``; a float tensor (``(B, ...)``)
            is differentiated as it is.
        probes: Rademacher projections (``"projection"``).
        method: ``"projection"`` (``probes`` backward passes) or ``"exact"`` (one per output coordinate of
            a sequence, ``L·C``; small outputs only).
        generator: RNG for the projections (drawn on the CPU); default seeded with 0.

    Cost: one forward pass, then ``probes`` (or ``L·C``) backward passes to the inputs. No parameter
    gradient is written.
    """
    if method not in JACOBIAN_METHODS:
        raise ValueError(f"method={method!r} is not one of {', '.join(map(repr, JACOBIAN_METHODS))}")
    if method == "projection" and probes < 1:
        raise ValueError(f"probes={probes} must be at least 1")
    kwargs = {k: v for k, v in batch.items() if k not in _NOT_INPUTS}
    if inputs not in kwargs:
        raise ValueError(f"the batch has no {inputs!r}; name the input to differentiate with inputs= ({list(kwargs)})")
    x = kwargs.pop(inputs)
    with torch.enable_grad():
        if not torch.is_floating_point(x):
            x = model.get_input_embeddings()(x).detach().requires_grad_(True)
            kwargs["inputs_embeds"] = x
        else:
            x = x.detach().requires_grad_(True)
            kwargs[inputs] = x
        outputs = model(**kwargs)
    logits = outputs if isinstance(outputs, torch.Tensor) else getattr(outputs, "logits", None)
    if logits is None:
        raise ValueError(
            f"{type(model).__name__} returned no tensor and no .logits; the outputs to differentiate are unknown"
        )
    mask = _output_mask(logits, batch.get("attention_mask"))  # (B, *positions), 1 for counted outputs
    positions = int(mask.sum())

    def squared_norm_of_vjp(v: torch.Tensor) -> torch.Tensor:
        (vjp,) = torch.autograd.grad(logits, x, grad_outputs=v * mask.unsqueeze(-1), retain_graph=True)
        return vjp.pow(2).sum() / positions

    if method == "exact":
        # Row r of every sequence's Jacobian at once: examples do not interact, so one backward pass
        # with the basis vector e_r repeated over the batch returns each sequence's own row.
        per_example = logits.shape[1:].numel()
        basis = torch.eye(per_example, dtype=logits.dtype, device=logits.device)
        total = sum(squared_norm_of_vjp(row.reshape(logits.shape[1:]).expand_as(logits).contiguous()) for row in basis)
        return JacobianNorm(total, None, method, per_example, positions)
    generator = default_generator(generator)
    values = []
    for _ in range(probes):
        signs = torch.randint(0, 2, logits.shape, generator=generator, dtype=torch.int8)
        values.append(squared_norm_of_vjp((signs.to(logits.dtype) * 2 - 1).to(logits.device)))
    values = torch.stack(values)
    std_error = values.std() / math.sqrt(probes) if probes > 1 else None
    return JacobianNorm(values.mean(), std_error, method, probes, positions)


def _output_mask(logits: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Which output positions count: ``(B, *positions)`` of 0/1 in the logits' dtype."""
    positions = logits.shape[:-1]
    if attention_mask is not None and attention_mask.shape == positions:
        return attention_mask.to(logits.dtype)
    return torch.ones(positions, dtype=logits.dtype, device=logits.device)

"""fam_hf.norms: LayerNorm from primitive ops, the same function as torch's, with right third derivatives."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from fam_hf.norms import differentiable_layer_norm, layer_norm


def third_directional(f, x, v):
    """d³/dt³ f(x + t v) at t = 0 by repeated reverse mode."""
    x = x.detach().requires_grad_(True)
    y = f(x)
    for i in range(3):
        (g,) = torch.autograd.grad(y, x, create_graph=i < 2)
        y = (g * v).sum()
    return y


def second_directional(f, x, v):
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x), x, create_graph=True)
    (h,) = torch.autograd.grad((g * v).sum(), x)
    return (h * v).sum()


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("shape", [(6,), (2, 3)])
def test_composed_layer_norm_is_torchs(affine, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 3, generator=g, dtype=torch.float64).reshape(4, *shape)
    weight, bias = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2)) if affine else (None, None)
    torch.testing.assert_close(layer_norm(x, shape, weight, bias, 1e-3), F.layer_norm(x, shape, weight, bias, 1e-3),
                               rtol=1e-12, atol=1e-12)  # fmt: skip


def test_third_derivative_through_nn_layer_norm_matches_finite_differences():
    g = torch.Generator().manual_seed(1)
    norm = nn.LayerNorm(6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(6, generator=g))
        norm.bias.copy_(torch.randn(6, generator=g))
    x, v, c = (torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(3))

    def f(y):
        return (norm(y) ** 3 * c).sum()

    eps = 1e-4  # the third derivative as the central difference of the second, which torch gets right
    truth = (second_directional(f, x + eps * v, v) - second_directional(f, x - eps * v, v)) / (2 * eps)
    with differentiable_layer_norm():
        composed = third_directional(f, x, v)
    torch.testing.assert_close(composed, truth, rtol=1e-6, atol=1e-8)
    fused = third_directional(f, x, v)  # torch's own kernel (pytorch/pytorch#175754): why the module exists
    if torch.allclose(fused, truth, rtol=1e-6, atol=1e-8):
        pytest.skip(f"torch {torch.__version__} differentiates layer_norm right to third order: fam_hf.norms can go")


def test_dtypes_follow_torchs_kernel():
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    w, b = torch.ones(8, dtype=torch.bfloat16), torch.zeros(8, dtype=torch.bfloat16)
    assert layer_norm(x, (8,), w, b).dtype == F.layer_norm(x, (8,), w, b).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x32 = torch.randn(3, 8)
        assert layer_norm(x32, (8,)).dtype == F.layer_norm(x32, (8,)).dtype
        with differentiable_layer_norm():
            assert nn.LayerNorm(8)(x32).dtype == F.layer_norm(x32, (8,)).dtype


def test_the_swap_nests_is_undone_and_holds_through_a_checkpointed_backward():
    fused = F.layer_norm
    norm, x = nn.LayerNorm(4), torch.randn(2, 4, requires_grad=True)
    with differentiable_layer_norm():
        with differentiable_layer_norm():
            assert F.layer_norm is layer_norm
        assert F.layer_norm is layer_norm  # the outer context still holds
        # the block is recomputed during backward: it must save what its forward saved (the composed ops)
        checkpoint(lambda t: norm(t).sin(), x, use_reentrant=False).sum().backward()
    assert F.layer_norm is fused and x.grad is not None
    with pytest.raises(RuntimeError), differentiable_layer_norm():
        raise RuntimeError
    assert F.layer_norm is fused

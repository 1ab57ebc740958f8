"""The measures of fam_hf.measures against ground truth computed independently, in float64: full Hessians
from ``torch.autograd.functional.hessian`` over ``functional_call`` (tests/brute_force.py), Jacobians from
``torch.autograd.functional.jacobian``, SAM's ascent step by hand on a copy of the model."""

from __future__ import annotations

import copy

import pytest
import torch
from brute_force import functional_loss
from models import tiny_bert, tiny_gpt2
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.nn import functional as F

from fam_hf import RelativeFlatness
from fam_hf.curvature import rademacher
from fam_hf.measures import (
    LossHessian,
    MicroBatchedHessian,
    activity_weight_duality,
    dual_weight_change,
    estimate_top_eigenpairs,
    estimate_trace,
    gauss_newton_trace,
    hessian_spectrum,
    hessian_trace,
    jacobian_norm,
    layer_inputs,
    layerwise_flatness,
    resolve_subset,
    sam_sharpness,
    split_batch,
    top_eigenvalues,
)
from fam_hf.measures.hessian import DenseOperator

F64 = torch.float64


def bert_batch():
    return {"input_ids": torch.randint(0, 40, (4, 5)), "labels": torch.tensor([0, 2, 1, 1])}


def gpt2_batch():
    ids = torch.randint(0, 24, (3, 6))
    mask = torch.ones_like(ids)
    mask[2, -2:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(6, 8), nn.Linear(8, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def mlp_loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"])


def mlp_batch(n=10):
    return {"x": torch.randn(n, 6, dtype=F64), "y": torch.randint(0, 3, (n,))}


def layer_hessian(model, batch, name, transpose=False):
    """Brute force: the ``(n, n)`` Hessian of the loss w.r.t. parameter ``name`` (``(d, m)`` layout).

    Symmetrised, as ``LossHessian.dense`` is: autograd's double backward through GPT-2 (its tanh-GELU) is
    symmetric only to ~1e-9 relative, in both.
    """
    weight = dict(model.named_parameters())[name].detach()
    shape = weight.T.shape if transpose else weight.shape
    h = hessian(functional_loss(model, batch, name, transpose=transpose), torch.zeros(shape, dtype=F64))
    h = h.reshape(shape.numel(), shape.numel())
    return (h + h.T) / 2


def params_hessian(model, loss_fn, batch, names):
    """Brute force: the Hessian w.r.t. the concatenation of the named parameters, each flattened row-major."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]

    def loss_of(flat):
        parts = [p.reshape(s) for p, s in zip(flat.split([s.numel() for s in shapes]), shapes)]
        moved = {n: params[n].detach() + p for n, p in zip(names, parts)}
        return loss_fn(_Swapped(model, moved), batch)

    n = sum(s.numel() for s in shapes)
    return hessian(loss_of, torch.zeros(n, dtype=F64))


class _Swapped:
    """``model`` called with some parameters replaced, via ``functional_call``."""

    def __init__(self, model, params):
        self.model, self.params = model, params

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self.model, self.params, args, kwargs)


def assert_within_stderr(value, std_error, truth, k=3.0):
    assert abs(float(value) - float(truth)) <= k * float(std_error), f"{float(value)} ± {float(std_error)} vs {truth}"


def assert_same_model(before: dict, model: nn.Module):
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


# -- the Hessian operator ----------------------------------------------------------------------------------


def test_loss_hessian_of_linear_and_conv1d_layers_matches_brute_force():
    bert, batch = tiny_bert(), bert_batch()
    op = LossHessian(bert, batch, "classifier")
    assert op.subset.shapes == [torch.Size([3, 12])]
    torch.testing.assert_close(op.dense(), layer_hessian(bert, batch, "classifier.weight"), rtol=1e-10, atol=1e-14)
    gpt2, batch = tiny_gpt2(), gpt2_batch()
    op = LossHessian(gpt2, batch, "transformer.h.0.attn.c_proj")  # Conv1D stores W transposed: H is in (d, m)
    truth = layer_hessian(gpt2, batch, "transformer.h.0.attn.c_proj.weight", transpose=True)
    torch.testing.assert_close(op.dense(), truth, rtol=1e-10, atol=1e-14)


def test_loss_hessian_of_a_lora_layer_is_that_of_its_effective_weight():
    model = tiny_gpt2()
    lora = get_peft_model(
        model,
        LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=["attn.c_proj"],
            lora_dropout=0.0,
            fan_in_fan_out=True,
            init_lora_weights=False,
        ),
    )
    batch = gpt2_batch()
    layer = lora.base_model.model.transformer.h[0].attn.c_proj
    effective = (layer.base_layer.weight.T + layer.get_delta_weight("default").T).detach()  # (d, m)

    def loss_of(e):  # the merged model: base weight := W0 + s·BA + E, adapter off
        with lora.disable_adapter():
            return torch.func.functional_call(
                lora.base_model.model,
                {"transformer.h.0.attn.c_proj.base_layer.weight": (effective + e).T},
                args=(),
                kwargs=batch,
            ).loss

    truth = hessian(loss_of, torch.zeros_like(effective)).reshape(64, 64)
    truth = (truth + truth.T) / 2
    op = LossHessian(lora, batch, "transformer.h.0.attn.c_proj")
    torch.testing.assert_close(op.subset.values[0], effective, rtol=0, atol=1e-15)
    torch.testing.assert_close(op.dense(), truth, rtol=1e-10, atol=1e-14)


def test_loss_hessian_of_parameters_in_the_order_given_frozen_included():
    model, batch = MLP().double(), mlp_batch()
    model.fc2.bias.requires_grad_(False)
    names = ["head.weight", "fc2.bias", "fc2.weight"]
    params = dict(model.named_parameters())
    op = LossHessian(model, batch, [params[n] for n in names], loss_fn=mlp_loss)
    assert op.dim == 15 + 5 + 40
    torch.testing.assert_close(op.dense(), params_hessian(model, mlp_loss, batch, names), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(op.loss, mlp_loss(model, batch), rtol=1e-15, atol=0)


def test_subset_resolution():
    model = tiny_gpt2()
    tied = resolve_subset(model, [model.transformer.wte.weight, model.lm_head.weight])
    assert tied.names == ["transformer.wte.weight"]  # one variable, used by the embedding and the head
    assert resolve_subset(model, None).dim == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match=r"shape \(3, 3\) in wrt is not a parameter of GPT2LMHeadModel"):
        resolve_subset(model, [torch.zeros(3, 3)])
    with pytest.raises(ValueError, match="unknown layer 'nope'; name exactly one of"):
        resolve_subset(model, "nope")


# -- trace ---------------------------------------------------------------------------------------------------


def test_hessian_trace_against_the_full_hessian():
    model, batch = tiny_bert(), bert_batch()
    truth = torch.trace(layer_hessian(model, batch, "classifier.weight"))
    hutchinson = hessian_trace(model, batch, probes=300)
    assert (hutchinson.method, hutchinson.matvecs, hutchinson.dim) == ("hutchinson", 300, 36)
    assert_within_stderr(hutchinson.value, hutchinson.std_error, truth)
    exact = hessian_trace(model, batch, method="exact")
    torch.testing.assert_close(exact.value, truth, rtol=1e-10, atol=0)
    assert exact.std_error is None
    hutchpp = hessian_trace(model, batch, probes=3 * 36, method="hutch++")  # the sketch spans R^36: exact
    torch.testing.assert_close(hutchpp.value, truth, rtol=1e-10, atol=0)


def test_trace_estimators_on_a_dense_matrix():
    gen = torch.Generator().manual_seed(3)
    basis, _ = torch.linalg.qr(torch.randn(50, 50, generator=gen, dtype=F64))
    spectrum = torch.cat([torch.tensor([100.0, 50.0, 20.0], dtype=F64), torch.rand(47, generator=gen, dtype=F64)])
    a = basis @ torch.diag(spectrum) @ basis.T
    truth = spectrum.sum()
    runs = [estimate_trace(a, probes=200, generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    assert runs[0].value == runs[1].value  # reproducible from the generator
    assert_within_stderr(runs[0].value, runs[0].std_error, truth)
    hutchpp = estimate_trace(a, probes=60, method="hutch++")  # a decaying spectrum: the sketch takes the top
    assert_within_stderr(hutchpp.value, hutchpp.std_error, truth)
    assert hutchpp.std_error < runs[0].std_error / 10
    torch.testing.assert_close(estimate_trace(a, method="exact").value, truth, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="method='lanczos' is not one of 'hutchinson', 'hutch\\+\\+', 'exact'"):
        estimate_trace(a, method="lanczos")


# -- top eigenvalues -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["bert_head", "gpt2_conv1d", "mlp_params"])
def test_top_eigenvalues_match_eigvalsh(which):
    if which == "bert_head":
        model, batch = tiny_bert(), bert_batch()
        truth, kwargs = layer_hessian(model, batch, "classifier.weight"), {"wrt": "classifier"}
    elif which == "gpt2_conv1d":
        model, batch = tiny_gpt2(), gpt2_batch()
        name = "transformer.h.0.attn.c_proj"
        truth, kwargs = layer_hessian(model, batch, name + ".weight", transpose=True), {"wrt": name}
    else:
        model, batch = MLP().double(), mlp_batch()
        names = ["fc2.weight", "fc2.bias"]
        truth = params_hessian(model, mlp_loss, batch, names)
        kwargs = {"wrt": [model.fc2.weight, model.fc2.bias], "loss_fn": mlp_loss}
    k = 3
    eig = top_eigenvalues(model, batch, k=k, **kwargs)
    expected = torch.linalg.eigvalsh(truth).flip(0)[:k]
    assert eig.method == "lanczos" and eig.values.shape == (k,) and eig.vectors.shape == (truth.shape[0], k)
    torch.testing.assert_close(eig.values, expected, rtol=1e-6, atol=0)
    assert eig.sharpness == eig.values[0]
    residual = truth @ eig.vectors - eig.vectors * eig.values  # H v = λ v, with the brute-force H
    assert residual.abs().max() <= 1e-6 * expected.abs().max()
    torch.testing.assert_close(eig.vectors.T @ eig.vectors, torch.eye(k, dtype=F64), rtol=0, atol=1e-8)


def test_eigenpairs_exact_method_and_magnitude_order():
    gen = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=F64))
    spectrum = torch.tensor([3.0, -5.0, 1.0, 0.5, -0.25, 0.1, 0.0, 2.0], dtype=F64)
    a = basis @ torch.diag(spectrum) @ basis.T
    assert estimate_top_eigenpairs(a, 2, method="lanczos").values.tolist() == pytest.approx([3.0, 2.0], rel=1e-10)
    assert estimate_top_eigenpairs(a, 2, which="LM").values.tolist() == pytest.approx([-5.0, 3.0], rel=1e-10)
    full = estimate_top_eigenpairs(a, 8)  # k = n: Lanczos cannot, the dense path does
    assert full.method == "exact"
    torch.testing.assert_close(full.values, spectrum.sort(descending=True).values, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="k=9 must be between 1 and the number of variables n=8"):
        estimate_top_eigenpairs(a, 9)


# -- layer-wise relative flatness ------------------------------------------------------------------------------


def test_layerwise_flatness_matches_brute_force():
    model, batch = tiny_bert(), bert_batch()
    h = layer_hessian(model, batch, "classifier.weight")
    norm_sq = model.classifier.weight.detach().pow(2).sum()
    result = layerwise_flatness(model, batch, trace_method="exact")
    assert result.layer == "classifier" and result.dim == 36
    torch.testing.assert_close(result.trace_measure, norm_sq * torch.trace(h), rtol=1e-10, atol=0)
    torch.testing.assert_close(result.eigenvalue_measure, norm_sq * torch.linalg.eigvalsh(h)[-1], rtol=1e-6, atol=0)
    stochastic = layerwise_flatness(model, batch, probes=300)
    assert_within_stderr(stochastic.trace_measure, stochastic.trace_measure_std_error, norm_sq * torch.trace(h))


# -- SAM sharpness -------------------------------------------------------------------------------------------------


def hand_sam(model, batch, params_of, rho, adaptive=False, eta=0.0):
    """SAM's ascent step done the ordinary way, on a copy: backward, move the weights in place, re-evaluate."""
    clone = copy.deepcopy(model)
    params = params_of(clone)
    loss = clone(**batch).loss
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        if adaptive:
            scale = [p.abs() + eta for p in params]
            norm = torch.cat([(t * g).reshape(-1) for t, g in zip(scale, grads)]).norm()
            for p, t, g in zip(params, scale, grads):
                p.add_(rho * t * t * g / norm)
        else:
            norm = torch.cat([g.reshape(-1) for g in grads]).norm()
            for p, g in zip(params, grads):
                p.add_(rho * g / norm)
        return clone(**batch).loss - loss.detach()


@pytest.mark.parametrize("adaptive,eta", [(False, 0.0), (True, 0.0), (True, 0.01)])
def test_sam_sharpness_matches_hand_computed_ascent_and_leaves_the_model_bit_identical(adaptive, eta):
    model, batch = tiny_bert(), bert_batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = sam_sharpness(model, batch, rho=0.5, adaptive=adaptive, eta=eta)
    expected = hand_sam(model, batch, lambda m: [p for p in m.parameters() if p.requires_grad], 0.5, adaptive, eta)
    torch.testing.assert_close(result.value, expected, rtol=1e-9, atol=1e-14)
    assert result.value > 0 and result.adaptive == adaptive
    torch.testing.assert_close(result.perturbed_loss - result.loss, result.value, rtol=0, atol=0)
    assert_same_model(before, model)


def test_sam_sharpness_on_a_layer_or_parameter_subset():
    model, batch = tiny_bert(), bert_batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = hand_sam(model, batch, lambda m: [m.classifier.weight], rho=0.3)
    torch.testing.assert_close(sam_sharpness(model, batch, "classifier", rho=0.3).value, expected, rtol=1e-9, atol=0)
    torch.testing.assert_close(
        sam_sharpness(model, batch, [model.classifier.weight], rho=0.3).value, expected, rtol=1e-9, atol=0
    )
    assert_same_model(before, model)
    assert float(sam_sharpness(model, batch, rho=0.0).value) == 0.0


# -- input–output Jacobian norm ------------------------------------------------------------------------------------


def brute_jacobian_norm(model, batch):
    """``(1/T) Σ_{i,t} ‖∂z_{i,t}/∂x_i‖²_F`` from the full Jacobian of all logits w.r.t. all input embeddings."""
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
    mask = batch.get("attention_mask")

    def logits_of(e):
        return model(inputs_embeds=e, attention_mask=mask).logits

    jac = jacobian(logits_of, embeds)  # (B, *positions, C, B, L, h)
    b = embeds.shape[0]
    own = torch.stack([jac[i, ..., i, :, :] for i in range(b)])  # each output w.r.t. its own sequence only
    per_position = own.pow(2).flatten(start_dim=own.dim() - 3).sum(-1)  # (B, *positions)
    counted = torch.ones_like(per_position) if per_position.dim() == 1 or mask is None else mask.to(F64)
    cross = sum(jac[i, ..., j, :, :].abs().max() for i in range(b) for j in range(b) if i != j)
    return (per_position * counted).sum() / counted.sum(), cross


@pytest.mark.parametrize("which", ["bert_classifier", "gpt2_lm_padded"])
def test_jacobian_norm_matches_autograd_jacobian(which):
    model, batch = (tiny_bert(), bert_batch()) if which == "bert_classifier" else (tiny_gpt2(), gpt2_batch())
    truth, cross = brute_jacobian_norm(model, batch)
    assert cross == 0  # examples do not interact
    exact = jacobian_norm(model, batch, method="exact")
    torch.testing.assert_close(exact.value, truth, rtol=1e-10, atol=0)
    assert exact.positions == (4 if which == "bert_classifier" else 16)
    projected = jacobian_norm(model, batch, probes=200)
    assert_within_stderr(projected.value, projected.std_error, truth)
    assert all(p.grad is None for p in model.parameters())


def test_jacobian_norm_of_a_plain_module_on_float_inputs():
    model, x = MLP().double(), torch.randn(5, 6, dtype=F64)
    jac = jacobian(model, x)  # (5, 3, 5, 6)
    truth = torch.stack([jac[i, :, i] for i in range(5)]).pow(2).sum() / 5
    result = jacobian_norm(model, {"x": x}, inputs="x", method="exact")
    torch.testing.assert_close(result.value, truth, rtol=1e-10, atol=0)
    torch.testing.assert_close(result.rms, truth.sqrt(), rtol=1e-10, atol=0)


# -- activity–weight duality ---------------------------------------------------------------------------------------


def test_dual_weight_change_is_exact():
    weight, a, delta = torch.randn(5, 8, dtype=F64), torch.randn(10, 8, dtype=F64), torch.randn(10, 8, dtype=F64)
    dual = dual_weight_change(weight, a, delta)
    assert dual.shape == (10, 5, 8)
    torch.testing.assert_close(torch.einsum("ndm,nm->nd", weight + dual, a), (a + delta) @ weight.T, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="activity vector is zero"):
        dual_weight_change(weight, torch.zeros(1, 8, dtype=F64), delta[:1])


def test_dual_weights_reproduce_the_test_examples_through_the_network():
    model = MLP().double()
    train, test = mlp_batch(6), mlp_batch(6)
    test["y"] = train["y"]
    a, a_test = layer_inputs(model, train, "fc2", loss_fn=mlp_loss), layer_inputs(model, test, "fc2", loss_fn=mlp_loss)
    dual = dual_weight_change(model.fc2.weight.detach(), a, a_test - a)
    z = torch.einsum("ndm,nm->nd", model.fc2.weight.detach() + dual, a) + model.fc2.bias.detach()
    with torch.no_grad():
        torch.testing.assert_close(model.head(torch.tanh(z)), model(test["x"]), rtol=0, atol=1e-12)


def test_duality_decomposition_sums_to_the_taylor_term():
    model = MLP().double()
    train, test = mlp_batch(12), mlp_batch(12)
    test["y"] = train["y"]
    n = 5 * 8
    full = activity_weight_duality(model, train, test, "fc2", k=n, method="exact", loss_fn=mlp_loss)
    assert full.contributions.shape == (n,) and full.dual_weights.shape == (12, 5, 8)
    h = params_hessian(model, mlp_loss, train, ["fc2.weight"])
    dual = full.dual_weights.reshape(12, n)
    brute = 0.5 * torch.einsum("ni,ij,nj->n", dual, h, dual).mean()
    torch.testing.assert_close(full.taylor_term, brute, rtol=1e-9, atol=0)
    torch.testing.assert_close(full.total, full.taylor_term, rtol=1e-9, atol=0)
    torch.testing.assert_close(full.contributions, 0.5 * full.eigenvalues * full.sigma_sq, rtol=0, atol=0)
    grad = torch.autograd.grad(mlp_loss(model, train), model.fc2.weight)[0].reshape(-1)
    torch.testing.assert_close(full.first_order_term, (dual @ grad).mean(), rtol=1e-10, atol=0)
    top = activity_weight_duality(model, train, test, "fc2", k=4, loss_fn=mlp_loss, taylor=False)
    assert top.taylor_term is None
    torch.testing.assert_close(top.eigenvalues, full.eigenvalues[:4], rtol=1e-6, atol=0)
    torch.testing.assert_close(top.contributions, full.contributions[:4], rtol=1e-6, atol=1e-14)


def test_duality_on_a_transformer_head():
    """The classifier sees pooled features, so the head's dual weights carry the whole test example."""
    model = tiny_bert()
    train, test = bert_batch(), bert_batch()
    test["labels"] = train["labels"]
    full = activity_weight_duality(model, train, test, "classifier", k=36, method="exact")
    torch.testing.assert_close(full.total, full.taylor_term, rtol=1e-9, atol=0)
    h = layer_hessian(model, train, "classifier.weight")
    dual = full.dual_weights.reshape(4, 36)
    torch.testing.assert_close(
        full.taylor_term, 0.5 * torch.einsum("ni,ij,nj->n", dual, h, dual).mean(), rtol=1e-9, atol=0
    )


# -- the reparameterization curse, shown ----------------------------------------------------------------------------


class TwoLayerReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def kappa_exact(model, batch, layer):
    flatness = RelativeFlatness(model, layer, "exact")
    try:
        with flatness.record(differentiable=False) as recording:
            loss = mlp_loss(model, batch)
        return recording.result(loss).value
    finally:
        flatness.close()


def measures_of(model, batch, layer):
    trace = hessian_trace(model, batch, layer, method="exact", loss_fn=mlp_loss).value
    lam = top_eigenvalues(model, batch, layer, method="exact", loss_fn=mlp_loss).values[0]
    layerwise = layerwise_flatness(model, batch, layer, trace_method="exact", eigen_method="exact", loss_fn=mlp_loss)
    return kappa_exact(model, batch, layer), trace, lam, layerwise.trace_measure


@pytest.mark.parametrize("alpha", [4.0, 0.3])
def test_layerwise_rescaling_changes_the_hessian_trace_but_not_relative_flatness(alpha):
    """fc1 → α·fc1, fc2 → fc2/α: same function (ReLU is positively homogeneous), fc2's input scaled by α,
    so H_{W2} → α² H_{W2}: trace and λ_max scale by α², while κ and ‖W2‖²·Tr(H) do not move."""
    model, batch = TwoLayerReLU().double(), mlp_batch(16)
    batch["x"] = batch["x"][:, :4]
    kappa, trace, lam, layerwise = measures_of(model, batch, "fc2")
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.fc1.weight.mul_(alpha), scaled.fc1.bias.mul_(alpha), scaled.fc2.weight.div_(alpha)
        torch.testing.assert_close(scaled(batch["x"]), model(batch["x"]), rtol=1e-12, atol=1e-14)
    kappa2, trace2, lam2, layerwise2 = measures_of(scaled, batch, "fc2")
    torch.testing.assert_close(kappa2, kappa, rtol=1e-6, atol=0)
    torch.testing.assert_close(layerwise2, layerwise, rtol=1e-6, atol=0)
    torch.testing.assert_close(trace2, alpha**2 * trace, rtol=1e-6, atol=0)
    torch.testing.assert_close(lam2, alpha**2 * lam, rtol=1e-6, atol=0)


def test_neuronwise_rescaling_is_seen_by_the_layerwise_measure_but_not_by_relative_flatness():
    """Hidden unit j: fc1 row j → c_j·row, fc2 column j → column/c_j. κ of fc1 (whose neurons are rescaled)
    is invariant; ‖W1‖²·Tr(H_{W1}) is not."""
    model, batch = TwoLayerReLU().double(), mlp_batch(16)
    batch["x"] = batch["x"][:, :4]
    c = torch.tensor([0.2, 5.0, 1.0, 3.0, 0.5, 2.0], dtype=F64)
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.fc1.weight.mul_(c[:, None]), scaled.fc1.bias.mul_(c), scaled.fc2.weight.div_(c[None, :])
        torch.testing.assert_close(scaled(batch["x"]), model(batch["x"]), rtol=1e-12, atol=1e-14)
    kappa, _, _, layerwise = measures_of(model, batch, "fc1")
    kappa2, _, _, layerwise2 = measures_of(scaled, batch, "fc1")
    torch.testing.assert_close(kappa2, kappa, rtol=1e-6, atol=0)
    assert abs(float(layerwise2 / layerwise) - 1) > 0.1


# -- memory that does not grow with the probes ------------------------------------------------------------------------


class _Recorder(DenseOperator):
    """A dense operator that records the widest block of vectors it was given at once."""

    widest = 0

    def matmat(self, vectors):
        self.widest = max(self.widest, vectors.shape[1])
        return super().matmat(vectors)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "exact"])
def test_trace_is_the_same_for_every_block_and_holds_only_a_block(method):
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(30, 30, generator=gen, dtype=F64)
    a = a + a.T
    runs = {}
    for block in (1, 4, 1000):
        operator = _Recorder(a)
        runs[block] = estimate_trace(
            operator, probes=21, method=method, block=block, generator=torch.Generator().manual_seed(2)
        )
        assert operator.widest == min(block, 30 if method == "exact" else 21 - 2 * 7 if method == "hutch++" else 21)
    for block in (1, 4):
        torch.testing.assert_close(runs[block].value, runs[1000].value, rtol=1e-12, atol=0)
        if method != "exact":
            torch.testing.assert_close(runs[block].std_error, runs[1000].std_error, rtol=1e-12, atol=0)
    if method == "hutchinson":  # each probe vector drawn whole, one after the other
        v = rademacher(21, 30, generator=torch.Generator().manual_seed(2), dtype=F64).T
        torch.testing.assert_close(runs[1].value, (v * (a @ v)).sum(0).mean(), rtol=1e-12, atol=0)
    if method == "exact":
        torch.testing.assert_close(runs[1].value, torch.trace(a), rtol=1e-12, atol=0)


def test_loss_hessian_default_block_keeps_the_probes_within_the_models_gradient():
    model, batch = tiny_bert(), bert_batch()
    op = LossHessian(model, batch, "classifier")
    parameters = sum(p.numel() for p in model.parameters())
    assert op.default_block == parameters // 36
    whole = LossHessian(model, batch, None)
    assert whole.default_block == 1
    truth = torch.trace(layer_hessian(model, batch, "classifier.weight"))
    torch.testing.assert_close(hessian_trace(model, batch, method="exact", block=5).value, truth, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="block=0 must be at least 1"):
        hessian_trace(model, batch, block=0)


def test_top_eigenvalues_with_fewer_lanczos_vectors_kept():
    model, batch = tiny_bert(), bert_batch()
    truth = torch.linalg.eigvalsh(layer_hessian(model, batch, "classifier.weight")).flip(0)[:2]
    few = top_eigenvalues(model, batch, k=2, block=5)  # ARPACK keeps 5 vectors of 36, not 20
    torch.testing.assert_close(few.values, truth, rtol=1e-6, atol=0)
    assert few.matvecs != top_eigenvalues(model, batch, k=2).matvecs  # ARPACK ran with ncv=5 (9 products, not 21)
    with pytest.raises(ValueError, match="block=2 must be more than k=2 and at most n=36"):
        top_eigenvalues(model, batch, k=2, block=2)
    exact = top_eigenvalues(model, batch, k=2, method="exact", block=7)
    torch.testing.assert_close(exact.values, truth, rtol=1e-10, atol=0)


def test_forward_over_reverse_products_equal_double_backward_ones():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)  # fmt: skip
    llama = LlamaForCausalLM(config).double().eval()
    ids = torch.randint(0, 64, (2, 8))
    for model, batch, wrt in [(llama, {"input_ids": ids, "labels": ids}, None), (tiny_gpt2(), gpt2_batch(), "auto")]:
        reverse = LossHessian(model, batch, wrt)
        forward = LossHessian(model, batch, wrt, hvp="forward_over_reverse")
        torch.testing.assert_close(forward.gradient, reverse.gradient, rtol=1e-10, atol=1e-14)
        v = torch.randn(reverse.dim, dtype=F64)
        # transformers' causal-LM loss runs in float32 (logits.float()): the two agree to float32's precision
        torch.testing.assert_close(forward @ v, reverse @ v, rtol=1e-6, atol=1e-7 * float((reverse @ v).abs().max()))
    with pytest.raises(ValueError, match="hvp='forward' is not one of 'double_backward', 'forward_over_reverse'"):
        LossHessian(llama, {"input_ids": ids, "labels": ids}, hvp="forward")


def _hvp_through_a_zero_perturbation(model, batch, wrt, vector):
    """The products as LossHessian took them before it differentiated by the parameters themselves: the loss at
    ``w + δ`` for a zero leaf ``δ``, the gradient with ``create_graph``, then ``torch.autograd.grad`` of ``g·v``."""
    from fam_hf.curvature import second_order_kernels
    from fam_hf.measures import perturbed_loss

    subset = resolve_subset(model, wrt)
    zeros = [torch.zeros_like(w, requires_grad=True) for w in subset.values]
    with second_order_kernels():
        grads = torch.autograd.grad(perturbed_loss(model, batch, subset, zeros), zeros, create_graph=True)
        hv = torch.autograd.grad(grads, zeros, grad_outputs=subset.unflatten(vector), allow_unused=True)
    hv = [h if h is not None else torch.zeros_like(z) for h, z in zip(hv, zeros)]
    return subset.flatten(grads).detach(), subset.flatten(hv)


def tiny_llama(dtype=F64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_loss_hessian_by_the_parameters_themselves_equals_the_zero_perturbation_form_bit_for_bit(dtype):
    """Differentiating by detached aliases of the parameters (no copy of the model) and adding the product into
    views of one output vector give the very numbers of ``w + δ`` at ``δ = 0`` and ``autograd.grad``."""
    llama, ids = tiny_llama(dtype), torch.randint(0, 64, (2, 8))
    bert = tiny_bert().to(dtype)
    frozen = bert.bert.embeddings.word_embeddings.weight
    frozen.requires_grad_(False)
    cases = [
        (llama, {"input_ids": ids, "labels": ids}, None),  # a tied matrix, in both its uses
        (tiny_gpt2().to(dtype), gpt2_batch(), "auto"),  # a layer: Conv1D's weight.T, not contiguous
        (bert, bert_batch(), [frozen, bert.classifier.weight]),  # a frozen parameter included
    ]
    for model, batch, wrt in cases:
        before = copy.deepcopy(model.state_dict())
        operator = LossHessian(model, batch, wrt)
        v = torch.randn(operator.dim, generator=torch.Generator().manual_seed(1), dtype=dtype)
        gradient, hv = _hvp_through_a_zero_perturbation(model, batch, wrt, v)
        assert torch.equal(operator.gradient, gradient)
        assert torch.equal(operator @ v, hv)
        assert torch.equal(operator @ v, hv)  # again: nothing left behind in the variables' .grad
        out = torch.randn(operator.dim, generator=torch.Generator().manual_seed(2), dtype=dtype)
        assert torch.equal(operator.add_matvec(v, out.clone()), out + hv)  # added into out as it is computed
        columns = torch.stack([v, -2 * v, v.flip(0)], dim=1)
        assert torch.equal(operator @ columns, torch.stack([operator @ c for c in columns.T], dim=1))
        if wrt is None:  # the variables are the parameters' own storage
            assert [x.data_ptr() for x in operator._variables] == [p.data_ptr() for p in model.parameters()]
        assert_same_model(before, model)
        assert frozen.requires_grad is False


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_sharpness_over_parameters_equals_the_copying_form_bit_for_bit(adaptive):
    """SAM sharpness takes the gradient at aliases of the parameters and turns it into ``w + ε̂`` in its own buffer: the
    very numbers of the form that evaluated ``L(w + δ)`` at a zero ``δ`` and then ``L(w + ε̂)`` from new tensors."""
    from fam_hf.measures import perturbed_loss
    from fam_hf.measures.sam import ascent_direction, ascent_norm

    llama, ids = tiny_llama(torch.float32), torch.randint(0, 64, (2, 8))
    bert = tiny_bert().to(torch.float32)
    bert.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    for model, batch in [(llama, {"input_ids": ids, "labels": ids}), (bert, bert_batch())]:
        before = copy.deepcopy(model.state_dict())
        result = sam_sharpness(model, batch, rho=0.05, adaptive=adaptive, eta=0.01)
        subset = resolve_subset(model, None)
        zeros = [torch.zeros_like(w, requires_grad=True) for w in subset.values]
        loss = perturbed_loss(model, batch, subset, zeros)
        grads = torch.autograd.grad(loss, zeros)
        norm = ascent_norm(zip(grads, subset.values), adaptive=adaptive, eta=0.01)
        epsilon = [ascent_direction(g, w, adaptive=adaptive, eta=0.01) * (0.05 / norm) for g, w in zip(grads, subset.values)]
        with torch.no_grad():
            perturbed = perturbed_loss(model, batch, subset, epsilon)
        assert torch.equal(result.loss, loss.detach()) and torch.equal(result.gradient_norm, norm)
        assert torch.equal(result.perturbed_loss, perturbed)
        assert_same_model(before, model)


def test_gauss_newton_trace_over_parameters_equals_the_zero_perturbation_form():
    """The forward-mode products differentiate the parameters themselves: the same ``vᵀ G v`` as the tangent of a zero
    perturbation ``w + δ`` (the form before, which held two more copies of the model)."""
    from fam_hf.curvature import gauss_newton_forms, second_order_kernels
    from fam_hf.head_loss import head_loss_for

    model, ids = tiny_llama(), torch.randint(0, 64, (2, 8))
    batch = {"input_ids": ids, "labels": ids}
    trace = gauss_newton_trace(model, batch, None, probes=3, generator=torch.Generator().manual_seed(4))
    subset = resolve_subset(model, None)
    generator = torch.Generator().manual_seed(4)
    probes = rademacher(3, subset.dim, generator=generator, dtype=F64).T  # the draws gauss_newton_trace makes
    loss = head_loss_for(model)
    labels, loss = loss.aligned(ids, batch)

    def logits_at(*deltas):
        moved = {name: w + d for name, w, d in zip(subset.names, subset.values, deltas)}
        return torch.func.functional_call(model, moved, kwargs={"input_ids": ids}).logits

    forms = []
    for v in probes.T:
        zeros = tuple(torch.zeros_like(w) for w in subset.values)
        with second_order_kernels():  # the math attention kernel, which has forward-mode derivatives
            logits, tangent = torch.func.jvp(logits_at, zeros, tuple(subset.unflatten(v)))
        positions, stacked, weights = loss.positions(logits, tangent, labels, input_ids=ids, num_items_in_batch=None)
        forms.append(gauss_newton_forms(positions, stacked.reshape(positions.shape[0], 1, -1), weights, loss.loss_type))
    torch.testing.assert_close(trace.value, torch.cat(forms).mean(), rtol=1e-12, atol=0)


def test_loss_hessian_over_parameters_refuses_a_product_once_the_weights_moved():
    """The operator differentiates by the parameters' own storage: after an optimizer step (in place) its graph is
    stale, and autograd says so rather than mixing old and new weights."""
    model, ids = tiny_llama(), torch.randint(0, 64, (2, 8))
    operator = LossHessian(model, {"input_ids": ids, "labels": ids}, None)
    v = torch.randn(operator.dim, dtype=F64)
    operator @ v
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        operator @ v


def test_micro_batched_hessian_is_the_whole_batchs():
    """``H v = Σ_c (N_c/N) H_c v`` over parts of the rows, weighted by the targets each part counts: the whole batch's
    product, gradient and loss (float64), for a causal LM with ignored labels (parts counting different numbers of
    targets, one counting none), a layer of GPT-2, and a sequence classifier."""
    llama = tiny_llama()
    ids = torch.randint(0, 64, (5, 8), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, 3:] = -100
    labels[3:, 1:] = -100  # the last part counts no target (the first label is shifted away)
    cases = [
        (llama, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}, None, 3),
        (tiny_gpt2(), gpt2_batch(), "auto", 2),
        (tiny_bert(), bert_batch(), None, 4),
    ]
    for model, batch, wrt, parts in cases:
        whole = LossHessian(model, batch, wrt)
        split = MicroBatchedHessian(model, batch, wrt, micro_batches=parts)
        v = torch.randn(whole.dim, generator=torch.Generator().manual_seed(1), dtype=F64)
        torch.testing.assert_close(split @ v, whole @ v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(split.gradient, whole.gradient, rtol=1e-10, atol=1e-13)
        # transformers' causal-LM loss value is computed in float32 (logits.float()): summed parts agree to its rounding
        torch.testing.assert_close(split.loss, whole.loss, rtol=1e-6, atol=0)
        columns = torch.stack([v, -v], dim=1)
        torch.testing.assert_close(split @ columns, whole @ columns, rtol=1e-10, atol=1e-12)
        assert split.matvecs == 3
    assert len(split_batch(llama, cases[0][1], 3)) == 2  # the part with no target is left out
    given = {**cases[0][1], "num_items_in_batch": 7}  # the model divides each part's summed loss by it already
    v = torch.randn(LossHessian(llama, given, None).dim, generator=torch.Generator().manual_seed(1), dtype=F64)
    torch.testing.assert_close(MicroBatchedHessian(llama, given, None, micro_batches=2) @ v,
                               LossHessian(llama, given, None) @ v, rtol=1e-10, atol=1e-12)  # fmt: skip
    batch = cases[0][1]
    truth = top_eigenvalues(llama, batch, None, k=2, method="streaming", tol=1e-10)
    parts = top_eigenvalues(llama, batch, None, k=2, method="streaming", tol=1e-10, micro_batches=2)
    torch.testing.assert_close(parts.values, truth.values, rtol=1e-9, atol=0)
    # the trace and the spectrum take the option too: the same probes, the same numbers
    torch.testing.assert_close(hessian_trace(llama, batch, None, probes=4, micro_batches=3).value,
                               hessian_trace(llama, batch, None, probes=4).value, rtol=1e-9, atol=0)  # fmt: skip
    spectra = [hessian_spectrum(llama, batch, None, runs=1, steps=6, micro_batches=m) for m in (1, 2)]
    torch.testing.assert_close(spectra[1].nodes, spectra[0].nodes, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="micro_batches splits the model's own loss"):
        top_eigenvalues(llama, batch, None, micro_batches=2, loss_fn=lambda m, b: m(**b).loss)
    with pytest.raises(ValueError, match="is not one fam_hf recognises"):
        MicroBatchedHessian(MLP().double(), {"x": torch.randn(4, 6, dtype=F64), "labels": torch.zeros(4)}, None,
                            micro_batches=2)  # fmt: skip
    with pytest.raises(ValueError, match="micro_batches=6 must be between 1 and the batch's 5 rows"):
        MicroBatchedHessian(llama, batch, None, micro_batches=6)

"""Every estimator against the brute-force float64 layer Hessian (tests/brute_force.py)."""

from __future__ import annotations

import pytest
import torch
from brute_force import functional_loss, kappa_from_loss_fn
from models import tiny_bert, tiny_gpt2
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.nn import functional as F
from transformers import (
    LlamaConfig,
    LlamaForSequenceClassification,
)

from fam_hf import RelativeFlatness, closed_form, relative_flatness
from fam_hf.curvature import softmax_curvature
from fam_hf.norms import differentiable_layer_norm

RTOL_CLOSED = 1e-8


def lm_batch(model, batch_size=3, length=6):
    ids = torch.randint(0, model.config.vocab_size, (batch_size, length))
    labels = ids.clone()
    labels[0, :3] = -100  # a masked prompt
    labels[2, -2:] = -100  # padding
    return {"input_ids": ids, "labels": labels}


def assert_within_stderr(result, truth, k=3.0):
    assert result.std_error is not None
    assert abs(float(result.value) - float(truth)) <= k * float(result.std_error), (
        f"probe {float(result.value):.6g} ± {float(result.std_error):.3g} vs truth {float(truth):.6g}"
    )


# -- closed form --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_labels,problem_type,labels",
    [
        (3, None, torch.tensor([0, 2, 1, -100])),  # cross-entropy with an ignored example
        (1, None, torch.tensor([0.3, -1.2, 2.0, 0.1], dtype=torch.float64)),  # MSE regression
        (
            3,
            "multi_label_classification",
            torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.float64),
        ),  # BCE
    ],
    ids=["cross_entropy", "mse", "bce"],
)
def test_closed_form_sequence_classifier_matches_brute_force(num_labels, problem_type, labels):
    model = tiny_bert(num_labels, problem_type)
    batch = {"input_ids": torch.randint(0, 40, (4, 5)), "labels": labels}
    truth = kappa_from_loss_fn(functional_loss(model, batch, "classifier.weight"), model.classifier.weight.detach())
    result = relative_flatness(model, batch, estimator="closed_form")
    assert result.estimator == "closed_form" and result.layer == "classifier"
    torch.testing.assert_close(result.value, truth, rtol=RTOL_CLOSED, atol=0)
    assert_within_stderr(relative_flatness(model, batch, estimator="probe", probes=300), truth)


def test_closed_form_tied_lm_head_with_masked_labels():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    batch = lm_batch(model)
    hidden = model.transformer(batch["input_ids"]).last_hidden_state.detach()

    def loss_of(e):  # perturb the head's use of the tied matrix only; the features stay fixed
        logits = hidden @ (model.lm_head.weight + e).T
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))

    truth = kappa_from_loss_fn(loss_of, model.lm_head.weight.detach())
    result = relative_flatness(model, batch)
    assert (result.estimator, result.layer) == ("closed_form", "lm_head")
    torch.testing.assert_close(result.value, truth, rtol=RTOL_CLOSED, atol=0)
    assert_within_stderr(relative_flatness(model, batch, estimator="probe", probes=300), truth)


def test_closed_form_lm_head_uses_num_items_in_batch():
    model = tiny_gpt2()
    batch = lm_batch(model)
    plain = relative_flatness(model, batch).value
    counted = int((batch["labels"][:, 1:] != -100).sum())
    summed = relative_flatness(model, {**batch, "num_items_in_batch": torch.tensor(2 * counted)}).value
    torch.testing.assert_close(summed, plain / 2, rtol=1e-12, atol=0)


def test_closed_form_pooled_decoder_classifier():
    cfg = LlamaConfig(
        vocab_size=30,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=3,
        pad_token_id=0,
        attn_implementation="eager",
    )
    model = LlamaForSequenceClassification(cfg).double().eval()
    ids = torch.randint(1, 30, (3, 6))
    ids[0, 4:] = 0  # right padding: the pooled position is the last non-pad token
    batch = {"input_ids": ids, "labels": torch.tensor([2, 0, 1])}
    truth = kappa_from_loss_fn(functional_loss(model, batch, "score.weight"), model.score.weight.detach())
    result = relative_flatness(model, batch)
    assert (result.estimator, result.layer) == ("closed_form", "score")
    torch.testing.assert_close(result.value, truth, rtol=RTOL_CLOSED, atol=0)


def test_closed_form_function_on_mlp_head():
    """The pure function on a 10-line MLP: mean cross-entropy over 5 examples."""
    features, head = torch.randn(5, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    targets = torch.tensor([0, 3, 1, 1, 2])
    truth = kappa_from_loss_fn(lambda e: F.cross_entropy(features @ (head + e).T, targets), head)
    value = closed_form(head, features, features @ head.T, torch.full((5,), 0.2, dtype=torch.float64), "cross_entropy")
    torch.testing.assert_close(value, truth, rtol=RTOL_CLOSED, atol=0)


def test_softmax_curvature_in_chunks_matches_autograd_of_the_formula():
    """The custom autograd function (P recomputed chunk by chunk in backward) against plain autograd."""
    logits = torch.randn(7, 11, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    probs = torch.softmax(logits, -1)
    expected = probs @ weight.pow(2).sum(-1) - (probs @ weight).pow(2).sum(-1)
    got = softmax_curvature(logits, weight, chunk_rows=3)  # chunks of 3, 3, 1 rows
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    upstream = torch.randn(7, dtype=torch.float64)
    for g, e in zip(
        torch.autograd.grad(got, (logits, weight), upstream),
        torch.autograd.grad(expected, (logits, weight), upstream, retain_graph=True),
    ):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda z, w: softmax_curvature(z, w, chunk_rows=2), (logits, weight))
    # detached logits ("detached" semantics): only W gets a gradient
    (g_weight,) = torch.autograd.grad(softmax_curvature(logits.detach(), weight, chunk_rows=2).sum(), weight)
    torch.testing.assert_close(g_weight, torch.autograd.grad(expected.sum(), weight)[0], rtol=1e-10, atol=1e-12)


def test_softmax_curvature_of_bf16_logits_is_float32_under_autocast():
    logits, weight = torch.randn(6, 50), torch.randn(50, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = softmax_curvature(logits.bfloat16(), weight, chunk_rows=4)
    assert got.dtype == torch.float32
    probs = torch.softmax(logits.bfloat16().float(), -1)
    expected = probs @ weight.pow(2).sum(-1) - (probs @ weight).pow(2).sum(-1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # float32 arithmetic on the bf16 logits
    got.sum().backward()
    assert weight.grad.dtype == torch.float32 and torch.isfinite(weight.grad).all()


def test_softmax_curvature_with_bf16_products_stays_close():
    """The GPU bf16 path (products in bf16, the rest in float32), run on the CPU: close to float32, same
    gradients to bf16 accuracy."""
    logits = (3 * torch.randn(64, 300)).requires_grad_()
    weight = (0.1 * torch.randn(300, 32)).requires_grad_()
    exact = softmax_curvature(logits, weight, chunk_rows=40)
    bf16 = softmax_curvature(logits, weight, chunk_rows=40, product_dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16.sum(), exact.sum(), rtol=1e-3, atol=0)
    for g, e in zip(
        torch.autograd.grad(bf16.sum(), (logits, weight)), torch.autograd.grad(exact.sum(), (logits, weight))
    ):
        assert (g - e).norm() <= 1e-2 * e.norm()


def test_token_fraction_is_unbiased_and_exact_when_it_covers_the_counted_positions():
    model = tiny_gpt2()
    batch = lm_batch(model, batch_size=4, length=6)  # 24 positions, 16 counted (prompt, padding, shift)
    exact = float(relative_flatness(model, batch).value)
    flatness = RelativeFlatness(model, token_fraction=0.25)  # 4 of the 16 counted positions
    draws = []
    for _ in range(400):
        with flatness.record(batch, differentiable=False) as recording:
            model(**batch)
        draws.append(float(recording.result(None).value))
    draws = torch.tensor(draws, dtype=torch.float64)
    assert draws.std() > 0  # it does sample
    assert abs(draws.mean() - exact) <= 3 * draws.std() / 20, (float(draws.mean()), exact)
    # a fraction of the counted positions: at 1/16, one of the 16 counted positions a draw, times 16
    single = RelativeFlatness(model, token_fraction=1 / 16)
    values = set()
    for _ in range(200):
        with single.record(batch, differentiable=False) as recording:
            model(**batch)
        values.add(round(float(recording.result(None).value), 12))
    shifted = batch["labels"][:, 1:]
    alone = set()  # κ with only position t counted (its weight 1 = 16 × 1/16), for every counted t
    for i, t in (shifted != -100).nonzero().tolist():
        labels = torch.full_like(batch["labels"], -100)
        labels[i, t + 1] = batch["labels"][i, t + 1]
        alone.add(round(float(relative_flatness(model, {**batch, "labels": labels}).value), 12))
    assert values == alone
    nearly = relative_flatness(model, batch, token_fraction=0.99)  # ⌈0.99 · 16⌉ = 16: every counted position
    torch.testing.assert_close(nearly.value, torch.tensor(exact, dtype=torch.float64), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="token_fraction=0.5 subsamples the positions of the closed form"):
        RelativeFlatness(model, "transformer.h.0.mlp.c_fc", token_fraction=0.5)
    with pytest.raises(ValueError, match=r"token_fraction=0 must be in \(0, 1\]"):
        RelativeFlatness(model, token_fraction=0)


def test_all_ignored_labels_give_zero_not_nan():
    model = tiny_gpt2()
    batch = lm_batch(model)
    batch["labels"][:] = -100
    assert float(relative_flatness(model, batch).value) == 0.0


def test_reference_scale_divides_by_fan_in():
    model = tiny_bert()
    batch = {"input_ids": torch.randint(0, 40, (4, 5)), "labels": torch.tensor([0, 2, 1, 1])}
    paper = relative_flatness(model, batch).value
    reference = relative_flatness(model, batch, scale="reference").value
    torch.testing.assert_close(reference, paper / model.config.hidden_size, rtol=1e-12, atol=0)


# -- gradients ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hessian_grad", ["full", "detached"])
def test_closed_form_gradient_matches_brute_force(hessian_grad):
    model = tiny_bert()
    batch = {"input_ids": torch.randint(0, 40, (4, 5)), "labels": torch.tensor([0, 2, 1, 1])}
    params = [p for p in model.parameters()]
    weight = model.classifier.weight
    truth = kappa_from_loss_fn(
        functional_loss(model, batch, "classifier.weight"),
        weight,
        create_graph=True,
        detach_hessian=hessian_grad == "detached",
    )
    expected = torch.autograd.grad(truth, params, allow_unused=True)
    result = relative_flatness(model, batch, hessian_grad=hessian_grad, differentiable=True)
    got = torch.autograd.grad(result.value, params, allow_unused=True)
    for name, g, e in zip([n for n, _ in model.named_parameters()], got, expected):
        g = torch.zeros_like(params[0]) if g is None and e is None else g
        if e is None:
            assert g is None or g.abs().max() == 0, name
            continue
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-10, msg=name)
    if hessian_grad == "detached":  # only the head's weight moves
        assert all(
            g is None or g.abs().max() == 0
            for (n, _), g in zip(model.named_parameters(), got)
            if n != "classifier.weight"
        )


@pytest.mark.parametrize("hessian_grad", ["full", "detached"])
def test_probe_gradient_for_a_fixed_probe_matches_brute_force(hessian_grad):
    """With the Rademacher matrix R fixed, one probe is q(θ) = vec(WR)ᵀ H(θ) vec(WR): compare ∇q."""
    model = tiny_bert()
    batch = {"input_ids": torch.randint(0, 40, (4, 5)), "labels": torch.tensor([0, 2, 1, 1])}
    params = list(model.parameters())
    flat = RelativeFlatness(
        model,
        "bert.encoder.layer.0.intermediate.dense",
        "probe",
        probes=1,
        hessian_grad=hessian_grad,
        generator=torch.Generator().manual_seed(7),
    )
    with flat.record() as recording:
        loss = model(**batch).loss
    got = torch.autograd.grad(recording.result(loss).value, params, allow_unused=True)
    r = recording.probe_matrices[0].to(torch.float64)

    name = "bert.encoder.layer.0.intermediate.dense.weight"
    weight = dict(model.named_parameters())[name]
    d, m = weight.shape

    def fixed_probe(create_graph):  # q(θ) = vec(WR)ᵀ H(θ) vec(WR)
        zero = torch.zeros_like(weight.detach(), requires_grad=True)
        h = torch.autograd.functional.hessian(functional_loss(model, batch, name), zero, create_graph=create_graph)
        h = h.reshape(d * m, d * m)
        v = (weight @ r).reshape(-1)
        return v @ (h.detach() if hessian_grad == "detached" else h) @ v

    with differentiable_layer_norm():  # the truth's own third derivatives through LayerNorm (fam_hf.norms)
        expected = torch.autograd.grad(fixed_probe(True), params, allow_unused=True)
    for (n, _), g, e in zip(model.named_parameters(), got, expected):
        if e is None or e.abs().max() == 0:
            assert g is None or g.abs().max() < 1e-12, n
        else:
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-10, msg=n)
    if hessian_grad == "full":  # anchored by finite differences, which need second derivatives only
        names = [n for n, _ in model.named_parameters()]
        for n in ("bert.embeddings.LayerNorm.weight", "bert.encoder.layer.0.attention.output.LayerNorm.weight"):
            param, eps = dict(model.named_parameters())[n], 1e-5
            with torch.no_grad():
                param[0] += eps
                up = fixed_probe(False)
                param[0] -= 2 * eps
                down = fixed_probe(False)
                param[0] += eps
            torch.testing.assert_close(got[names.index(n)][0], (up - down) / (2 * eps), rtol=1e-5, atol=1e-12, msg=n)


# -- probe and exact on every kind of layer ----------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(6, 8), nn.Linear(8, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


@pytest.mark.parametrize("layer", ["fc2", "head"])
def test_probe_and_exact_on_mlp(layer):
    model = MLP().double()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    weight = getattr(model, layer).weight

    def loss_of(e):
        return F.cross_entropy(torch.func.functional_call(model, {f"{layer}.weight": weight + e}, (x,)), y)

    truth = kappa_from_loss_fn(loss_of, weight.detach())
    for estimator in ("exact", "probe"):
        flat = RelativeFlatness(model, layer, estimator, probes=400, generator=torch.Generator().manual_seed(1))
        with flat.record(differentiable=False) as recording:
            loss = F.cross_entropy(model(x), y)
        result = recording.result(loss)
        if estimator == "exact":
            torch.testing.assert_close(result.value, truth, rtol=1e-10, atol=0)
        else:
            assert_within_stderr(result, truth)


def test_probe_and_exact_on_gpt2_conv1d_projection():
    model = tiny_gpt2()
    batch = lm_batch(model)
    name = "transformer.h.0.attn.c_proj"
    weight = dict(model.named_modules())[name].weight  # Conv1D: (in, out)
    truth = kappa_from_loss_fn(functional_loss(model, batch, name + ".weight", transpose=True), weight.detach().T)
    exact = relative_flatness(model, batch, name, "exact")
    torch.testing.assert_close(exact.value, truth, rtol=1e-10, atol=0)
    probe = relative_flatness(model, batch, name, "probe", probes=400)
    assert_within_stderr(probe, truth)


def lora_gpt2():
    """A tiny GPT-2 with a LoRA adapter (off its zero init) on ``c_attn``, its batch, and the effective weight
    ``W0 + s·BA: (d, m)``; ``merged(e)`` runs the base model, adapter disabled, with the base weight ``W0 + s·BA + E``."""
    model = tiny_gpt2()
    lora = get_peft_model(
        model,
        LoraConfig(
            r=2, lora_alpha=4, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True, init_lora_weights=False
        ),
    )
    layer = lora.base_model.model.transformer.h[0].attn.c_attn
    effective = (layer.base_layer.weight.T + layer.get_delta_weight("default").T).detach()  # (d, m)
    assert not torch.allclose(effective, layer.base_layer.weight.T)  # the adapter is not at its zero init

    def merged(e, **kwargs):
        with lora.disable_adapter():
            return torch.func.functional_call(
                lora.base_model.model,
                {"transformer.h.0.attn.c_attn.base_layer.weight": (effective + e).T},
                args=(),
                kwargs=kwargs,
            )

    return lora, layer, effective, merged


def test_probe_and_exact_on_lora_projection():
    lora, layer, effective, merged = lora_gpt2()
    batch = lm_batch(lora)

    def loss_of(e):
        return merged(e, **batch).loss

    truth = kappa_from_loss_fn(loss_of, effective)
    exact = relative_flatness(lora, batch, "transformer.h.0.attn.c_attn", "exact")
    assert exact.layer == "transformer.h.0.attn.c_attn"
    torch.testing.assert_close(exact.value, truth, rtol=1e-10, atol=0)
    probe = relative_flatness(lora, batch, "transformer.h.0.attn.c_attn", "probe", probes=400)
    assert_within_stderr(probe, truth)
    # gradients reach the adapter only (the base layer is frozen)
    result = relative_flatness(lora, batch, "transformer.h.0.attn.c_attn", "probe", probes=1, differentiable=True)
    result.value.backward()
    assert layer.lora_A["default"].weight.grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is None


def test_gauss_newton_on_lora_projection_is_the_effective_weights():
    """κ_GN of the merged weight W0 + s·BA from the full Jacobian of the logits; the gradient trains the adapter."""
    lora, layer, effective, merged = lora_gpt2()
    batch = lm_batch(lora)
    counted = (batch["labels"][:, 1:] != -100).reshape(-1)

    def logits_of(e):
        logits = merged(e, input_ids=batch["input_ids"]).logits[:, :-1]
        return logits.reshape(-1, logits.shape[-1])[counted]

    n = int(counted.sum())
    g = gauss_newton_matrix(logits_of, effective, torch.full((n,), 1.0 / n, dtype=torch.float64))
    truth = kappa_of_matrix(g, effective)
    result = relative_flatness(lora, batch, "transformer.h.0.attn.c_attn", "gauss_newton", probes=400)
    assert_within_stderr(result, truth)
    result = relative_flatness(lora, batch, "transformer.h.0.attn.c_attn", "gauss_newton", differentiable=True)
    result.value.backward()
    assert layer.lora_A["default"].weight.grad.abs().sum() > 0 and layer.base_layer.weight.grad is None


def test_probe_on_head_agrees_with_closed_form():
    model = tiny_bert()
    batch = {"input_ids": torch.randint(0, 40, (4, 5)), "labels": torch.tensor([0, 2, 1, 1])}
    exact = relative_flatness(model, batch, estimator="closed_form").value
    assert_within_stderr(relative_flatness(model, batch, estimator="probe", probes=400), exact)


def test_probe_std_error_shrinks_as_inverse_sqrt_probes():
    model = tiny_bert()
    batch = {"input_ids": torch.randint(0, 40, (4, 5)), "labels": torch.tensor([0, 2, 1, 1])}
    few = relative_flatness(model, batch, estimator="probe", probes=25).std_error
    many = relative_flatness(model, batch, estimator="probe", probes=400).std_error
    ratio = float(few / many)  # √(400/25) = 4
    assert 4 / 1.5 < ratio < 4 * 1.5, ratio


def test_probe_is_reproducible_from_its_generator():
    model = tiny_bert()
    batch = {"input_ids": torch.randint(0, 40, (4, 5)), "labels": torch.tensor([0, 2, 1, 1])}
    runs = [
        relative_flatness(model, batch, estimator="probe", probes=3, generator=torch.Generator().manual_seed(5)).value
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


# -- errors -------------------------------------------------------------------------------------------------


def test_exact_refuses_a_large_layer():
    model = tiny_gpt2()
    with pytest.raises(ValueError, match=r"estimator='exact' on 'lm_head' \(24×8 = 192 weights\).*max_exact_entries"):
        relative_flatness(model, lm_batch(model), estimator="exact", max_exact_entries=100)


def test_closed_form_refuses_a_body_layer():
    model = tiny_bert()
    with pytest.raises(ValueError, match="not the model's output head.*estimator='probe'"):
        RelativeFlatness(model, "bert.pooler.dense", "closed_form")
    assert RelativeFlatness(model, "bert.pooler.dense", "auto").estimator == "exact"  # 144 weights: cheap
    assert RelativeFlatness(model, "bert.pooler.dense", "auto", max_exact_entries=100).estimator == "probe"


def test_bad_options_name_the_choices():
    model = tiny_bert()
    with pytest.raises(ValueError, match="estimator='hutchinson' is not one of 'auto', 'closed_form'"):
        RelativeFlatness(model, estimator="hutchinson")
    with pytest.raises(ValueError, match="probes=0 must be at least 1"):
        RelativeFlatness(model, estimator="probe", probes=0)


def test_layer_not_called_is_reported():
    model = MLP().double()
    flat = RelativeFlatness(model, "fc1", "probe")
    with flat.record() as recording:
        loss = torch.zeros((), requires_grad=True)
    with pytest.raises(RuntimeError, match="'fc1' did not run"):
        recording.result(loss)


# -- Gauss–Newton -------------------------------------------------------------------------------------------


def gauss_newton_matrix(logits_of_weight, weight, position_weights, *, create_graph=False):
    """``G = Σ_t c_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t``, ``(d·m, d·m)``, from the full Jacobian of the counted
    positions' logits w.r.t. the layer's weight (``logits_of_weight(E)``: ``(N, C)`` with the weight + E)."""
    zero = torch.zeros_like(weight.detach(), requires_grad=True)
    jac = torch.autograd.functional.jacobian(logits_of_weight, zero, create_graph=create_graph)  # (N, C, d, m)
    jac = jac.reshape(*jac.shape[:2], -1)
    probs = torch.softmax(logits_of_weight(zero), dim=-1)
    curvature = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]  # (N, C, C)
    return torch.einsum("t,tci,tcd,tdj->ij", position_weights, jac, curvature, jac)


def kappa_of_matrix(curvature, weight):
    """``κ = Σ_{s,s'} ⟨w_s, w_s'⟩ Tr(M_{s,s'})`` for a ``(d·m, d·m)`` curvature ``M`` of a ``(d, m)`` weight."""
    d, m = weight.shape
    return ((weight @ weight.T) * torch.einsum("aibi->ab", curvature.reshape(d, m, d, m))).sum()


def bert_logits_of(model, batch, name):
    param = dict(model.named_parameters())[name]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return lambda e: torch.func.functional_call(model, {name: param + e}, args=(), kwargs=inputs).logits


def gpt2_counted_logits_of(model, batch, name):
    """The shifted, counted positions' logits of a GPT-2 LM, with ``name`` (a Conv1D weight, (in, out)) + Eᵀ."""
    param = dict(model.named_parameters())[name]
    counted = (batch["labels"][:, 1:] != -100).reshape(-1)

    def logits_of(e):
        out = torch.func.functional_call(model, {name: param + e.T}, args=(), kwargs={"input_ids": batch["input_ids"]})
        return out.logits[:, :-1].reshape(-1, out.logits.shape[-1])[counted]

    return logits_of, int(counted.sum())


@pytest.mark.parametrize("hessian_grad_check", [False, True], ids=["value", "gradient"])
def test_gauss_newton_for_a_fixed_probe_matches_brute_force(hessian_grad_check):
    """With R fixed, one probe is q(θ) = vec(WR)ᵀ G(θ) vec(WR) with G the Gauss–Newton matrix: value and ∇q."""
    model = tiny_bert()
    batch = {"input_ids": torch.randint(0, 40, (4, 5)), "labels": torch.tensor([0, 2, 1, -100])}
    name = "bert.encoder.layer.0.intermediate.dense"
    flat = RelativeFlatness(model, name, "gauss_newton", probes=1, generator=torch.Generator().manual_seed(3))
    with flat.record(batch) as recording:
        outputs = model(**batch)
    result = recording.result(outputs.loss, logits=outputs.logits)
    assert result.estimator == "gauss_newton" and result.probes == 1
    r = recording.probe_matrices[0]
    weight = dict(model.named_parameters())[name + ".weight"]
    c = torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0], dtype=torch.float64)  # the ignored example weighs 0
    g = gauss_newton_matrix(bert_logits_of(model, batch, name + ".weight"), weight, c, create_graph=hessian_grad_check)
    v = (weight @ r).reshape(-1)
    expected = v @ g @ v
    if not hessian_grad_check:
        torch.testing.assert_close(result.value, expected, rtol=1e-10, atol=0)
        assert torch.linalg.eigvalsh(g).min() > -1e-12  # PSD (the probe's Hessian here is not: see below)
        return
    params = list(model.parameters())
    got = torch.autograd.grad(result.value, params, allow_unused=True)
    want = torch.autograd.grad(expected, params, allow_unused=True)
    for (n, _), a, b in zip(model.named_parameters(), got, want):
        if b is None or b.abs().max() == 0:
            assert a is None or a.abs().max() < 1e-14, n
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12, msg=n)


def test_gauss_newton_kappa_on_a_masked_lm_projection_matches_brute_force():
    """κ_GN = Σ ⟨w_s, w_s'⟩ Tr(G_{s,s'}) on GPT-2's Conv1D projection, shifted and masked labels, and the
    loss's num_items_in_batch denominator; the probe mean lands within its standard error."""
    model = tiny_gpt2()
    batch = lm_batch(model)
    name = "transformer.h.0.attn.c_proj"
    weight = dict(model.named_modules())[name].weight.detach().T  # (d, m)
    logits_of, counted = gpt2_counted_logits_of(model, batch, name + ".weight")
    items = 2 * counted  # as if the batch were half of an accumulated step
    g = gauss_newton_matrix(logits_of, weight, torch.full((counted,), 1.0 / items, dtype=torch.float64))
    truth = kappa_of_matrix(g, weight)
    result = relative_flatness(model, {**batch, "num_items_in_batch": torch.tensor(items)}, name, "gauss_newton",
                               probes=400)  # fmt: skip
    assert_within_stderr(result, truth)
    assert float(truth) > 0


def test_gauss_newton_on_the_head_is_the_probe_with_the_same_probes():
    """On an output head the logits are the layer's output, so G is the Hessian: per probe, the same number."""
    model = tiny_bert()
    batch = {"input_ids": torch.randint(0, 40, (4, 5)), "labels": torch.tensor([0, 2, 1, 1])}
    values = [
        relative_flatness(model, batch, "classifier", est, probes=5, generator=torch.Generator().manual_seed(2)).value
        for est in ("probe", "gauss_newton")
    ]
    torch.testing.assert_close(values[1], values[0], rtol=1e-10, atol=0)


def test_gauss_newton_refusals_name_the_fix():
    with pytest.raises(ValueError, match="estimator='gauss_newton'.*MLP's loss is not one fam_hf recognises.*head_loss=.*'probe'"):
        RelativeFlatness(MLP(), "fc2", "gauss_newton")
    with pytest.raises(ValueError, match="hessian_grad='detached' is for the probe.*'full'"):
        RelativeFlatness(tiny_bert(), "bert.pooler.dense", "gauss_newton", hessian_grad="detached")
    model = tiny_bert()
    batch = {"input_ids": torch.randint(0, 40, (4, 5)), "labels": torch.tensor([0, 2, 1, 1])}
    flat = RelativeFlatness(model, "bert.pooler.dense", "gauss_newton")
    with flat.record(batch) as recording:
        loss = model(**batch).loss
    with pytest.raises(ValueError, match="needs the model's logits.*result\\(loss, logits=...\\)"):
        recording.result(loss)


def test_the_registry_chooses_by_purpose_and_loss_and_each_estimator_class_refuses_what_it_cannot_do():
    from fam_hf.flatness import (
        ClosedFormFlatness,
        ExactFlatness,
        GaussNewtonFlatness,
        HeadInputFlatness,
        ProbeFlatness,
        choose,
    )

    model, body = tiny_gpt2(), "transformer.h.0.mlp.c_fc"
    assert choose(model, "auto") is ClosedFormFlatness
    assert choose(model, body) is ExactFlatness  # measurement: the paper's κ, exactly on a small layer (8×32)
    assert choose(model, body, options={"max_exact_entries": 100}) is ProbeFlatness  # else by probes
    assert choose(model, body, purpose="penalty") is GaussNewtonFlatness  # a penalty needs κ bounded below
    assert choose(model, body, options={"hessian_grad": "detached"}, purpose="penalty") is ProbeFlatness
    assert choose(model, "auto", purpose="penalty", loss="custom") is ProbeFlatness
    assert choose(model, "auto", purpose="penalty", loss="fused") is HeadInputFlatness
    with pytest.raises(ValueError, match="only the LM head's closed form"):
        choose(model, body, purpose="penalty", loss="fused")
    with pytest.raises(ValueError, match="compute_loss_func or label smoothing"):
        choose(model, "auto", "gauss_newton", purpose="penalty", loss="custom")
    assert type(RelativeFlatness(model, body, "gauss_newton")) is GaussNewtonFlatness
    # built directly, a class checks what the registry would have checked
    with pytest.raises(ValueError, match="is not the model's output head"):
        ClosedFormFlatness(model, body)
    with pytest.raises(ValueError, match="ProbeFlatness is the probe estimator, not 'closed_form'"):
        ProbeFlatness(model, "auto", "closed_form")
    with pytest.raises(ValueError, match="hessian_grad='detached' is for the probe"):
        GaussNewtonFlatness(model, body, hessian_grad="detached")

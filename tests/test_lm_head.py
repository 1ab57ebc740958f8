"""The logits-free LM-head closed form (fam_hf.flatness.HeadInputFlatness, fam_hf.curvature.weighted_curvature_from_features) against the closed form on the logits and the brute-force
float64 Hessian, and its custom backward against autograd of the formula."""

from __future__ import annotations

import pytest
import torch
from brute_force import kappa_from_loss_fn
from models import tiny_gpt2
from torch.nn import functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from fam_hf import RelativeFlatness, relative_flatness
from fam_hf.curvature import softmax_curvature, weighted_curvature_from_features
from fam_hf.flatness import HeadInputFlatness

RTOL = 1e-8


def formula(features, weight, bias=None):
    """c_t = Σ_s p_s ‖w_s‖² − ‖Wᵀp‖², written out with ordinary autograd."""
    logits = features @ weight.T + (0 if bias is None else bias)
    p = torch.softmax(logits, -1)
    return p @ weight.pow(2).sum(-1) - (p @ weight).pow(2).sum(-1)


@pytest.mark.parametrize("bias", [False, True])
def test_curvature_from_features_equals_the_closed_form_on_logits_and_its_gradient_autograd(bias):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(13, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    rows = torch.rand(13, generator=g, dtype=torch.float64, requires_grad=True)
    ours = weighted_curvature_from_features(features, weight, b, rows, chunk_rows=4)  # 4 chunks, the last short
    logits = features @ weight.T + (0 if b is None else b)
    torch.testing.assert_close(ours, (rows * softmax_curvature(logits, weight, chunk_rows=13)).sum(), rtol=RTOL, atol=0)
    truth = (rows * formula(features, weight, b)).sum()
    torch.testing.assert_close(ours, truth, rtol=RTOL, atol=0)
    inputs = (features, weight, rows) + ((b,) if bias else ())
    mine = torch.autograd.grad(3.0 * ours, inputs)  # the gradient of the forward, scaled by the incoming one
    want = torch.autograd.grad(3.0 * truth, inputs)
    for a, t in zip(mine, want):
        torch.testing.assert_close(a, t, rtol=1e-10, atol=1e-12)
    # and a central finite difference along a random direction (gradcheck runs backward twice on one graph)
    directions = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (features, weight, rows)]

    def at(step):
        moved = [(t + step * d).detach() for t, d in zip((features, weight, rows), directions)]
        return weighted_curvature_from_features(moved[0], moved[1], None, moved[2], chunk_rows=5)

    point = [t.detach().requires_grad_() for t in (features, weight, rows)]
    value = weighted_curvature_from_features(point[0], point[1], None, point[2], chunk_rows=5)
    slope = sum((gr * d).sum() for gr, d in zip(torch.autograd.grad(value, point), directions))
    torch.testing.assert_close(slope, (at(1e-6) - at(-1e-6)) / 2e-6, rtol=1e-6, atol=0)
    twice = weighted_curvature_from_features(features, weight, None, rows, chunk_rows=4)
    twice.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran a second time"):
        twice.backward()
    # only what requires grad is computed; under no_grad nothing is
    frozen = weighted_curvature_from_features(features, weight.detach(), None, rows.detach(), chunk_rows=4)
    (only,) = torch.autograd.grad(frozen, features)
    torch.testing.assert_close(only, torch.autograd.grad((rows.detach() * formula(features, weight.detach())).sum(),
                                                         features)[0], rtol=1e-10, atol=1e-12)  # fmt: skip
    with torch.no_grad():
        assert not weighted_curvature_from_features(features, weight, None, rows, chunk_rows=4).requires_grad


def test_detached_gradient_holds_the_softmax_constant():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(7, 4, generator=g, dtype=torch.float64)
    weight = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    rows = torch.rand(7, generator=g, dtype=torch.float64)
    ours = weighted_curvature_from_features(features, weight, None, rows, chunk_rows=3, through_logits=False)
    p = torch.softmax(features @ weight.detach().T, -1)  # constant
    truth = (rows * (p @ weight.pow(2).sum(-1) - (p @ weight).pow(2).sum(-1))).sum()
    torch.testing.assert_close(ours, truth.detach(), rtol=RTOL, atol=0)
    (mine,) = torch.autograd.grad(ours, weight)
    (want,) = torch.autograd.grad(truth, weight)
    torch.testing.assert_close(mine, want, rtol=1e-10, atol=1e-12)


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=40, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, attn_implementation="eager", tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).double().eval()


def kappa_from_input(model, batch, **kw):
    flat = HeadInputFlatness(model, **kw)
    with flat.record(batch, num_items_in_batch=batch.get("num_items_in_batch"), differentiable=False) as rec:
        model(**{k: v for k, v in batch.items() if k != "num_items_in_batch"})
    flat.close()
    return rec.result().value


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-tied"])
def test_head_input_estimator_equals_the_closed_form_and_the_brute_force(make_model):
    model = make_model()
    ids = torch.randint(0, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :4] = -100  # assistant-only: the prompt is masked
    labels[2, -3:] = -100  # padding
    batch = {"input_ids": ids, "labels": labels}
    ours = kappa_from_input(model, batch)
    torch.testing.assert_close(ours, relative_flatness(model, batch).value, rtol=RTOL, atol=0)
    hidden = model.base_model(ids).last_hidden_state.detach()
    head = model.get_output_embeddings().weight

    def loss_of(e):
        logits = hidden @ (head + e).T
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))

    torch.testing.assert_close(ours, kappa_from_loss_fn(loss_of, head.detach()), rtol=RTOL, atol=0)
    # num_items_in_batch (gradient accumulation): the sum over counted positions divided by it
    counted = int((labels[:, 1:] != -100).sum())
    scaled = kappa_from_input(model, {**batch, "num_items_in_batch": 2 * counted})
    torch.testing.assert_close(scaled, ours / 2, rtol=RTOL, atol=0)
    # shift_labels (pre-shifted, as under context parallelism) score every position of the hidden states
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    torch.testing.assert_close(
        kappa_from_input(model, {"input_ids": ids, "shift_labels": shift}), ours, rtol=RTOL, atol=0
    )


def test_head_input_estimator_reports_a_backbone_that_never_ran_or_ran_without_gradients():
    model = tiny_llama().train()
    flat = HeadInputFlatness(model)
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.zeros(1, 4, dtype=torch.long)}
    with flat.record(batch) as rec:
        pass
    with pytest.raises(RuntimeError, match="did not run during the forward pass"):
        rec.result()
    with flat.record(batch) as rec, torch.no_grad():
        model(**batch)
    with pytest.raises(RuntimeError, match=r"ran only under torch.no_grad\(\).*would train nothing"):
        rec.result()


def test_head_input_token_fraction_draws_among_the_counted_positions_as_the_logits_estimator_does():
    model = tiny_llama()
    ids = torch.randint(0, model.config.vocab_size, (4, 6), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :2] = -100  # 16 of the 20 shifted positions are counted
    batch = {"input_ids": ids, "labels": labels}
    exact = float(relative_flatness(model, batch).value)

    def draws(flatness, n=200):  # at 1/16: one counted position a draw, times 16
        values = set()
        for _ in range(n):
            with flatness.record(batch, differentiable=False) as recording:
                model(**batch)
            values.add(round(float(recording.result(None).value), 12))
        return values

    ours = draws(HeadInputFlatness(model, token_fraction=1 / 16))
    assert len(ours) == 16 and sum(ours) / 16 == pytest.approx(exact, rel=1e-9)
    assert ours == draws(RelativeFlatness(model, token_fraction=1 / 16))  # the same 16 per-position values
    nearly = kappa_from_input(model, batch, token_fraction=0.95)  # ⌈0.95 · 16⌉ = 16: every counted position
    torch.testing.assert_close(nearly, torch.tensor(exact, dtype=torch.float64), rtol=RTOL, atol=0)


def dft_formula(features, weight, labels):
    """DFT's per-token curvature: c_t times the token's detached probability of its label."""
    p = torch.softmax(features @ weight.T, -1)
    return p.gather(1, labels[:, None]).squeeze(1).detach() * formula(features, weight)


def test_dft_weights_each_row_by_its_detached_label_probability_value_and_gradient():
    g = torch.Generator().manual_seed(4)
    features = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    rows = torch.rand(9, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (9,), generator=g)
    ours = weighted_curvature_from_features(features, weight, None, rows, chunk_rows=4, label_probability_of=labels)
    truth = (rows * dft_formula(features, weight, labels)).sum()
    torch.testing.assert_close(ours, truth, rtol=RTOL, atol=0)
    for a, t in zip(torch.autograd.grad(2.0 * ours, (features, weight, rows)),
                    torch.autograd.grad(2.0 * truth, (features, weight, rows))):  # fmt: skip
        torch.testing.assert_close(a, t, rtol=1e-10, atol=1e-12)


def test_head_input_estimator_under_dft_equals_the_brute_force_hessian_of_the_dft_loss():
    model = tiny_llama()
    ids = torch.randint(0, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[1, :3] = -100
    batch = {"input_ids": ids, "labels": labels}
    hidden = model.base_model(ids).last_hidden_state.detach()
    head = model.get_output_embeddings().weight

    def dft_loss_of(e):  # TRL's loss_type="dft": −sg(p_y)·log p_y, averaged over the counted tokens
        logits = (hidden @ (head + e).T)[:, :-1].reshape(-1, head.shape[0])
        targets = labels[:, 1:].reshape(-1)
        counted = targets != -100
        log_p = torch.log_softmax(logits[counted], -1).gather(1, targets[counted, None]).squeeze(1)
        return -(log_p.exp().detach() * log_p).sum() / counted.sum()

    ours = kappa_from_input(model, batch, loss_type="dft")
    torch.testing.assert_close(ours, kappa_from_loss_fn(dft_loss_of, head.detach()), rtol=RTOL, atol=0)
    assert ours < kappa_from_input(model, batch)  # each token's curvature weighed by a probability < 1
    with pytest.raises(ValueError, match="loss_type='mse' is not one of 'nll', 'dft'"):
        HeadInputFlatness(model, loss_type="mse")


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_prompt_learning_aligns_the_labels_with_the_virtual_tokens_prepended_to_the_input(method):
    import peft

    config = {
        "prompt_tuning": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        "p_tuning": peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=8),
    }[method]
    model = peft.get_peft_model(tiny_llama(), config).double().eval()
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(6))
    labels = ids.clone()
    labels[0, :2] = -100
    batch = {"input_ids": ids, "labels": labels}
    # the truth: the loss of the prefixed sequence as PEFT computes it (-100 for the 3 virtual tokens)
    hidden = model.base_model.model(inputs_embeds=torch.cat(
        [model.get_prompt(batch_size=2).double(), model.word_embeddings(ids)], 1)).last_hidden_state.detach()  # fmt: skip
    head = model.get_output_embeddings().weight
    prefixed = F.pad(labels, (3, 0), value=-100)

    def loss_of(e):
        logits = hidden @ (head + e).T
        return F.cross_entropy(logits[:, :-1].reshape(-1, 40), prefixed[:, 1:].reshape(-1))

    truth = kappa_from_loss_fn(loss_of, head.detach())
    loss = model(**batch).loss  # transformers computes it from float32 logits
    torch.testing.assert_close(loss, loss_of(torch.zeros_like(head)).float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(kappa_from_input(model, batch), truth, rtol=RTOL, atol=0)  # FAMSFTTrainer's
    torch.testing.assert_close(relative_flatness(model, batch).value, truth, rtol=RTOL, atol=0)  # FAMTrainer's


SMALL_LM = dict(vocab_size=12, hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1,
                num_hidden_layers=1, tie_word_embeddings=False)  # fmt: skip
RESCALING_LMS = {  # each rescales or caps the head's output (or input) its own way; model_type decides
    "falcon_h1": dict(lm_head_multiplier=0.3, mamba_d_ssm=8, mamba_n_heads=2, mamba_d_head=4, mamba_d_state=4,
                      mamba_n_groups=1, mamba_chunk_size=4, head_dim=4),  # logits × 0.3
    "hyperclovax": dict(logits_scaling=0.5),  # logits × logits_scaling (Granite divides by it)
    "minicpm3": dict(hidden_size=32, num_key_value_heads=2, dim_model_base=8, q_lora_rank=8, kv_lora_rank=8,
                     qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4),  # the head's *input* ÷ logits_scaling
    "recurrent_gemma": dict(lru_width=8, attention_window_size=8, conv1d_width=2, block_types=["attention"],
                            head_dim=4, logits_soft_cap=3.0),  # a soft cap: refused, "auto" takes another
}  # fmt: skip


@pytest.mark.parametrize("model_type", list(RESCALING_LMS))
def test_models_that_rescale_or_cap_their_logits_get_kappa_of_the_loss_they_compute(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    from fam_hf.flatness import FusedHeadFlatness
    from fam_hf.layers import resolve_layer

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**SMALL_LM, **RESCALING_LMS[model_type]})
    model = AutoModelForCausalLM.from_config(config).double().eval()
    ids = torch.randint(0, 12, (2, 5))
    batch = {"input_ids": ids, "labels": ids.clone()}
    exact = relative_flatness(model, batch, "lm_head", "exact").value
    auto = relative_flatness(model, batch, "lm_head", "auto")
    torch.testing.assert_close(auto.value, exact, rtol=1e-6, atol=0)  # transformers takes the loss in float32
    assert auto.estimator == ("exact" if model_type == "recurrent_gemma" else "closed_form")
    # the fused head reads the backbone's last hidden state and forms the plain cross-entropy: none of these
    assert FusedHeadFlatness.refusal(model, resolve_layer(model, "lm_head")) is not None

"""The closed-form Hessian (and Gauss–Newton) trace of an output head, ``Tr(H_W) = Σ_t c_t ‖φ_t‖² Tr ∇²_z ℓ_t``,
against brute-force Hessians in float64: ``torch.autograd.functional.hessian`` of the loss as a function of a
perturbation of the head (its weight swapped by ``functional_call``, or, for a tied LM head, ``δ φ`` added to the
head's own output by a hook), on tiny random transformers models and a plain torch MLP."""

from __future__ import annotations

import pytest
import torch
from brute_force import functional_loss
from models import tiny_bert, tiny_gpt2
from test_measures import MLP, mlp_loss
from torch import nn
from torch.autograd.functional import hessian
from torch.nn import functional as F
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from fam_hf import HeadLoss, relative_flatness
from fam_hf.curvature import head_hessian_trace
from fam_hf.flatness import HeadInputFlatness
from fam_hf.head_loss import head_loss_for
from fam_hf.measures import gauss_newton_trace, hessian_trace

F64 = torch.float64


def brute_trace(model, batch, name, transpose=False):
    """``Tr`` of the Hessian w.r.t. the parameter ``name`` (its only use), by ``functional_call``."""
    weight = dict(model.named_parameters())[name].detach()
    shape = weight.T.shape if transpose else weight.shape
    h = hessian(functional_loss(model, batch, name, transpose=transpose), torch.zeros(shape, dtype=F64))
    return torch.einsum("aiai->", h) if len(shape) == 2 else torch.einsum("aa->", h)


def brute_head_trace(model, batch, head: nn.Module, loss_of=None):
    """``Tr`` of the Hessian w.r.t. ``δ: (d, m)`` added to the head's own output as ``δ φ`` (a tied head's own use)."""
    d, m = head.weight.shape

    def loss(delta):
        handle = head.register_forward_hook(lambda module, inputs, output: output + F.linear(inputs[0], delta))
        try:
            return model(**batch).loss if loss_of is None else loss_of(model, batch)
        finally:
            handle.remove()

    return torch.einsum("aiai->", hessian(loss, torch.zeros(d, m, dtype=F64)))


def lm_batch(vocab=24):
    ids = torch.randint(0, vocab, (3, 6))
    mask = torch.ones_like(ids)
    mask[2, -2:] = 0  # right padding, ignored through its -100 labels
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def untied_gpt2():
    config = GPT2Config(**{**tiny_gpt2().config.to_dict(), "tie_word_embeddings": False})
    return GPT2LMHeadModel(config).double().eval()


# -- the formula ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["cross_entropy", "mse", "bce"])
@pytest.mark.parametrize("bias", [False, True])
def test_formula_is_the_trace_of_a_linear_heads_hessian(loss_type, bias):
    n, m, d = 7, 4, 5
    phi, w, b = torch.randn(n, m, dtype=F64), torch.randn(d, m, dtype=F64), torch.randn(d, dtype=F64)
    weights = torch.rand(n, dtype=F64)
    weights[2] = 0  # an ignored position
    targets = {
        "cross_entropy": torch.randint(0, d, (n,)),
        "mse": torch.randn(n, d, dtype=F64),
        "bce": torch.rand(n, d, dtype=F64),
    }[loss_type]

    def loss(flat):
        z = phi @ flat[: d * m].reshape(d, m).T + (flat[d * m :] if bias else b)
        if loss_type == "cross_entropy":
            per_position = F.cross_entropy(z, targets, reduction="none")
        elif loss_type == "mse":
            per_position = F.mse_loss(z, targets, reduction="none").sum(-1)
        else:
            per_position = F.binary_cross_entropy_with_logits(z, targets, reduction="none").sum(-1)
        return (weights * per_position).sum()

    point = torch.cat([w.reshape(-1), b]) if bias else w.reshape(-1)
    truth = torch.trace(hessian(loss, point))
    logits = phi @ w.T + b
    value = head_hessian_trace(phi, logits, weights, loss_type, bias=bias, chunk_elements=2 * d)  # 2 rows at a time
    torch.testing.assert_close(value, truth, rtol=1e-12, atol=0)


# -- transformers models ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_causal_lm_head_with_ignored_labels_and_padding(tied):
    model = tiny_gpt2() if tied else untied_gpt2()
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    batch = lm_batch()
    truth = brute_head_trace(model, batch, model.lm_head)
    if not tied:  # the head's own use is all of it: the parameter's Hessian too
        torch.testing.assert_close(truth, brute_trace(model, batch, "lm_head.weight"), rtol=1e-10, atol=0)
    result = hessian_trace(model, batch, "lm_head", method="closed_form")
    assert (result.method, result.std_error, result.matvecs, result.dim) == ("closed_form", None, 0, 24 * 8)
    # transformers' causal-LM loss upcasts the logits with .float(): the brute force is float32-accurate only
    torch.testing.assert_close(result.value, truth, rtol=1e-6, atol=0)
    torch.testing.assert_close(
        result.value, hessian_trace(model, batch, "auto", method="exact").value, rtol=1e-6, atol=0
    )
    gn = gauss_newton_trace(model, batch, "lm_head", method="closed_form")
    assert gn.method == "gauss_newton_closed_form" and gn.std_error is None
    torch.testing.assert_close(gn.value, result.value, rtol=0, atol=0)


def test_causal_lm_reads_num_items_in_batch_and_shift_labels():
    model, batch = tiny_gpt2(), lm_batch()
    plain = hessian_trace(model, batch, method="closed_form").value
    counted = int((batch["labels"][:, 1:] != -100).sum())
    halved = hessian_trace(model, {**batch, "num_items_in_batch": torch.tensor(2 * counted)}, method="closed_form")
    torch.testing.assert_close(halved.value, plain / 2, rtol=1e-12, atol=0)
    # shift_labels as given (context parallelism): logits[t] scored against shift_labels[t], no shift
    shifted = {**batch, "shift_labels": torch.randint(0, 24, (3, 6)).masked_fill(torch.rand(3, 6) < 0.4, -100)}
    truth = brute_head_trace(model, shifted, model.lm_head)
    value = hessian_trace(model, shifted, method="closed_form").value
    torch.testing.assert_close(value, truth, rtol=1e-6, atol=0)
    assert abs(float(value / plain) - 1) > 1e-4  # the shift_labels mattered (100 times the tolerance above)


def test_kappa_and_gauss_newton_read_shift_labels_as_the_model_s_loss_does():
    """transformers' causal-LM loss scores ``logits[t]`` against a batch's ``shift_labels[t]`` when given; κ's closed
    form and the Gauss–Newton measures mirror that loss, so they read them too (the exact estimator differentiates the
    loss itself)."""
    model, batch = tiny_gpt2(), lm_batch()
    shifted = {**batch, "shift_labels": torch.randint(0, 24, (3, 6)).masked_fill(torch.rand(3, 6) < 0.4, -100)}
    exact = relative_flatness(model, shifted, "lm_head", "exact").value
    closed = relative_flatness(model, shifted, "lm_head", "closed_form").value
    torch.testing.assert_close(closed, exact, rtol=1e-6, atol=0)
    assert abs(float(exact / relative_flatness(model, batch, "lm_head", "exact").value) - 1) > 1e-3
    truth = brute_head_trace(model, shifted, model.lm_head)
    gauss_newton = gauss_newton_trace(model, shifted, "lm_head", method="exact").value
    torch.testing.assert_close(gauss_newton, truth, rtol=1e-6, atol=0)


def rescaled_lm(family):
    """A tiny causal LM that rescales its head's output before the loss: Cohere (× logit_scale), Granite
    (÷ logits_scaling)."""
    from transformers import CohereConfig, CohereForCausalLM, GraniteConfig, GraniteForCausalLM

    shape = dict(vocab_size=24, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, eos_token_id=None, bos_token_id=None, pad_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    if family == "cohere":
        return CohereForCausalLM(CohereConfig(**shape, logit_scale=0.5)).double().eval(), 0.5
    return GraniteForCausalLM(GraniteConfig(**shape, logits_scaling=4.0)).double().eval(), 0.25


@pytest.mark.parametrize("family", ["cohere", "granite"])
def test_rescaled_logits_are_mirrored_with_their_factor(family):
    """``s·z = W (s·φ)``: κ's closed form, the closed-form trace and the Gauss–Newton trace of a head whose output the
    model rescales before its loss, against the exact estimator and the brute-force Hessian of the model's own loss."""
    model, scale = rescaled_lm(family)
    batch = lm_batch()
    assert head_loss_for(model).logit_scale == scale
    exact = relative_flatness(model, batch, "lm_head", "exact").value
    closed = relative_flatness(model, batch, "lm_head", "closed_form").value
    torch.testing.assert_close(closed, exact, rtol=1e-6, atol=0)
    truth = brute_head_trace(model, batch, model.lm_head)
    torch.testing.assert_close(hessian_trace(model, batch, method="closed_form").value, truth, rtol=1e-6, atol=0)
    torch.testing.assert_close(gauss_newton_trace(model, batch, method="exact").value, truth, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match=r"rescales its logits .* does not mirror"):
        HeadInputFlatness(model)
    with pytest.raises(ValueError, match=r"read from a model's config"):
        hessian_trace(model, batch, method="closed_form", head_loss=HeadLoss("cross_entropy", logit_scale=2.0))


@pytest.mark.parametrize(
    ("problem_type", "num_labels", "labels"),
    [
        ("single_label_classification", 3, torch.tensor([0, 2, -100, 1])),
        ("regression", 1, torch.randn(4, dtype=F64)),
        ("multi_label_classification", 3, torch.randint(0, 2, (4, 3)).to(F64)),
    ],
)
def test_sequence_classifier_head_under_each_loss(problem_type, num_labels, labels):
    model = tiny_bert(num_labels=num_labels, problem_type=problem_type)
    batch = {"input_ids": torch.randint(0, 40, (4, 5)), "labels": labels}
    truth = brute_trace(model, batch, "classifier.weight")
    result = hessian_trace(model, batch, method="closed_form")
    torch.testing.assert_close(result.value, truth, rtol=1e-10, atol=0)
    torch.testing.assert_close(gauss_newton_trace(model, batch, method="closed_form").value, truth, rtol=1e-10, atol=0)


def test_decoder_classifier_pools_the_last_non_padding_token():
    config = GPT2Config(vocab_size=24, n_positions=16, n_embd=8, n_layer=1, n_head=2, num_labels=3, pad_token_id=0,
                        attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    model = GPT2ForSequenceClassification(config).double().eval()
    ids = torch.randint(1, 24, (3, 6))
    ids[1, -2:] = 0  # right padding
    batch = {"input_ids": ids, "labels": torch.tensor([0, 2, 1])}
    truth = brute_trace(model, batch, "score.weight")
    torch.testing.assert_close(hessian_trace(model, batch, method="closed_form").value, truth, rtol=1e-10, atol=0)


def test_equals_hutchinson_within_its_standard_error():
    model = tiny_bert()
    batch = {"input_ids": torch.randint(0, 40, (4, 5)), "labels": torch.tensor([0, 2, 1, 1])}
    closed = hessian_trace(model, batch, method="closed_form").value
    hutchinson = hessian_trace(model, batch, probes=300)
    assert abs(float(hutchinson.value - closed)) <= 3 * float(hutchinson.std_error)
    assert abs(float(hutchinson.value / closed) - 1) > 1e-6  # a different (stochastic) computation


# -- any model, with HeadLoss -----------------------------------------------------------------------------------------


def test_plain_torch_head_with_head_loss():
    model = MLP().double().eval()
    batch = {"x": torch.randn(10, 6, dtype=F64), "y": torch.randint(0, 3, (10,))}
    batch["y"][3] = -100
    spec = HeadLoss("cross_entropy", head="head", labels="y")
    truth = brute_head_trace(model, batch, model.head, loss_of=mlp_loss)
    value = hessian_trace(model, batch, "head", method="closed_form", loss_fn=mlp_loss, head_loss=spec).value
    torch.testing.assert_close(value, truth, rtol=1e-10, atol=0)
    auto = hessian_trace(model, batch, "head", method="auto", loss_fn=mlp_loss, head_loss=spec)
    assert auto.method == "closed_form"
    # a loss the spec does not describe is caught: another loss on these targets, or targets it cannot take
    one_hot = {**batch, "y": F.one_hot(batch["y"].clamp_min(0), 3).to(F64)}
    with pytest.raises(ValueError, match=r"does not describe the loss computed \("):
        hessian_trace(model, one_hot, "head", method="closed_form", loss_fn=mlp_loss,
                      head_loss=HeadLoss("mse", head="head", labels="y"))  # fmt: skip
    with pytest.raises(ValueError, match="does not describe the loss computed: .* it fails"):
        hessian_trace(model, batch, "head", method="closed_form", loss_fn=mlp_loss,
                      head_loss=HeadLoss("bce", head="head", labels="y"))  # fmt: skip


def test_refusals_name_the_problem_and_the_fix():
    model = MLP().double().eval()
    batch = {"x": torch.randn(10, 6, dtype=F64), "y": torch.randint(0, 3, (10,))}
    spec = HeadLoss("cross_entropy", head="head", labels="y")
    with pytest.raises(ValueError, match=r"the loss is computed outside the model .*measurement's loss_fn=.*head_loss=HeadLoss"):
        hessian_trace(model, batch, "head", method="closed_form", loss_fn=mlp_loss)
    with pytest.raises(ValueError, match="'fc2' is not the output layer that head_loss names"):
        hessian_trace(model, batch, "fc2", method="closed_form", loss_fn=mlp_loss, head_loss=spec)
    with pytest.raises(ValueError, match="wrt names parameters"):
        hessian_trace(model, batch, [model.head.weight], method="closed_form", loss_fn=mlp_loss, head_loss=spec)
    gpt2, lm = tiny_gpt2(), lm_batch()
    with pytest.raises(ValueError, match=r"'transformer.h.0.mlp.c_fc' is not the model's output head.*hutchinson"):
        gauss_newton_trace(gpt2, lm, "transformer.h.0.mlp.c_fc", method="closed_form")
    assert hessian_trace(gpt2, lm, "transformer.h.0.mlp.c_fc", method="auto", probes=2).method == "hutchinson"
    assert gauss_newton_trace(gpt2, lm, "transformer.h.0.mlp.c_fc", method="auto", probes=2).method == "gauss_newton"
    gpt2.config.final_logit_softcapping = 30.0  # logits transformed before the loss: not mirrored
    with pytest.raises(ValueError, match="loss is not one fam_hf recognises"):
        hessian_trace(gpt2, lm, "lm_head", method="closed_form")

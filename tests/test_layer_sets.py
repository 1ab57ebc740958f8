"""κ over a set of layers with one probe (fam_hf.flatness.layer_set) against float64 brute force: the mean over
probes against the sum of per-layer exact κ's, one probe's gradient against autograd of the same quadratic form
written out with functional_call, the mean gradient against autograd of the exact sum, LoRA's effective weights,
the trainer's accumulation, and the refusals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from brute_force import functional_loss, kappa_from_loss_fn
from models import COMMON, fam_logs, fam_trainer, gpt2, lm_data, params, tiny_bert, tiny_gpt2
from peft import LoraConfig, get_peft_model
from test_estimators import (
    MLP,
    assert_within_stderr,
    gauss_newton_matrix,
    gpt2_counted_logits_of,
    kappa_of_matrix,
    lm_batch,
)
from torch.nn import functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from fam_hf import RelativeFlatness, relative_flatness
from fam_hf.flatness import GaussNewtonSetFlatness, ProbeSetFlatness, choose
from fam_hf.layers import LayerSet, resolve_layers
from fam_hf.norms import differentiable_layer_norm

GPT2_SET = ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"]  # the second is downstream of the first


def gpt2_weight(model, name):
    return dict(model.named_modules())[name].weight.detach().T  # Conv1D stores (in, out)


def set_estimate(model, batch, spec, estimator, probes, per_call=10, **options):
    """The mean of ``probes`` probes of the set and its standard error, drawn ``per_call`` at a time (one δ graph
    holds every probe of a call, so a call's cost grows faster than its probe count) from one generator."""
    flat = RelativeFlatness(model, spec, estimator, probes=per_call, generator=torch.Generator().manual_seed(11),
                            **options)  # fmt: skip
    means = []
    for _ in range(probes // per_call):
        with flat.record(batch, num_items_in_batch=batch.get("num_items_in_batch"), differentiable=False) as rec:
            out = model(**batch)
        means.append(rec.result(out.loss, logits=out.logits).value)
    means = torch.stack(means)
    return SimpleNamespace(value=means.mean(), std_error=means.std() / len(means) ** 0.5)


# -- resolution ---------------------------------------------------------------------------------------------


def test_set_specs_resolve_in_model_order_each_layer_once():
    model = tiny_gpt2()
    names = lambda spec: [layer.name for layer in resolve_layers(model, spec)]  # noqa: E731
    body = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
            "transformer.h.0.mlp.c_proj"]  # fmt: skip
    assert names("all-linear") == body  # PEFT's all-linear: the output head left out
    assert names("*.c_proj") == [body[1], body[3]]
    assert names(["transformer.h.0.mlp.c_fc", "*.attn.c_attn", "transformer.h.0.mlp.c_fc"]) == GPT2_SET
    assert names("transformer.h.0.mlp.c_fc, lm_head") == [body[2], "lm_head"]
    flatness = RelativeFlatness(model, "*.c_proj")
    assert isinstance(flatness, ProbeSetFlatness) and isinstance(flatness.layer, LayerSet)
    assert flatness.layer.name == "*.c_proj (2 layers)" and flatness.layer.names == (body[1], body[3])
    # a set spec that resolves to one layer is that layer, with the one-layer estimators (exact: ≤ 1024 weights)
    assert (
        RelativeFlatness(model, "*.mlp.c_fc").estimator == "exact"
        and RelativeFlatness(model, ["lm_head"]).layer.name == "lm_head"
    )
    assert RelativeFlatness(model, "*.mlp.c_fc").layer.name == "transformer.h.0.mlp.c_fc"


# -- the value: the mean over probes against the sum of per-layer exact κ's ------------------------------------


def test_probe_over_a_set_is_unbiased_for_the_sum_of_the_layers_exact_kappas():
    """Hessian probe, two layers one after the other (so the set's joint Hessian has cross blocks and each probe
    cross terms): the mean over 4000 probes lands within 3 standard errors of Σ_l κ_l from each layer's brute-force
    Hessian; and the per-layer exact estimator agrees with that brute force."""
    model = tiny_gpt2()
    batch = lm_batch(model)
    truths = [
        kappa_from_loss_fn(functional_loss(model, batch, name + ".weight", transpose=True), gpt2_weight(model, name))
        for name in GPT2_SET
    ]
    for name, truth in zip(GPT2_SET, truths):
        torch.testing.assert_close(relative_flatness(model, batch, name, "exact").value, truth, rtol=1e-10, atol=0)
    result = relative_flatness(model, batch, GPT2_SET, "probe", probes=3)
    assert (result.estimator, result.layer, result.probes) == ("probe", f"{','.join(GPT2_SET)} (2 layers)", 3)
    assert_within_stderr(set_estimate(model, batch, GPT2_SET, "probe", 4000), sum(truths))


def test_gauss_newton_over_a_set_is_unbiased_for_the_sum_of_the_layers_kappas():
    """Gauss–Newton: Σ_l κ_GN,l from each layer's full Jacobian of the counted logits (num_items_in_batch
    denominator), against the mean of 1000 one-δ probes."""
    model = tiny_gpt2()
    batch = lm_batch(model)
    truth = 0.0
    for name in GPT2_SET:
        logits_of, counted = gpt2_counted_logits_of(model, batch, name + ".weight")
        g = gauss_newton_matrix(logits_of, gpt2_weight(model, name), torch.full((counted,), 1.0 / (2 * counted),
                                dtype=torch.float64))  # fmt: skip
        truth = truth + kappa_of_matrix(g, gpt2_weight(model, name))
    items = torch.tensor(2 * counted)
    truth = truth.detach()
    assert float(truth) > 0
    assert_within_stderr(set_estimate(model, {**batch, "num_items_in_batch": items}, GPT2_SET, "gauss_newton", 1000),
                         truth)  # fmt: skip


def test_reference_scale_divides_each_layers_kappa_by_its_own_fan_in():
    """fam_scale='reference' on a set: Σ_l κ_l/m_l (c_attn: m = 8, c_proj of the MLP: m = 32)."""
    model = tiny_gpt2()
    batch = lm_batch(model)
    names = ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj"]
    truth = sum(
        kappa_from_loss_fn(functional_loss(model, batch, n + ".weight", transpose=True), gpt2_weight(model, n))
        / gpt2_weight(model, n).shape[1]
        for n in names
    )
    assert_within_stderr(set_estimate(model, batch, names, "probe", 2000, scale="reference"), truth)


# -- gradients ----------------------------------------------------------------------------------------------

BERT_SET = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.intermediate.dense", "classifier"]


def bert_batch():
    return {"input_ids": torch.randint(0, 40, (4, 5)), "labels": torch.tensor([0, 2, 1, -100])}


def perturbed(model, probes, delta):
    """Every layer of BERT_SET's weight as ``W_l + δ · W_l R_l``: the set's probe written on the weights."""
    modules = dict(model.named_modules())
    return {f"{n}.weight": modules[n].weight + delta * (modules[n].weight @ r) for n, r in zip(BERT_SET, probes)}


@pytest.mark.parametrize("estimator", ["probe", "gauss_newton"])
def test_one_probe_and_its_gradient_over_a_set_match_autograd_of_the_weight_perturbation(estimator):
    """With the R_l fixed, one probe of the set is q(θ) = d²/dδ² L(W_l + δ W_l R_l for every l) (probe) or
    aᵀ ∇²ℓ a with a = d logits/dδ (Gauss–Newton): written here on the weights with functional_call, no hooks, and
    differentiated by autograd — value and gradient with respect to every parameter."""
    model = tiny_bert()
    batch = bert_batch()
    flat = RelativeFlatness(model, BERT_SET, estimator, probes=1, generator=torch.Generator().manual_seed(4))
    with flat.record(batch) as recording:
        outputs = model(**batch)
    result = recording.result(outputs.loss, logits=outputs.logits)
    probes = [r[0] for r in recording.layer_probes]
    assert [r.shape for r in probes] == [(12, 12), (12, 12), (12, 12)]
    params = list(model.parameters())
    got = torch.autograd.grad(result.value, params, allow_unused=True)

    delta = torch.zeros((), dtype=torch.float64, requires_grad=True)
    with differentiable_layer_norm():  # the truth's own third derivatives through LayerNorm (fam_hf.norms)
        out = torch.func.functional_call(model, perturbed(model, probes, delta), args=(), kwargs=batch)
        if estimator == "probe":
            (first,) = torch.autograd.grad(out.loss, delta, create_graph=True)
            (expected,) = torch.autograd.grad(first, delta, create_graph=True)
        else:
            tangent = torch.autograd.functional.jacobian(
                lambda d: torch.func.functional_call(model, perturbed(model, probes, d), args=(),
                                                     kwargs={"input_ids": batch["input_ids"]}).logits,
                delta, create_graph=True,
            )  # fmt: skip
            p = torch.softmax(out.logits, -1)
            per_example = (p * tangent**2).sum(-1) - (p * tangent).sum(-1) ** 2
            expected = per_example[:3].mean()  # the -100 example weighs 0
        want = torch.autograd.grad(expected, params, allow_unused=True)
    torch.testing.assert_close(result.value, expected, rtol=1e-10, atol=1e-14)
    assert float(expected) != 0
    for (n, _), a, b in zip(model.named_parameters(), got, want):
        if b is None or b.abs().max() == 0:
            assert a is None or a.abs().max() < 1e-12, n
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10, msg=n)


def test_mean_gradient_over_probes_is_the_gradient_of_the_exact_sum():
    """E_R[∇q] = ∇ Σ_l κ_l: the mean of 400 one-probe gradients against autograd of the brute-force Σ_l κ_l (Hessian
    of each layer, create_graph) on an MLP, within 3.5 standard errors in norm (‖ḡ − ∇κ‖² has mean tr Cov / K)."""
    model = MLP().double()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    params = list(model.parameters())
    names = ["fc1", "fc2"]

    def loss_of(name):
        weight = getattr(model, name).weight
        return lambda e: F.cross_entropy(torch.func.functional_call(model, {f"{name}.weight": weight + e}, (x,)), y)

    truth = sum(kappa_from_loss_fn(loss_of(n), getattr(model, n).weight, create_graph=True) for n in names)
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(truth, params)])
    flat = RelativeFlatness(model, names, "probe", generator=torch.Generator().manual_seed(5))
    draws = []
    for _ in range(400):
        with flat.record() as recording:
            loss = F.cross_entropy(model(x), y)
        draws.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(recording.result(loss).value, params)]))
    draws = torch.stack(draws)
    error = (draws.mean(0) - expected).norm()
    stderr = (draws.var(0).sum() / len(draws)).sqrt()
    assert error <= 3.5 * stderr, (float(error), float(stderr))
    assert error < 0.2 * expected.norm()  # the test can tell a wrong gradient from noise


# -- LoRA -----------------------------------------------------------------------------------------------------


def test_all_lora_sums_the_effective_weights_kappas_and_trains_only_the_adapters():
    """'all-lora' on a GPT-2 whose c_attn and c_fc carry adapters off their zero init: the Gauss–Newton mean against
    Σ_l κ_GN of the merged W0 + s·BA (the base model run with the merged weights, adapters off); the gradient
    reaches both adapters and no frozen base."""
    model = tiny_gpt2()
    lora = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], lora_dropout=0.0,
                                            fan_in_fan_out=True, init_lora_weights=False))  # fmt: skip
    batch = lm_batch(lora)
    modules = dict(lora.base_model.model.named_modules())
    effective = {
        n: (modules[n].base_layer.weight.T + modules[n].get_delta_weight("default").T).detach() for n in GPT2_SET
    }
    counted = (batch["labels"][:, 1:] != -100).reshape(-1)
    n_counted = int(counted.sum())

    def logits_of(name):
        def run(e):
            merged = {f"{k}.base_layer.weight": (w + (e if k == name else 0)).T for k, w in effective.items()}
            with lora.disable_adapter():
                out = torch.func.functional_call(lora.base_model.model, merged, args=(),
                                                 kwargs={"input_ids": batch["input_ids"]})  # fmt: skip
            return out.logits[:, :-1].reshape(-1, out.logits.shape[-1])[counted]

        return run

    c = torch.full((n_counted,), 1.0 / n_counted, dtype=torch.float64)
    truth = sum(kappa_of_matrix(gauss_newton_matrix(logits_of(n), effective[n], c), effective[n]) for n in GPT2_SET)
    assert relative_flatness(lora, batch, "all-lora", "gauss_newton").layer == "all-lora (2 layers)"
    assert_within_stderr(set_estimate(lora, batch, "all-lora", "gauss_newton", 1000), truth)
    result = relative_flatness(lora, batch, "all-lora", "gauss_newton", probes=1, differentiable=True)
    result.value.backward()
    for name in GPT2_SET:
        assert modules[name].lora_A["default"].weight.grad.abs().sum() > 0, name
        assert modules[name].base_layer.weight.grad is None, name


# -- in training --------------------------------------------------------------------------------------------


def test_one_step_on_a_set_equals_hand_computed_sgd(tmp_path):
    """FAMTrainer with fam_layer='*.mlp.*' (auto: Gauss–Newton over the set) against one SGD step on loss + λκ by
    hand, the trainer's probe draw reproduced from its seed."""
    lam, lr = 0.3, 0.5
    model = gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = fam_trainer(model, lm_data(16), tmp_path, max_steps=1, per_device_train_batch_size=16, fam_lambda=lam,
                          fam_layer="*.mlp.*", fam_probes=2)  # fmt: skip
    assert isinstance(trainer.flatness, GaussNewtonSetFlatness)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in list(trainer.get_train_dataloader().sampler)])
    trainer.train()
    batch["num_items_in_batch"] = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    reference = gpt2()
    reference.load_state_dict(before)
    reference.train()
    kappa = relative_flatness(reference, batch, "*.mlp.*", "gauss_newton", probes=2, differentiable=True,
                              generator=torch.Generator().manual_seed(COMMON["seed"]))  # fmt: skip
    objective = reference(**batch).loss + lam * kappa.value
    grads = torch.autograd.grad(objective, list(reference.parameters()))
    for (name, p), g in zip(reference.named_parameters(), grads):
        torch.testing.assert_close(model.state_dict()[name], p.detach() - lr * g, rtol=0, atol=1e-6, msg=name)
    assert fam_logs(trainer)[0]["fam/kappa"] == pytest.approx(float(kappa.value), rel=1e-5)


@pytest.mark.parametrize(
    "layer,estimator",
    [("all-linear", "gauss_newton"), ("all-linear", "probe"), ("transformer.h.0.mlp.c_fc", "probe")],
)
def test_gradient_accumulation_on_a_set_equals_one_big_batch(tmp_path, layer, estimator):
    """Every micro-batch of a step draws the step's probes (FAMMixin), so 2 × 8 = 1 × 16 for the probe estimators
    too, one layer or a set."""
    runs = {}
    for micro, accumulate in [(16, 1), (8, 2)]:
        model = gpt2()
        trainer = fam_trainer(model, lm_data(32), tmp_path / f"{micro}", max_steps=2, per_device_train_batch_size=micro,
                              gradient_accumulation_steps=accumulate, fam_lambda=0.3, fam_layer=layer,
                              fam_estimator=estimator, fam_probes=2)  # fmt: skip
        trainer.train()
        runs[micro] = (params(model), fam_logs(trainer))
    (p16, logs16), (p8, logs8) = runs[16], runs[8]
    for key in ("fam/kappa", "loss"):
        assert [h[key] for h in logs8] == pytest.approx([h[key] for h in logs16], rel=1e-5), key
    for name in p16:
        torch.testing.assert_close(p8[name], p16[name], rtol=0, atol=1e-6, msg=name)


# -- refusals -------------------------------------------------------------------------------------------------


def test_refusals_name_the_set_the_layer_and_the_fix():
    model = tiny_gpt2()
    with pytest.raises(ValueError, match=r"estimator='closed_form' on a set of layers \('\*.mlp.\*', 2 layers\).*"
                                         r"output head alone.*'gauss_newton' or 'probe'"):  # fmt: skip
        RelativeFlatness(model, "*.mlp.*", "closed_form")
    with pytest.raises(ValueError, match="estimator='exact' on a set of layers.*one layer's full Hessian"):
        RelativeFlatness(model, "*.mlp.*", "exact")
    with pytest.raises(ValueError, match="hessian_grad='detached' on a set of layers.*hessian_grad='full'"):
        RelativeFlatness(model, "*.mlp.*", "probe", hessian_grad="detached")
    with pytest.raises(ValueError, match="hessian_grad='detached' on a set of layers"):
        choose(model, "*.mlp.*", options={"hessian_grad": "detached"}, purpose="penalty")
    with pytest.raises(ValueError, match="names 2 layers, but the loss runs through a fused LM head"):
        choose(model, "*.mlp.*", purpose="penalty", loss="fused")
    with pytest.raises(ValueError, match="compute_loss_func or label smoothing"):
        choose(model, "*.mlp.*", "gauss_newton", purpose="penalty", loss="custom")
    assert choose(model, "*.mlp.*", purpose="penalty", loss="custom") is ProbeSetFlatness
    assert choose(model, "*.mlp.*", purpose="penalty") is GaussNewtonSetFlatness
    from fam_hf.flatness import ClosedFormFlatness

    with pytest.raises(ValueError, match=r"names 2 layers .* and ClosedFormFlatness takes one"):
        ClosedFormFlatness(model, "*.mlp.*")
    with pytest.raises(ValueError, match="found no LoRA-adapted linear layer in GPT2LMHeadModel"):
        RelativeFlatness(model, "all-lora")
    with pytest.raises(ValueError, match="unknown layer 'transformer.h.9.*'; name exactly one of"):
        RelativeFlatness(model, ["lm_head", "transformer.h.9.*"])


def test_a_layer_that_cannot_be_estimated_is_named_with_its_reason():
    cfg = LlamaConfig(hidden_size=8, num_key_value_heads=1, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=16, vocab_size=32)  # fmt: skip
    peft_model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="layer 'model.layers.0.self_attn.q_proj' in the set .* cannot be estimated: "
                                         "relative flatness of a DoRA layer is not supported.*Leave it out"):  # fmt: skip
        RelativeFlatness(peft_model, "model.layers.0.self_attn.*")


def test_options_for_one_layer_are_refused_for_a_set():
    # normalize_features scales each layer by its own features, and head_loss= reads a head the set's probe does
    # not: a set once ignored the first silently and crashed on the second
    from fam_hf import HeadLoss

    with pytest.raises(ValueError, match="normalize_features=True is for one layer"):
        RelativeFlatness(MLP().double(), ["fc1", "fc2"], "probe", normalize_features=True)
    for estimator in ("probe", "gauss_newton"):
        with pytest.raises(ValueError, match=r"head_loss= with a set of layers .* is not supported"):
            RelativeFlatness(MLP().double(), ["fc1", "fc2"], estimator, head_loss=HeadLoss("cross_entropy", head="head"))


def test_a_layer_of_the_set_that_did_not_run_is_named():
    model = MLP().double()
    flat = RelativeFlatness(model, ["fc1", "fc2"], "probe")
    with flat.record() as recording:
        loss = model.head(torch.tanh(model.fc2(torch.randn(3, 8, dtype=torch.float64)))).sum()
    with pytest.raises(RuntimeError, match=r"1 of the 2 layers of the set 'fc1,fc2' did not run.*: fc1;"):
        recording.result(loss)


def test_activation_checkpointing_sees_the_same_probes_on_every_layer_of_the_set(tmp_path):
    """The backward pass's recomputation of checkpointed blocks runs every layer's hook again: each must reuse its
    R_l and the set's δ, so the step equals the one without checkpointing."""
    runs = {}
    for checkpointing in (False, True):
        model = gpt2()
        trainer = fam_trainer(model, lm_data(16), tmp_path / str(checkpointing), max_steps=2,
                              per_device_train_batch_size=8, fam_lambda=0.3, fam_layer="all-linear", fam_probes=2,
                              gradient_checkpointing=checkpointing,
                              gradient_checkpointing_kwargs={"use_reentrant": False})  # fmt: skip
        trainer.train()
        runs[checkpointing] = (params(model), [h["fam/kappa"] for h in fam_logs(trainer)])
    assert runs[True][1] == pytest.approx(runs[False][1], rel=1e-6)
    for name, value in runs[True][0].items():
        torch.testing.assert_close(value, runs[False][0][name], rtol=0, atol=1e-6, msg=name)

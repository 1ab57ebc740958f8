"""Training set-ups beyond the plain loop: activation checkpointing, bf16 autocast, PEFT adapters."""

from __future__ import annotations

import pytest
import torch
from models import fam_logs, fam_trainer, gpt2, lm_data, params
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch.nn.attention import SDPBackend, sdpa_kernel

from fam_hf import RelativeFlatness, relative_flatness

PROBE = dict(fam_estimator="probe", fam_layer="transformer.h.0.mlp.c_fc", fam_probes=2)


@pytest.mark.parametrize("estimator,hessian_grad", [("probe", "full"), ("probe", "detached"), ("gauss_newton", "full")])
def test_non_reentrant_checkpointing_gives_the_same_training(tmp_path, estimator, hessian_grad):
    """The recomputation in backward sees the same probe, attention kernel and LayerNorm as the forward."""
    runs = []
    for checkpointing in (False, True):
        model = gpt2()
        trainer = fam_trainer(
            model,
            lm_data(16),
            tmp_path / str(checkpointing),
            max_steps=2,
            per_device_train_batch_size=8,
            fam_lambda=0.5,
            fam_hessian_grad=hessian_grad,
            gradient_checkpointing=checkpointing,
            **{**PROBE, "fam_estimator": estimator},
        )
        trainer.train()
        runs.append((params(model), [h["fam/kappa"] for h in fam_logs(trainer)]))
    assert runs[1][1] == pytest.approx(runs[0][1], rel=1e-6)
    for name, value in runs[0][0].items():
        torch.testing.assert_close(runs[1][0][name], value, rtol=0, atol=1e-6, msg=name)


def test_reentrant_checkpointing_is_refused_with_the_fix(tmp_path):
    trainer = fam_trainer(
        gpt2(),
        lm_data(16),
        tmp_path,
        max_steps=1,
        per_device_train_batch_size=8,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True},
        **PROBE,
    )
    with pytest.raises(ValueError, match=r"gradient_checkpointing_kwargs=\{'use_reentrant': False\}"):
        trainer.train()


def test_hook_leaves_other_forward_passes_alone():
    model = gpt2()
    batch = {k: torch.tensor(v) for k, v in lm_data(4)[:4].items()}
    flatness = RelativeFlatness(model, "transformer.h.0.mlp.c_fc", "probe")
    with flatness.record() as recording:
        model(**batch)
    with torch.no_grad():
        model(**batch)
    assert recording.calls == 1


@pytest.mark.parametrize("estimator", [{}, PROBE], ids=["closed_form", "probe"])
def test_bf16_autocast_on_cpu(tmp_path, estimator):
    logs = {}
    for bf16 in (False, True):
        model = gpt2()
        trainer = fam_trainer(
            model,
            lm_data(16),
            tmp_path / str(bf16),
            max_steps=2,
            per_device_train_batch_size=8,
            fam_lambda=0.3,
            learning_rate=0.05,
            bf16=bf16,
            **estimator,
        )
        trainer.train()
        assert all(torch.isfinite(p).all() for p in model.parameters())
        logs[bf16] = [h["fam/kappa"] for h in fam_logs(trainer)]
    assert logs[True] == pytest.approx(logs[False], rel=3e-2, abs=1e-3)


@pytest.mark.parametrize("estimator", ["closed_form", "probe"])
def test_grad_scaler_scales_the_penalty_with_the_loss(tmp_path, estimator):
    """fp16's path on the CPU: a real GradScaler (scale 2¹²) in the accelerator. The penalty is part of the loss
    that goes through the scaler, so the step equals the unscaled one (powers of two are exact); no gradient of
    the penalty is taken outside it. fp16 autocast itself needs a GPU."""
    kw = {} if estimator == "closed_form" else PROBE
    runs = {}
    for scaled in (False, True):
        model = gpt2()
        trainer = fam_trainer(
            model,
            lm_data(16),
            tmp_path / f"{estimator}{scaled}",
            max_steps=2,
            per_device_train_batch_size=8,
            fam_lambda=0.5,
            max_grad_norm=0.0,  # accelerate unscales before clipping only when its own mixed precision is fp16
            **kw,
        )
        if scaled:
            trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        trainer.train()
        runs[scaled] = (params(model), [h["fam/penalty"] for h in fam_logs(trainer)])
    assert trainer.accelerator.scaler.get_scale() == 2.0**12  # no step skipped
    assert runs[True][1] == pytest.approx(runs[False][1], rel=1e-6) and runs[True][1][0] != 0
    for name, value in runs[True][0].items():
        torch.testing.assert_close(value, runs[False][0][name], rtol=0, atol=1e-7, msg=name)


def test_lora_training_with_penalty_on_frozen_head_and_on_adapted_layer(tmp_path):
    for layer, estimator in (("auto", "closed_form"), ("transformer.h.0.attn.c_attn", "probe")):
        model = get_peft_model(
            gpt2(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
        )
        before = params(model)
        trainer = fam_trainer(
            model,
            lm_data(16),
            tmp_path / layer,
            max_steps=2,
            per_device_train_batch_size=8,
            fam_lambda=0.5,
            fam_layer=layer,
            fam_estimator=estimator,
        )
        assert trainer.flatness.estimator == estimator
        trainer.train()
        after = params(model)
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        assert changed and all("lora_" in n for n in changed), changed  # only the adapter trains
        assert len(fam_logs(trainer)) == 2
        trainer.save_model(str(tmp_path / layer / "adapter"))
        reloaded = PeftModel.from_pretrained(gpt2(), str(tmp_path / layer / "adapter"))
        name = "base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight"
        torch.testing.assert_close(dict(reloaded.named_parameters())[name], after[name])


@pytest.mark.parametrize("reentrant", [True, False])
def test_kbit_style_frozen_base_with_lora(tmp_path, reentrant):
    """peft's prepare_model_for_kbit_training (frozen fp32 base, checkpointing, input grads) + LoRA: the closed
    form on the frozen head trains whatever the checkpointing; a probe on an adapted layer needs it
    non-reentrant, and peft's default (no use_reentrant: torch's reentrant default) is refused with the fix."""
    kwargs = None if reentrant else {"use_reentrant": False}
    for layer, estimator in (("auto", "closed_form"), ("transformer.h.0.attn.c_attn", "probe")):
        base = gpt2()
        base.is_loaded_in_8bit = True  # what peft checks: take its k-bit path (frozen base, checkpointing, input grads)
        base = prepare_model_for_kbit_training(base, gradient_checkpointing_kwargs=kwargs)
        assert base.is_gradient_checkpointing
        model = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
        before = params(model)
        trainer = fam_trainer(
            model,
            lm_data(16),
            tmp_path / f"{layer}{reentrant}",
            max_steps=2,
            per_device_train_batch_size=8,
            fam_lambda=0.5,
            fam_layer=layer,
            fam_estimator=estimator,
        )
        if reentrant and estimator == "probe":
            with pytest.raises(ValueError, match="prepare_model_for_kbit_training needs it passed explicitly"):
                trainer.train()
            continue
        trainer.train()
        changed = {n for n, v in params(model).items() if not torch.equal(before[n], v)}
        assert changed and all("lora_" in n for n in changed), changed
        assert [h["fam/skipped"] for h in fam_logs(trainer)] == [0, 0]
        assert all(h["fam/kappa"] != 0 for h in fam_logs(trainer))


def test_sdpa_with_checkpointing_trains_with_the_probe(tmp_path):
    """SDPA's fused CPU kernel has no double backward: the probe runs the forward, the second-order pass and
    the backward's recomputation of checkpointed blocks with the math kernel, so training matches eager."""
    runs = []
    for attention in ("eager", "sdpa"):
        model = gpt2()
        model.set_attn_implementation(attention)
        trainer = fam_trainer(
            model,
            lm_data(16),
            tmp_path / attention,
            max_steps=2,
            per_device_train_batch_size=8,
            fam_lambda=0.5,
            gradient_checkpointing=True,
            **{**PROBE, "fam_layer": "transformer.h.0.attn.c_attn"},
        )
        trainer.train()
        runs.append(params(model))
    for name, value in runs[0].items():
        torch.testing.assert_close(runs[1][name], value, rtol=0, atol=1e-6, msg=name)


def test_missing_double_backward_names_the_fix():
    """A model that picks a fused attention kernel itself (as flash-attention models do) cannot give a second
    derivative: the error says what to do."""
    model = gpt2()
    attention = model.transformer.h[0].attn
    forward = attention.forward

    def fused_forward(*args, **kwargs):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return forward(*args, **kwargs)

    attention.forward = fused_forward
    batch = {k: torch.tensor(v) for k, v in lm_data(4)[:4].items()}
    with pytest.raises(RuntimeError, match="attn_implementation='eager'"):
        relative_flatness(model, batch, "transformer.h.0.attn.c_attn", "probe")
    model.set_attn_implementation("eager")
    assert relative_flatness(model, batch, "transformer.h.0.attn.c_attn", "probe").value != 0

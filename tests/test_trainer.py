"""FAMTrainer against plain Trainer and against κ computed by hand: same numbers, not just "it runs"."""

from __future__ import annotations

import pytest
import torch
from models import COMMON, bert, cls_data, fam_logs, fam_trainer, gpt2, lm_data, params
from transformers import (
    Seq2SeqTrainingArguments,
    Trainer,
    TrainingArguments,
)

import fam_hf.flatness
from fam_hf import FAMConfig, FAMTrainer, RelativeFlatness, relative_flatness


@pytest.mark.parametrize("estimator", ["closed_form", "probe"])
def test_lambda_zero_trains_exactly_like_plain_trainer(tmp_path, estimator):
    plain = gpt2()
    Trainer(
        model=plain,
        args=TrainingArguments(
            output_dir=str(tmp_path / "plain"), max_steps=3, per_device_train_batch_size=8, **COMMON
        ),
        train_dataset=lm_data(),
    ).train()
    fam = gpt2()
    trainer = fam_trainer(
        fam,
        lm_data(),
        tmp_path / "fam",
        max_steps=3,
        per_device_train_batch_size=8,
        fam_lambda=0.0,
        fam_estimator=estimator,
    )
    trainer.train()
    for (name, a), b in zip(plain.named_parameters(), fam.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-7, msg=name)
    assert len(fam_logs(trainer)) == 3 and all(h["fam/penalty"] == 0 for h in fam_logs(trainer))


@pytest.mark.parametrize("make_model,data", [(gpt2, lm_data), (bert, cls_data)], ids=["causal-lm", "classifier"])
def test_one_step_equals_hand_computed_sgd_on_loss_plus_lambda_kappa(tmp_path, make_model, data):
    lam, lr = 0.3, 0.5
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = fam_trainer(model, data(16), tmp_path, max_steps=1, per_device_train_batch_size=16, fam_lambda=lam)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in list(trainer.get_train_dataloader().sampler)])
    trainer.train()

    # the denominator Trainer hands the model (for GPT-2 it counts position 0 too: transformers leaves
    # GPT2LMHeadModel.loss_type unset); FAM must follow whatever the loss used
    if trainer.model_accepts_loss_kwargs:
        batch["num_items_in_batch"] = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    reference = make_model()
    reference.load_state_dict(before)
    reference.train()
    kappa = relative_flatness(reference, batch, differentiable=True)
    objective = reference(**batch).loss + lam * kappa.value
    grads = torch.autograd.grad(objective, list(reference.parameters()))
    for (name, p), g in zip(reference.named_parameters(), grads):
        torch.testing.assert_close(model.state_dict()[name], p.detach() - lr * g, rtol=0, atol=1e-6, msg=name)
    assert fam_logs(trainer)[0]["fam/kappa"] == pytest.approx(float(kappa.value), rel=1e-5)
    assert fam_logs(trainer)[0]["fam/task_loss"] == pytest.approx(float(objective - lam * kappa.value), rel=1e-5)


@pytest.mark.parametrize("make_model,data", [(gpt2, lm_data), (bert, cls_data)], ids=["causal-lm", "classifier"])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, make_model, data):
    runs = {}
    for micro, accumulate in [(16, 1), (8, 2)]:
        model = make_model()
        trainer = fam_trainer(
            model,
            data(32),
            tmp_path / f"{micro}",
            max_steps=2,
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=accumulate,
            fam_lambda=0.3,
        )
        trainer.train()
        runs[micro] = (
            params(model),
            [h["fam/kappa"] for h in fam_logs(trainer)],
            [h["loss"] for h in fam_logs(trainer)],
        )
    (p16, k16, l16), (p8, k8, l8) = runs[16], runs[8]
    assert k8 == pytest.approx(k16, rel=1e-6) and l8 == pytest.approx(l16, rel=1e-6)
    for name in p16:
        torch.testing.assert_close(p8[name], p16[name], rtol=0, atol=1e-6, msg=name)


def test_probe_penalty_on_a_body_layer_logs_its_std_error(tmp_path):
    model = gpt2()
    before = params(model)
    trainer = fam_trainer(
        model,
        lm_data(16),
        tmp_path,
        max_steps=2,
        per_device_train_batch_size=8,
        fam_lambda=1.0,
        fam_layer="transformer.h.0.mlp.c_fc",
        fam_estimator="probe",
        fam_probes=2,
    )
    assert trainer.flatness.estimator == "probe"
    trainer.train()
    logs = fam_logs(trainer)
    # away from a minimum a body layer's Hessian is indefinite, so κ may have either sign
    assert len(logs) == 2 and all(h["fam/kappa"] != 0 and h["fam/kappa_stderr"] > 0 for h in logs)
    assert not torch.equal(before["transformer.h.0.mlp.c_fc.weight"], model.transformer.h[0].mlp.c_fc.weight)


def test_the_probe_std_error_under_accumulation_is_the_one_big_batchs(tmp_path):
    # the micro-batches of a step share its probes: the step's per-probe values add up, and their spread (not the sum
    # of the micro-batches' standard errors, which grew ×1.6 at 2 × 8 and ×3 at 4 × 4) is κ's standard error
    logged = []
    for batch, accumulation in ((16, 1), (8, 2), (4, 4)):
        trainer = fam_trainer(gpt2(), lm_data(16), tmp_path / str(batch), max_steps=1, fam_lambda=0.0, fam_probes=4,
                              per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                              fam_layer="transformer.h.0.mlp.c_fc", fam_estimator="probe")  # fmt: skip
        trainer.train()
        logged.append(fam_logs(trainer)[0])
    for h in logged[1:]:
        assert h["fam/kappa"] == pytest.approx(logged[0]["fam/kappa"], rel=1e-5)
        assert h["fam/kappa_stderr"] == pytest.approx(logged[0]["fam/kappa_stderr"], rel=1e-5)


def test_gauss_newton_penalty_on_a_body_layer_one_step_equals_hand_computed_sgd(tmp_path):
    """The Gauss–Newton κ of GPT-2's c_fc (LayerNorms after it: their third derivatives must be right), the
    loss's num_items_in_batch denominator, the trainer's probe draw: one SGD step on loss + λκ_GN by hand."""
    lam, lr, layer = 0.3, 0.5, "transformer.h.0.mlp.c_fc"
    model = gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = fam_trainer(model, lm_data(16), tmp_path, max_steps=1, per_device_train_batch_size=16, fam_lambda=lam,
                          fam_layer=layer, fam_estimator="gauss_newton", fam_probes=2)  # fmt: skip
    batch = trainer.data_collator([trainer.train_dataset[i] for i in list(trainer.get_train_dataloader().sampler)])
    trainer.train()
    batch["num_items_in_batch"] = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    reference = gpt2()
    reference.load_state_dict(before)
    reference.train()
    kappa = relative_flatness(reference, batch, layer, "gauss_newton", probes=2, differentiable=True,
                              generator=torch.Generator().manual_seed(COMMON["seed"]))  # fmt: skip
    assert kappa.estimator == "gauss_newton" and float(kappa.value) > 0
    objective = reference(**batch).loss + lam * kappa.value
    grads = torch.autograd.grad(objective, list(reference.parameters()))
    for (name, p), g in zip(reference.named_parameters(), grads):
        torch.testing.assert_close(model.state_dict()[name], p.detach() - lr * g, rtol=0, atol=1e-6, msg=name)
    assert fam_logs(trainer)[0]["fam/kappa"] == pytest.approx(float(kappa.value), rel=1e-5)


def test_lazy_schedule_and_warmup(tmp_path):
    trainer = fam_trainer(
        gpt2(),
        lm_data(),
        tmp_path,
        max_steps=4,
        per_device_train_batch_size=8,
        fam_lambda=0.2,
        fam_every_n_steps=2,
        fam_warmup_steps=4,
    )
    assert [trainer.fam_lambda_at(s) for s in range(5)] == [
        (0.05, 2.0),
        None,
        (0.15000000000000002, 2.0),
        None,
        (0.2, 2.0),
    ]
    trainer.train()
    steps = [h["step"] for h in fam_logs(trainer)]
    assert steps == [1, 3]  # κ computed on optimizer steps 0 and 2, logged after them
    for h in fam_logs(trainer):
        assert h["fam/penalty"] == pytest.approx(2 * h["fam/lambda"] * h["fam/kappa"], rel=1e-6)
        assert h["fam/task_loss"] == pytest.approx(h["loss"] - h["fam/penalty"], rel=1e-9)


@pytest.mark.parametrize("logging_steps", [2, 3])
def test_logged_penalty_and_task_loss_average_over_every_step_as_the_loss_does(tmp_path, logging_steps):
    """With fam_every_n_steps=2 a log spans penalised and unpenalised steps: ``loss`` is the mean over all of them,
    so ``fam/penalty`` is what the penalty added to it and ``fam/task_loss`` the mean of the model's own loss, while
    ``fam/kappa`` is the mean over the steps that measured it."""
    trainer = fam_trainer(gpt2(), lm_data(48), tmp_path, max_steps=6, per_device_train_batch_size=8, fam_lambda=0.5,
                          fam_every_n_steps=2, logging_steps=logging_steps)  # fmt: skip
    penalties, kappas, losses = {}, {}, []
    add, training_step = trainer.fam_penalty.add, trainer.training_step

    def recording_add(loss, result, step, norm, accelerator):
        total = add(loss, result, step, norm, accelerator)
        penalties[step], kappas[step] = float(total.detach() - loss.detach()), float(result.value.detach())
        return total

    trainer.fam_penalty.add = recording_add
    trainer.training_step = lambda *args, **kw: losses.append(float(training_step(*args, **kw))) or torch.tensor(losses[-1])
    trainer.train()
    logs = fam_logs(trainer)
    assert [h["step"] for h in logs] == list(range(logging_steps, 7, logging_steps))
    for h in logs:
        steps = range(h["step"] - logging_steps, h["step"])
        assert h["loss"] == pytest.approx(sum(losses[s] for s in steps) / logging_steps, rel=1e-6)
        assert h["fam/penalty"] == pytest.approx(sum(penalties.get(s, 0) for s in steps) / logging_steps, rel=1e-5)
        task = sum(losses[s] - penalties.get(s, 0) for s in steps) / logging_steps
        assert h["fam/task_loss"] == pytest.approx(task, rel=1e-6)
        measured = [kappas[s] for s in steps if s in kappas]
        assert h["fam/kappa"] == pytest.approx(sum(measured) / len(measured), rel=1e-6)


def test_evaluation_is_untouched(tmp_path):
    eval_data = lm_data(16)
    plain = Trainer(
        model=gpt2(), args=TrainingArguments(output_dir=str(tmp_path / "p"), **COMMON), eval_dataset=eval_data
    ).evaluate()
    fam = FAMTrainer(
        model=gpt2(), args=FAMConfig(output_dir=str(tmp_path / "f"), fam_lambda=5.0, **COMMON), eval_dataset=eval_data
    ).evaluate()
    assert fam["eval_loss"] == plain["eval_loss"]


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernel", "beside-the-loss"])
def test_non_finite_kappa_skips_the_penalty_and_never_writes_nan(tmp_path, monkeypatch, fused):
    if fused:  # κ = inf in the kernel itself, whose loss then carries the loss's own gradient only
        kernel = fam_hf.flatness.fused.fused_head_loss

        def overflowing(*args, **kwargs):
            return kernel(*args[:5], args[5] * float("inf"), **kwargs)

        monkeypatch.setattr(fam_hf.flatness.fused, "fused_head_loss", overflowing)
    else:
        monkeypatch.setattr(fam_hf.flatness.closed_form, "closed_form", lambda *a, **k: torch.tensor(float("nan")))
        monkeypatch.setattr(FAMTrainer, "fam_fuse_head", False)
    model = gpt2()
    trainer = fam_trainer(model, lm_data(16), tmp_path, max_steps=2, per_device_train_batch_size=8, fam_lambda=1.0)
    assert (trainer.fam_fused is not None) == fused
    trainer.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [h["fam/skipped"] for h in fam_logs(trainer)] == [1, 2]
    assert all(h["fam/kappa"] == 0 and h["fam/penalty"] == 0 for h in fam_logs(trainer))


def test_the_skipped_count_survives_a_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(fam_hf.flatness.closed_form, "closed_form", lambda *a, **k: torch.tensor(float("nan")))
    monkeypatch.setattr(FAMTrainer, "fam_fuse_head", False)
    kw = dict(max_steps=4, per_device_train_batch_size=8, fam_lambda=1.0, save_strategy="steps", save_steps=2)
    straight = fam_trainer(gpt2(), lm_data(), tmp_path / "straight", **kw)
    straight.train()
    fam_trainer(gpt2(), lm_data(), tmp_path / "interrupted", **{**kw, "max_steps": 2}).train()
    resumed = fam_trainer(gpt2(), lm_data(), tmp_path / "interrupted", **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "interrupted" / "checkpoint-2"))
    assert [h["fam/skipped"] for h in fam_logs(straight)] == [1, 2, 3, 4]
    assert [h["fam/skipped"] for h in fam_logs(resumed)] == [1, 2, 3, 4]  # the first two from the checkpoint
    assert straight.state.log_history[-1]["fam/skipped"] == resumed.state.log_history[-1]["fam/skipped"] == 4


def test_config_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="fam_lambda=-1.0 is negative"):
        FAMConfig(output_dir=str(tmp_path), fam_lambda=-1.0)
    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"fam_lambda={value} is not a finite number"):
            FAMConfig(output_dir=str(tmp_path), fam_lambda=value)
        with pytest.raises(ValueError, match=f"fam_lambda_relative={value} must be a finite number > 0"):
            FAMConfig(output_dir=str(tmp_path), fam_lambda_relative=value)
    with pytest.raises(ValueError, match="fam_probes=1.5 must be a whole number ≥ 1"):
        FAMConfig(output_dir=str(tmp_path), fam_probes=1.5)
    with pytest.raises(ValueError, match="fam_estimator='hessian' is not one of 'auto'"):
        FAMConfig(output_dir=str(tmp_path), fam_estimator="hessian")
    with pytest.raises(ValueError, match="fam_every_n_steps=0 must be ≥ 1"):
        FAMConfig(output_dir=str(tmp_path), fam_every_n_steps=0)
    with pytest.raises(ValueError, match=r"fam_token_fraction=1.5 must be in \(0, 1\]"):
        FAMConfig(output_dir=str(tmp_path), fam_token_fraction=1.5)
    # a TrainingArguments is adopted (tests/test_drop_in.py); a config FAMConfig does not extend is refused
    with pytest.raises(TypeError, match=r"FAMTrainer needs args=FAMConfig\(...\), got Seq2SeqTrainingArguments"):
        FAMTrainer(model=gpt2(), args=Seq2SeqTrainingArguments(output_dir=str(tmp_path), report_to=[]))
    frozen_head = gpt2()
    frozen_head.lm_head.weight.requires_grad_(False)  # tied: the embeddings too
    with pytest.raises(ValueError, match="frozen: the penalty would train nothing. Use fam_hessian_grad='full'"):
        fam_trainer(frozen_head, lm_data(), tmp_path, fam_hessian_grad="detached")
    with pytest.raises(ValueError, match="unknown layer 'decoder'; name exactly one of: "):
        fam_trainer(gpt2(), lm_data(), tmp_path, fam_layer="decoder")
    with pytest.raises(ValueError, match=r"computed outside the model \(a Trainer's compute_loss_func or label smoothing"):
        FAMTrainer(
            model=gpt2(),
            args=FAMConfig(output_dir=str(tmp_path), fam_estimator="closed_form", **COMMON),
            compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.logits.mean(),
        )


def test_custom_loss_switches_auto_to_the_probe(tmp_path):
    trainer = FAMTrainer(model=gpt2(), args=FAMConfig(output_dir=str(tmp_path), label_smoothing_factor=0.1, **COMMON))
    assert trainer.flatness.estimator == "probe"


@pytest.mark.parametrize(
    ("layer", "extra", "expected"),
    [
        ("auto", {}, "closed_form"),
        ("transformer.h.0.mlp.c_fc", {}, "gauss_newton"),  # a penalty needs κ bounded below
        ("transformer.h.0.mlp.c_fc", {"fam_hessian_grad": "detached"}, "probe"),  # Gauss–Newton takes "full" only
        ("transformer.h.0.mlp.c_fc", {"label_smoothing_factor": 0.1}, "probe"),  # not the model's own loss
    ],
    ids=["head", "body", "body_detached", "body_label_smoothing"],
)
def test_auto_trains_with_the_estimator_a_penalty_needs(tmp_path, layer, extra, expected):
    args = FAMConfig(output_dir=str(tmp_path), fam_layer=layer, **extra, **COMMON)
    assert FAMTrainer(model=gpt2(), args=args).flatness.estimator == expected
    # measurement keeps the paper's κ (the full Hessian) on a body layer: exactly, on one of ≤ 1024 weights
    measured = RelativeFlatness(gpt2(), layer).estimator
    assert measured == ("closed_form" if layer == "auto" else "exact")


def test_one_forward_pass_per_micro_batch(tmp_path):
    model = gpt2()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    fam_trainer(
        model,
        lm_data(16),
        tmp_path,
        max_steps=2,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        fam_lambda=0.5,
    ).train()
    assert len(calls) == 4


@pytest.mark.parametrize("relative", [None, 0.2], ids=["lambda", "lambda_relative"])
def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, relative):
    """Probe estimator (random) with lazy schedule: the resumed run must draw the same probes (and keep the λ
    that fam_lambda_relative set at the first step, not set it again from its own first batch)."""
    kw = dict(
        max_steps=4,
        per_device_train_batch_size=8,
        fam_lambda=0.5,
        fam_lambda_relative=relative,
        fam_estimator="probe",
        fam_layer="transformer.h.0.mlp.c_fc",
        fam_probes=2,
        save_strategy="steps",
        save_steps=2,
    )
    if relative:  # on the head (closed form): the probe's κ₀ on c_fc is negative here, which λ-relative refuses
        kw.update(fam_estimator="closed_form", fam_layer="auto")
    straight = gpt2()
    fam_trainer(straight, lm_data(), tmp_path / "straight", **kw).train()

    fam_trainer(gpt2(), lm_data(), tmp_path / "interrupted", **{**kw, "max_steps": 2}).train()
    assert (tmp_path / "interrupted" / "checkpoint-2" / "fam_state.pt").is_file()
    resumed = gpt2(seed=1)  # different init: everything must come from the checkpoint
    fam_trainer(resumed, lm_data(), tmp_path / "interrupted", **kw).train(
        resume_from_checkpoint=str(tmp_path / "interrupted" / "checkpoint-2")
    )
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)


def test_a_negative_kappa_is_reported_once_naming_the_layer_and_the_fix(tmp_path, caplog):
    trainer = fam_trainer(bert(), cls_data(8), tmp_path, max_steps=1, fam_layer="bert.encoder.layer.0.output.dense",
                          fam_estimator="probe")  # fmt: skip
    for kappa in (-2.0, -3.0):
        trainer.fam_penalty.steps = 1
        zero = torch.zeros(())
        trainer.fam_penalty.sums.add(kappa=torch.tensor(kappa), penalty=zero, skipped=zero)
        with caplog.at_level("WARNING", logger="fam_hf.penalty"):
            trainer.log({"loss": 1.0})
    warned = [r.getMessage() for r in caplog.records if "not positive semi-definite" in r.getMessage()]
    assert len(warned) == 1 and "'bert.encoder.layer.0.output.dense' averaged -2 < 0" in warned[0]
    assert "Use fam_estimator='gauss_newton'" in warned[0] and "penalise the output head" in warned[0]
    assert trainer.state.log_history[-1]["fam/kappa"] == -3.0


def test_lambda_relative_sets_lambda_from_the_first_steps_loss_and_kappa(tmp_path):
    share, lr = 0.1, 0.5
    model = bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = fam_trainer(model, cls_data(16), tmp_path, max_steps=2, per_device_train_batch_size=16,
                          fam_lambda=123.0, fam_lambda_relative=share)  # fmt: skip
    batch = trainer.data_collator([trainer.train_dataset[i] for i in list(trainer.get_train_dataloader().sampler)])
    trainer.train()
    reference = bert()
    reference.load_state_dict(before)
    reference.train()
    kappa = relative_flatness(reference, batch, differentiable=True).value
    loss = reference(**batch).loss
    lam = share * loss.item() / kappa.item()  # fam_lambda (123) is replaced
    assert trainer.fam_base_lambda == pytest.approx(lam, rel=1e-5)
    assert [h["fam/lambda"] for h in fam_logs(trainer)] == pytest.approx([lam, lam], rel=1e-5)  # set once
    grads = torch.autograd.grad(loss + lam * kappa, list(reference.parameters()))
    # no clipping: λ ≈ 356 here, the gradient's norm is above Trainer's default max_grad_norm
    first = fam_trainer(bert(), cls_data(16), tmp_path / "one", max_steps=1, per_device_train_batch_size=16,
                        fam_lambda_relative=share, max_grad_norm=0.0)  # fmt: skip
    first.model.load_state_dict(before)
    first.train()
    for (name, p), g in zip(reference.named_parameters(), grads):
        torch.testing.assert_close(first.model.state_dict()[name], p.detach() - lr * g, rtol=0, atol=1e-6, msg=name)
    assert fam_logs(first)[0]["fam/penalty"] == pytest.approx(share * loss.item(), rel=1e-5)
    with pytest.raises(ValueError, match=r"fam_lambda_relative=0 must be a finite number > 0"):
        FAMConfig(output_dir=str(tmp_path), fam_lambda_relative=0)


def test_lambda_relative_waits_for_a_micro_batch_that_counts_a_target(tmp_path):
    # under accumulation the first micro-batch may be all prompt (labels -100): L₀ = κ₀ = 0 there, and λ comes from
    # the next one instead of stopping the run
    trainer = fam_trainer(gpt2(), lm_data(16), tmp_path, max_steps=1, fam_lambda_relative=0.1)
    penalty, zero = trainer.fam_penalty, torch.zeros(())
    assert penalty.calibrate(zero, zero, trainer.accelerator) == 0.0 and penalty.base_lambda is None
    assert penalty.calibrate(torch.tensor(2.0), torch.tensor(4.0), trainer.accelerator) == pytest.approx(0.05)
    assert penalty.base_lambda == pytest.approx(0.05)


def test_lambda_relative_refuses_a_first_kappa_that_is_not_positive(tmp_path):
    trainer = fam_trainer(bert(), cls_data(16), tmp_path, max_steps=1, fam_lambda_relative=0.1)
    with pytest.raises(ValueError, match=r"L₀ = 0.5 and κ₀ = -1 on 'classifier' \(both must be > 0\); set fam_lambda"):
        trainer.fam_penalty.calibrate(torch.tensor(0.5), torch.tensor(-1.0), trainer.accelerator)


@pytest.mark.parametrize(
    "extra",
    [{}, {"fam_token_fraction": 0.5}, {"fam_hessian_grad": "detached"}, {"fam_scale": "reference"},
     {"fam_lambda_relative": 0.1}, {"fam_every_n_steps": 2, "fam_warmup_steps": 3}],
    ids=["default", "token-fraction", "detached", "reference-scale", "lambda-relative", "schedule"],
)  # fmt: skip
def test_the_fused_kernel_trains_as_the_penalty_beside_the_loss_and_never_forms_the_logits(tmp_path, extra):
    runs = {}
    for fused in (True, False):
        model = gpt2()
        shapes = []
        model.lm_head.register_forward_hook(lambda _m, _i, out, shapes=shapes: shapes.append(tuple(out.shape)))
        trainer = fam_trainer(model, lm_data(32), tmp_path / str(fused), max_steps=3, per_device_train_batch_size=8,
                              gradient_accumulation_steps=2, fam_lambda=0.3, **extra)  # fmt: skip
        trainer.fam_fused = trainer.fam_fused if fused else None
        assert (trainer.fam_fused is not None) == fused
        trainer.train()
        if fused and "fam_every_n_steps" not in extra:  # the head ran on no position at all
            assert shapes and all(shape[1] == 0 for shape in shapes), shapes
        elif not fused:
            assert all(shape[1] > 0 for shape in shapes)
        runs[fused] = params(model), fam_logs(trainer)
    (p_fused, logs_fused), (p_beside, logs_beside) = runs[True], runs[False]
    for name in p_beside:
        torch.testing.assert_close(p_fused[name], p_beside[name], rtol=0, atol=1e-6, msg=name)
    assert len(logs_fused) == len(logs_beside) >= 2
    for a, b in zip(logs_fused, logs_beside):
        for key in ("loss", "fam/kappa", "fam/penalty", "fam/lambda"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


def test_a_router_auxiliary_loss_keeps_the_penalty_beside_the_models_own_loss(tmp_path):
    """A mixture of experts with ``output_router_logits`` adds its load-balancing loss only when it computes the loss
    itself: the fused kernel (which runs the model without labels) must not take that micro-batch, or the router's
    loss is silently dropped. Trained as with κ beside the loss, and as plain Trainer at λ = 0."""
    from transformers import AutoConfig, AutoModelForCausalLM

    def moe():
        torch.manual_seed(0)
        config = AutoConfig.for_model(
            "qwen3_moe", vocab_size=32, hidden_size=16, intermediate_size=32, moe_intermediate_size=16, num_experts=4,
            num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
            output_router_logits=True, router_aux_loss_coef=0.5, tie_word_embeddings=False,
        )  # fmt: skip
        return AutoModelForCausalLM.from_config(config)

    runs = {}
    for fused in (True, False):
        model = moe()
        trainer = fam_trainer(model, lm_data(16), tmp_path / str(fused), max_steps=2, per_device_train_batch_size=8,
                              fam_lambda=0.3)  # fmt: skip
        trainer.fam_fused = trainer.fam_fused if fused else None
        trainer.train()
        runs[fused] = params(model), [h["loss"] for h in fam_logs(trainer)]
    for name, value in runs[False][0].items():
        torch.testing.assert_close(runs[True][0][name], value, rtol=0, atol=1e-6, msg=name)
    assert runs[True][1] == pytest.approx(runs[False][1], rel=1e-6)
    plain = moe()
    Trainer(model=plain, args=TrainingArguments(output_dir=str(tmp_path / "p"), **COMMON, max_steps=2,
                                                per_device_train_batch_size=8), train_dataset=lm_data(16)).train()  # fmt: skip
    off = moe()
    fam_trainer(off, lm_data(16), tmp_path / "off", max_steps=2, per_device_train_batch_size=8, fam_lambda=0.0).train()
    for name, value in params(plain).items():
        torch.testing.assert_close(params(off)[name], value, rtol=0, atol=1e-7, msg=name)

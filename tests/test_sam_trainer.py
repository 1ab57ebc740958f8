"""SAMTrainer against SAM steps written out by hand (float64, ≤ 1e-6), and against fam_hf.sam_sharpness."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from models import COMMON, bert, cls_data, gpt2, launch, lm_data, params
from transformers import Seq2SeqTrainingArguments, Trainer, TrainingArguments

from fam_hf import SAMConfig, SAMTrainer, sam_sharpness

HERE = Path(__file__).parent
LR = 0.5


def gpt2_64(seed=0):
    return gpt2(seed).double()


def bert_64(seed=0):
    return bert(seed).double()


def sam_trainer(model, data, tmp_path, **kw):
    args = SAMConfig(output_dir=str(tmp_path), **{**COMMON, **kw})
    return SAMTrainer(model=model, args=args, train_dataset=data)


def sam_logs(trainer):
    return [h for h in trainer.state.log_history if "sam/rho" in h]


def first_batch(trainer):
    """The step-0 batch exactly as Trainer hands it to the model (with its loss denominator, if it passes one)."""
    order = list(trainer.get_train_dataloader().sampler)[: trainer.args.train_batch_size]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in order])
    if trainer.model_accepts_loss_kwargs:
        batch["num_items_in_batch"] = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    return batch


def hand_sam_gradient(model, batch, rho, adaptive, eta=0.0, scale=1.0):
    """SAM's gradient ∇L(w + ε̂) of ``L = scale · model(**batch).loss``, written out over the trainable parameters.

    Returns (gradients, L(w), L(w + ε̂), ‖g‖ or ‖T g‖); the model's weights are left as they were.
    """
    w = [p for p in model.parameters() if p.requires_grad]
    loss = scale * model(**batch).loss
    g = torch.autograd.grad(loss, w)
    if adaptive:
        t = [p.detach().abs() + eta for p in w]
        norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
        eps = [rho * ti * ti * gi / norm for ti, gi in zip(t, g)]
    else:
        norm = torch.sqrt(sum((gi**2).sum() for gi in g))
        eps = [rho * gi / norm for gi in g]
    with torch.no_grad():
        for p, e in zip(w, eps):
            p.add_(e)
    loss_eps = scale * model(**batch).loss
    g_eps = torch.autograd.grad(loss_eps, w)
    with torch.no_grad():
        for p, e in zip(w, eps):
            p.sub_(e)
    return g_eps, loss.item(), loss_eps.item(), norm.item()


def hand_sam_step(model, batch, rho, adaptive, lr=LR):
    """One SGD step with SAM's gradient: (new trainable parameters by name, L(w), L(w + ε̂), ascent norm)."""
    g_eps, *rest = hand_sam_gradient(model, batch, rho, adaptive)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return {n: (p - lr * g).detach() for (n, p), g in zip(trainable, g_eps)}, *rest


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("make_model,data", [(gpt2_64, lm_data), (bert_64, cls_data)], ids=["causal-lm", "classifier"])
def test_one_step_equals_a_hand_written_sam_step(tmp_path, make_model, data, adaptive):
    rho = 0.5 if adaptive else 0.05
    model = make_model()
    trainer = sam_trainer(
        model, data(16), tmp_path, max_steps=1, per_device_train_batch_size=16, sam_rho=rho, sam_adaptive=adaptive
    )
    batch = first_batch(trainer)
    trainer.train()

    reference = make_model().train()
    expected, loss, loss_eps, norm = hand_sam_step(reference, batch, rho, adaptive)
    got = dict(model.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(got[name].detach(), value, rtol=0, atol=1e-6, msg=name)
    # transformers' losses cast the logits to float32 (even of a float64 model): losses agree to a few float32 ulps
    (log,) = sam_logs(trainer)
    assert log["loss"] == pytest.approx(loss, abs=1e-6)  # the loss at w, as a plain step logs it
    assert log["sam/sharpness"] == pytest.approx(loss_eps - loss, abs=2e-6)
    assert log["sam/grad_norm"] == pytest.approx(norm, rel=1e-6)
    assert log["sam/rho"] == rho and log["sam/skipped"] == 0

    # trainer and measure perturb alike: the logged sharpness is fam_hf.sam_sharpness on the step's batch
    measured = sam_sharpness(make_model().train(), batch, rho=rho, adaptive=adaptive)
    assert log["sam/sharpness"] == pytest.approx(float(measured.value), abs=2e-6)
    assert log["sam/grad_norm"] == pytest.approx(float(measured.gradient_norm), rel=1e-6)


@pytest.mark.parametrize("make_model,data", [(gpt2_64, lm_data), (bert_64, cls_data)], ids=["causal-lm", "classifier"])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, make_model, data):
    """ε̂ from the gradient of the whole step's batch, the second pass over all of its micro-batches."""
    runs = {}
    for micro, accumulate in [(16, 1), (8, 2)]:
        model = make_model()
        trainer = sam_trainer(
            model,
            data(32),
            tmp_path / f"{micro}",
            max_steps=2,
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=accumulate,
            sam_rho=0.1,
        )
        trainer.train()
        runs[micro] = (params(model), sam_logs(trainer))
    (p16, logs16), (p8, logs8) = runs[16], runs[8]
    for name in p16:
        torch.testing.assert_close(p8[name], p16[name], rtol=0, atol=1e-6, msg=name)
    for key in ("loss", "sam/sharpness", "sam/grad_norm"):  # losses are float32 (see above): a few ulps
        assert [h[key] for h in logs8] == pytest.approx([h[key] for h in logs16], rel=1e-6, abs=1e-6), key


def test_small_rho_sharpness_is_rho_times_the_ascent_norm(tmp_path):
    """First order: L(w + ε̂) − L(w) ≈ ρ‖g‖ (SAM) and ρ‖Tg‖ (ASAM); positive at the default radius."""
    for adaptive, rho in [(False, 1e-4), (True, 1e-3), (False, 0.05)]:
        trainer = sam_trainer(
            gpt2_64(),
            lm_data(16),
            tmp_path / f"{adaptive}{rho}",
            max_steps=1,
            per_device_train_batch_size=16,
            sam_rho=rho,
            sam_adaptive=adaptive,
        )
        trainer.train()
        (log,) = sam_logs(trainer)
        ratio = log["sam/sharpness"] / (rho * log["sam/grad_norm"])
        assert log["sam/sharpness"] > 0
        assert ratio == pytest.approx(1.0, abs=0.05 if rho < 0.01 else 0.5), (adaptive, rho, ratio)


def test_weights_are_restored_exactly(tmp_path):
    """With a zero learning rate a SAM step must leave every weight bit-identical (restored, not w + ε − ε)."""
    model = gpt2()
    before = params(model)
    sam_trainer(model, lm_data(16), tmp_path, max_steps=2, per_device_train_batch_size=8, learning_rate=0.0).train()
    for name, value in params(model).items():
        assert torch.equal(value, before[name]), name


def test_lora_moves_only_the_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
    model = peft.get_peft_model(gpt2_64(), lora)
    before = params(model)
    trainer = sam_trainer(model, lm_data(16), tmp_path, max_steps=1, per_device_train_batch_size=16, sam_rho=0.05)
    batch = first_batch(trainer)
    trainer.train()

    after = params(model)
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    for name in before.keys() - adapters:  # the frozen base: never perturbed, never stepped
        assert torch.equal(after[name], before[name]), name
    # B starts at 0, so the first pass has no gradient for A; at w + ε̂ (B ≠ 0) it has, and A moves too
    assert all(not torch.equal(after[n], before[n]) for n in adapters)

    reference = peft.get_peft_model(gpt2_64(), lora).train()  # same seeds: the same base and adapters
    assert all(torch.equal(p, before[n]) for n, p in reference.named_parameters())
    expected, *_ = hand_sam_step(reference, batch, rho=0.05, adaptive=False)
    for name, value in expected.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=1e-6, msg=name)


def test_non_finite_first_pass_gradient_skips_the_perturbation(tmp_path, caplog):
    """A NaN first-pass gradient (as fp16 overflow gives) must not reach the weights: the step is a plain one."""
    plain = gpt2()
    Trainer(
        model=plain,
        args=TrainingArguments(output_dir=str(tmp_path / "p"), max_steps=2, per_device_train_batch_size=8, **COMMON),
        train_dataset=lm_data(16),
    ).train()

    model = gpt2()
    backward_calls = []

    def nan_on_first_pass(grad):  # backward passes alternate: first pass, second pass, first, second, ...
        backward_calls.append(1)
        return grad * float("nan") if len(backward_calls) % 2 == 1 else grad

    model.transformer.h[0].mlp.c_fc.weight.register_hook(nan_on_first_pass)
    trainer = sam_trainer(model, lm_data(16), tmp_path / "s", max_steps=2, per_device_train_batch_size=8)
    with caplog.at_level(logging.WARNING, logger="fam_hf.sam_trainer"):
        trainer.train()
    assert "first-pass gradient is not finite" in caplog.text
    assert trainer._sam_skipped == 2 and sam_logs(trainer)[-1]["sam/skipped"] == 2
    assert "sam/sharpness" not in sam_logs(trainer)[-1]
    for (name, a), b in zip(plain.named_parameters(), model.parameters()):
        assert torch.isfinite(b).all(), name
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)


def test_grad_scaler_path_unscales_the_first_pass_gradient(tmp_path):
    """fp16's path on the CPU: a real GradScaler (scale 2¹²) in the accelerator scales both backward passes; ε̂ and
    the logged ‖g‖ must come from the unscaled gradient, and the step must equal the unscaled run (powers of two
    are exact). fp16 autocast itself needs a GPU and is not run here."""
    runs = {}
    for scaled in (False, True):
        model = gpt2()
        # no clipping: accelerate unscales before clipping only when its mixed_precision is fp16
        trainer = sam_trainer(
            model, lm_data(16), tmp_path / str(scaled), max_steps=2, per_device_train_batch_size=8, max_grad_norm=0.0
        )
        if scaled:
            trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        trainer.train()
        runs[scaled] = (params(model), sam_logs(trainer))
    assert trainer.accelerator.scaler.get_scale() == 2.0**12  # no step was skipped for inf/NaN
    (p1, logs1), (p2, logs2) = runs[False], runs[True]
    for name, value in p2.items():
        torch.testing.assert_close(value, p1[name], rtol=0, atol=1e-7, msg=name)
    for key in ("loss", "sam/grad_norm", "sam/sharpness"):
        assert [h[key] for h in logs2] == pytest.approx([h[key] for h in logs1], rel=1e-6), key


def test_bf16_autocast_on_cpu_is_close_to_float32(tmp_path):
    runs = {}
    for bf16 in (False, True):
        model = gpt2()
        trainer = sam_trainer(
            model, lm_data(16), tmp_path / str(bf16), max_steps=2, per_device_train_batch_size=8, bf16=bf16
        )
        trainer.train()
        runs[bf16] = (params(model), sam_logs(trainer))
    (p32, logs32), (p16, logs16) = runs[False], runs[True]
    assert all(h["sam/skipped"] == 0 for h in logs16)
    for name, value in p16.items():
        assert value.dtype == torch.float32 and torch.isfinite(value).all(), name
        # bf16 autocast keeps 8 bits of mantissa in the matmuls; seen here: max |Δw| 6.3e-4 after two steps at lr 0.5
        torch.testing.assert_close(value, p32[name], rtol=0, atol=5e-3, msg=name)
    for key in ("loss", "sam/grad_norm"):  # seen here: ≤ 2.5e-4 relative
        assert [h[key] for h in logs16] == pytest.approx([h[key] for h in logs32], rel=2e-3), key


def test_config_errors_name_the_fix(tmp_path):
    for rho in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"sam_rho=.* must be a finite number > 0"):
            SAMConfig(output_dir=str(tmp_path), sam_rho=rho)
    with pytest.raises(ValueError, match="sam_eta=-0.01 must be ≥ 0"):
        SAMConfig(output_dir=str(tmp_path), sam_eta=-0.01)
    # a TrainingArguments is adopted (tests/test_drop_in.py); a config SAMConfig does not extend is refused
    with pytest.raises(TypeError, match=r"SAMTrainer needs args=SAMConfig\(...\), got Seq2SeqTrainingArguments"):
        SAMTrainer(model=gpt2(), args=Seq2SeqTrainingArguments(output_dir=str(tmp_path), report_to=[]))
    with pytest.raises(ValueError, match="updates the weights inside backward"):
        sam_trainer(gpt2(), lm_data(), tmp_path, optim="lomo")
    for field, value, message in (("sam_adaptive", "false", "must be true or false, not str"),
                                  ("sam_rho", "5e-2", "must be a number, not str .*write 5.0e-2"),
                                  ("sam_rho", True, "must be a number, not bool")):  # fmt: skip
        with pytest.raises(TypeError, match=f"{field}=.* {message}"):
            SAMConfig(output_dir=str(tmp_path), **{field: value})


def test_a_restarted_training_loop_does_not_replay_an_interrupted_step(tmp_path):
    """auto_find_batch_size retries the loop after an out-of-memory error at the same global step (and a train()
    after an exception starts at it too): the micro-batches the interrupted step kept must not enter the new step's
    second pass."""
    runs = {}
    for interrupted in (False, True):
        model = gpt2_64()
        trainer = sam_trainer(model, lm_data(32), tmp_path / str(interrupted), max_steps=2,
                              per_device_train_batch_size=8, gradient_accumulation_steps=2, sam_rho=0.1)  # fmt: skip
        if interrupted:  # what an out-of-memory error on the step's second micro-batch leaves behind
            stale = {k: v[:4] for k, v in trainer.data_collator([trainer.train_dataset[i] for i in range(8)]).items()}
            trainer._sam_kept = [(stale, torch.tensor(3.0))]
        trainer.train()
        runs[interrupted] = params(model), sam_logs(trainer)
    for name, value in runs[False][0].items():
        torch.testing.assert_close(runs[True][0][name], value, rtol=0, atol=0, msg=name)
    assert [h["sam/sharpness"] for h in runs[True][1]] == [h["sam/sharpness"] for h in runs[False][1]]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sam_ddp")
    launch("accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "29543",
           str(HERE / "sam_ddp_worker.py"), str(out))  # fmt: skip
    return out


@pytest.mark.parametrize("variant", ["sam", "asam"])
@pytest.mark.multiprocess
def test_two_ddp_ranks_stay_in_sync_and_equal_a_replay_with_per_rank_perturbations(ddp_run, variant):
    """Each rank perturbs with its own gradient (first pass under no_sync); the second pass is all-reduced. The
    replay computes each rank's ε̂ by hand from the micro-batches that rank was handed."""
    from sam_ddp_worker import STEPS, VARIANTS

    rho, adaptive = VARIANTS[variant]["sam_rho"], VARIANTS[variant].get("sam_adaptive", False)
    ranks = [torch.load(ddp_run / f"{variant}-rank{r}.pt") for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for name, value in ranks[0]["params"].items():
        assert torch.equal(ranks[1]["params"][name], value), name  # the ranks stay in sync, bit for bit

    model, shared = gpt2_64().train(), gpt2_64().train()
    for step in range(STEPS):
        # Trainer multiplies each rank's loss by the world size (token averaging); DDP averages the gradients
        per_rank = []
        for rank in ranks:
            batch, num_items = rank["seen"][step]
            per_rank.append({**batch, "num_items_in_batch": num_items})
        results = [hand_sam_gradient(model, b, rho, adaptive, scale=ranks[0]["loss_scale"]) for b in per_rank]
        if step == 0:  # what the ranks logged: their own loss, sharpness and ascent norm, averaged
            log = ranks[0]["logs"][0]
            assert log == ranks[1]["logs"][0]
            assert log["loss"] == pytest.approx(sum(r[1] for r in results) / 2, abs=1e-6)
            assert log["sam/sharpness"] == pytest.approx(sum(r[2] - r[1] for r in results) / 2, abs=2e-6)
            assert log["sam/grad_norm"] == pytest.approx(sum(r[3] for r in results) / 2, rel=1e-6)
            # one ε̂ from the all-reduced gradient instead would be a different step: the test can tell them apart
            merged = {k: torch.cat([b[k] for b in per_rank]) for k in ("input_ids", "labels")}
            g_global, *_ = hand_sam_gradient(shared, {**merged, "num_items_in_batch": num_items}, rho, adaptive)
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p -= LR * (results[0][0][i] + results[1][0][i]) / 2
        if step == 0:
            differences = [(g - (a + b) / 2).abs().max() for g, a, b in zip(g_global, results[0][0], results[1][0])]
            assert max(differences) > 1e-4
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ranks[0]["params"][name], value, rtol=0, atol=1e-6, msg=name)

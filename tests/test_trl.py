"""fam_hf.trl (FAM and SAM inside TRL's SFTTrainer) on a tiny random Llama, against plain SFTTrainer and against
steps written out by hand on the same collated batches."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from models import COMMON, params
from test_sam_trainer import hand_sam_step

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

import fam_hf.curvature  # noqa: E402
from fam_hf import FAMFields, FAMMixin, FAMTrainer, RelativeFlatness, SAMMixin, relative_flatness  # noqa: E402
from fam_hf.trl import FAMSFTConfig, FAMSFTTrainer, SAMSFTConfig, SAMSFTTrainer  # noqa: E402

VOCAB, LR, LAM = 48, 0.5, 0.3
# SFTConfig trains in bf16 by default (autocast, on CPU too): the hand-written steps are float32/float64
SFT_COMMON = {**COMMON, "dataloader_drop_last": False, "learning_rate": LR, "max_length": 16, "bf16": False}
LAYOUTS = {
    "padded": {},
    "packed": {"packing": True},  # bfd: padding-free rows with position_ids
    "padding_free": {"padding_free": True, "max_length": None},
}


def llama(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False, attn_implementation="eager",
    )  # fmt: skip
    return LlamaForCausalLM(cfg).to(dtype)


def tokenizer():
    vocab = {f"t{i}": i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t2")), pad_token="t0", eos_token="t1"
    )


def chat_data(n=16):
    """Pre-tokenized conversations: a prompt (masked out of the loss, as assistant-only loss does) and a reply."""
    g = torch.Generator().manual_seed(1)
    rows = {"input_ids": [], "assistant_masks": []}
    for _ in range(n):
        prompt, reply = (int(x) for x in torch.randint(2, 6, (2,), generator=g))
        rows["input_ids"].append(torch.randint(3, VOCAB, (prompt + reply,), generator=g).tolist())
        rows["assistant_masks"].append([0] * prompt + [1] * reply)
    return Dataset.from_dict(rows)


def sft(cls, config, model, tmp_path, **kw):
    args = config(output_dir=str(tmp_path), **{**SFT_COMMON, **kw})
    return cls(model=model, args=args, train_dataset=chat_data(), processing_class=tokenizer())


def whole_batch(trainer):
    """A batch of every row (batch size ≥ the data), in the dataset's order."""
    return trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])


def recorded_batches(trainer) -> list[dict]:
    """The micro-batches exactly as the trainer hands them to compute_loss (filled in during training)."""
    seen, compute_loss = [], trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        if model.training:
            seen.append(dict(inputs))
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording
    return seen


def reference_of(trainer, state, dtype=torch.float32):
    """A fresh copy of the trainer's model at ``state``, with the config SFTTrainer left it (pad token, no cache:
    the attention mask of a padding-free row depends on them)."""
    reference = LlamaForCausalLM(trainer.model.config).to(dtype)
    reference.load_state_dict(state)
    return reference.train()


def model_inputs(batch):
    """The collated batch as the model takes it (padding-free rows carry position_ids and cu_seq_lens_*, …)."""
    return {k: v for k, v in batch.items() if k != "seq_lengths"}


def test_lambda_zero_equals_plain_sft_exactly_with_no_extra_forward(tmp_path):
    plain = llama()
    sft(SFTTrainer, SFTConfig, plain, tmp_path / "plain", max_steps=3, per_device_train_batch_size=4).train()
    fam = llama()
    calls = {"head": 0, "backbone": 0}
    fam.lm_head.register_forward_hook(lambda *_: calls.__setitem__("head", calls["head"] + 1))
    fam.model.register_forward_hook(lambda *_: calls.__setitem__("backbone", calls["backbone"] + 1))
    trainer = sft(FAMSFTTrainer, FAMSFTConfig, fam, tmp_path / "fam", max_steps=3, per_device_train_batch_size=4,
                  fam_lambda=0.0)  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*return_outputs=True.*")  # TRL's extra-forward warning
        trainer.train()
    for (name, a), b in zip(plain.named_parameters(), fam.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    assert calls == {"head": 0, "backbone": 3}  # one fused forward per micro-batch, no logits pass
    logs = [h for h in trainer.state.log_history if "fam/kappa" in h]
    assert len(logs) == 3 and all(h["fam/penalty"] == 0 and h["fam/kappa"] > 0 for h in logs)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_step_equals_hand_computed_sgd_on_loss_plus_lambda_kappa(tmp_path, layout):
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = sft(FAMSFTTrainer, FAMSFTConfig, model, tmp_path, max_steps=1, per_device_train_batch_size=64,
                  fam_lambda=LAM, **LAYOUTS[layout])  # fmt: skip
    seen = recorded_batches(trainer)
    trainer.train()
    (batch,) = seen
    assert ("position_ids" in batch) == (layout != "padded") and ("attention_mask" in batch) == (layout == "padded")
    assert (batch["labels"] == -100).any() and int((batch["labels"] != -100).sum()) == 51  # the replies only

    reference = reference_of(trainer, before)
    inputs = model_inputs(batch)
    kappa = relative_flatness(reference, inputs, differentiable=True)  # the head's own forward, on the logits
    objective = reference(**inputs).loss + LAM * kappa.value
    grads = torch.autograd.grad(objective, list(reference.parameters()))
    for (name, p), g in zip(reference.named_parameters(), grads):
        torch.testing.assert_close(model.state_dict()[name], p.detach() - LR * g, rtol=0, atol=1e-6, msg=name)
    (log,) = [h for h in trainer.state.log_history if "fam/kappa" in h]
    assert log["fam/kappa"] == pytest.approx(float(kappa.value), rel=1e-5)


def test_gradient_accumulation_two_by_eight_equals_one_by_sixteen(tmp_path):
    runs = {}
    for micro, accumulate in [(16, 1), (8, 2)]:
        model = llama()
        trainer = sft(FAMSFTTrainer, FAMSFTConfig, model, tmp_path / f"{micro}", max_steps=2, fam_lambda=LAM,
                      per_device_train_batch_size=micro, gradient_accumulation_steps=accumulate)  # fmt: skip
        trainer.train()
        logs = [h for h in trainer.state.log_history if "fam/kappa" in h]
        runs[micro] = params(model), [h["fam/kappa"] for h in logs], [h["loss"] for h in logs]
    (p16, k16, l16), (p8, k8, l8) = runs[16], runs[8]
    assert k8 == pytest.approx(k16, rel=1e-6) and l8 == pytest.approx(l16, rel=1e-6)
    for name in p16:
        torch.testing.assert_close(p8[name], p16[name], rtol=0, atol=1e-6, msg=name)


def test_a_mixin_behind_a_trainer_subclass_is_an_error_naming_the_order():
    with pytest.raises(TypeError, match=r"put the mixin first: class Bad\(FAMMixin, SFTTrainer\)"):

        class Bad(SFTTrainer, FAMMixin):
            pass

    with pytest.raises(TypeError, match=r"FAMMixin after SFTTrainer"):

        class AlsoBad(SFTTrainer, FAMTrainer):
            pass

    with pytest.raises(TypeError, match=r"class BadSAM\(SAMMixin, SFTTrainer\)"):

        class BadSAM(SFTTrainer, SAMMixin):
            pass


def test_trl_defaults_survive_in_the_combined_configs(tmp_path):
    @dataclasses.dataclass
    class Reversed(SFTConfig, FAMFields):  # the other order keeps them too
        pass

    reference = SFTConfig(output_dir=str(tmp_path), use_cpu=True)
    for config in (FAMSFTConfig, SAMSFTConfig, Reversed):
        args = config(output_dir=str(tmp_path), use_cpu=True)
        for name in ("logging_steps", "learning_rate", "bf16", "gradient_checkpointing", "max_length", "report_to"):
            assert getattr(args, name) == getattr(reference, name), (config.__name__, name)
    assert reference.bf16 and reference.learning_rate == 2e-5 and reference.logging_steps == 10  # TRL's, not HF's
    assert FAMSFTConfig(output_dir=str(tmp_path), use_cpu=True).fam_lambda == 0.01
    with pytest.raises(ValueError, match="fam_lambda=-1 is negative"):
        FAMSFTConfig(output_dir=str(tmp_path), use_cpu=True, fam_lambda=-1)


class NaiveFAMSFT(FAMTrainer, SFTTrainer):
    """What came before FAMSFTTrainer: FAMTrainer in front of SFTTrainer, hooking lm_head (which the fused loss never
    calls)."""


def test_every_path_that_would_train_nothing_raises(tmp_path):
    # The naive combination: lm_head runs only in TRL's no-grad logits forward (closed form and probe alike) ...
    for estimator in ("closed_form", "probe"):
        naive = sft(NaiveFAMSFT, FAMSFTConfig, llama(), tmp_path / estimator, max_steps=1, fam_lambda=LAM,
                    per_device_train_batch_size=4, fam_estimator=estimator)  # fmt: skip
        with pytest.raises(RuntimeError, match=r"ran only under torch.no_grad\(\).*fam_hf.trl.FAMSFTTrainer"):
            naive.train()
    # ... and without that forward it never runs at all
    naive = sft(NaiveFAMSFT, FAMSFTConfig, llama(), tmp_path / "never", max_steps=1, fam_lambda=LAM,
                per_device_train_batch_size=4)  # fmt: skip
    naive._fam_wants_outputs = lambda: False
    with pytest.raises(RuntimeError, match=r"did not run.*train nothing.*fam_hf.trl.FAMSFTTrainer"):
        naive.train()
    # Probe/exact and body layers under the fused head: refused at construction, naming the fix
    for kw in ({"fam_estimator": "probe"}, {"fam_estimator": "exact"}, {"fam_layer": "model.layers.0.mlp.down_proj"}):
        with pytest.raises(ValueError, match="only the LM head's closed form .* can train; use fam_layer='auto'"):
            sft(FAMSFTTrainer, FAMSFTConfig, llama(), tmp_path / "refused", fam_lambda=LAM, **kw)
    # a config FAMSFTConfig does not extend (an SFTConfig or a TrainingArguments it adopts: tests/test_drop_in.py)
    with pytest.raises(TypeError, match=r"FAMSFTTrainer needs args=FAMSFTConfig\(...\), got SAMSFTConfig"):
        sft(FAMSFTTrainer, SAMSFTConfig, llama(), tmp_path / "args")
    # A probe whose perturbation never reaches the loss (the layer's output is computed, then not used)
    model = llama(dtype=torch.float64).train()
    flat = RelativeFlatness(model, "model.layers.0.mlp.down_proj", "probe")
    batch = model_inputs(
        whole_batch(sft(SFTTrainer, SFTConfig, llama(), tmp_path / "b", per_device_train_batch_size=4))
    )
    with flat.record(batch) as recording:
        model(**batch)
        loss = model.lm_head(model.model.embed_tokens(batch["input_ids"])).logsumexp(-1).mean()  # skips the body
    with pytest.raises(RuntimeError, match="does not depend on the output of 'model.layers.0.mlp.down_proj'"):
        recording.result(loss)
    flat.close()


def test_the_fused_kernels_missing_double_backward_is_explained():
    message = "mm(): functions with out=... arguments don't support automatic differentiation, but one of the arguments requires grad."  # noqa: E501
    with pytest.raises(RuntimeError, match="TRL's fused LM head.*Penalise the LM head"):
        with fam_hf.curvature.explain_missing_double_backward():
            raise RuntimeError(message)


def test_sam_sft_one_step_equals_a_hand_written_sam_step_and_logs_trl_metrics_once(tmp_path):
    model = llama(dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = sft(SAMSFTTrainer, SAMSFTConfig, model, tmp_path, max_steps=1, per_device_train_batch_size=64,
                  sam_rho=0.05)  # fmt: skip
    seen = recorded_batches(trainer)
    trainer.train()
    assert len(seen) == 2  # the pass at w and the pass at w + ε̂, on the same batch
    batch = seen[0]
    reference = reference_of(trainer, before, torch.float64)
    # 1e-7, not float64's 1e-12: TRL's fused kernel takes its log-softmax in float32 (seen: 1.1e-8)
    expected, loss, _, norm = hand_sam_step(reference, model_inputs(batch), rho=0.05, adaptive=False, lr=LR)
    for name, value in expected.items():
        torch.testing.assert_close(
            model.state_dict()[name], value, rtol=0, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}"
        )
    (log,) = [h for h in trainer.state.log_history if "sam/rho" in h]
    assert log["sam/grad_norm"] == pytest.approx(norm, rel=1e-6)
    assert log["num_tokens"] == int(batch["attention_mask"].sum())  # the second pass's tokens are not counted
    assert log["loss"] == pytest.approx(loss, rel=1e-6)
    labels = batch["labels"][:, 1:]
    with torch.no_grad():
        reference.load_state_dict(before)
        logits = reference(**model_inputs(batch)).logits[:, :-1]
    accuracy = ((logits.argmax(-1) == labels) & (labels != -100)).sum() / (labels != -100).sum()
    assert log["mean_token_accuracy"] == pytest.approx(float(accuracy), rel=1e-6)  # at w, from the first pass


def test_the_model_card_names_the_trainer_and_the_estimator_that_trained(tmp_path):
    trainer = sft(FAMSFTTrainer, FAMSFTConfig, llama(), tmp_path, max_steps=1, per_device_train_batch_size=4,
                  fam_lambda=LAM, logging_steps=1)  # fmt: skip
    trainer.train()
    trainer.save_model()
    card = (tmp_path / "README.md").read_text()
    assert "through `fam_hf`'s `FAMSFTTrainer`" in card and "`FAMTrainer`" not in card
    assert "closed form from the input of 'lm_head' (the backbone's last hidden state)" in card
    assert "| trainer | FAMSFTTrainer |" in card


# DFT: each token's loss weighed by its detached probability, in the fused kernel's loss and in its κ
@pytest.mark.parametrize("layout", [*LAYOUTS, "dft"])
def test_the_fused_kernel_trains_and_logs_as_sft_with_the_penalty_beside_it_and_never_forms_the_logits(tmp_path,
                                                                                                       layout):  # fmt: skip
    runs = {}
    for fused in (True, False):
        model = llama()
        shapes = []
        model.lm_head.register_forward_hook(lambda _m, _i, out, shapes=shapes: shapes.append(tuple(out.shape)))
        trainer = sft(FAMSFTTrainer, FAMSFTConfig, model, tmp_path / str(fused), max_steps=2,
                      per_device_train_batch_size=4, gradient_accumulation_steps=2, fam_lambda=LAM,
                      fam_token_fraction=0.5, **LAYOUTS.get(layout, {"loss_type": layout}))  # fmt: skip
        trainer.fam_fused = trainer.fam_fused if fused else None
        assert (trainer.fam_fused is not None) == fused
        trainer.train()
        assert all(shape[-2] == 0 for shape in shapes) if fused else not shapes  # SFTTrainer's own head: no call
        runs[fused] = params(model), [h for h in trainer.state.log_history if "loss" in h]
    (p_fused, logs_fused), (p_beside, logs_beside) = runs[True], runs[False]
    for name in p_beside:
        torch.testing.assert_close(p_fused[name], p_beside[name], rtol=0, atol=1e-6, msg=name)
    assert len(logs_fused) == len(logs_beside) == 2
    for a, b in zip(logs_fused, logs_beside):
        assert a["num_tokens"] == b["num_tokens"]
        for key in ("loss", "fam/kappa", "fam/penalty", "entropy", "mean_token_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key

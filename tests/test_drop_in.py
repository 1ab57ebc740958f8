"""Drop-in: FAMSFTTrainer and SAMSFTTrainer across SFTTrainer's features, FAMTrainer and SAMTrainer across the
Trainer features users turn on. Each supported cell trains two steps of tiny random models built from configs and
checks, against SFTTrainer on the same model and data: at λ = 0 FAMSFTTrainer ends bit-identical to it; at λ > 0
the penalty is applied, finite, and the parameters differ; SAMSFTTrainer takes SAM steps (finite sharpness,
parameters that differ). What cannot work is refused at construction, with the fix in the message. README
"Drop-in compatibility" lists the cells."""

from __future__ import annotations

import json
import logging
import math
import re

import pytest
import torch

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from test_sft import chatml_tokenizer  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from fam_hf import FAMConfig, FAMTrainer, SAMConfig, SAMTrainer  # noqa: E402
from fam_hf.trl import FAMSFTConfig, FAMSFTTrainer, SAMSFTConfig, SAMSFTTrainer  # noqa: E402

# ChatML with {% generation %} markers (assistant-only loss) and tool calls, rendered as JSON
TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}<|im_start|>assistant\n{% generation %}"
    "{%- if message.get('content') %}{{ message['content'] }}{% endif -%}"
    "{%- if message.get('tool_calls') %}{{ message['tool_calls'] | tojson }}{% endif -%}"
    "<|im_end|>\n{% endgeneration %}"
    "{%- else -%}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif -%}"
)
COMMON = dict(
    max_steps=2, per_device_train_batch_size=4, learning_rate=0.05, bf16=False, report_to="none", use_cpu=True,
    save_strategy="no", logging_steps=1, disable_tqdm=True, max_length=48, seed=0, dataloader_drop_last=True,
)  # fmt: skip
WORDS = "the king speaks and the queen answers while the fool sings of rain in the night".split()
FAMILIES = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "output_router_logits": True,
                  "router_aux_loss_coef": 0.01},  # fmt: skip
    "gpt_neox": {},
    "mistral": {},
    "lfm2": {},
}


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = chatml_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def tiny(tokenizer, family: str = "llama", **overrides):
    """A 2-layer random causal LM of ``family`` with the tokenizer's vocabulary (seeded: the same every call)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        family, vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        **{**FAMILIES[family], **overrides},
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


def sentence(i: int, n: int = 6) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


def data(kind: str, n: int = 8) -> Dataset:
    """``n`` rows of one of TRL's dataset formats."""
    if kind == "language_modeling":
        return Dataset.from_dict({"text": [sentence(i, 10) for i in range(n)]})
    if kind == "prompt_completion":
        return Dataset.from_dict({"prompt": [sentence(i) for i in range(n)], "completion": [sentence(i + 1, 4) for i in range(n)]})  # noqa: E501
    if kind == "conversational":
        rows = [[{"role": "user", "content": sentence(i)}, {"role": "assistant", "content": sentence(i + 3, 4)}]
                for i in range(n)]  # fmt: skip
        return Dataset.from_dict({"messages": rows})
    if kind == "conversational_prompt_completion":
        return Dataset.from_dict({
            "prompt": [[{"role": "user", "content": sentence(i)}] for i in range(n)],
            "completion": [[{"role": "assistant", "content": sentence(i + 2, 4)}] for i in range(n)],
        })  # fmt: skip
    if kind == "tool_calls":
        tool = {"type": "function", "function": {"name": "weather", "description": "The weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip
        rows = []
        for i in range(n):
            call = {"type": "function", "function": {"name": "weather", "arguments": {"city": WORDS[i]}}}
            rows.append([
                {"role": "user", "content": sentence(i, 4)},
                {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "name": "weather", "content": sentence(i + 5, 2)},
                {"role": "assistant", "content": sentence(i + 1, 3)},
            ])  # fmt: skip
        return Dataset.from_dict({"messages": rows, "tools": [json.dumps([tool])] * n})
    raise ValueError(kind)


def run(trainer_cls, config_cls, tokenizer, *, family="llama", dataset="language_modeling", model=None,
        trainer_kw=None, model_kw=None, tmp_path, **config_kw):  # fmt: skip
    args = config_cls(output_dir=str(tmp_path / f"{trainer_cls.__name__}"), **{**COMMON, **config_kw})
    model = model if model is not None else tiny(tokenizer, family, **(model_kw or {}))
    trainer = trainer_cls(model=model, args=args,
                          train_dataset=data(dataset), processing_class=tokenizer, **(trainer_kw or {}))  # fmt: skip
    trainer.train()
    return trainer


def trained(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}


def logged(trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


def check_cell(tokenizer, tmp_path, **cell):
    """SFTTrainer, FAMSFTTrainer at λ = 0 and λ = 0.5, SAMSFTTrainer: the λ = 0 run bit-identical to SFTTrainer,
    the others applying their method (finite, logged, parameters moved differently)."""
    config_kw = cell.pop("config_kw", {})
    plain = trained(run(SFTTrainer, SFTConfig, tokenizer, tmp_path=tmp_path / "plain", **cell, **config_kw))
    off = run(FAMSFTTrainer, FAMSFTConfig, tokenizer, tmp_path=tmp_path / "off", fam_lambda=0.0, **cell, **config_kw)
    for name, value in trained(off).items():
        torch.testing.assert_close(value, plain[name], rtol=0, atol=0, msg=name)
    assert all(k > 0 and math.isfinite(k) for k in logged(off, "fam/kappa")) and logged(off, "fam/kappa")
    on = run(FAMSFTTrainer, FAMSFTConfig, tokenizer, tmp_path=tmp_path / "on", fam_lambda=0.5, **cell, **config_kw)
    penalties = logged(on, "fam/penalty")
    assert len(penalties) == 2 and all(p > 0 and math.isfinite(p) for p in penalties)
    assert logged(on, "fam/skipped")[-1] == 0
    assert any(not torch.equal(value, plain[name]) for name, value in trained(on).items())
    sam = run(SAMSFTTrainer, SAMSFTConfig, tokenizer, tmp_path=tmp_path / "sam", sam_rho=0.5, **cell, **config_kw)
    assert all(math.isfinite(s) for s in logged(sam, "sam/sharpness")) and len(logged(sam, "sam/sharpness")) == 2
    assert any(not torch.equal(value, plain[name]) for name, value in trained(sam).items())
    return on


def peft_config(method: str):
    import peft

    targets = ["q_proj", "v_proj"]
    return {
        "lora": lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=targets),
        "loha": lambda: peft.LoHaConfig(task_type="CAUSAL_LM", r=4, target_modules=targets),
        "lokr": lambda: peft.LoKrConfig(task_type="CAUSAL_LM", r=4, target_modules=targets),
        "ia3": lambda: peft.IA3Config(task_type="CAUSAL_LM", target_modules=[*targets, "down_proj"],
                                      feedforward_modules=["down_proj"]),  # fmt: skip
        "prompt_tuning": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "p_tuning": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                     encoder_hidden_size=8),  # fmt: skip
    }[method]()


# -- the SFTTrainer matrix -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dataset, config_kw",
    [
        ("language_modeling", {}),
        ("prompt_completion", {}),  # completion-only loss, TRL's default for this format
        ("prompt_completion", {"completion_only_loss": False}),
        ("conversational", {}),
        ("conversational", {"assistant_only_loss": True}),
        ("conversational_prompt_completion", {}),
        ("tool_calls", {"assistant_only_loss": True, "max_length": 160}),
        ("language_modeling", {"packing": True, "per_device_train_batch_size": 1}),  # bfd: padding-free rows
        ("language_modeling", {"packing": True, "packing_strategy": "wrapped", "per_device_train_batch_size": 1}),
        ("conversational", {"padding_free": True, "max_length": None}),
        ("conversational", {"loss_type": "dft"}),
        ("conversational", {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2}),
    ],
    ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()) or "defaults",
)
def test_sft_features(tokenizer, tmp_path, dataset, config_kw):
    check_cell(tokenizer, tmp_path, dataset=dataset, config_kw=config_kw)


@pytest.mark.parametrize("method", ["lora", "loha", "lokr", "ia3", "prompt_tuning", "p_tuning"])
def test_sft_peft_methods(tokenizer, tmp_path, method):
    # a fresh PeftConfig per trainer: SFTTrainer may edit the one it is given
    cell = dict(dataset="conversational", trainer_kw={"peft_config": peft_config(method)})
    plain = trained(run(SFTTrainer, SFTConfig, tokenizer, tmp_path=tmp_path / "plain", **cell))
    cell["trainer_kw"] = {"peft_config": peft_config(method)}
    off = run(FAMSFTTrainer, FAMSFTConfig, tokenizer, tmp_path=tmp_path / "off", fam_lambda=0.0, **cell)
    for name, value in trained(off).items():
        torch.testing.assert_close(value, plain[name], rtol=0, atol=0, msg=name)
    cell["trainer_kw"] = {"peft_config": peft_config(method)}
    on = run(FAMSFTTrainer, FAMSFTConfig, tokenizer, tmp_path=tmp_path / "on", fam_lambda=0.5, **cell)
    assert all(p > 0 and math.isfinite(p) for p in logged(on, "fam/penalty"))
    assert any(not torch.equal(value, plain[name]) for name, value in trained(on).items())
    cell["trainer_kw"] = {"peft_config": peft_config(method)}
    sam = run(SAMSFTTrainer, SAMSFTConfig, tokenizer, tmp_path=tmp_path / "sam", sam_rho=0.5, **cell)
    assert any(not torch.equal(value, plain[name]) for name, value in trained(sam).items())


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])
@pytest.mark.slow
def test_sft_model_families(tokenizer, tmp_path, family):
    # qwen3_moe: output_router_logits adds the router's auxiliary loss (whose Hessian w.r.t. the LM head is 0)
    on = check_cell(tokenizer, tmp_path, family=family, dataset="conversational")
    if family == "qwen3_moe":
        assert logged(on, "aux_loss")


def test_sft_compute_loss_func_and_label_smoothing_take_the_probe(tokenizer, tmp_path):
    def loss_func(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1].flatten(0, 1)
        return torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100)

    # The probe differentiates twice, through SDPA's math kernel (at λ = 0 too, for κ's value): bit-identical to
    # SFTTrainer where the model's attention is that computation already (eager), equal to rounding otherwise
    eager = {"attn_implementation": "eager"}
    for cell in (dict(trainer_kw={"compute_loss_func": loss_func}), dict(config_kw={"label_smoothing_factor": 0.1})):
        on = check_cell(tokenizer, tmp_path, dataset="conversational", model_kw=eager, **cell)
        assert on.flatness.estimator == "probe"


def test_sft_model_by_name_with_model_init_kwargs(tokenizer, tmp_path):
    folder = tmp_path / "model"
    tiny(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    kw = {"model_init_kwargs": {"dtype": torch.float64}}
    plain = trained(run(SFTTrainer, SFTConfig, tokenizer, model=str(folder), tmp_path=tmp_path / "p", **kw))
    fam = run(FAMSFTTrainer, FAMSFTConfig, tokenizer, model=str(folder), tmp_path=tmp_path / "f", fam_lambda=0.0, **kw)
    assert fam.model.dtype == torch.float64
    for name, value in trained(fam).items():
        torch.testing.assert_close(value, plain[name], rtol=0, atol=0, msg=name)


# -- args=None, a TrainingArguments, an SFTConfig: adopted as TRL adopts them ------------------------------------


@pytest.mark.parametrize(
    "trainer_cls, config_cls, prefix", [(FAMSFTTrainer, FAMSFTConfig, "fam"), (SAMSFTTrainer, SAMSFTConfig, "sam")]
)
def test_sft_pairs_take_no_args_training_arguments_or_an_sft_config(tokenizer, tmp_path, monkeypatch, caplog,
                                                                      trainer_cls, config_cls, prefix):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    model = tiny(tokenizer)
    try:  # SFTConfig's defaults train in bf16, which a machine without a bf16 GPU refuses unless use_cpu is set
        reference = SFTTrainer(model=tiny(tokenizer), train_dataset=data("conversational"), processing_class=tokenizer)
    except ValueError as refused:  # then the drop-in refuses alike
        with pytest.raises(ValueError, match=re.escape(str(refused))):
            trainer_cls(model=model, train_dataset=data("conversational"), processing_class=tokenizer)
    else:
        with caplog.at_level(logging.WARNING, logger="fam_hf"):
            trainer = trainer_cls(model=model, train_dataset=data("conversational"), processing_class=tokenizer)
        assert type(trainer.args) is config_cls and trainer.args.output_dir == reference.args.output_dir
        assert f"{trainer_cls.__name__} was given no args" in caplog.text and f"{prefix}_" in caplog.text
    given = TrainingArguments(output_dir=str(tmp_path / "ta"), hub_token="hf_secret", **{
        **{k: v for k, v in COMMON.items() if k != "max_length"}, "learning_rate": 3e-4})  # fmt: skip
    trainer = trainer_cls(model, given, train_dataset=data("conversational"), processing_class=tokenizer)  # positional
    assert type(trainer.args) is config_cls and trainer.args.learning_rate == 3e-4
    assert trainer.args.hub_token == "hf_secret" and trainer.args.bf16 is False  # TrainingArguments' values, kept
    given = SFTConfig(output_dir=str(tmp_path / "sft"), pad_token=tokenizer.pad_token, packing=True, **COMMON)
    trainer = trainer_cls(model=model, args=given, train_dataset=data("language_modeling"), processing_class=tokenizer)
    assert type(trainer.args) is config_cls and trainer.args.packing and trainer.args.pad_token == tokenizer.pad_token
    trainer.train()


def test_trainer_pairs_take_no_args_or_training_arguments_and_refuse_an_unrelated_config(tmp_path, monkeypatch):
    from models import gpt2, lm_data

    monkeypatch.chdir(tmp_path)
    for trainer_cls, config_cls in ((FAMTrainer, FAMConfig), (SAMTrainer, SAMConfig)):
        trainer = trainer_cls(model=gpt2())
        assert type(trainer.args) is config_cls and trainer.args.output_dir == "tmp_trainer"
        given = TrainingArguments(output_dir=str(tmp_path / "o"), max_steps=1, report_to="none", use_cpu=True,
                                  per_device_train_batch_size=4)  # fmt: skip
        trainer = trainer_cls(gpt2(), given, train_dataset=lm_data(8))
        assert type(trainer.args) is config_cls
        trainer.train()
        with pytest.raises(TypeError, match=rf"needs args={config_cls.__name__}\(...\), got SFTConfig.*MyConfig"):
            trainer_cls(gpt2(), SFTConfig(output_dir=str(tmp_path / "s"), use_cpu=True))


# -- what cannot work is refused at construction ----------------------------------------------------------------


def test_liger_kernels_fused_cross_entropy_is_refused_for_fam_trainer_and_left_to_trl_for_fam_sft(tokenizer, tmp_path):
    from models import tiny_gpt2

    args = FAMConfig(output_dir=str(tmp_path / "l"), use_liger_kernel=True, report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="fused linear cross-entropy.*fused_linear_cross_entropy': False"):
        FAMTrainer(model=tiny_gpt2(), args=args)
    args = FAMConfig(output_dir=str(tmp_path / "l2"), use_liger_kernel=True, report_to="none", use_cpu=True,
                     liger_kernel_config={"fused_linear_cross_entropy": False}, fam_layer="transformer.h.0.mlp.c_fc",
                     fam_estimator="probe")  # fmt: skip
    with pytest.raises(ValueError, match="no second derivative"):
        FAMTrainer(model=tiny_gpt2(), args=args)
    # SFTTrainer keeps liger's layer kernels and turns its fused cross-entropy off: κ from the head's input applies
    args = FAMSFTConfig(output_dir=str(tmp_path / "s"), use_liger_kernel=True, **COMMON)
    trainer = FAMSFTTrainer(model=tiny(tokenizer), args=args, train_dataset=data("conversational"),
                            processing_class=tokenizer)  # fmt: skip
    assert trainer.args.liger_kernel_config["fused_linear_cross_entropy"] is False


@pytest.mark.parametrize(
    "family, message",
    [("gemma2", "soft-capped"), ("cohere2", "rescales its logits")],  # FAMTrainer takes Cohere's (closed form on logits)
)
def test_a_model_whose_logits_are_transformed_is_refused_at_construction(tokenizer, tmp_path, family, message):
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                  pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    args = FAMSFTConfig(output_dir=str(tmp_path), **COMMON)
    with pytest.raises(ValueError, match=message):
        FAMSFTTrainer(model=AutoModelForCausalLM.from_config(config), args=args, train_dataset=data("conversational"),
                      processing_class=tokenizer)  # fmt: skip


# -- a dropped penalty is told at the end of training ------------------------------------------------------------


def test_penalties_dropped_in_a_run_shorter_than_logging_steps_are_told_at_the_end(tokenizer, tmp_path, caplog):
    trainer = FAMSFTTrainer(
        model=tiny(tokenizer), train_dataset=data("conversational"), processing_class=tokenizer,
        args=FAMSFTConfig(output_dir=str(tmp_path), **{**COMMON, "logging_steps": 50, "max_steps": 3}),
    )  # fmt: skip
    trainer.fam_fused = None  # κ beside the loss (the fused kernel's own overflow fallback: tests/test_fused_head.py)
    calls = {"n": 0}
    original = trainer.flatness.Recording.value

    def overflow_twice(self, loss, logits):  # κ and its gradient overflow on the first two micro-batches
        calls["n"] += 1
        value, stderr = original(self, loss, logits)
        return (value * float("inf"), stderr) if calls["n"] <= 2 else (value, stderr)

    trainer.flatness.Recording.value = overflow_twice
    try:
        with caplog.at_level(logging.WARNING, logger="fam_hf"):
            output = trainer.train()
    finally:
        trainer.flatness.Recording.value = original
    assert output.metrics["fam/skipped"] == 2
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # dropped, gradient included
    assert math.isfinite(output.training_loss)
    assert "dropped on 2 of the run's 3 penalised micro-batches" in caplog.text


# -- Trainer features under FAMTrainer / SAMTrainer -----------------------------------------------------------------


def lm_rows(tokenizer, n=8):
    encoded = tokenizer([sentence(i, 10) for i in range(n)])
    return Dataset.from_dict({"input_ids": encoded["input_ids"], "labels": encoded["input_ids"]})


@pytest.mark.parametrize(
    "feature",
    [
        {"gradient_checkpointing": True},
        {"neftune_noise_alpha": 5.0},
        {"eval_strategy": "steps", "eval_steps": 1, "save_strategy": "steps", "save_steps": 1,
         "load_best_model_at_end": True, "metric_for_best_model": "loss"},
    ],
    ids=["gradient_checkpointing", "neftune", "load_best_model_at_end"],
)
def test_trainer_features(tokenizer, tmp_path, feature):
    from transformers import Trainer

    common = {k: v for k, v in COMMON.items() if k != "max_length"} | {"per_device_train_batch_size": 1} | feature
    rows = lm_rows(tokenizer)
    kw = dict(train_dataset=rows, eval_dataset=rows if "eval_strategy" in feature else None)
    plain = Trainer(model=tiny(tokenizer), args=TrainingArguments(str(tmp_path / "p"), **common), **kw)
    plain.train()
    off = FAMTrainer(model=tiny(tokenizer), args=FAMConfig(str(tmp_path / "f"), fam_lambda=0.0, **common), **kw)
    off.train()
    for (name, a), b in zip(plain.model.named_parameters(), off.model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    on = FAMTrainer(model=tiny(tokenizer), args=FAMConfig(str(tmp_path / "o"), fam_lambda=0.5, **common), **kw)
    on.train()
    assert all(p > 0 and math.isfinite(p) for p in logged(on, "fam/penalty"))
    sam = SAMTrainer(model=tiny(tokenizer), args=SAMConfig(str(tmp_path / "s"), sam_rho=0.5, **common), **kw)
    sam.train()
    assert all(math.isfinite(s) for s in logged(sam, "sam/sharpness"))
    if "load_best_model_at_end" in feature:
        assert on.state.best_model_checkpoint is not None


@pytest.mark.slow
def test_torch_compile(tokenizer, tmp_path):
    common = {k: v for k, v in COMMON.items() if k != "max_length"} | {"torch_compile": True}
    on = FAMTrainer(model=tiny(tokenizer), args=FAMConfig(str(tmp_path / "o"), fam_lambda=0.5, **common),
                    train_dataset=lm_rows(tokenizer))  # fmt: skip
    on.train()
    assert all(p > 0 and math.isfinite(p) for p in logged(on, "fam/penalty"))


def test_hyperparameter_search_over_fam_lambda_with_optuna(tokenizer, tmp_path):
    pytest.importorskip("optuna")
    common = {k: v for k, v in COMMON.items() if k != "max_length"} | {"eval_strategy": "no"}
    rows = lm_rows(tokenizer)
    trainer = FAMTrainer(model_init=lambda trial=None: tiny(tokenizer), train_dataset=rows, eval_dataset=rows,
                         args=FAMConfig(str(tmp_path), **common))  # fmt: skip
    seen = []

    def space(trial):
        lam = trial.suggest_float("fam_lambda", 1e-3, 1.0, log=True)
        seen.append(lam)
        return {"fam_lambda": lam}

    best = trainer.hyperparameter_search(hp_space=space, backend="optuna", n_trials=2, direction="minimize")
    assert best.hyperparameters["fam_lambda"] in seen and len(seen) == 2
    assert trainer.fam_penalty.base_lambda == seen[-1]  # the penalty follows the trial's λ


def test_a_prompt_tuned_peft_model_given_directly_under_sft_and_trainer(tokenizer, tmp_path):
    import peft

    def prompt_tuned():
        return peft.get_peft_model(tiny(tokenizer), peft_config("prompt_tuning"))

    plain = trained(run(SFTTrainer, SFTConfig, tokenizer, model=prompt_tuned(), dataset="conversational",
                        tmp_path=tmp_path / "plain"))  # fmt: skip
    on = run(FAMSFTTrainer, FAMSFTConfig, tokenizer, model=prompt_tuned(), dataset="conversational",
             tmp_path=tmp_path / "on", fam_lambda=0.5)  # fmt: skip
    assert all(p > 0 and math.isfinite(p) for p in logged(on, "fam/penalty"))
    assert any(not torch.equal(value, plain[name]) for name, value in trained(on).items())
    # FAMTrainer: the closed form on the logits, which carry the virtual tokens' positions too
    common = {k: v for k, v in COMMON.items() if k != "max_length"} | {"per_device_train_batch_size": 1}
    trainer = FAMTrainer(model=prompt_tuned(), args=FAMConfig(str(tmp_path / "t"), fam_lambda=0.5, **common),
                         train_dataset=lm_rows(tokenizer))  # fmt: skip
    trainer.train()
    assert trainer.flatness.estimator == "closed_form"
    assert all(p > 0 and math.isfinite(p) for p in logged(trainer, "fam/penalty"))

"""Layer resolution: heads found by 'auto', names and globs, LoRA/Conv1D/modules_to_save weights, errors."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    Qwen2Config,
    Qwen2ForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from fam_hf import candidate_layers, resolve_layer

SMALL = dict(num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, vocab_size=32)


def llama_cfg(**kw):
    return LlamaConfig(hidden_size=8, num_key_value_heads=1, **SMALL, **kw)


@pytest.mark.parametrize(
    "model,head",
    [
        (lambda: BertForSequenceClassification(BertConfig(hidden_size=8, **SMALL)), "classifier"),
        (lambda: RobertaForSequenceClassification(RobertaConfig(hidden_size=8, **SMALL)), "classifier.out_proj"),
        (
            lambda: DistilBertForSequenceClassification(
                DistilBertConfig(dim=8, hidden_dim=16, n_layers=1, n_heads=2, vocab_size=32)
            ),
            "classifier",
        ),
        (lambda: LlamaForSequenceClassification(llama_cfg()), "score"),
        (lambda: GPT2ForSequenceClassification(GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=32)), "score"),
        (lambda: Qwen2ForSequenceClassification(Qwen2Config(hidden_size=8, num_key_value_heads=1, **SMALL)), "score"),
        (lambda: GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=32)), "lm_head"),
        (lambda: LlamaForCausalLM(llama_cfg(tie_word_embeddings=False)), "lm_head"),
    ],
    ids=["bert", "roberta", "distilbert", "llama-cls", "gpt2-cls", "qwen2-cls", "gpt2-lm-tied", "llama-lm-untied"],
)
def test_auto_finds_the_output_head(model, head):
    model = model()
    layer = resolve_layer(model, "auto")
    assert layer.name == head and layer.is_output_head
    module = dict(model.named_modules())[head]
    assert layer.weight() is module.weight
    assert layer.shape == tuple(module.weight.shape)


def test_tied_lm_head_weight_is_the_embedding():
    model = GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=32))
    assert resolve_layer(model).weight() is model.transformer.wte.weight


def test_conv1d_weight_is_transposed_to_out_by_in():
    model = GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=32))
    layer = resolve_layer(model, "transformer.h.0.attn.c_attn")
    assert layer.kind == "conv1d" and not layer.is_output_head
    assert layer.shape == (24, 8)  # out = 3·n_embd, in = n_embd
    torch.testing.assert_close(layer.weight(), model.transformer.h[0].attn.c_attn.weight.T)


def test_glob_resolves_one_layer_and_rejects_ambiguity():
    model = LlamaForCausalLM(llama_cfg())
    assert resolve_layer(model, "*.layers.0.*.q_proj").name == "model.layers.0.self_attn.q_proj"
    with pytest.raises(ValueError, match=r"matches 3 layers .*name exactly one of"):
        resolve_layer(model, "*.mlp.*")


def test_unknown_layer_lists_candidates():
    model = LlamaForCausalLM(llama_cfg())
    with pytest.raises(
        ValueError,
        match=r"unknown layer 'model.layers.9.mlp'; name exactly one of: "
        r"model.layers.0.self_attn.q_proj, .*lm_head",
    ):
        resolve_layer(model, "model.layers.9.mlp")


def test_unsupported_module_type_is_named():
    model = LlamaForCausalLM(llama_cfg())
    with pytest.raises(ValueError, match="layer 'model.norm' is a LlamaRMSNorm, not a linear layer"):
        resolve_layer(model, "model.norm")


def test_lora_layer_is_the_effective_weight_and_names_survive_peft():
    model = LlamaForCausalLM(llama_cfg())
    peft_model = get_peft_model(
        model, LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    names = candidate_layers(peft_model)
    assert "model.layers.0.self_attn.q_proj" in names
    assert not any("lora_A" in n or "base_layer" in n for n in names)
    for spec in ("model.layers.0.self_attn.q_proj", "base_model.model.model.layers.0.self_attn.q_proj"):
        layer = resolve_layer(peft_model, spec)
        assert layer.kind == "lora"
    q = model.model.layers[0].self_attn.q_proj
    expected = q.base_layer.weight + 4.0 * q.lora_B["default"].weight @ q.lora_A["default"].weight
    torch.testing.assert_close(layer.weight(), expected)
    assert resolve_layer(peft_model, "auto").name == "lm_head"


def test_lora_b_starts_at_zero_so_effective_weight_is_the_base():
    model = LlamaForCausalLM(llama_cfg())
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    layer = resolve_layer(peft_model, "model.layers.0.self_attn.q_proj")
    torch.testing.assert_close(layer.weight(), model.model.layers[0].self_attn.q_proj.base_layer.weight)


def test_head_in_modules_to_save_uses_the_trainable_copy():
    model = LlamaForSequenceClassification(llama_cfg(num_labels=2))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS"))
    layer = resolve_layer(peft_model, "auto")
    assert layer.name == "score" and layer.kind == "modules_to_save" and layer.is_output_head
    wrapper = model.score
    assert layer.weight() is wrapper.modules_to_save["default"].weight
    assert layer.weight().requires_grad


def test_dora_is_refused_with_a_reason():
    model = LlamaForCausalLM(llama_cfg())
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA layer is not supported"):
        resolve_layer(peft_model, "model.layers.0.self_attn.q_proj")


def test_lora_over_a_4bit_base_uses_the_dequantized_weight():
    """QLoRA: the frozen base stores packed 4-bit integers; the effective weight is what the layer computes with."""
    bnb = pytest.importorskip("bitsandbytes")

    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.proj = bnb.nn.Linear4bit(16, 8, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    net.proj.weight = bnb.nn.Params4bit(torch.randn(8, 16), requires_grad=False, quant_type="nf4")
    net.proj = net.proj.to("cpu")  # quantizes
    assert not net.proj.weight.is_floating_point()
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False))
    layer = resolve_layer(model, "proj")
    assert layer.shape == (8, 16)
    x = torch.randn(4, 16)
    torch.testing.assert_close(model.base_model.model.proj(x), x @ layer.weight().T, rtol=1e-5, atol=1e-5)

"""The chat SFT recipe (recipes/sft.py) and its conversations (fam_hf.chat_data): pure functions on small texts,
then the recipe end to end on a tiny random Llama with a ChatML chat template (seconds), real Shakespeare data."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from test_recipes import ROOT, free_port, recipe  # noqa: E402

from fam_hf.chat_data import (  # noqa: E402
    check_conversations,
    dialogue_conversations,
    play_speeches,
    training_chat_template,
    with_counted_positions,
)

SFT_CONFIG = ROOT / "configs" / "sft_smollm2.yaml"
SFT_LORA_CONFIG = ROOT / "configs" / "sft_smollm2_lora.yaml"
# SmolLM2-Instruct's template (ChatML, a default system prompt), as its tokenizer_config has it
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PLAY = """ A Play

 ACT I

 SCENE I. A room.

Enter A and B

ALPHA
One line,
and another.

BETA
A reply.

Exit ALPHA

A line BETA resumes with after the direction.

GAMMA
Third.

DELTA
Fourth.

EPSILON
Fifth, left over.

 SCENE II. Elsewhere.

ALPHA
New scene.

BETA
Its answer.
""".replace("\n", "  \n")  # the Markdown hard line breaks the alias keeps


def chatml_tokenizer():
    from transformers import AutoTokenizer

    from fam_hf.assets import model_path

    tokenizer = AutoTokenizer.from_pretrained(model_path("minilm-l6"))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"  # as SmolLM2's
    return tokenizer


@pytest.fixture(scope="module")
def tiny_chat_llama(tmp_path_factory) -> str:
    """A 2-layer random Llama (tied head, as SmolLM2) with a ChatML chat template: the recipe in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_chat_llama")
    tokenizer = chatml_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def sft_args(tmp_path, config: Path, model: str, *extra: str) -> list[str]:
    return [
        "--config", str(config),
        "--model_name_or_path", model,
        "--output_dir", str(tmp_path / "out"),
        "--max_train_samples", "16",
        "--max_eval_samples", "8",
        "--max_length", "128",
        "--max_steps", "2",
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4",
        "--gradient_accumulation_steps", "1",
        "--kappa_batches", "1",
        "--logging_steps", "1",
        "--fam_lambda", "0.1",
        "--use_cpu", "true",
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


# -- conversations (pure) ---------------------------------------------------------------------------------


def test_play_speeches_keep_speakers_and_scenes_and_leave_out_directions_and_headings():
    scenes = play_speeches(PLAY)
    assert scenes == [
        [("ALPHA", "One line,\nand another."), ("BETA", "A reply."), ("GAMMA", "Third."), ("DELTA", "Fourth."),
         ("EPSILON", "Fifth, left over.")],
        [("ALPHA", "New scene."), ("BETA", "Its answer.")],
    ]  # fmt: skip


def test_dialogue_conversations_alternate_turns_within_a_scene():
    from datasets import Dataset

    plays = Dataset.from_dict({"text": [PLAY], "play": ["a-play"]})
    rows = dialogue_conversations(plays, turns=2, system_prompt="Reply.")
    assert rows["speakers"] == [["ALPHA", "BETA"], ["GAMMA", "DELTA"], ["ALPHA", "BETA"]]  # the rest is dropped
    assert rows[0]["messages"] == [
        {"role": "system", "content": "Reply."},
        {"role": "user", "content": "One line,\nand another."},
        {"role": "assistant", "content": "A reply."},
    ]
    four = dialogue_conversations(plays, turns=4)
    assert [[m["role"] for m in c] for c in four["messages"]] == [["user", "assistant", "user", "assistant"]]
    with pytest.raises(ValueError, match="turns=3: .* even number"):
        dialogue_conversations(plays, turns=3)


def test_shakespeare_conversations_split_by_play():
    from fam_hf.data import carve_splits, load_source

    splits = carve_splits(load_source("shakespeare"), "shakespeare", test_size=0.15, validation_size=0.1)
    conversations = {name: dialogue_conversations(plays) for name, plays in splits.items()}
    plays = {name: set(split["play"]) for name, split in conversations.items()}
    assert plays["train"].isdisjoint(plays["test"]) and plays["train"].isdisjoint(plays["validation"])
    assert plays["test"].isdisjoint(plays["validation"]) and all(len(p) >= 3 for p in plays.values())
    assert sum(len(c) for c in conversations.values()) > 10_000
    check_conversations(conversations, "shakespeare")  # every one ends on an assistant turn


def test_a_conversation_without_an_assistant_turn_is_an_error_naming_the_rows():
    from datasets import Dataset

    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    silent = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "anyone?"}]
    data = {"train": Dataset.from_dict({"messages": [good, silent, good, silent]})}
    with pytest.raises(ValueError, match=r"'chats.jsonl' has 2 of 4 conversations without an assistant turn \(rows 2, 4"
                       r".*0/0"):  # fmt: skip
        check_conversations(data, "chats.jsonl")
    broken = {"train": Dataset.from_dict({"messages": [good, [{"role": "user"}]]})}
    with pytest.raises(ValueError, match=r"1 of 2 rows whose 'messages' is not a conversation \(row 2"):
        check_conversations(broken, "chats.jsonl")
    with pytest.raises(ValueError, match=r"messages_column='chat' is not a column"):
        check_conversations(data, "chats.jsonl", column="chat")


def test_rows_whose_reply_was_truncated_away_are_left_out_and_none_left_is_an_error(caplog):
    from datasets import Dataset

    prepared = Dataset.from_dict({"labels": [[-100, -100, 5], [7, -100, -100], [-100, 3, 4]]})
    with caplog.at_level("WARNING"):
        kept = with_counted_positions(prepared, "test", max_length=3)
    assert kept["labels"] == [[-100, -100, 5], [-100, 3, 4]]  # position 0 is never scored
    assert "1 of 3 rows of the test split count no token after truncation to max_length=3" in caplog.text
    with pytest.raises(ValueError, match=r"no row of the test split .* max_length=3\): its loss and κ would be 0/0"):
        with_counted_positions(prepared.select([1]), "test", max_length=3)


def test_the_marked_chat_template_renders_the_models_own_and_masks_the_replies():
    tokenizer = chatml_tokenizer()
    conversation = [{"role": "user", "content": "who goes there"}, {"role": "assistant", "content": "a friend"}]
    marked = training_chat_template(tokenizer, check=[conversation])
    assert "{% generation %}" in marked
    out = tokenizer.apply_chat_template(conversation, chat_template=marked, return_dict=True,
                                        return_assistant_tokens_mask=True)  # fmt: skip
    kept = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.decode(kept) == "a friend <|im_end|>"  # the reply and its end-of-turn token only
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="no {% generation %} markers .* or set assistant_only_loss: false"):
        training_chat_template(tokenizer)


# -- the recipe on a tiny model (fast) ---------------------------------------------------------------------


def test_sft_recipe_lora_on_shakespeare_conversations(tmp_path, tiny_chat_llama, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    metrics = recipe("sft").main(sft_args(tmp_path, SFT_LORA_CONFIG, tiny_chat_llama))
    out = tmp_path / "out"
    for split in ("validation", "test"):
        assert metrics[f"{split}_perplexity"] == pytest.approx(math.exp(metrics[f"{split}_loss"]), rel=1e-6)
        assert 0 <= metrics[f"{split}_mean_token_accuracy"] <= 1  # TRL's eval_* metrics, under the split's name
    assert metrics["kappa_train_start"] > 0 and metrics["kappa_test_end"] > 0
    settings = json.loads((out / "fam_config.json").read_text())
    assert (settings["fam"]["resolved_layer"], settings["fam"]["resolved_estimator"]) == ("lm_head", "closed_form")
    logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "fam/kappa" in h]
    assert len(logs) == 2 and all(h["fam/penalty"] > 0 for h in logs)
    card = (out / "README.md").read_text()
    assert "relative-flatness" in card and "lm_head" in card and "sft" in card
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_chat_llama), out)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # the adapter trained
    assert "held-out assistant turns: test loss" in capsys.readouterr().out


def test_sft_recipe_full_fine_tune_with_packing(tmp_path, tiny_chat_llama):
    from transformers import AutoModelForCausalLM

    metrics = recipe("sft").main(sft_args(tmp_path, SFT_CONFIG, tiny_chat_llama, "--packing", "true"))
    assert metrics["test_perplexity"] == pytest.approx(math.exp(metrics["test_loss"]), rel=1e-6)
    assert metrics["kappa_train_start"] > 0 and metrics["kappa_train_end"] > 0
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


@pytest.mark.multiprocess
def test_sft_recipe_on_two_real_ranks_via_accelerate_launch(tmp_path, tiny_chat_llama):
    from models import console_script

    command = [
        console_script("accelerate"), "launch",
        "--config_file", str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"),
        "--main_process_port", str(free_port()),
        str(ROOT / "recipes" / "sft.py"),
        *sft_args(tmp_path, SFT_LORA_CONFIG, tiny_chat_llama, "--max_steps", "3", "--disable_tqdm", "true"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "threads are still running" not in proc.stderr  # the group ended before the interpreter (runs.py)
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["test_perplexity"] > 1
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and all(h["fam/penalty"] > 0 for h in state["log_history"] if "fam/kappa" in h)
    assert proc.stdout.count("held-out assistant turns: test loss") == 1  # rank 0 reports
    assert "FAMSFTTrainer" in (out / "README.md").read_text()


def test_own_conversations_without_an_assistant_turn_stop_before_the_model_loads(tmp_path):
    chats = tmp_path / "chats.jsonl"
    rows = [[{"role": "user", "content": f"line {i}"}, {"role": "assistant", "content": "reply"}] for i in range(6)]
    rows[3] = rows[3][:1]
    chats.write_text("".join(json.dumps({"messages": row}) + "\n" for row in rows))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("earlier run")
    args = sft_args(tmp_path, SFT_LORA_CONFIG, "./no/such/model", "--dataset", str(chats), "--overwrite_output", "true")
    with pytest.raises(ValueError, match=r"1 of 6 conversations without an assistant turn \(row 4;"):
        recipe("sft").main(args)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]  # nothing written, nothing lost

"""Publishing to the Hub: the model card records FAM and κ, and pushes go through huggingface_hub's real
client to a local stand-in of the Hub (tests/hub_server.py) — from FAMTrainer, a recipe and `fam-hf publish`.

The first test points HF_ENDPOINT at the server in a fresh process, as a user would; the others point this
process's client at it (:func:`point_client_at`). No part of huggingface_hub is mocked.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import transformers.utils.hub
from hub_server import HubServer
from huggingface_hub import ModelCard, constants
from models import COMMON, bert, cls_data, gpt2, lm_data

from fam_hf import FAMConfig, FAMTrainer
from fam_hf.cli import main
from fam_hf.hub import HubPushError
from fam_hf.model_card import card_facts, model_card

TESTS = Path(__file__).resolve().parent
TOKEN = "fam-tests-secret-token-5c1e0b7d"  # not hf_-shaped, so only keeping it out (not pattern masking) passes


def point_client_at(monkeypatch, endpoint: str) -> None:
    """In this process, what HF_ENDPOINT does in a fresh one: huggingface_hub reads it into
    ``constants.ENDPOINT`` at import, and Trainer pushes through one ``HfApi`` made on first use."""
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)  # rebuilt on next use, with the endpoint above


@pytest.fixture
def hub(monkeypatch):
    with HubServer() as server:
        point_client_at(monkeypatch, server.endpoint)
        yield server


def closed_endpoint() -> str:
    """An endpoint on 127.0.0.1 where nothing listens: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def tiny_tokenizer():
    """A word-level tokenizer over the 32 ids of tests/models.py's models (``w2`` … ``w31``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, 32)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")


def tiny_trainer(output_dir, **kw) -> FAMTrainer:
    settings = {**COMMON, "max_steps": 2, "per_device_train_batch_size": 8, "fam_lambda": 0.5, **kw}
    return FAMTrainer(
        model=bert(),
        args=FAMConfig(output_dir=str(output_dir), **settings),
        train_dataset=cls_data(16),
        eval_dataset=cls_data(8),
        processing_class=tiny_tokenizer(),
    )


def train_and_push(output_dir: str, repo_id: str) -> None:
    """A user's script, run in a fresh process: HF_ENDPOINT and HF_TOKEN come from its environment."""
    trainer = tiny_trainer(output_dir, push_to_hub=True, hub_model_id=repo_id)
    trainer.train()
    trainer.evaluate()
    trainer.save_state()
    trainer.push_to_hub()


def no_token_in(*texts: str | bytes) -> bool:
    return all((TOKEN.encode() if isinstance(t, bytes) else TOKEN) not in t for t in texts)


# -- FAMTrainer.push_to_hub, end to end --------------------------------------------------------------------


def test_push_to_hub_uploads_weights_tokenizer_and_a_card_with_the_fam_settings_and_kappa(tmp_path, hub, caplog, capfd):
    out = tmp_path / "run"
    train_and_push(str(out), "tester/fam-tiny")
    check_arrival(hub, out, logs=caplog.text + "".join(capfd.readouterr()))


@pytest.mark.slow
def test_push_to_hub_from_a_fresh_process_with_hf_endpoint_in_its_environment(tmp_path):
    """The same, as a user runs it: a new process that reads HF_ENDPOINT and HF_TOKEN, its logs at their chattiest."""
    out = tmp_path / "run"
    with HubServer() as hub:
        env = {
            **os.environ,
            "HF_ENDPOINT": hub.endpoint,
            "HF_TOKEN": TOKEN,
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            "HF_HOME": str(tmp_path / "hf_home"),
            "HF_HUB_VERBOSITY": "debug",  # every request is logged too
            "TRANSFORMERS_VERBOSITY": "info",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(TESTS),
        }
        script = f"import test_hub; test_hub.train_and_push({str(out)!r}, 'tester/fam-tiny')"
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    check_arrival(hub, out, logs=done.stdout + done.stderr)


def check_arrival(hub: HubServer, out: Path, logs: str) -> None:
    """What train_and_push must have sent: weights, config, tokenizer and a card with FAM and κ; no token leaked."""
    repo_calls = [call for call in hub.paths() if "/api/repos/" in call or "/api/models/" in call]
    assert repo_calls == [
        "POST /api/repos/create",  # by Trainer.__init__, before training
        "POST /api/models/tester/fam-tiny/preupload/main",
        "POST /api/models/tester/fam-tiny/commit/main",
    ]
    files = hub.repos["tester/fam-tiny"].files
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md"} <= set(files)
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert "classifier.weight" in safetensors.torch.load(files["model.safetensors"])
    assert json.loads(files["config.json"])["architectures"] == ["BertForSequenceClassification"]

    card = ModelCard(files["README.md"].decode())  # metadata parses back with huggingface_hub
    kappa = [h["fam/kappa"] for h in json.loads(files["trainer_state.json"])["log_history"] if "fam/kappa" in h]
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-classification"
    assert {"fam", "relative-flatness", "generated_from_trainer"} <= set(card.data.tags)
    assert card.data.fam["lambda"] == 0.5 and card.data.fam["layer"] == "classifier"
    assert card.data.fam["estimator"] == "closed_form" and card.data.fam["kappa"] == pytest.approx(kappa[-1])
    assert "| fam_lambda | 0.5 |" in card.text and "| resolved_layer | classifier |" in card.text
    assert f"| last logged | 2 | {kappa[-1]:.6g} |" in card.text and "| eval_loss |" in card.text
    assert "@inproceedings{petzka2021relative" in card.text and "eprint        = {2307.02337}" in card.text
    assert "- PEFT " in card.text and "- huggingface_hub " in card.text

    # the client sent the token to the Hub, and it went nowhere else: files, bodies, the local folder, the logs
    repo_requests = [r for r in hub.requests if "/api/repos/" in r.path or "/api/models/" in r.path]
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in repo_requests)
    assert no_token_in(logs, *files.values(), *(r.body for r in hub.requests))
    assert no_token_in(*(p.read_bytes() for p in out.rglob("*") if p.is_file()))


def test_push_without_a_reachable_hub_fails_clearly_and_keeps_the_local_save(tmp_path, monkeypatch, caplog, capfd):
    endpoint = closed_endpoint()
    point_client_at(monkeypatch, endpoint)
    out = tmp_path / "run"
    trainer = tiny_trainer(out, hub_token=TOKEN)
    trainer.train()
    with pytest.raises(HubPushError) as failure:
        trainer.push_to_hub()  # fails creating the repository, before Trainer has saved anything
    message = str(failure.value)
    assert f"repository 'run' at {endpoint}: cannot connect" in message
    assert "HF_ENDPOINT" in message and f"saved locally at {out}" in message and "fam-hf publish" in message
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert ModelCard.load(out / "README.md").data.fam["lambda"] == 0.5

    with pytest.raises(HubPushError, match="Nothing has been trained yet") as failure:
        tiny_trainer(tmp_path / "other", push_to_hub=True, hub_model_id="tester/other")  # fails at once
    logs = caplog.text + "".join(capfd.readouterr())
    assert no_token_in(logs, message, str(failure.value), *(p.read_bytes() for p in out.rglob("*") if p.is_file()))


# -- PEFT: an adapter card --------------------------------------------------------------------------------


def test_lora_run_pushes_an_adapter_whose_card_names_its_base_model(tmp_path, hub, monkeypatch):
    from peft import LoraConfig, get_peft_model

    # peft asks the Hub whether the base model's embeddings were resized, through huggingface_hub's default
    # client (bound to huggingface.co at import): HF_HUB_OFFLINE, which peft reads, skips that lookup
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = gpt2()
    base.config._name_or_path = base.name_or_path = "fam-tests/tiny-gpt2"  # as if loaded from the Hub
    lora = LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    settings = {**COMMON, "max_steps": 2, "per_device_train_batch_size": 8, "push_to_hub": True}
    args = FAMConfig(output_dir=str(tmp_path / "lora"), hub_model_id="tester/fam-lora", **settings)
    trainer = FAMTrainer(model=get_peft_model(base, lora), args=args, train_dataset=lm_data(16))
    trainer.train()
    trainer.push_to_hub()

    files = hub.repos["tester/fam-lora"].files
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(files)
    assert "model.safetensors" not in files
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "peft" and card.data.base_model == "fam-tests/tiny-gpt2"
    assert {"fam", "relative-flatness", "lora", "base_model:adapter:fam-tests/tiny-gpt2"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "text-generation" and card.data.fam["layer"] == "lm_head"
    assert 'PeftModel.from_pretrained(base, "tester/fam-lora")' in card.text


# -- fam-hf publish ----------------------------------------------------------------------------------------


@dataclass
class RecipeArguments:  # what a recipe records in fam_config.json
    model_name_or_path: str = "minilm-l6"
    dataset: str = "rotten-tomatoes"
    max_length: int = 64


def test_fam_hf_publish_pushes_a_finished_run_and_rebuilds_a_missing_card(tmp_path, hub, monkeypatch, capsys):
    run = tmp_path / "run"
    trainer = tiny_trainer(run)
    trainer.train()
    trainer.evaluate()
    trainer.save_model()
    trainer.save_state()
    from kit.runs import fam_settings, write_json  # the recipes' kit (recipes/ is on sys.path: conftest.py)

    write_json(str(run), "fam_config.json", fam_settings(trainer, RecipeArguments()))
    write_json(str(run), "metrics.json", {"test_accuracy": 0.75, "kappa_train_start": 0.5, "kappa_train_end": 0.25})
    (run / "README.md").unlink()  # a run saved before cards existed
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("MY_HUB_TOKEN", TOKEN)

    assert main(["publish", str(run), "--repo-id", "tester/published", "--private", "--token-env", "MY_HUB_TOKEN"]) == 0
    assert "pushed" in capsys.readouterr().out
    repo = hub.repos["tester/published"]
    # every request of the push carries the token (huggingface_hub ≥ 2.4 also fetches an anonymous registry of
    # agent harnesses from the endpoint, once a day per HF_HOME, while building its user agent)
    repo_requests = [r for r in hub.requests if "/api/repos/" in r.path or "/api/models/" in r.path]
    assert repo.private and repo_requests
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in repo_requests)
    assert {"model.safetensors", "README.md", "metrics.json", "fam_config.json", "trainer_state.json"} <= set(
        repo.files
    )
    card = ModelCard(repo.files["README.md"].decode())
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"  # the alias's Hub model
    assert card.data.fam["layer"] == "classifier" and card.data.fam["lambda"] == 0.5
    assert "| train | 0.5 | 0.25 |" in card.text and "| test_accuracy | 0.75 |" in card.text
    assert "| max_length | 64 |" in card.text and (run / "README.md").is_file()
    assert no_token_in(*repo.files.values())
    # the repository's card loads the model from it; the folder's names no repository (it may go to another)
    assert 'from_pretrained("tester/published")' in card.text
    assert 'from_pretrained("path/to/this/folder")' in (run / "README.md").read_text()
    assert main(["publish", str(run), "--repo-id", "tester/other", "--token-env", "MY_HUB_TOKEN"]) == 0
    assert 'from_pretrained("tester/other")' in hub.repos["tester/other"].files["README.md"].decode()
    # a new branch is created for --revision (upload_folder alone commits to existing branches only)
    assert main(["publish", str(run), "--repo-id", "tester/other", "--revision", "experiment", "--token-env",
                 "MY_HUB_TOKEN"]) == 0  # fmt: skip
    assert "experiment" in hub.repos["tester/other"].branches
    # --private cannot hide a public repository that exists: refused before anything is uploaded
    commits = len(hub.repos["tester/other"].commits)
    with pytest.raises(SystemExit, match="tester/other exists and is public.*nothing was uploaded"):
        main(["publish", str(run), "--repo-id", "tester/other", "--private", "--token-env", "MY_HUB_TOKEN"])
    assert len(hub.repos["tester/other"].commits) == commits and not hub.repos["tester/other"].private


def test_fam_hf_publish_errors_name_the_fix(tmp_path, monkeypatch):
    run = tmp_path / "run"
    bert().save_pretrained(run)
    point_client_at(monkeypatch, closed_endpoint())
    with pytest.raises(SystemExit, match="cannot connect(.|\n)*HF_ENDPOINT(.|\n)*saved locally"):
        main(["publish", str(run), "--repo-id", "tester/x"])
    with pytest.raises(SystemExit, match="holds no saved model"):
        main(["publish", str(tmp_path), "--repo-id", "tester/x"])
    with pytest.raises(SystemExit, match="MISSING_VAR: that environment variable is not set"):
        main(["publish", str(run), "--repo-id", "tester/x", "--token-env", "MISSING_VAR"])


# -- the recipes: --push_to_hub -----------------------------------------------------------------------------


@pytest.fixture
def tiny_classifier(tmp_path) -> tuple[str, str]:
    """A 1-layer random BERT with the tiny tokenizer, and a 40-review csv in its vocabulary."""
    from transformers import BertConfig, BertModel

    folder = tmp_path / "tiny_bert"
    BertModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(folder)  # fmt: skip
    tiny_tokenizer().save_pretrained(folder)
    rng = random.Random(0)
    rows = [f"{' '.join(f'w{rng.randrange(2, 32)}' for _ in range(6))},{i % 2}" for i in range(40)]
    (tmp_path / "reviews.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    return str(folder), str(tmp_path / "reviews.csv")


def test_classification_recipe_pushes_the_run_with_test_metrics_and_kappa_in_the_card(tmp_path, hub, tiny_classifier):
    from test_recipes import classification_args, recipe

    model, reviews = tiny_classifier
    argv = classification_args(tmp_path, model, "--dataset", reviews, "--push_to_hub", "true",
                               "--hub_model_id", "tester/recipe")  # fmt: skip
    metrics = recipe("finetune_classification").main(argv)
    files = hub.repos["tester/recipe"].files
    assert {"model.safetensors", "tokenizer.json", "metrics.json", "fam_config.json", "trainer_state.json"} <= set(
        files
    )
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model is None  # a local folder is no Hub id
    assert f"| test_accuracy | {metrics['test_accuracy']:.6g} |" in card.text
    assert f"| train | {metrics['kappa_train_start']:.6g} | {metrics['kappa_train_end']:.6g} |" in card.text
    assert "reviews.csv" in card.text and str(tmp_path) not in card.text  # no local paths in a public card


# -- the card on its own ------------------------------------------------------------------------------------


def test_card_masks_tokens_and_leaves_token_settings_out(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    trainer = tiny_trainer(tmp_path, hub_token=TOKEN)
    facts = card_facts(trainer)
    facts.script = {"hub_token": TOKEN, "note": f"token {TOKEN} and hf_{'x' * 30}"}  # a careless recipe argument
    text = str(model_card(facts))
    assert no_token_in(text) and "hf_xxxx" not in text and "<redacted>" in text


def test_sam_trainer_pushes_a_card_with_its_own_settings_and_sharpness(tmp_path, hub):
    from fam_hf import SAMConfig, SAMTrainer

    args = SAMConfig(output_dir=str(tmp_path / "sam"), max_steps=2, per_device_train_batch_size=8, sam_rho=0.05,
                     sam_adaptive=True, push_to_hub=True, hub_model_id="tester/sam-tiny", hub_token=TOKEN,
                     **COMMON)  # fmt: skip
    trainer = SAMTrainer(model=gpt2(), args=args, train_dataset=lm_data(16))
    trainer.train()
    trainer.push_to_hub()
    card = ModelCard(hub.repos["tester/sam-tiny"].files["README.md"].decode())
    sharpness = [h["sam/sharpness"] for h in trainer.state.log_history if "sam/sharpness" in h]
    assert card.data.sam == {"rho": 0.05, "adaptive": True, "sharpness": pytest.approx(sharpness[-1]),
                             "sharpness_step": 2}  # fmt: skip
    assert {"sam", "sharpness-aware-minimization"} <= set(card.data.tags) and "relative-flatness" not in card.data.tags
    assert "with **ASAM (adaptive SAM)** (Sharpness-Aware Minimization) through `fam_hf`'s `SAMTrainer`" in card.text
    assert "| sam_rho | 0.05 |" in card.text and "fam_lambda" not in card.text and "foret2021" in card.text
    assert no_token_in(card.content)


def test_flat_lora_trainer_pushes_a_card_with_its_own_settings_and_sigma(tmp_path, hub):
    from peft import LoraConfig, get_peft_model

    from fam_hf import FlatLoRAConfig, FlatLoRATrainer

    model = get_peft_model(gpt2(), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                                              fan_in_fan_out=True))  # fmt: skip
    args = FlatLoRAConfig(output_dir=str(tmp_path / "flat"), max_steps=2, per_device_train_batch_size=8,
                          flat_lora_sigma=0.1, flat_lora_seed=11, push_to_hub=True, hub_model_id="tester/flat-tiny",
                          hub_token=TOKEN, **COMMON)  # fmt: skip
    trainer = FlatLoRATrainer(model=model, args=args, train_dataset=lm_data(16), eval_dataset=lm_data(8))
    trainer.train()
    trainer.evaluate()
    trainer.push_to_hub()
    card = ModelCard(hub.repos["tester/flat-tiny"].files["README.md"].decode())
    (last,) = [h for h in trainer.state.log_history if "flat_lora/sigma" in h][-1:]
    assert card.data.flat_lora == {"sigma": 0.1, "schedule": "cosine", "seed": 11, "seed_from": "flat_lora_seed",
                                   "layers": 2, "sigma_t": pytest.approx(last["flat_lora/sigma"]), "sigma_t_step": 2,
                                   "loss": pytest.approx(last["loss"])}  # fmt: skip
    assert last["flat_lora/sigma"] > 0 and card.data.library_name == "peft"
    assert {"flat-lora", "random-weight-perturbation", "lora"} <= set(card.data.tags)
    assert not {"fam", "relative-flatness", "sam"} & set(card.data.tags)
    assert (
        "with **Flat-LoRA** (random weight perturbation; Li et al., ICML 2025) through `fam_hf`'s `FlatLoRATrainer`"
        in card.text
    )
    assert "Perturbed layers (2): `transformer.h.0.attn.c_attn`, `transformer.h.0.mlp.c_fc`." in card.text
    assert "| flat_lora_sigma | 0.1 |" in card.text and "| resolved_seed | 11 |" in card.text
    for shared in ("## Evaluation", "| eval_loss |", "## Training procedure", "### Framework versions",
                   "PeftModel.from_pretrained", "@inproceedings{li2025flatlora", "pages         = {34549--34563}"):  # fmt: skip
        assert shared in card.text, shared
    assert "fam_lambda" not in card.text and "foret2021" not in card.text and no_token_in(card.content)


def test_a_sam_or_flat_lora_run_folder_without_a_card_gets_its_own_method_s_card(tmp_path):
    """``fam-hf publish`` rebuilds a missing card from the folder: a SAM or Flat-LoRA run is known by its logs."""
    from fam_hf import FlatLoRAConfig, FlatLoRATrainer, SAMConfig, SAMTrainer
    from fam_hf.model_card import run_card_facts

    runs = {
        "sam": (SAMTrainer, SAMConfig, {"sam_rho": 0.07}),
        "flat": (FlatLoRATrainer, FlatLoRAConfig, {"flat_lora_sigma": 0.1}),
    }
    for name, (trainer_class, config_class, settings) in runs.items():
        args = config_class(output_dir=str(tmp_path / name), max_steps=2, per_device_train_batch_size=8,
                            **settings, **COMMON)  # fmt: skip
        trainer = trainer_class(model=gpt2(), args=args, train_dataset=lm_data(16))
        trainer.train()
        trainer.save_state()
        card = model_card(run_card_facts(tmp_path / name))
        assert "fam" not in card.data.to_dict() and "relative-flatness" not in card.data.tags
        assert "settings_from | trainer_state.json" in card.text
        if name == "sam":
            assert card.data.sam["rho"] == 0.07 and "sharpness-aware-minimization" in card.data.tags
        else:
            assert "flat-lora" in card.data.tags and card.data.flat_lora["sigma_t"] > 0


def test_a_card_written_during_training_leaves_out_an_earlier_runs_files(tmp_path):
    """A resumed or repeated run in the same output_dir: the recipes' metrics.json there is the earlier run's until
    this one writes its own, so a checkpoint's card must not show it; once written, the final card does."""
    import os

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text('{"test_accuracy": 0.123}')
    os.utime(run / "metrics.json", (1_000_000_000, 1_000_000_000))  # written long before this run started
    trainer = tiny_trainer(run, save_strategy="steps", save_steps=2)
    trainer.train()
    assert "0.123" not in (run / "checkpoint-2" / "README.md").read_text()
    (run / "metrics.json").write_text('{"test_accuracy": 0.456}')  # this run's, as a recipe writes it at the end
    trainer.save_model()
    assert "| test_accuracy | 0.456 |" in (run / "README.md").read_text()


def test_an_adapter_of_the_packaged_smollm2_loads_the_weights_it_was_trained_on():
    """The smollm2-135m alias is de-quantized from a Q4_1 GGUF: its weights are not the Hub model's, so the card
    names the Hub model it derives from but loads (and says it was trained on) the packaged weights."""
    from fam_hf.model_card import CardFacts, model_card

    facts = CardFacts(model_name="x", base_model="HuggingFaceTB/SmolLM2-135M-Instruct", base_model_source="smollm2-135m",
                      task="text-generation", adapter="LORA", repo_id="you/x")  # fmt: skip
    text = model_card(facts).text
    assert 'base = AutoModelForCausalLM.from_pretrained(model_path("smollm2-135m"))' in text
    assert "de-quantized from the Q4_1 GGUF, not the Hub's own" in text
    minilm = CardFacts(model_name="y", base_model="sentence-transformers/all-MiniLM-L6-v2", base_model_source="minilm-l6",
                       task="text-classification", adapter="LORA", repo_id="you/y")  # fmt: skip
    assert 'from_pretrained("sentence-transformers/all-MiniLM-L6-v2")' in model_card(minilm).text
    minilm.num_labels = 3  # a classifier's adapter: its base is built with the head's size, or loading fails
    assert 'from_pretrained("sentence-transformers/all-MiniLM-L6-v2", num_labels=3)' in model_card(minilm).text


def test_a_lambda_zero_card_says_the_model_trained_on_its_own_loss():
    from fam_hf.model_card import CardFacts, model_card

    plain = model_card(CardFacts(model_name="z", fam={"fam_lambda": 0.0, "fam_lambda_relative": None})).text
    assert "on its own loss (λ = 0" in plain and "with **FAM**" not in plain
    fam = model_card(CardFacts(model_name="z", fam={"fam_lambda": 0.0, "fam_lambda_relative": 0.01})).text
    assert "with **FAM**" in fam  # λ set from the loss share

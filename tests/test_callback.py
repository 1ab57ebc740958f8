"""FlatnessCallback: its numbers land in log_history at the right steps, equal the measures computed by hand,
and leave training untouched."""

from __future__ import annotations

import json

import pytest
import torch
from models import COMMON, bert, cls_data, fam_trainer, gpt2, lm_data, params
from transformers import Trainer, TrainingArguments

from fam_hf import relative_flatness
from fam_hf.callback import MEASURES, FlatnessCallback, logged_names
from fam_hf.measures import hessian_spectrum, hessian_trace
from fam_hf.plots import is_spectrum_file, last_spectra, plot_runs, plot_spectra

SMALL_SPECTRUM = dict(spectrum_runs=2, spectrum_steps=8)  # every measure runs in the tests below: keep it cheap


def collate(trainer, dataset, n=8):
    return trainer.data_collator([dataset[i] for i in range(n)])


def flatness_logs(trainer):
    return {h["step"]: h for h in trainer.state.log_history if "flatness/train/kappa" in h}


def test_plain_trainer_logs_every_n_steps_and_at_evaluation_and_matches_hand_computed(tmp_path):
    model, data = bert(), cls_data(32)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=8,
        eval_strategy="steps",
        eval_steps=3,
        **COMMON,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=cls_data(16, length=6))
    train_batch, eval_batch = collate(trainer, data), collate(trainer, trainer.eval_dataset)
    callback = FlatnessCallback(
        train_batch, eval_batch, measures=MEASURES, every_n_steps=2, estimator="probe", probes=4, trace_probes=8,
        **SMALL_SPECTRUM,
    )  # fmt: skip
    trainer.add_callback(callback.attach(trainer))
    trainer.train()

    logs = flatness_logs(trainer)
    assert sorted(logs) == [2, 3, 4]  # every 2nd step, and the evaluation at step 3
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2, 3, 4]  # Trainer's own logs kept
    for entry in logs.values():
        for split in ("train", "eval"):
            assert {f"flatness/{split}/{m}" for m in (*logged_names(MEASURES), "loss")} <= entry.keys()
        assert entry["flatness/gap"] == pytest.approx(entry["flatness/eval/loss"] - entry["flatness/train/loss"])

    model.eval()
    kappa = relative_flatness(
        model, eval_batch, estimator="probe", probes=4, generator=torch.Generator().manual_seed(0)
    )
    trace = hessian_trace(model, train_batch, probes=8, generator=torch.Generator().manual_seed(0))
    assert logs[4]["flatness/eval/kappa"] == pytest.approx(float(kappa.value), rel=1e-6)
    assert logs[4]["flatness/train/hessian_trace"] == pytest.approx(float(trace.value), rel=1e-6)
    with torch.no_grad():
        loss = float(model(**train_batch).loss)
    assert logs[4]["flatness/train/loss"] == pytest.approx(loss, rel=1e-6)


def test_fam_trainer_with_callback_trains_exactly_as_without(tmp_path):
    def run(with_callback):
        model = gpt2()
        trainer = fam_trainer(
            model, lm_data(), tmp_path / str(with_callback), max_steps=3, per_device_train_batch_size=8, fam_lambda=0.1
        )
        if with_callback:
            train = trainer.train_dataset
            batches = [collate(trainer, train, 4), trainer.data_collator([train[i] for i in range(4, 8)])]
            eval_batch = collate(trainer, lm_data(8, 12), 4)
            trainer.add_callback(FlatnessCallback(batches, eval_batch, every_n_steps=1, trainer=trainer))
        trainer.train()
        return model, trainer

    plain_model, _ = run(False)
    model, trainer = run(True)
    for (name, a), b in zip(params(plain_model).items(), params(model).values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    logs = flatness_logs(trainer)
    assert sorted(logs) == [1, 2, 3]
    fam = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in fam] == [1, 2, 3] and all("fam/kappa" in h for h in fam)  # FAM's own logs intact
    assert all(logs[s]["flatness/gap"] > 0 for s in logs)  # random-token LM: held-out loss is higher


def test_compute_restores_the_model_mode_and_leaves_weights_and_grads_alone():
    model = bert()
    batch = {"input_ids": torch.randint(0, 32, (4, 8)), "labels": torch.tensor([0, 1, 2, 0])}
    callback = FlatnessCallback(batch, batch, measures=MEASURES, probes=2, trace_probes=2, **SMALL_SPECTRUM)
    before = params(model)
    for mode in (True, False):
        model.train(mode)
        metrics = callback.compute(model)
        assert model.training is mode and all(m.training is mode for m in model.modules())
    model.train()
    model.bert.embeddings.eval()  # mixed modes (a frozen part kept in eval) come back as they were, module by module
    callback.compute(model)
    assert not any(m.training for m in model.bert.embeddings.modules())
    assert model.training and model.classifier.training and all(m.training for m in model.bert.encoder.modules())
    assert metrics["flatness/gap"] == 0.0
    assert all(p.grad is None for p in model.parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=0)


def test_trace_method_auto_logs_the_exact_trace_of_the_head():
    model = bert().eval()
    batch = {"input_ids": torch.randint(0, 32, (4, 8)), "labels": torch.tensor([0, 1, 2, 0])}
    exact = float(hessian_trace(model, batch, method="closed_form").value)
    logged = FlatnessCallback(batch, measures=("hessian_trace",), trace_method="auto").compute(model)
    assert logged["flatness/train/hessian_trace"] == pytest.approx(exact, rel=1e-12)
    sampled = FlatnessCallback(batch, measures=("hessian_trace",), trace_probes=2).compute(model)
    assert sampled["flatness/train/hessian_trace"] != pytest.approx(exact, rel=1e-6)  # the default samples it


def test_hessian_spectrum_logs_its_top_ritz_values_and_saves_each_spectrum(tmp_path):
    model, data = bert(), cls_data(16)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, **COMMON)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    train_batch, eval_batch = collate(trainer, data), collate(trainer, cls_data(8, length=6))
    callback = FlatnessCallback(
        train_batch, eval_batch, measures=["hessian_spectrum"], every_n_steps=1, spectrum_top=2, spectrum_runs=3,
        spectrum_steps=10, trainer=trainer,
    )  # fmt: skip
    trainer.add_callback(callback)
    trainer.train()

    logs = {h["step"]: h for h in trainer.state.log_history if "flatness/train/spectrum_top1" in h}
    assert sorted(logs) == [1, 2]
    for entry in logs.values():
        keys = {k for k in entry if k.startswith("flatness/")}
        expected = {f"flatness/{s}/{m}" for s in ("train", "eval") for m in ("loss", "spectrum_top1", "spectrum_top2")}
        assert keys == expected | {"flatness/gap"}
    files = sorted(tmp_path.glob("spectrum-step*.json"))
    assert [f.name for f in files] == [f"spectrum-step{n}-{s}.json" for n in (1, 2) for s in ("eval", "train")]
    # the last measurement is of the trained weights: the same spectrum, computed directly with the same seed
    model.eval()
    for split, batch in (("train", train_batch), ("eval", eval_batch)):
        spectrum = hessian_spectrum(model, batch, runs=3, steps=10, generator=torch.Generator().manual_seed(0))
        runs = [sorted((x for x in row if x == x), reverse=True) for row in spectrum.nodes.tolist()]
        for i in (0, 1):  # the i-th largest Ritz value, the largest over the runs
            top = max(run[i] for run in runs)
            assert logs[2][f"flatness/{split}/spectrum_top{i + 1}"] == pytest.approx(top, rel=1e-6)
        saved = json.loads((tmp_path / f"spectrum-step2-{split}.json").read_text())
        assert saved["name"] == f"{split}, step 2" and saved["dim"] == spectrum.dim == 48
        for row, expected_row in zip(saved["nodes"], spectrum.as_dict()["nodes"]):
            assert row == pytest.approx(expected_row, rel=1e-6)
    assert all(is_spectrum_file(f) for f in files)
    assert plot_spectra([f for f in files if f.name.endswith("train.json")], tmp_path / "plots").is_file()
    # the run's folder: the Ritz values against the step, and its last spectrum per split
    trainer.save_state()
    written = plot_runs([tmp_path], tmp_path / "run-plots", names=["plain"])
    assert {p.name for p in written} >= {"spectrum_top.png", "spectrum-eval.png", "spectrum-train.png"}
    assert last_spectra(tmp_path) == {s: tmp_path / f"spectrum-step2-{s}.json" for s in ("eval", "train")}


def test_last_spectra_takes_the_highest_step_and_a_split_s_first_batch(tmp_path):
    for name in ("spectrum-step9-train.json", "spectrum-step10-train.json", "spectrum-step10-eval-batch1.json",
                 "spectrum-step10-eval-batch0.json", "spectrum-step12-eval-batch1.json", "notes.json"):  # fmt: skip
        (tmp_path / name).write_text("{}")
    assert last_spectra(tmp_path) == {
        "eval": tmp_path / "spectrum-step10-eval-batch0.json",
        "train": tmp_path / "spectrum-step10-train.json",
    }
    (tmp_path / "trainer_state.json").write_text("{}")
    assert last_spectra(tmp_path / "trainer_state.json") == last_spectra(tmp_path)


def test_spectra_of_several_batches_are_saved_one_file_each(tmp_path):
    model = bert()
    batch = {"input_ids": torch.randint(0, 32, (4, 8)), "labels": torch.tensor([0, 1, 2, 0])}
    callback = FlatnessCallback([batch, batch], measures=["hessian_spectrum"], spectrum_runs=1, spectrum_steps=4)
    metrics = callback.compute(model)
    assert set(metrics) == {"flatness/train/loss", *(f"flatness/train/spectrum_top{i}" for i in (1, 2, 3))}
    paths = callback.save_spectra(tmp_path, 7)
    assert [p.name for p in paths] == ["spectrum-step7-train-batch0.json", "spectrum-step7-train-batch1.json"]
    assert json.loads(paths[1].read_text())["name"] == "train, step 7, batch 1"


def test_errors_name_the_fix():
    batch = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "labels": torch.zeros(1, dtype=torch.long)}
    with pytest.raises(ValueError, match="unknown measure.*'curvature'.*choose from"):
        FlatnessCallback(batch, measures=["kappa", "curvature"])
    with pytest.raises(TypeError, match="'input_ids' is a list, not a tensor: pass a collated batch"):
        FlatnessCallback({"input_ids": [[1, 2]], "labels": [0]})  # dataset[:8], not collated
    callback = FlatnessCallback(batch)
    state = type("State", (), {"is_world_process_zero": True, "global_step": 1})()
    with pytest.raises(RuntimeError, match="attach"):
        callback.on_evaluate(None, state, None, model=bert())


def test_each_run_and_an_evaluation_after_training_are_measured(tmp_path):
    """The step already measured is remembered within a run only: a second train() (a hyperparameter-search trial)
    measures its own steps, and evaluate() after training (of the best model, say) measures at the last step too."""
    model, data = bert(), cls_data(16)
    args = TrainingArguments(output_dir=str(tmp_path), **{**COMMON, "max_steps": 2, "per_device_train_batch_size": 8})
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    callback = FlatnessCallback(collate(trainer, data), measures=["kappa"], every_n_steps=2, probes=2)
    trainer.add_callback(callback.attach(trainer))
    trainer.train()
    trainer.train()
    measured = [h["step"] for h in trainer.state.log_history if "flatness/train/kappa" in h]
    assert measured == [2]  # the second run's log_history starts afresh: its own step 2
    with torch.no_grad():
        model.classifier.weight.mul_(2)  # other weights at the same step
    trainer.evaluate()
    last = [h for h in trainer.state.log_history if "flatness/train/kappa" in h]
    assert [h["step"] for h in last] == [2, 2]
    assert last[1]["flatness/train/kappa"] != pytest.approx(last[0]["flatness/train/kappa"])

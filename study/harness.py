"""The study's definitions (``study/run.py``): its arguments, the methods and their grids, the data-size regimes,
and the selection of each grid value on the first seed's validation metric. Its tables are :mod:`study.tables`."""

from __future__ import annotations

from dataclasses import dataclass, field

# the methods, in the order they run and are tabled; CHEAP: what a user would turn instead of FAM
METHODS = ("plain", "weight_decay", "label_smoothing", "sam", "fam", "fam_body", "fam_multi", "flat_lora")
CHEAP = ("plain", "weight_decay", "label_smoothing")
RESCALING_NAME = "rescaling.json"  # the rescaling control's record, beside runs/
PARAMETER = {"weight_decay": "wd", "label_smoothing": "ls", "sam": "rho", "fam": "lambda", "fam_body": "lambda",
             "fam_multi": "share", "flat_lora": "sigma"}  # fmt: skip
LABEL = {"plain": "plain", "weight_decay": "weight decay", "label_smoothing": "label smoothing", "sam": "SAM",
         "fam": "FAM head", "fam_body": "FAM body", "fam_multi": "FAM multi-layer", "flat_lora": "Flat-LoRA"}  # fmt: skip
SYMBOL = {"weight_decay": "wd", "label_smoothing": "ε", "sam": "ρ", "fam": "λ", "fam_body": "λ", "fam_multi": "share",
          "flat_lora": "σ"}  # fmt: skip
# measures compared with the gap: (key in a checkpoint, label); *_train on the fixed train batches
MEASURES = (
    ("kappa_train", "κ (train batches)"),
    ("kappa_eval", "κ (test batches)"),
    ("hessian_trace_train", "Hessian trace"),
    ("top_eigenvalue_train", "top eigenvalue"),
    ("sam_sharpness_train", "SAM sharpness"),
    ("jacobian_norm_train", "Jacobian norm"),
)


@dataclass
class StudyArguments:
    study_recipe: str = field(
        metadata={"help": "The recipe every run goes through: finetune_classification | finetune_clm."}
    )
    study_name: str = field(metadata={"help": "Title of the task in results.md."})
    study_metric: str = field(
        metadata={"help": "Metric compared and selected on: test_<m>, validation_<m> (accuracy, perplexity)."}
    )
    study_fam_lambdas: list[float] = field(metadata={"help": "fam: λ grid (FAM on fam_layer, the config's estimator)."})
    study_seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "Seeds; the first one also selects each grid value."}
    )
    study_methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"help": f"Any of {', '.join(METHODS)}."})  # fmt: skip
    study_higher_is_better: bool = field(default=True, metadata={"help": "True for accuracy, False for perplexity."})
    study_second_metric: str = field(default="", metadata={"help": "A second test metric tabled beside study_metric, paired with plain (test_<m> in the records; e.g. f1: macro-F1 with 3+ classes, which a shift toward the majority class does not raise as it raises accuracy). Same direction as study_metric; never selected on. Empty: none."})  # fmt: skip
    study_sam_rhos: list[float] = field(default_factory=lambda: [0.05], metadata={"help": "sam: ρ grid."})
    study_sam_adaptive: bool = field(default=False, metadata={"help": "ASAM instead of SAM."})
    study_weight_decays: list[float] = field(default_factory=list, metadata={"help": "weight_decay: AdamW's weight decay grid (plain runs keep the config's)."})  # fmt: skip
    study_label_smoothings: list[float] = field(default_factory=list, metadata={"help": "label_smoothing: label_smoothing_factor grid (trained by transformers.Trainer; κ measured as in every run)."})  # fmt: skip
    study_fam_body_lambdas: list[float] = field(default_factory=list, metadata={"help": "fam_body: λ grid for FAM on study_fam_body_layer."})  # fmt: skip
    study_fam_body_layer: str = field(default="", metadata={"help": "fam_body: the body layer penalised (probe estimator)."})  # fmt: skip
    study_fam_body_estimator: str = field(default="auto", metadata={"help": "fam_body: the estimator of κ in training ('auto': FAMTrainer's choice, Gauss–Newton on a body layer under the model's own loss)."})  # fmt: skip
    study_fam_multi_shares: list[float] = field(default_factory=list, metadata={"help": "fam_multi: grid of the penalty's loss share at the first step (fam_lambda_relative: λ = share · L₀/κ₀), for FAM over study_fam_multi_layer."})  # fmt: skip
    study_fam_multi_layer: str = field(default="all-lora", metadata={"help": "fam_multi: the set of layers whose κ's are summed (one probe a step): 'all-lora', 'all-linear', a glob such as 'bert.encoder.*', or a comma-separated list."})  # fmt: skip
    study_fam_multi_estimator: str = field(default="auto", metadata={"help": "fam_multi: the estimator ('auto': Gauss–Newton over the set under the model's own loss)."})  # fmt: skip
    study_flat_lora_sigmas: list[float] = field(default_factory=list, metadata={"help": "flat_lora: Flat-LoRA's σ grid (cosine schedule; every LoRA-adapted layer, or every trainable linear layer in a full fine-tune)."})  # fmt: skip
    study_train_sizes: list[int] = field(default_factory=list, metadata={"help": "Data-size regimes: training examples per regime (0: all); empty: the config's max_train_samples."})  # fmt: skip
    study_epochs: list[float] = field(default_factory=list, metadata={"help": "Epochs per regime (same length as study_train_sizes): the same schedule for every method of a regime."})  # fmt: skip
    study_records_dir: str = field(default="", metadata={"help": "Where the run records and tables go (a tracked folder, e.g. studies/<task>); empty: output_dir. A run whose record is there is finished."})  # fmt: skip
    study_rescaling_norm: str = field(default="", metadata={"help": "Rescaling control: a LayerNorm whose weight and bias are × α (empty: no control)."})  # fmt: skip
    study_rescaling_linear: str = field(default="", metadata={"help": "Rescaling control: the linear layer it feeds, weight × 1/α (the function is unchanged)."})  # fmt: skip
    study_rescaling_alphas: list[float] = field(default_factory=lambda: [0.1, 10.0], metadata={"help": "Rescaling control: the factors α."})  # fmt: skip
    study_bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples (over runs) for the τ intervals."})  # fmt: skip
    study_quick: bool = field(
        default=False, metadata={"help": "A reduced study (fewer seeds/steps): labelled QUICK everywhere."}
    )
    study_note: str = field(
        default="", metadata={"help": "What the settings are, for results.md (e.g. what quick mode cut)."}
    )
    study_only_aggregate: bool = field(default=False, metadata={"help": "Train nothing; rebuild the tables from the records."})  # fmt: skip


def grid(study: StudyArguments, method: str) -> list:
    """The method's grid values (``[None]`` for plain)."""
    return {
        "plain": [None],
        "weight_decay": study.study_weight_decays,
        "label_smoothing": study.study_label_smoothings,
        "sam": study.study_sam_rhos,
        "fam": study.study_fam_lambdas,
        "fam_body": study.study_fam_body_lambdas,
        "fam_multi": study.study_fam_multi_shares,
        "flat_lora": study.study_flat_lora_sigmas,
    }[method]


def methods(study: StudyArguments) -> list[str]:
    return [m for m in METHODS if m in study.study_methods]


def check_study(study: StudyArguments) -> None:
    """Bad settings stop the study before any training, naming the fix."""
    unknown = [m for m in study.study_methods if m not in METHODS]
    if unknown or not study.study_methods:
        raise ValueError(f"study_methods {study.study_methods}: choose from {', '.join(METHODS)}")
    if not study.study_seeds:
        raise ValueError("study_seeds needs at least one seed")
    sizes = {m: len(grid(study, m)) for m in methods(study) if m != "plain"}
    if any(n == 0 for n in sizes.values()):
        empty = [m for m, n in sizes.items() if n == 0]
        raise ValueError(f"methods {empty} have an empty grid; set their study_* grid or drop them from study_methods")
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"every method gets the same grid budget, but the grids have {sizes} points; give each the same number"
        )
    for method in ("fam", "fam_body", "fam_multi", "flat_lora"):
        if method in study.study_methods and min(grid(study, method)) <= 0:
            what = {"fam_multi": "the loss share", "flat_lora": "σ"}.get(method, "FAM's λ")
            raise ValueError(f"study grid of {method} {grid(study, method)}: {what} must be > 0 (plain is 0)")
    if "fam_body" in study.study_methods and not study.study_fam_body_layer:
        raise ValueError("fam_body needs study_fam_body_layer (e.g. bert.encoder.layer.5.output.dense)")
    if study.study_train_sizes and len(study.study_epochs) != len(study.study_train_sizes):
        raise ValueError(
            f"study_epochs {study.study_epochs} needs one value per regime of study_train_sizes {study.study_train_sizes}"
        )


def regimes(study: StudyArguments, max_train_samples: int | None, epochs: float) -> list[tuple[str, int | None, float]]:
    """``[(name, max_train_samples or None for all, epochs)]``: ``n100``, ``nall``, … in the order given."""
    if not study.study_train_sizes:
        return [(f"n{max_train_samples or 'all'}", max_train_samples, epochs)]
    return [(f"n{n or 'all'}", n or None, e) for n, e in zip(study.study_train_sizes, study.study_epochs)]


def run_name(method: str, value, seed: int) -> str:
    return f"{method}-seed{seed}" if value is None else f"{method}-{PARAMETER[method]}{value:g}-seed{seed}"


def best_value(runs: list[dict], study: StudyArguments):
    """The grid value of the run with the best ``validation_metric``; ``runs`` in grid order (ties: the first)."""
    sign = 1 if study.study_higher_is_better else -1
    return max(runs, key=lambda r: sign * r["validation_metric"])["value"]


def chosen_values(records: list[dict], study: StudyArguments, regime: str) -> dict[str, object]:
    """Per method, the value selected on the first seed's validation metric in ``regime`` (only validation is
    read; a method whose grid is not finished on the first seed has no choice yet)."""
    chosen = {}
    for method in methods(study):
        values = grid(study, method)
        first = {r["value"]: r for r in records if r["regime"] == regime and r["method"] == method
                 and r["seed"] == study.study_seeds[0]}  # fmt: skip
        if all(v in first for v in values):
            chosen[method] = values[0] if len(values) == 1 else best_value([first[v] for v in values], study)
    return chosen

"""What the benchmark measures: the cases (model, batch, variants), and how each is built.

A :class:`Case` is one model with one fixed batch of real data; its :class:`Variant` list says which
trainers are timed on it (the plain ``Trainer`` first). Add a variant by appending to a case in
:func:`build_cases`; ``requires`` names ``FAMConfig`` fields it needs, so it is skipped with a note where
the installed fam_hf lacks them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .reference_fam import ReferenceFAMTrainer, hessian_bytes


@dataclass(frozen=True)
class Variant:
    """One way of running the step.

    Attributes:
        name: short id (command line, memory worker, table).
        kind: ``"plain"`` (``Trainer``), ``"fam"`` (``FAMTrainer`` with ``fam``), ``"sam"`` (``SAMTrainer``
            with ``sam``), ``"flat_lora"`` (``FlatLoRATrainer`` with ``flat_lora``), ``"reference"`` (:class:`~benchmarks.reference_fam.ReferenceFAMTrainer`),
            ``"sft"`` (TRL's ``SFTTrainer``: the fused LM head, no logits), ``"famsft"``
            (``fam_hf.trl.FAMSFTTrainer`` with ``fam``).
        label: what the table says.
        fam: ``FAMConfig`` fields (``fam_*``).
        sam: ``SAMConfig`` fields (``sam_*``).
        flat_lora: ``FlatLoRAConfig`` fields (``flat_lora_*``).
        requires: ``FAMConfig`` fields that must exist, else the variant is skipped with a note.
        time_target, memory_target: the targets BENCHMARKS.md judges the variant by, as the largest ratio to the
            plain step.
        reference_speedup_target: the reference method must be at least this many times slower than this variant.
        fused: with a penalty on a causal LM's head, train on the fused LM-head kernel (loss and κ in one pass,
            ``fam_hf.flatness.FusedHeadFlatness``); False: κ beside the trainer's own loss, as before the kernel.
    """

    name: str
    kind: str
    label: str
    fam: dict[str, Any] = field(default_factory=dict)
    sam: dict[str, Any] = field(default_factory=dict)
    flat_lora: dict[str, Any] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    time_target: float | None = None
    memory_target: float | None = None
    reference_speedup_target: float | None = None
    fused: bool = True

    @property
    def every_n(self) -> int:
        return int(self.fam.get("fam_every_n_steps", 1))


@dataclass
class Case:
    """A model, a batch shape and the variants timed on it."""

    name: str
    title: str
    model: str  # "minilm-l6", "smollm2-135m", "tiny-bert", "tiny-llama"
    data: str  # "rotten-tomatoes", "shakespeare", "random"
    batch_size: int
    seq_len: int
    variants: list[Variant]
    lora: bool = False
    learning_rate: float = 1e-5
    notes: list[str] = field(default_factory=list)


PLAIN = Variant("plain", "plain", "plain `Trainer` step")


def _sam(label: str = "SAM (ρ = 0.05, two forward/backward passes)") -> Variant:
    return Variant("sam", "sam", label, sam={"sam_rho": 0.05})


def _flat_lora(label: str) -> Variant:
    # σ_t = σ: no training loop runs here, so the cosine schedule (0 at step 0) would time a noiseless step
    return Variant(
        "flat-lora", "flat_lora", label, flat_lora={"flat_lora_sigma": 0.05, "flat_lora_schedule": "constant"}
    )


def build_cases(quick: bool, device: str) -> dict[str, Case]:
    """Every case, sized for ``device`` (``--quick``: smaller SmolLM2 sequences)."""
    gpu = device != "cpu"
    # "batch as fits": on 2 CPU cores a SmolLM2 step on 16×256 tokens takes ~2 min; 1–2 blocks keep the full
    # bench under ~40 min. A GPU takes the recipes' micro-batch.
    full_batch, lora_batch, lm_len = (16, 16, 256) if gpu else ((1, 2, 256) if not quick else (1, 1, 128))
    head = dict(fam_estimator="closed_form")
    probe = dict(fam_layer="model.layers.29.self_attn.q_proj", fam_estimator="probe", fam_probes=1, fam_lambda=0.01)
    body = dict(fam_layer="bert.encoder.layer.5.output.dense", fam_probes=1)  # the study's FAM-body layer
    cases = [
        Case(
            "minilm-head",
            "MiniLM sequence classifier, FAM on the head (closed form) and on the last FFN output (probe, Gauss–Newton)",
            "minilm-l6",
            "rotten-tomatoes",
            32,
            64,
            [
                PLAIN,
                Variant(
                    "fam",
                    "fam",
                    "FAM closed form on `classifier` (2×384)",
                    {**head, "fam_lambda": 0.3},
                    time_target=1.03,
                    memory_target=1.05,
                    reference_speedup_target=2.0,
                ),
                Variant(
                    "fam-detached",
                    "fam",
                    "FAM closed form, `fam_hessian_grad=detached`",
                    {**head, "fam_lambda": 0.3, "fam_hessian_grad": "detached"},
                ),
                Variant(
                    "reference",
                    "reference",
                    "reference method: full head Hessian, `jacfwd(jacrev)`",
                    {"fam_lambda": 0.3},
                ),
                Variant(
                    "probe-body",
                    "fam",
                    "FAM probe on `bert.encoder.layer.5.output.dense` (384×1536), 1 probe",
                    {**body, "fam_estimator": "probe", "fam_lambda": 0.003},
                ),
                Variant(
                    "gn-body",
                    "fam",
                    "FAM Gauss–Newton on `bert.encoder.layer.5.output.dense`, 1 probe",
                    {**body, "fam_estimator": "gauss_newton", "fam_lambda": 0.1},
                ),
                Variant(
                    "gn-all-dense",
                    "fam",
                    "FAM Gauss–Newton over every encoder dense layer (`bert.encoder.*`, 36 layers), 1 probe",
                    {
                        "fam_layer": "bert.encoder.*",
                        "fam_probes": 1,
                        "fam_estimator": "gauss_newton",
                        "fam_lambda": 0.1,
                    },
                ),
                Variant(
                    "probe-all-dense",
                    "fam",
                    "FAM probe over every encoder dense layer (36 layers), 1 probe",
                    {"fam_layer": "bert.encoder.*", "fam_probes": 1, "fam_estimator": "probe", "fam_lambda": 0.003},
                ),
                _flat_lora("Flat-LoRA (σ = 0.05) on every trainable linear layer (38: full fine-tune)"),
                _sam(),
            ],  # fmt: skip
            learning_rate=1e-4,
            notes=["batch and length as `make demo` (configs/classification_minilm.yaml): 32 snippets × 64 tokens."],
        ),
        Case(
            "smollm2-full-head",
            "SmolLM2-135M full fine-tune, FAM closed form on the LM head",
            "smollm2-135m",
            "shakespeare",
            full_batch,
            lm_len,
            [
                PLAIN,
                Variant(
                    "fam",
                    "fam",
                    "FAM closed form on `lm_head` (49,152×576, tied)",
                    {**head, "fam_lambda": 1e-5},
                    time_target=1.20,
                    memory_target=1.10,
                ),
                Variant(
                    "fam-detached",
                    "fam",
                    "FAM closed form, `fam_hessian_grad=detached`",
                    {**head, "fam_lambda": 1e-5, "fam_hessian_grad": "detached"},
                ),
                Variant(
                    "fam-tf0.25",
                    "fam",
                    "FAM closed form, `fam_token_fraction=0.25`",
                    {**head, "fam_lambda": 1e-5, "fam_token_fraction": 0.25},
                    requires=("fam_token_fraction",),
                ),
                _sam(),
            ],  # fmt: skip
            notes=[_reference_note()],
        ),
        Case(
            "smollm2-lora",
            "SmolLM2-135M LoRA (r = 8 on q/v), FAM on the frozen LM head and on a LoRA-adapted layer",
            "smollm2-135m",
            "shakespeare",
            lora_batch,
            lm_len,
            [
                PLAIN,
                Variant(
                    "fam-head",
                    "fam",
                    "FAM closed form on the frozen `lm_head`",
                    {**head, "fam_lambda": 1e-5},
                    time_target=1.10,
                    memory_target=1.10,
                ),
                Variant(
                    "fam-head-tf0.25",
                    "fam",
                    "FAM closed form on `lm_head`, `fam_token_fraction=0.25`",
                    {**head, "fam_lambda": 1e-5, "fam_token_fraction": 0.25},
                    requires=("fam_token_fraction",),
                ),
                Variant(
                    "probe",
                    "fam",
                    "FAM probe on `layers.29.self_attn.q_proj` (LoRA), 1 probe, `full`",
                    probe,
                    time_target=2.0,
                ),
                Variant(
                    "gauss-newton",
                    "fam",
                    "FAM Gauss–Newton on `layers.29.self_attn.q_proj` (LoRA), 1 probe",
                    {**probe, "fam_estimator": "gauss_newton"},
                ),
                Variant(
                    "probe-detached",
                    "fam",
                    "FAM probe, 1 probe, `detached`",
                    {**probe, "fam_hessian_grad": "detached"},
                    time_target=2.0,
                ),
                Variant(
                    "probe-every4",
                    "fam",
                    "FAM probe, 1 probe, `full`, `fam_every_n_steps=4`",
                    {**probe, "fam_every_n_steps": 4},
                    time_target=1.3,
                ),
                Variant(
                    "probe-detached-every4",
                    "fam",
                    "FAM probe, 1 probe, `detached`, `fam_every_n_steps=4`",
                    {**probe, "fam_hessian_grad": "detached", "fam_every_n_steps": 4},
                    time_target=1.3,
                ),
                Variant(
                    "gn-all-lora",
                    "fam",
                    "FAM Gauss–Newton over every LoRA-adapted projection (`all-lora`, 60 layers), 1 probe",
                    {**probe, "fam_layer": "all-lora", "fam_estimator": "gauss_newton"},
                ),
                _flat_lora("Flat-LoRA (σ = 0.05) on the 60 adapted projections (merged W0 + s·BA)"),
                _sam("SAM (ρ = 0.05) on the LoRA parameters"),
            ],  # fmt: skip
            lora=True,
            learning_rate=1e-4,
            notes=["LoRA as configs/clm_smollm2_lora.yaml: r = 8, α = 16, dropout 0, on q_proj and v_proj."],
        ),
        _sft_case("smollm2-sft-full", "SmolLM2-135M full fine-tune", full_batch, lm_len, lora=False),
        _sft_case("smollm2-sft-lora", "SmolLM2-135M LoRA (r = 8 on q/v)", lora_batch, lm_len, lora=True),
        _clm_case("smollm2-clm-full", "SmolLM2-135M full fine-tune", full_batch, lm_len, lora=False),
        _clm_case("smollm2-clm-lora", "SmolLM2-135M LoRA (r = 8 on q/v)", lora_batch, lm_len, lora=True),
        # Tiny random models: the harness's own smoke test (tests/test_benchmarks.py), seconds.
        Case(
            "tiny-bert",
            "tiny random BERT classifier (smoke test)",
            "tiny-bert",
            "random",
            4,
            8,
            [
                PLAIN,
                Variant(
                    "fam",
                    "fam",
                    "FAM closed form on `classifier`",
                    {**head, "fam_lambda": 0.3},
                    time_target=1.03,
                    memory_target=1.05,
                    reference_speedup_target=2.0,
                ),
                Variant("reference", "reference", "reference method", {"fam_lambda": 0.3}),
                _sam(),
            ],  # fmt: skip
        ),
        Case(
            "tiny-llama-lora",
            "tiny random Llama + LoRA (smoke test)",
            "tiny-llama",
            "random",
            2,
            8,
            [
                PLAIN,
                Variant("fam-head", "fam", "FAM closed form on `lm_head`", {**head, "fam_lambda": 1e-3}),
                Variant(
                    "fam-head-tf0.25",
                    "fam",
                    "FAM closed form, `fam_token_fraction=0.25`",
                    {**head, "fam_lambda": 1e-3, "fam_token_fraction": 0.25},
                    requires=("fam_token_fraction",),
                ),
                Variant(
                    "probe-every4",
                    "fam",
                    "FAM probe, `fam_every_n_steps=4`",
                    {**probe, "fam_layer": "model.layers.1.self_attn.q_proj", "fam_every_n_steps": 4},
                    time_target=1.3,
                ),
            ],  # fmt: skip
            lora=True,
        ),
        _sft_case("tiny-llama-sft", "tiny random Llama (smoke test)", 2, 8, lora=False, model="tiny-llama", smoke=True),
        _clm_case("tiny-llama-clm", "tiny random Llama (smoke test)", 2, 8, lora=True, model="tiny-llama", smoke=True),
    ]
    return {case.name: case for case in cases}


def _sft_case(
    name: str,
    title: str,
    batch_size: int,
    seq_len: int,
    *,
    lora: bool,
    model: str = "smollm2-135m",
    smoke: bool = False,
) -> Case:
    """FAMSFTTrainer against TRL's SFTTrainer (the ``plain`` step here: fused LM head, no logits), and the plain
    ``Trainer`` step that materialises the logits, on the same batches (targets: BENCHMARKS.md, "FAM inside TRL's
    SFTTrainer")."""
    head = dict(fam_estimator="closed_form", fam_lambda=1e-3 if smoke else 1e-5)
    targets = {} if smoke else dict(time_target=1.20, memory_target=1.00)
    return Case(
        name,
        f"{title} under TRL's SFTTrainer, FAM closed form on the LM head from its input",
        model,
        "random" if smoke else "shakespeare",
        batch_size,
        seq_len,
        [
            Variant("plain", "sft", "plain `SFTTrainer` step (fused LM head, no logits)"),
            Variant("famsft", "famsft", "`FAMSFTTrainer` on the fused LM-head kernel (loss and κ in one pass)", head,
                    **targets),
            Variant("famsft-beside", "famsft", "`FAMSFTTrainer`, κ beside TRL's fused loss (before the kernel)", head,
                    fused=False),
            Variant(
                "famsft-tf0.25",
                "famsft",
                "`FAMSFTTrainer`, `fam_token_fraction=0.25`",
                {**head, "fam_token_fraction": 0.25},
                time_target=None if smoke else 1.08,
            ),
            Variant("trainer", "plain", "plain `Trainer` step (full logits; FAM's memory should be below it)"),
        ],  # fmt: skip
        lora=lora,
        learning_rate=1e-4 if lora else 1e-5,
        notes=[
            "Ratios are to SFTTrainer's step; FAMSFT's memory against the plain `Trainer` step is the ratio of its "
            "row to the `Trainer` row. Every label counts (Shakespeare blocks, no assistant mask): the penalty's "
            "largest cost. 1,024 tokens: `--seq-len 1024`."
        ],
    )


def _clm_case(name: str, title: str, batch_size: int, seq_len: int, *, lora: bool, model: str = "smollm2-135m",
              smoke: bool = False) -> Case:  # fmt: skip
    """FAMTrainer with the penalty on a causal LM's head (the fused LM-head kernel: the step never forms the logits)
    against the plain ``Trainer`` step, which forms them (targets: BENCHMARKS.md, "One fused LM-head kernel")."""
    head = dict(fam_estimator="closed_form", fam_lambda=1e-3 if smoke else 1e-5)
    return Case(
        name,
        f"{title}, FAMTrainer on the fused LM-head kernel",
        model,
        "random" if smoke else "shakespeare",
        batch_size,
        seq_len,
        [
            PLAIN,
            Variant("fam", "fam", "FAM on the fused LM-head kernel (no logits)", head,
                    time_target=None if smoke else 1.20, memory_target=None if smoke else 1.00),
            Variant("fam-beside", "fam", "FAM closed form beside the model's loss (the logits; before the kernel)",
                    head, fused=False),
            Variant("loss-from-hidden", "hidden-loss", "the plain loss from the last hidden state on the kernel, "
                    "λ = 0 (no logits: what they cost, measured)"),
        ],  # fmt: skip
        lora=lora,
        learning_rate=1e-4 if lora else 1e-5,
        notes=[
            "Every label counts (Shakespeare blocks). The `loss-from-hidden` row is the plain step with the model's "
            "cross-entropy computed by `fam_hf.curvature.fused_head_loss` from the last hidden state (no κ rows): "
            "plain's transient memory minus its transient is what the logits, their softmax and their gradient "
            "cost. 1,024 tokens: `--seq-len 1024`."
        ],
    )


QUICK_CASES = ("minilm-head", "smollm2-lora")
FULL_CASES = ("minilm-head", "smollm2-full-head", "smollm2-lora")
QUICK_LORA_VARIANTS = (
    "plain", "fam-head", "fam-head-tf0.25", "probe", "gauss-newton", "probe-detached", "probe-every4", "sam",
)  # fmt: skip


def _reference_note() -> str:
    size = hessian_bytes(49152, 576)
    return (
        "The reference method (full layer Hessian by `jacfwd(jacrev)`) cannot run on this head: W is 49,152×576 = "
        f"28.3M weights, so its Hessian has (V·m)² = 8.0·10¹⁴ entries, {size / 1e15:.1f} PB in float32 "
        f"({size / 2**50:.2f} PiB), built from 28.3M forward-mode tangents. Not run."
    )


# -- building models, data and trainers ----------------------------------------------------------------------


# SmolLM2-135M's architecture (its GGUF file's config): for `smollm2-135m-random`, where the weights are not at
# hand (a GPU machine without the 94 MB asset package). Step times and precision comparisons need the shapes only.
SMOLLM2_135M_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                          rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)  # fmt: skip
CLASSIFIER_MODELS = ("minilm-l6", "tiny-bert")  # the others are causal LMs (random data: labels = inputs)


def load_model(case: Case, device: str, dtype: torch.dtype = torch.float32):
    """The case's model (seed 0; LoRA adapters included) on ``device``.

    ``case.model``: ``tiny-bert``, ``tiny-llama``, ``smollm2-135m-random`` (SmolLM2-135M's shapes, random
    weights), or what :func:`fam_hf.assets.load_model_and_tokenizer` takes (an alias or a local folder).
    """
    torch.manual_seed(0)
    tokenizer = None
    if case.model == "smollm2-135m-random":
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M_SHAPE)).to(dtype)
    elif case.model == "tiny-bert":
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, num_labels=2)  # fmt: skip
        model = BertForSequenceClassification(config)
    elif case.model == "tiny-llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)  # fmt: skip
        model = LlamaForCausalLM(config)
    else:
        from fam_hf.assets import load_model_and_tokenizer

        task = "sequence-classification" if case.data == "rotten-tomatoes" else "causal-lm"
        kwargs = {"num_labels": 2} if task == "sequence-classification" else {}
        model, tokenizer = load_model_and_tokenizer(case.model, task, dtype=dtype, **kwargs)
    if case.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                          task_type="CAUSAL_LM")  # fmt: skip
        model = get_peft_model(model, lora)
    return model.to(device), tokenizer


def load_batch(case: Case, tokenizer, vocab_size: int, device: str) -> dict[str, torch.Tensor]:
    """One fixed batch of real data (or random tokens for the tiny models), on ``device``."""
    rng = np.random.default_rng(0)
    if case.data == "rotten-tomatoes":
        from fam_hf.data import rotten_tomatoes

        data = rotten_tomatoes()
        rows = data.select(rng.choice(len(data), case.batch_size, replace=False))
        batch = dict(tokenizer(list(rows["text"]), padding="max_length", truncation=True, max_length=case.seq_len,
                               return_tensors="pt"))  # fmt: skip
        batch["labels"] = torch.tensor(list(rows["label"]))
    elif case.data == "shakespeare":
        from fam_hf.data import chunk_texts, shakespeare

        plays = shakespeare()
        names = list(plays["play"])
        play = plays.select([names.index("hamlet") if "hamlet" in names else 0])
        blocks = chunk_texts(play, tokenizer, "text", case.seq_len)
        rows = blocks[: case.batch_size]
        batch = {key: torch.tensor(value) for key, value in rows.items()}
    else:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab_size, (case.batch_size, case.seq_len), generator=g)
        causal = case.model not in CLASSIFIER_MODELS
        labels = ids.clone() if causal else torch.randint(0, 2, (case.batch_size,), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {key: value.to(device) for key, value in batch.items()}


def fam_fields() -> set[str]:
    from fam_hf import FAMConfig

    return {f.name for f in dataclasses.fields(FAMConfig)}


def sam_classes():
    """``(SAMTrainer, SAMConfig)`` from fam_hf, or None where this fam_hf has none yet."""
    try:
        from fam_hf import SAMConfig, SAMTrainer
    except ImportError:
        return None
    return SAMTrainer, SAMConfig


def unavailable(variant: Variant) -> str | None:
    """Why ``variant`` cannot run with the installed fam_hf, or None."""
    missing = [name for name in variant.requires if name not in fam_fields()]
    if missing:
        return f"skipped: FAMConfig has no field {', '.join(f'`{m}`' for m in missing)} yet"
    if variant.kind == "sam" and sam_classes() is None:
        return "skipped: this fam_hf has no `SAMTrainer`/`SAMConfig` yet"
    return None


def make_trainer(case: Case, variant: Variant, model, output_dir: str, device: str, bf16: bool):
    """A trainer for ``variant`` with the arguments every variant shares."""
    from transformers import Trainer, TrainingArguments

    from fam_hf import FAMConfig, FAMTrainer

    common = dict(
        output_dir=output_dir,
        report_to=[],
        use_cpu=device == "cpu",
        save_strategy="no",
        logging_strategy="no",
        eval_strategy="no",
        optim="adamw_torch",
        learning_rate=case.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        per_device_train_batch_size=case.batch_size,
        seed=0,
        disable_tqdm=True,
        bf16=bf16,
        dataloader_num_workers=0,
    )
    if variant.kind == "plain":
        trainer = Trainer(model=model, args=TrainingArguments(**common))
    elif variant.kind == "fam":
        trainer = FAMTrainer(model=model, args=FAMConfig(**common, **variant.fam))
    elif variant.kind == "sam":
        sam_trainer, sam_config = sam_classes()
        trainer = sam_trainer(model=model, args=sam_config(**common, **variant.sam))
    elif variant.kind == "flat_lora":
        from fam_hf import FlatLoRAConfig, FlatLoRATrainer

        trainer = FlatLoRATrainer(model=model, args=FlatLoRAConfig(**common, **variant.flat_lora))
    elif variant.kind == "reference":
        trainer = ReferenceFAMTrainer(model=model, args=TrainingArguments(**common), **variant.fam)
    elif variant.kind in ("sft", "famsft"):
        trainer = _sft_trainer(case, variant, model, common)
    elif variant.kind == "hidden-loss":
        trainer = _hidden_loss_trainer()(model=model, args=TrainingArguments(**common))
    else:
        raise ValueError(f"unknown variant kind {variant.kind!r}")
    if not variant.fused and getattr(trainer, "fam_fused", None) is not None:
        trainer.fam_fused = None
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop, which is not run here
    return trainer


def _sft_trainer(case: Case, variant: Variant, model, common: dict):
    """SFTTrainer or FAMSFTTrainer; the rows it is built with only satisfy its constructor (the bench hands every
    step its fixed batch)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from fam_hf.trl import FAMSFTConfig, FAMSFTTrainer

    # TRL's own defaults would change the step the others take: activation checkpointing on, bf16 on
    sft = dict(common, gradient_checkpointing=False, max_length=None)
    rows = Dataset.from_dict({"input_ids": [[1, 2, 3, 4]]})
    tokenizer = _sft_tokenizer(case)
    if variant.kind == "sft":
        return SFTTrainer(model=model, args=SFTConfig(**sft), train_dataset=rows, processing_class=tokenizer)
    args = FAMSFTConfig(**sft, **variant.fam)
    return FAMSFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)


def _sft_tokenizer(case: Case):
    """The case model's tokenizer (SFTTrainer wants one), or a word-level stand-in for the random models."""
    if case.model in ("tiny-llama", "smollm2-135m-random"):
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        vocab = {f"t{i}": i for i in range(64)}
        return PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t2")), pad_token="t0", eos_token="t1"
        )
    from transformers import AutoTokenizer

    from fam_hf.assets import model_path

    return AutoTokenizer.from_pretrained(model_path(case.model))


def _hidden_loss_trainer():
    from transformers import Trainer

    from fam_hf.curvature import fused_head_loss
    from fam_hf.flatness import FusedHeadFlatness, lm_head_positions

    class HiddenLossTrainer(Trainer):
        """The plain step with the causal-LM loss computed from the last hidden state by the fused kernel with no
        κ rows (λ = 0): the model's own loss without the logits, to measure what holding them costs."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not hasattr(self, "_flatness"):
                self._flatness = FusedHeadFlatness(self.model, "auto", "closed_form")
            batch = {key: inputs.get(key) for key in ("labels", "input_ids")}
            forward = {key: value for key, value in inputs.items() if key != "labels"}  # as Trainer's, less labels
            with self._flatness.record(batch, num_items_in_batch=num_items_in_batch) as recording:
                model(**forward, **FusedHeadFlatness.forward_kwargs())
            recording.check()
            features, weights, labels = lm_head_positions(recording.hidden, batch, num_items_in_batch)
            weight = self._flatness.layer.weight()
            head = fused_head_loss(features, weight, None, labels, weights, weights[:0],
                                   chunk_rows=max(1, self._flatness.chunk_elements // weight.shape[0]))  # fmt: skip
            return head.loss

    return HiddenLossTrainer

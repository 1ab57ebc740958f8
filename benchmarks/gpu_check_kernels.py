"""Kernel and set-up checks: the probe under SDPA's fused kernels and activation checkpointing, a 4-bit
bitsandbytes base with peft's k-bit preparation, and DDP over NCCL (skipped on one GPU).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import math

import torch
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .cases import Case, build_cases, load_batch, load_model, make_trainer
from .gpu_check_core import Context, Outcome, Skip
from .gpu_check_setup import (
    Rows,
    check_case,
    fam_config,
    fam_logs,
    float32_matmuls,
    last_q_proj,
    relative,
    trainable,
    without_printer,
)
from .measure import Stepper

# -- the probe under SDPA's fused kernels and activation checkpointing ---------------------------------------


def probe_kernels(dtype: str):
    """Probe on the last LoRA q_proj: SDPA / non-reentrant checkpointing vs eager attention.

    Three numbers per set-up, each against eager attention without checkpointing: κ of two FAMTrainer steps,
    the SGD update of those steps (the whole step: forward, second-order pass, backward with recomputation),
    and ∇κ alone on the initial weights (λκ is ~1e-9 of the loss here, so the update hardly sees the penalty).
    """

    def run(ctx: Context, out: Outcome) -> None:
        bf16 = dtype == "bf16"
        case = check_case(ctx, lora=True)
        base, _ = load_model(case, ctx.device)
        batch = load_batch(case, None, base.config.vocab_size, ctx.device)
        lora_case = build_cases(False, ctx.device)["smollm2-lora"]
        probe = next(v for v in lora_case.variants if v.name == "probe")
        probe = dataclasses.replace(probe, fam={**probe.fam, "fam_layer": last_q_proj(base)})
        out.values.update(layer=probe.fam["fam_layer"], fam=probe.fam, fused_kernels=fused_kernels(ctx))
        out.values["fused_double_backward"] = fused_double_backward(ctx, bf16)
        runs, setups = {}, {}
        with float32_matmuls():
            for attention in ("eager", "sdpa"):
                for checkpointing in (False, True):
                    model = copy.deepcopy(base)
                    model.set_attn_implementation(attention)
                    if checkpointing:
                        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                    setups[attention, checkpointing] = (model.config._attn_implementation,
                                                        bool(getattr(model, "is_gradient_checkpointing", False)))  # fmt: skip
                    gradient = penalty_gradient(ctx, model, batch, probe.fam["fam_layer"], bf16)
                    runs[attention, checkpointing] = (*probe_steps(ctx, case, probe, model, batch, bf16), gradient)
                    del model
            if bf16:  # how far bf16 itself moves these (eager vs eager in float32): the scale of bf16's rounding
                model = copy.deepcopy(base)
                gradient = penalty_gradient(ctx, model, batch, probe.fam["fam_layer"], False)
                kappa, _ = probe_steps(ctx, case, probe, model, batch, False)
                out.values["eager_bf16_vs_float32"] = {
                    "kappa_rel_err": max(relative(k, r) for k, r in zip(runs["eager", False][0], kappa)),
                    "penalty_grad_rel_err": relative(runs["eager", False][2], gradient),
                }
        out.require("set_ups", "each run had the attention and checkpointing it names",
                    all(setup == key for key, setup in setups.items()), value=sorted(set(setups.values())))  # fmt: skip
        reference = runs["eager", False]
        out.values["kappa"] = {f"{a}{'+ckpt' if c else ''}": k for (a, c), (k, _, _) in runs.items()}
        out.values["penalty_grad_norm"] = float(reference[2].norm())
        # float32: eager and SDPA's math kernel differ in summation order only. bf16: each rounds its own bf16
        # intermediates, which a second derivative amplifies (the dry run's tiny model: κ 2e-2 from eager, where
        # bf16 moves eager's own κ by 6e-2 from float32)
        tol = {"kappa": 1e-1, "update": 5e-2, "penalty_grad": 1e-1} if bf16 else dict.fromkeys(
            ("kappa", "update", "penalty_grad"), 1e-4)  # fmt: skip
        for (attention, checkpointing), (kappa, update, gradient) in runs.items():
            if (attention, checkpointing) == ("eager", False):
                continue
            name = f"{attention}{'+ckpt' if checkpointing else ''}"
            err = max(relative(k, r) for k, r in zip(kappa, reference[0]))
            out.within(f"{name}.kappa_rel_err", f"{name}: κ per step vs eager", err, tol["kappa"])
            out.within(f"{name}.update_rel_err", f"{name}: ‖Δθ − Δθ_eager‖ / ‖Δθ_eager‖", relative(update, reference[1]),
                       tol["update"])  # fmt: skip
            out.within(f"{name}.penalty_grad_rel_err", f"{name}: ‖∇κ − ∇κ_eager‖ / ‖∇κ_eager‖",
                       relative(gradient, reference[2]), tol["penalty_grad"])  # fmt: skip

    return run


def penalty_gradient(ctx: Context, model, batch, layer: str, bf16: bool) -> torch.Tensor:
    """∇κ w.r.t. the trainable parameters, flattened: one probe (seed 0), as FAMTrainer's step computes it.

    As in ``FAMTrainer.training_step``: forward and κ under autocast, the backward after it, all inside the
    kernels the probe needs (a checkpointed block is recomputed in both backward passes).
    """
    from fam_hf import RelativeFlatness

    params = [p for p in model.parameters() if p.requires_grad]
    flatness = RelativeFlatness(model, layer, "probe", generator=torch.Generator().manual_seed(0))
    autocast = torch.autocast(ctx.device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    model.train()
    try:
        with flatness.kernels(differentiable=True):
            with autocast:
                with flatness.record(batch) as recording:
                    loss = model(**batch).loss
                kappa = recording.result(loss).value
            grads = torch.autograd.grad(kappa, params, allow_unused=True)
    finally:
        flatness.close()
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)]).detach()


def probe_steps(ctx: Context, case: Case, variant, model, batch, bf16: bool, steps: int = 2):
    """``(κ per step, Δθ of the trainable parameters)`` over ``steps`` FAMTrainer steps with SGD (lr 1e-2).

    SGD's update is proportional to the gradient, so Δθ compares the gradients of ``L + λκ`` (AdamW's first
    steps are ≈ lr·sign(g), which turns rounding-level differences of tiny gradients into full steps).
    """
    trainer = without_printer(make_trainer(case, variant, model, str(ctx.workdir / "probe"), ctx.device, bf16))
    params = [p for p in model.parameters() if p.requires_grad]
    trainer.optimizer = torch.optim.SGD(params, lr=1e-2)
    stepper = Stepper(trainer, model, batch, ctx.device, bf16)
    before = torch.cat([p.detach().flatten().clone() for p in params])
    kappas = []
    for _ in range(steps):
        stepper.step()
        trainer.log({"loss": 0.0})  # FAMTrainer adds fam/kappa of the steps since its last log
        kappas.append(trainer.state.log_history[-1]["fam/kappa"])
    update = torch.cat([p.detach().flatten() for p in params]) - before
    trainer.flatness.close()
    return kappas, update


def fused_kernels(ctx: Context) -> dict[str, bool]:
    """Which SDPA kernels are enabled here (FAM's probe must keep them out of its double backward)."""
    if ctx.cuda:
        return {"flash": torch.backends.cuda.flash_sdp_enabled(),
                "memory_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                "cudnn": torch.backends.cuda.cudnn_sdp_enabled()}  # fmt: skip
    return {"cpu_flash": True}


def fused_double_backward(ctx: Context, bf16: bool) -> str:
    """Whether a second derivative goes through SDPA's fused kernels here (the control: why the math kernel)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    q = torch.randn(1, 2, 16, 64, device=ctx.device, dtype=dtype, requires_grad=True)
    backends = (
        [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION] if ctx.cuda else [SDPBackend.FLASH_ATTENTION]
    )
    try:
        with sdpa_kernel(backends):
            (g,) = torch.autograd.grad(F.scaled_dot_product_attention(q, q, q).square().sum(), q, create_graph=True)
            torch.autograd.grad(g.square().sum(), q)
    except RuntimeError as error:
        return "fails: " + str(error).splitlines()[0][:200]
    return "works"


# -- 4-bit base (bitsandbytes) + prepare_model_for_kbit_training + LoRA ---------------------------------------


def kbit(estimator: str):
    """A bitsandbytes 4-bit base, peft's k-bit preparation (non-reentrant checkpointing) and LoRA, trained with FAM."""

    def run(ctx: Context, out: Outcome) -> None:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise Skip("bitsandbytes not installed (carry its wheel in .whl/: README.md, 'GPU check')")
        import bitsandbytes
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from fam_hf import FAMTrainer

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
        device_map = {"": torch.cuda.current_device() if ctx.cuda else "cpu"}
        model = AutoModelForCausalLM.from_pretrained(saved_base(ctx), quantization_config=quantization,
                                                     device_map=device_map)  # fmt: skip
        quantized = sum(isinstance(m, bitsandbytes.nn.Linear4bit) for m in model.modules())
        model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
        layer = "auto" if estimator == "closed_form" else last_q_proj(model)
        lora = LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        )
        model = get_peft_model(model, lora)
        batch = load_batch(check_case(ctx), None, model.config.vocab_size, ctx.device)
        args = fam_config(ctx, f"kbit-{estimator}", max_steps=3, bf16=True, learning_rate=1e-3, fam_layer=layer,
                          fam_estimator=estimator, gradient_checkpointing=True,
                          gradient_checkpointing_kwargs={"use_reentrant": False})  # fmt: skip
        before = trainable(model)
        out.values.update(bitsandbytes=bitsandbytes.__version__, linear4bit_modules=quantized, layer=layer)
        trainer = without_printer(FAMTrainer(model=model, args=args, train_dataset=Rows(batch)))
        trainer.train()
        logs = fam_logs(trainer)
        after = trainable(model)
        changed = sorted(n for n in before if not torch.equal(before[n], after[n]))
        kappas = [h["fam/kappa"] for h in logs]
        out.values.update(kappa=kappas, loss=[h["loss"] for h in logs], changed_parameters=len(changed))
        out.require("quantized", "the base holds bitsandbytes Linear4bit layers", quantized > 0, value=quantized)
        out.require("kappa_logged", "κ finite and non-zero at every step",
                    len(kappas) == 3 and all(math.isfinite(k) and k != 0 for k in kappas), value=kappas)  # fmt: skip
        skipped = logs[-1]["fam/skipped"] if logs else None
        out.require("fam_skipped", "fam/skipped is 0", skipped == 0, value=skipped)
        out.require("only_adapters_train", "the adapters and nothing else moved",
                    bool(changed) and all("lora_" in n for n in changed), value=len(changed))  # fmt: skip
        out.require(
            "weights_finite",
            "no NaN/inf in the trainable weights",
            all(torch.isfinite(v).all() for v in after.values()),
        )

    return run


def saved_base(ctx: Context) -> str:
    """A folder ``from_pretrained`` can quantize: the real model's, or the random model saved once in the workdir."""
    if ctx.real_weights:
        from fam_hf.assets import model_path

        return model_path(ctx.model)
    folder = ctx.workdir / "base-model"
    if not folder.is_dir():
        model, _ = load_model(check_case(ctx), "cpu")
        model.save_pretrained(folder)
    return str(folder)


# -- DDP ------------------------------------------------------------------------------------------------------


def ddp_nccl(ctx: Context, out: Outcome) -> None:
    count = torch.cuda.device_count() if ctx.cuda else 0
    if count < 2:
        raise Skip(f"DDP over NCCL needs ≥ 2 GPUs; this machine has {count}. DDP itself is verified on 2 gloo CPU "
                   "ranks (tests/test_distributed.py)")  # fmt: skip
    raise Skip(f"{count} GPUs, but this script runs one process; launch tests/ddp_worker.py with torchrun and NCCL")

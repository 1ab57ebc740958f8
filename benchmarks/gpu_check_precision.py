"""Precision checks: the closed form on the LM head under bf16 and fp16, and fp16's GradScaler on an overflow.

Each compares with the same computation in float32 (float64 for the estimator alone). In the dry run
(``ctx.device == "cpu"``) the same functions run on a tiny random Llama; what needs CUDA says so.
"""

from __future__ import annotations

import torch

from .gpu_check_core import Context, Outcome
from .gpu_check_setup import (
    Rows,
    fam_config,
    fam_logs,
    float32_matmuls,
    max_prob,
    model_and_batch,
    relative,
    sharpen,
    trainable,
    without_printer,
)

# -- precision of the closed form on the LM head ------------------------------------------------------------


def kappa_products_bf16(ctx: Context, out: Outcome) -> None:
    """softmax_curvature with bf16 operands in its three products vs float64, on the same (φ, z) of a bf16 pass."""
    from fam_hf.curvature import CHUNK_ELEMENTS, closed_form, softmax_curvature
    from fam_hf.head_loss import head_loss_for

    model, batch = model_and_batch(ctx)
    model.eval()
    head = model.get_output_embeddings()
    seen: dict[str, torch.Tensor] = {}
    handle = head.register_forward_hook(lambda m, args, z: seen.update(phi=args[0].detach(), z=z.detach()))
    with torch.no_grad(), torch.autocast(ctx.device, dtype=torch.bfloat16):
        model(**batch)
    handle.remove()
    z, phi, weights = head_loss_for(model).positions(seen["z"], seen["phi"], batch["labels"])
    weight = head.weight.detach()
    rows = max(1, CHUNK_ELEMENTS // z.shape[-1])
    out.values.update(positions=int(z.shape[0]), vocab=int(z.shape[1]), logits_dtype=str(z.dtype))

    def kappa(logits, w, product_dtype):
        logits, w = logits.clone().requires_grad_(), w.clone().requires_grad_()
        dtype = torch.promote_types(w.dtype, torch.float32)
        curvature = softmax_curvature(logits, w, chunk_rows=rows, product_dtype=product_dtype)
        value = (weights.to(dtype) * phi.to(dtype).pow(2).sum(-1) * curvature).sum()
        grads = torch.autograd.grad(value, (logits, w))
        return value.detach(), grads

    exact, (exact_dz, exact_dw) = kappa(z.double(), weight.double(), None)
    value, (dz, dw) = kappa(z, weight, torch.bfloat16)
    out.values.update(kappa_float64=float(exact), kappa_bf16_products=float(value), mean_max_prob=max_prob(z))
    out.within("kappa_rel_err", "κ: |bf16 products − float64| / float64", relative(value, exact), 1e-3)
    out.within("grad_logits_rel_err", "∂κ/∂z: ‖bf16 − float64‖ / ‖float64‖", relative(dz, exact_dz), 2e-2)
    out.within("grad_weight_rel_err", "∂κ/∂W: ‖bf16 − float64‖ / ‖float64‖", relative(dw, exact_dw), 2e-2)
    # Random weights give near-uniform p, where κ = ‖φ‖² Var_p(w) has no cancellation. A trained LM's peaked p
    # (SmolLM2 on Shakespeare: mean max p 0.48, κ moved 1.0e-4 by bf16 products) makes Σ p‖w‖² and ‖Wᵀp‖²
    # nearly equal: the same logits, sharpened to that mean max p, test the path in that regime (the tiny dry-run
    # head, 64 × 16, averages fewer rounding errors: 6e-4 seen, hence its looser bound).
    sharp = sharpen(z, 0.5)
    sharp_exact, _ = kappa(sharp.double(), weight.double(), None)
    sharp_value, _ = kappa(sharp, weight, torch.bfloat16)
    out.values.update(sharp_mean_max_prob=max_prob(sharp), sharp_kappa_float64=float(sharp_exact))
    out.within("sharp_kappa_rel_err", "κ, logits sharpened to mean max p 0.5: |bf16 products − float64| / float64",
               relative(sharp_value, sharp_exact), 1e-3 if ctx.cuda else 2e-3)  # fmt: skip
    chosen = closed_form(weight, phi, z, weights, "cross_entropy").detach()
    if ctx.cuda:  # closed_form takes bf16 products for bf16 logits on CUDA: the path measured above
        out.require("closed_form_uses_bf16_products", "closed_form() on bf16 CUDA logits equals the bf16-product κ",
                    relative(chosen, value) < 1e-6, value=relative(chosen, value))  # fmt: skip
    else:
        out.notes.append("CPU: closed_form() keeps float32 products (its bf16 path is for CUDA); softmax_curvature "
                         "was called with product_dtype=bf16 directly")  # fmt: skip


def kappa_under_autocast(dtype: torch.dtype):
    """κ (closed form, FAM's hook) of the whole model run under ``dtype`` autocast vs the float32 model."""

    def run(ctx: Context, out: Outcome) -> None:
        from fam_hf import relative_flatness

        model, batch = model_and_batch(ctx)
        model.eval()
        with torch.no_grad(), float32_matmuls():  # the measured κ needs no gradient
            reference = relative_flatness(model, batch, estimator="closed_form")
            loss32 = model(**batch).loss
        with torch.no_grad(), torch.autocast(ctx.device, dtype=dtype):
            low = relative_flatness(model, batch, estimator="closed_form")
            outputs = model(**batch)
        out.values.update(kappa_float32=float(reference.value), kappa_autocast=float(low.value),
                          loss_float32=float(loss32), loss_autocast=float(outputs.loss),
                          mean_max_prob=max_prob(outputs.logits), tokens=int(batch["labels"].numel()))  # fmt: skip
        out.require("kappa_finite", "κ under autocast is finite", bool(torch.isfinite(low.value)))
        out.within(
            "kappa_rel_err", f"|κ_{str(dtype)[6:]} − κ_fp32| / κ_fp32", relative(low.value, reference.value), 3e-2
        )

    return run


# -- fp16 + GradScaler: a forced overflow is skipped and counted ---------------------------------------------


def gradscaler_overflow(ctx: Context, out: Outcome) -> None:
    """FAMTrainer under fp16 + GradScaler, 4 steps; step 2's head input (the final norm's output) is blown up so the
    logits overflow."""
    from transformers import TrainerCallback

    from fam_hf import FAMTrainer

    model, batch = model_and_batch(ctx)
    forced = 2
    # fp16 overflows past 65504: ×1e5 on the RMS-normed features does it in the head's fp16 product. The CPU
    # dry run has no fp16 autocast in Trainer (accelerate's fp16 is CUDA-only), so it puts ±inf there itself.
    factor = 1e5 if ctx.cuda else float("inf")

    class ForceOverflow(TrainerCallback):
        def __init__(self) -> None:
            self.handle, self.changed, self.scales = None, {}, {}

        def on_step_begin(self, args, state, control, **kw):
            self.step, self.before = state.global_step, trainable(model)
            self.scales[self.step] = [scaler.get_scale()]
            if self.step == forced:
                # the final norm's output is the head's input on both of FAM's paths: through the head module (κ
                # beside the loss) and the fused LM-head kernel, which takes the backbone's last hidden state
                norm = model.get_decoder().norm
                self.handle = norm.register_forward_hook(lambda m, a, output: output * factor)

        def on_step_end(self, args, state, control, **kw):
            if self.handle is not None:
                self.handle.remove()
                self.handle = None
            after = trainable(model)
            self.changed[self.step] = any(not torch.equal(after[n], v) for n, v in self.before.items())
            self.scales[self.step].append(scaler.get_scale())

    callback = ForceOverflow()
    # max_grad_norm=0 on the CPU: accelerate unscales before clipping only under its own fp16
    args = fam_config(ctx, "fp16", max_steps=4, fp16=ctx.cuda, max_grad_norm=1.0 if ctx.cuda else 0.0)
    trainer = without_printer(FAMTrainer(model=model, args=args, train_dataset=Rows(batch), callbacks=[callback]))
    if not ctx.cuda:
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaler = trainer.accelerator.scaler
    out.values["mixed_precision"] = str(trainer.accelerator.mixed_precision)
    if not ctx.cuda:
        out.notes.append("CPU: float32 forward with a GradScaler('cpu', 2¹²) put in the accelerator; head input ±inf")
    if scaler is None:
        out.require("grad_scaler", "the accelerator has a GradScaler", False)
        return
    trainer.train()
    logs = fam_logs(trainer)
    skipped = max((h["fam/skipped"] for h in logs), default=None)
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    scale_before, scale_after = callback.scales[forced]
    others = [s for s in callback.changed if s != forced]
    out.values.update(fam_skipped=skipped, kappa=[h["fam/kappa"] for h in logs], scales=callback.scales,
                      steps_that_updated=callback.changed, overflow_factor=factor)  # fmt: skip
    out.require("fam_skipped", "fam/skipped counts exactly the forced step", skipped == 1, value=skipped)
    out.require("weights_finite", "no NaN/inf in the weights after training", finite)
    out.require("forced_step_skipped", "the forced step left the weights alone", not callback.changed[forced])
    out.require("scale_lowered", "the GradScaler lowered its scale at the forced step", scale_after < scale_before,
                value=[scale_before, scale_after])  # fmt: skip
    out.require("other_steps_trained", "a step without overflow updated the weights",
                any(callback.changed[s] for s in others))  # fmt: skip
    skipped_naturally = [s for s in others if not callback.changed[s]]
    if skipped_naturally:
        out.notes.append(f"the GradScaler also skipped step(s) {skipped_naturally} on its own (scale too high)")


# -- the fused LM-head kernel in bf16, and its time against the loss alone -----------------------------------


def fused_head_bf16(ctx: Context, out: Outcome) -> None:
    """fused_head_loss on the LM head's input of a bf16 autocast pass: bf16 products (what FusedHeadFlatness takes on
    a GPU) vs float64, for the loss, κ and the gradients of L + λκ w.r.t. Φ and W; then the kernel's forward +
    backward time against the loss alone on the same kernel (no κ rows) and against the unfused logits CE."""
    import time

    from fam_hf.curvature import FUSED_CHUNK_ELEMENTS, fused_head_loss
    from fam_hf.flatness import lm_head_positions

    model, batch = model_and_batch(ctx)
    model.eval()
    head = model.get_output_embeddings()
    seen: dict[str, torch.Tensor] = {}
    handle = head.register_forward_hook(lambda m, args, z: seen.update(phi=args[0].detach()))
    with torch.no_grad(), torch.autocast(ctx.device, dtype=torch.bfloat16):
        model(**batch)
    handle.remove()
    phi, weights, labels = lm_head_positions(seen["phi"], batch, None)
    weight = head.weight.detach()
    rows = max(1, FUSED_CHUNK_ELEMENTS // weight.shape[0])
    lam = 1e-2
    out.values.update(positions=int(phi.shape[0]), vocab=int(weight.shape[0]), features_dtype=str(phi.dtype))

    def run(features, w, product_dtype, kappa_rows=None):
        features, w = features.clone().requires_grad_(), w.clone().requires_grad_()
        k = weights if kappa_rows is None else weights[:kappa_rows]
        result = fused_head_loss(features, w, None, labels, weights.to(w.dtype if w.dtype == torch.float64
                                 else torch.float32), k, lam=lam, chunk_rows=rows,
                                 product_dtype=product_dtype)  # fmt: skip
        grads = torch.autograd.grad(result.loss, (features, w))
        return result.loss.detach(), result.kappa.detach(), grads

    loss64, kappa64, (dphi64, dw64) = run(phi.double(), weight.double(), None)
    product = torch.bfloat16  # as FusedHeadFlatness on CUDA; the CPU dry run takes the same path
    loss, kappa, (dphi, dw) = run(phi, weight, product)
    out.values.update(loss_float64=float(loss64), kappa_float64=float(kappa64), loss_bf16=float(loss),
                      kappa_bf16=float(kappa))  # fmt: skip
    out.within("loss_rel_err", "loss: |bf16 products − float64| / float64", relative(loss, loss64), 1e-3)
    out.within("kappa_rel_err", "κ: |bf16 products − float64| / float64", relative(kappa, kappa64),
               1e-3 if ctx.cuda else 2e-3)  # fmt: skip
    out.within("grad_features_rel_err", "∂(L + λκ)/∂Φ: ‖bf16 − float64‖ / ‖float64‖", relative(dphi, dphi64), 2e-2)
    out.within("grad_weight_rel_err", "∂(L + λκ)/∂W: ‖bf16 − float64‖ / ‖float64‖", relative(dw, dw64), 2e-2)

    def timed(fn, repeats: int = 5) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            if ctx.cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if ctx.cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2] * 1e3

    def unfused():
        features, w = phi.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast(ctx.device, dtype=torch.bfloat16):
            logits = features @ w.T
        loss = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum") / len(labels)
        torch.autograd.grad(loss, (features, w))

    fused_ms = timed(lambda: run(phi, weight, product))
    loss_only_ms = timed(lambda: run(phi, weight, product, kappa_rows=0))
    unfused_ms = timed(unfused)
    out.values.update(fused_ms=fused_ms, loss_only_ms=loss_only_ms, unfused_logits_ce_ms=unfused_ms,
                      fused_over_loss_only=fused_ms / loss_only_ms, fused_over_unfused=fused_ms / unfused_ms)  # fmt: skip
    out.notes.append("products per token (units of d·m, trained head): loss alone 3, fused loss + κ 6: a ratio "
                     "near 2 to the loss alone is the floor")  # fmt: skip

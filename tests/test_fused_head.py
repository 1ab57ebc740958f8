"""The fused LM-head kernel (fam_hf.curvature.fused_head_loss) against the unfused reference in float64: the
cross-entropy and κ written out with ordinary autograd (the closed form on the logits), every gradient of
``L + λ·κ`` included."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import fam_hf.curvature.fused_head
from fam_hf.curvature import closed_form, fused_head_loss

RTOL = 1e-10
N, M, D = 13, 5, 11


def close(actual, expected):
    # 1e-10 relative to the tensor's scale (an entry near 0 is held to the others' precision)
    scale = expected.abs().max().clamp_min(1e-300)
    torch.testing.assert_close(actual / scale, expected / scale, rtol=0, atol=RTOL)


def reference(features, weight, bias, labels, u, k, *, dft=False, through_logits=True):
    """``(L, κ)`` by autograd of the formulas (docs/mathematics.md#the-fused-lm-head-kernel)."""
    logits = features @ weight.T + (0 if bias is None else bias)
    nll = F.cross_entropy(logits, labels, reduction="none")
    omega = torch.exp(-nll).detach() if dft else torch.ones_like(nll)
    loss = (u * omega * nll).sum()
    kk = k.shape[0]
    z, phi = logits[:kk], features[:kk]
    if not through_logits:
        z, phi = z.detach(), phi.detach()
    # the closed form on the logits, as fam_hf.curvature.closed_form computes it
    kappa = closed_form(weight, phi, z, k * omega[:kk], "cross_entropy")
    return loss, kappa


def problem(seed=0, *, bias=False, n=N):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, M, generator=g, dtype=torch.float64)
    weight = torch.randn(D, M, generator=g, dtype=torch.float64)
    b = torch.randn(D, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, D, (n,), generator=g)
    u = torch.full((n,), 1 / 17, dtype=torch.float64)  # a num_items_in_batch that counts other micro-batches too
    return features, weight, b, labels, u


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("head", ["trained", "frozen", "tied"])
@pytest.mark.parametrize("dft", [False, True], ids=["nll", "dft"])
@pytest.mark.parametrize("fraction", [1.0, 0.4], ids=["all-rows", "sample"])
@pytest.mark.parametrize("through_logits", [True, False], ids=["full", "detached"])
def test_loss_kappa_and_every_gradient_equal_the_unfused_reference(bias, head, dft, fraction, through_logits):
    features, weight, b, labels, u = problem(bias=bias)
    kk = round(fraction * N)
    k = torch.rand(kk, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * N / kk
    lam = 0.7
    weight.requires_grad_(head != "frozen")
    if b is not None:
        b.requires_grad_()
    if head == "tied":  # the head's input depends on its weight too (tied embeddings)
        ids = torch.randint(0, D, (N,), generator=torch.Generator().manual_seed(4))
        base = features.clone().requires_grad_()
        inputs = [base, weight] + ([b] if b is not None else [])

        def phi():
            return torch.tanh(base + weight[ids])
    else:
        features.requires_grad_()
        inputs = [features] + ([weight] if head == "trained" else []) + ([b] if b is not None else [])

        def phi():
            return features

    ours = fused_head_loss(phi(), weight, b, labels, u, k, lam=lam, dft=dft, through_logits=through_logits,
                           chunk_rows=4)  # 4 chunks, the last short; the sample ends inside a chunk  # fmt: skip
    loss, kappa = reference(phi(), weight, b, labels, u, k, dft=dft, through_logits=through_logits)
    close(ours.loss, loss)
    close(ours.kappa, kappa)
    assert not ours.kappa.requires_grad  # its gradient travels with the loss's
    mine = torch.autograd.grad(2.5 * ours.loss, inputs)  # scaled by the incoming gradient
    want = torch.autograd.grad(2.5 * (loss + lam * kappa), inputs)
    for a, t in zip(mine, want, strict=True):
        close(a, t)


@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_kappa_with_its_own_gradient_for_a_step_whose_lambda_comes_after_the_pass(lam):
    features, weight, b, labels, u = problem(1, bias=True)
    k = torch.full((N,), 1 / N, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (features, weight, b)]
    ours = fused_head_loss(features, weight, b, labels, u, k, lam=lam, kappa_grad=True, chunk_rows=5)
    loss, kappa = reference(features, weight, b, labels, u, k)
    mine = torch.autograd.grad(ours.loss - 4.0 * ours.kappa, inputs)
    want = torch.autograd.grad(loss + (lam - 4.0) * kappa, inputs)
    for a, t in zip(mine, want, strict=True):
        close(a, t)


def test_entropy_and_top1_are_those_of_the_logits():
    features, weight, b, labels, u = problem(2, bias=True)
    labels[:4] = (features[:4] @ weight.T + b).argmax(-1)  # some right, for a test that can fail
    ours = fused_head_loss(features, weight, b, labels, u, u, metrics=True, chunk_rows=3)
    logp = torch.log_softmax(features @ weight.T + b, -1)
    close(ours.entropy, -(logp.exp() * logp).sum(-1))
    assert torch.equal(ours.is_top1, logp.argmax(-1) == labels) and ours.is_top1.sum() >= 4
    assert fused_head_loss(features, weight, b, labels, u, u, chunk_rows=3).entropy is None


@pytest.mark.parametrize("tile", [3, 4096], ids=["vocabulary-tiles", "one-tile"])
def test_the_vocabulary_tiles_of_the_combined_gradient_do_not_change_it(monkeypatch, tile):
    monkeypatch.setattr(fam_hf.curvature.fused_head, "VOCAB_TILE", tile)  # 11 columns: 4 tiles, the last short
    features, weight, b, labels, u = problem(12, bias=True)
    inputs = [t.requires_grad_() for t in (features, weight, b)]
    ours = fused_head_loss(features, weight, b, labels, u, u[:9], lam=0.4, chunk_rows=5)
    loss, kappa = reference(features, weight, b, labels, u, u[:9])
    for a, t in zip(torch.autograd.grad(ours.loss, inputs), torch.autograd.grad(loss + 0.4 * kappa, inputs)):
        close(a, t)


def test_chunking_does_not_change_the_result():
    features, weight, b, labels, u = problem(5, bias=True)
    one = fused_head_loss(features, weight, b, labels, u, u, chunk_rows=N)
    for rows in (1, 2, 6):
        many = fused_head_loss(features, weight, b, labels, u, u, chunk_rows=rows)
        close(many.loss, one.loss)
        close(many.kappa, one.kappa)


def test_only_what_requires_grad_is_formed_and_a_second_backward_is_an_error():
    features, weight, b, labels, u = problem(6)
    features.requires_grad_()
    out = fused_head_loss(features, weight, None, labels, u, u, lam=1.0, chunk_rows=4)
    (grad,) = torch.autograd.grad(out.loss, features, retain_graph=True)
    loss, kappa = reference(features, weight, None, labels, u, u)
    close(grad, torch.autograd.grad(loss + kappa, features)[0])
    with pytest.raises(RuntimeError, match="backward ran a second time"):
        torch.autograd.grad(out.loss, features)
    with torch.no_grad():
        assert not fused_head_loss(features, weight, None, labels, u, u, lam=1.0, chunk_rows=4).loss.requires_grad


def test_no_counted_rows_give_a_differentiable_zero():
    features, weight, _, labels, u = problem(7, n=0)
    features.requires_grad_()
    weight.requires_grad_()
    out = fused_head_loss(features, weight, None, labels, u, u, lam=1.0, chunk_rows=4)
    assert out.loss.item() == 0 and out.kappa.item() == 0
    out.loss.backward()
    assert features.grad.shape == (0, M)
    assert torch.equal(weight.grad, torch.zeros_like(weight))  # set, though no chunk ever wrote it


def test_shapes_that_do_not_line_up_are_errors_naming_them():
    features, weight, _, labels, u = problem(8)
    with pytest.raises(ValueError, match="counted positions only"):
        fused_head_loss(features, weight, None, labels[:-1], u, u, chunk_rows=4)
    with pytest.raises(ValueError, match="first K rows"):
        fused_head_loss(features, weight, None, labels, u, torch.ones(N + 1, dtype=torch.float64), chunk_rows=4)


@pytest.mark.parametrize("kappa_grad", [False, True])
def test_a_kappa_that_overflows_leaves_the_loss_with_its_own_finite_gradient(kappa_grad):
    features, weight, b, labels, u = (t.float() if t.is_floating_point() else t for t in problem(9, bias=True))
    weight = (weight * 1e-25).requires_grad_()  # finite logits and loss, ‖φ‖² = inf in float32
    features = (features * 1e20).requires_grad_()
    out = fused_head_loss(features, weight, b, labels, u, u, lam=1.0, kappa_grad=kappa_grad, chunk_rows=4)
    assert not torch.isfinite(out.kappa) and torch.isfinite(out.loss)
    assert not out.kappa.requires_grad
    mine = torch.autograd.grad(out.loss, [features, weight])
    plain = fused_head_loss(features, weight, b, labels, u, u, chunk_rows=4)
    want = torch.autograd.grad(plain.loss, [features, weight])
    for a, t in zip(mine, want, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, t, rtol=0, atol=0)


# -- on a model: FusedHeadFlatness against the model's own loss and the closed form on its logits, float64 -----


def tiny_gpt2(tied: bool):
    # GPT-2 rather than Llama: Llama's RMSNorm computes in float32 even in a float64 model, which rounds the
    # gradients behind it to float32 precision on both paths alike
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=40, n_positions=16, n_embd=8, n_layer=1, n_head=2, attn_implementation="eager",
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tied)  # fmt: skip
    return GPT2LMHeadModel(cfg).double().train()


def batches():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 40, (3, 9), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt (assistant-/completion-only masks arrive like this)
    labels[2, 6:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    padded = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    # two sequences packed in one row, padding-free: position_ids restart, the second's first label is -100
    packed_ids = torch.randint(0, 40, (1, 11), generator=g)
    packed_labels = packed_ids.clone()
    packed_labels[0, 5] = -100
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5]])
    packed = {"input_ids": packed_ids, "position_ids": position_ids, "labels": packed_labels}
    return {"padded": padded, "packed": packed}


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("head", ["untied-trained", "untied-frozen", "tied"])
@pytest.mark.parametrize("items", [None, 23], ids=["mean", "num_items"])
@pytest.mark.parametrize("fraction", [1.0, 0.5], ids=["all-rows", "sample"])
def test_on_a_model_the_fused_loss_kappa_and_gradients_equal_the_models_loss_and_the_closed_form(layout, head, items,
                                                                                                 fraction):  # fmt: skip
    from fam_hf import relative_flatness
    from fam_hf.flatness import FusedHeadFlatness

    batch = batches()[layout]
    lam = 0.7
    results = {}
    for fused in (True, False):
        model = tiny_gpt2(tied=head == "tied")
        if head == "untied-frozen":
            model.lm_head.weight.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        generator = torch.Generator().manual_seed(11)
        if fused:
            flat = FusedHeadFlatness(model, token_fraction=fraction, generator=generator, draw_over_grid=True)
            forward = {k: v for k, v in batch.items() if k != "labels"}
            with flat.record(batch, num_items_in_batch=items) as recording:
                model(**forward, **flat.forward_kwargs())
            loss = recording.fused(lam).loss
            kappa = recording.result(loss).value
            objective = loss  # carries the gradient of L + λκ
        else:
            extra = {} if items is None else {"num_items_in_batch": items}
            kappa = relative_flatness(model, {**batch, **extra}, differentiable=True, token_fraction=fraction,
                                      generator=generator).value  # fmt: skip
            # the model's loss, in float64 (transformers' loss function casts the logits to float32)
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            total = F.cross_entropy(logits.reshape(-1, 40), labels.reshape(-1), ignore_index=-100, reduction="sum")
            loss = total / (int((labels != -100).sum()) if items is None else items)
            objective = loss + lam * kappa
        results[fused] = loss.detach(), kappa.detach(), torch.autograd.grad(objective, params)
    (loss, kappa, grads), (want_loss, want_kappa, want_grads) = results[True], results[False]
    close(loss, want_loss)
    close(kappa, want_kappa)
    for a, t in zip(grads, want_grads, strict=True):
        close(a, t)

"""fam_hf's Hessian, Gauss–Newton and trace against an independent, well-kept library: curvlinops (Dangel et al.),
in float64 on small models, with the conventions matched (the mean over the counted tokens, ``-100`` excluded).

curvlinops declares backpack-for-pytorch, which pulls torchvision, which replaces the pinned CPU torch with a CUDA
build; curvlinops itself never imports either. ``make install-oracle`` (part of ``make test``) installs it and its
imported dependencies with ``--no-deps``, pinned. Without it these tests are skipped, saying so.

What fam_hf keeps of its own and why: its Hessian operator (``LossHessian``), because it takes a transformers batch
as the model's own loss sees it (``num_items_in_batch``, the model's own label shift and masking), a layer's
*effective* weight (LoRA ``W0 + s·BA``, GPT-2's transposed ``Conv1D``, the head's own use of a tied matrix) and the
kernels with a double backward; curvlinops' operators take ``(X, y)`` batches and a loss criterion on parameters.
Its estimators (Hutchinson, Hutch++, SLQ) are kept too, because they stream the probes in blocks at 10⁸ variables
(curvlinops' ``hutchinson_trace`` draws its ``(n, num_matvecs)`` probes at once) and report standard errors.
"""

from __future__ import annotations

import pytest
import torch
from models import tiny_gpt2
from test_any_model import DictMLP, make
from torch import nn

from fam_hf import HeadLoss
from fam_hf.measures import LossHessian, gauss_newton_trace, hessian_trace

curvlinops = pytest.importorskip("curvlinops", reason="curvlinops is not installed: make install-oracle")

F64 = torch.float64


def dense(operator, n):
    return operator @ torch.eye(n, dtype=F64)


def mlp():
    model, batch = make(n=16)
    dict_model = DictMLP().double().eval()
    dict_model.load_state_dict(model.state_dict())
    return model, dict_model, batch


def test_hessian_and_gauss_newton_of_an_mlp_agree_with_curvlinops():
    model, dict_model, batch = mlp()
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    data = [(batch["x"], batch["y"])]
    hessian = dense(curvlinops.HessianLinearOperator(model, nn.CrossEntropyLoss(), params, data), n)
    ours = LossHessian(dict_model, batch, None).dense()
    torch.testing.assert_close(ours, (hessian + hessian.T) / 2, rtol=1e-10, atol=1e-13)
    ggn = dense(curvlinops.GGNLinearOperator(model, nn.CrossEntropyLoss(), params, data), n)
    spec = HeadLoss("cross_entropy", head="fc3", labels="y")
    gn = gauss_newton_trace(dict_model, batch, None, method="exact", head_loss=spec)
    torch.testing.assert_close(gn.value, torch.trace(ggn), rtol=1e-10, atol=0)
    torch.testing.assert_close(hessian_trace(dict_model, batch, None, method="exact").value, torch.trace(hessian))
    # the trace estimators on curvlinops' operator: ours within 3 standard errors of the exact trace
    estimate = hessian_trace(dict_model, batch, None, probes=400)
    assert abs(float(estimate.value - torch.trace(hessian))) <= 3 * float(estimate.std_error)


def test_hessian_of_a_tied_lm_head_under_ignored_tokens_agrees_with_curvlinops():
    model = tiny_gpt2()
    ids = torch.randint(0, 24, (3, 6), generator=torch.Generator().manual_seed(0))
    labels = ids.masked_fill(torch.rand(3, 6, generator=torch.Generator().manual_seed(1)) < 0.3, -100)
    batch = {"input_ids": ids, "labels": labels}
    vocab = model.config.vocab_size

    class Logits(nn.Module):  # position t scores token t + 1, as the model's own loss does
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids).logits[:, :-1].reshape(-1, vocab)

    logits = Logits()

    weight = model.lm_head.weight  # tied to the input embedding: both uses, as curvlinops differentiates it
    data = [(ids, labels[:, 1:].reshape(-1))]
    reference = dense(curvlinops.HessianLinearOperator(logits, nn.CrossEntropyLoss(), [weight], data), weight.numel())
    reference = (reference + reference.T) / 2

    def loss_fn(model, batch):  # the same loss in float64 (transformers' own casts the logits to float32)
        return nn.functional.cross_entropy(logits(batch["input_ids"]), batch["labels"][:, 1:].reshape(-1))

    torch.testing.assert_close(LossHessian(model, batch, [weight], loss_fn=loss_fn).dense(), reference,
                               rtol=1e-10, atol=1e-12)  # fmt: skip
    own_loss = LossHessian(model, batch, [weight]).dense()  # the model's own loss: float32 inside
    torch.testing.assert_close(own_loss, reference, rtol=1e-5, atol=1e-6 * float(reference.abs().max()))

"""κ and the measures on plain torch models: a model that returns logits or a dict, a ``loss_fn``, the closed form
and Gauss–Newton on an output layer the user names (``head_loss=``), ``estimator="auto"``'s choice, and the
reference code's neuron-wise feature normalisation; each against brute force in float64 (tests/brute_force.py)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from brute_force import kappa_from_loss_fn
from torch import nn
from torch.autograd.functional import jacobian
from torch.nn import functional as F

from fam_hf import HeadLoss, relative_flatness
from fam_hf.measures import gauss_newton_trace, hessian_trace, top_eigenvalues

F64 = torch.float64


class MLP(nn.Module):
    """Returns its logits, as a plain torch classifier does."""

    def __init__(self, activation=torch.tanh, widths=(6, 8, 5, 3)):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = (nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.activation = activation

    def forward(self, x):
        return self.fc3(self.activation(self.fc2(self.activation(self.fc1(x)))))


class DictMLP(MLP):
    """Takes the batch as keyword arguments and returns a plain dict with its loss and logits."""

    def forward(self, x, y):
        logits = super().forward(x)
        return {"loss": F.cross_entropy(logits, y), "logits": logits}


def loss_fn(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"])


def make(seed=0, activation=torch.tanh, n=12):
    torch.manual_seed(seed)
    model = MLP(activation).double().eval()
    batch = {"x": torch.randn(n, 6, dtype=F64), "y": torch.randint(0, 3, (n,))}
    return model, batch


CE = HeadLoss("cross_entropy", head="fc3", labels="y")


def brute_kappa(model, batch, name):
    """κ from ``torch.autograd.functional.hessian`` of the loss as a function of the layer's weight."""
    weight = getattr(model, name).weight

    def loss_of(e):
        return loss_fn(_Swapped(model, {f"{name}.weight": weight.detach() + e}), batch)

    return kappa_from_loss_fn(loss_of, weight.detach()).detach()


def brute_gauss_newton(model, batch, name):
    """``G = Σ_t J_tᵀ ∇²ℓ_t J_t`` w.r.t. the layer's weight, ``(d, m, d, m)``: ``J`` the Jacobian of the logits,
    ``∇²ℓ_t = (diag p_t − p_t p_tᵀ)/N`` for the mean cross-entropy."""
    weight = getattr(model, name).weight.detach()
    d, m = weight.shape

    def logits_of(e):
        return _Swapped(model, {f"{name}.weight": weight + e})(batch["x"])

    jac = jacobian(logits_of, torch.zeros_like(weight)).reshape(batch["x"].shape[0], -1, d * m)  # (N, C, d·m)
    p = torch.softmax(logits_of(torch.zeros_like(weight)), -1)
    curvature = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / p.shape[0]  # (N, C, C)
    return torch.einsum("nci,ncd,ndj->ij", jac, curvature, jac).reshape(d, m, d, m).detach()


def brute_gauss_newton_kappa(model, batch, name):
    """κ with the layer Hessian replaced by the Gauss–Newton matrix."""
    weight, g = getattr(model, name).weight.detach(), brute_gauss_newton(model, batch, name)
    return ((weight @ weight.T) * torch.einsum("aibi->ab", g)).sum()


class _Swapped:
    def __init__(self, model, params):
        self.model, self.params = model, params

    def __call__(self, *args):
        return torch.func.functional_call(self.model, self.params, args)


def assert_within_stderr(result, truth, k=4.0):
    assert abs(float(result.value) - float(truth)) <= k * float(result.std_error), (result, truth)


# -- a model that returns logits, measured through loss_fn ----------------------------------------------------------


@pytest.mark.parametrize("estimator", ["closed_form", "gauss_newton", "exact"])
def test_output_layer_named_by_head_loss_matches_brute_force(estimator):
    model, batch = make()
    truth = brute_kappa(model, batch, "fc3")
    result = relative_flatness(model, batch, "fc3", estimator, loss_fn=loss_fn, head_loss=CE, probes=400)
    assert result.estimator == estimator
    if estimator == "gauss_newton":  # on the output layer the Gauss–Newton matrix is the Hessian
        assert_within_stderr(result, truth)
    else:
        torch.testing.assert_close(result.value, truth, rtol=1e-10, atol=0)


def test_head_loss_spec_by_name_when_the_layer_measured_is_the_output():
    model, batch = make()
    batch = {"x": batch["x"], "labels": batch["y"]}
    result = relative_flatness(
        model, batch, "fc3", "closed_form", head_loss="cross_entropy",
        loss_fn=lambda model, batch: F.cross_entropy(model(batch["x"]), batch["labels"]),
    )  # fmt: skip
    torch.testing.assert_close(result.value, brute_kappa(model, {"x": batch["x"], "y": batch["labels"]}, "fc3"))


@pytest.mark.parametrize("loss_type", ["mse", "bce"])
def test_closed_form_of_mse_and_bce_heads_of_a_plain_model(loss_type):
    model, batch = make()
    batch["y"] = torch.rand(12, 3, dtype=F64)  # regression targets / probabilities
    functional = F.mse_loss if loss_type == "mse" else F.binary_cross_entropy_with_logits

    def own_loss(model, batch):
        return functional(model(batch["x"]), batch["y"])

    weight = model.fc3.weight.detach()
    truth = kappa_from_loss_fn(lambda e: own_loss(_Swapped(model, {"fc3.weight": weight + e}), batch), weight)
    spec = HeadLoss(loss_type, head="fc3", labels="y")
    result = relative_flatness(model, batch, "fc3", "closed_form", loss_fn=own_loss, head_loss=spec)
    torch.testing.assert_close(result.value, truth, rtol=1e-10, atol=0)


def test_gauss_newton_of_a_body_layer_against_brute_force():
    model, batch = make()
    truth = brute_gauss_newton_kappa(model, batch, "fc2")
    result = relative_flatness(model, batch, "fc2", "gauss_newton", loss_fn=loss_fn, head_loss=CE, probes=300)
    assert_within_stderr(result, truth)
    hessian_kappa = brute_kappa(model, batch, "fc2")  # tanh: the Hessian has a residual term, 7% of it here
    assert abs(float(truth / hessian_kappa) - 1) > 0.05


def test_probe_and_exact_through_loss_fn_on_a_body_layer():
    model, batch = make()
    truth = brute_kappa(model, batch, "fc2")
    exact = relative_flatness(model, batch, "fc2", "exact", loss_fn=loss_fn)
    torch.testing.assert_close(exact.value, truth, rtol=1e-10, atol=0)
    assert_within_stderr(relative_flatness(model, batch, "fc2", "probe", loss_fn=loss_fn, probes=300), truth)


def test_a_model_returning_a_dict_is_measured_by_its_loss_as_a_transformers_model_is():
    model, batch = make()
    dict_model = DictMLP().double().eval()
    dict_model.load_state_dict(model.state_dict())
    truth = brute_kappa(model, batch, "fc2")
    torch.testing.assert_close(relative_flatness(dict_model, batch, "fc2", "exact").value, truth, rtol=1e-10, atol=0)
    by_loss_fn = hessian_trace(model, batch, "fc2", method="exact", loss_fn=loss_fn).value
    torch.testing.assert_close(hessian_trace(dict_model, batch, "fc2", method="exact").value, by_loss_fn)
    torch.testing.assert_close(
        top_eigenvalues(dict_model, batch, "fc2").values, top_eigenvalues(model, batch, "fc2", loss_fn=loss_fn).values
    )
    # the dict's logits are the output of fc3: head_loss names it, and no loss_fn is needed
    result = relative_flatness(dict_model, batch, "fc3", "closed_form", head_loss=CE)
    torch.testing.assert_close(result.value, brute_kappa(model, batch, "fc3"), rtol=1e-10, atol=0)


# -- errors that say what is missing --------------------------------------------------------------------------------


def test_a_model_returning_logits_without_loss_fn_is_told_to_pass_one():
    model, batch = make()
    with pytest.raises(TypeError, match=r"MLP\(\*\*batch\) failed .* loss_fn=lambda model, batch"):
        relative_flatness(model, batch, "fc2", "probe")
    with pytest.raises(TypeError, match=r"MLP\(\*\*batch\) failed .* loss_fn="):
        hessian_trace(model, batch, "fc2")

    class TakesX(MLP):
        def forward(self, x, **ignored):
            return super().forward(x)

    takes_x = TakesX().double()
    with pytest.raises(ValueError, match=r"TakesX returned a tensor of shape \(12, 3\) and no loss: .*loss_fn="):
        hessian_trace(takes_x, batch, "fc2")
    with pytest.raises(ValueError, match=r"no loss to differentiate: .*loss_fn="):
        relative_flatness(takes_x, batch, "fc2", "probe")


def test_closed_form_refusals_name_head_loss():
    model, batch = make()
    with pytest.raises(ValueError, match=r"'fc3' is not the model's output head .*head_loss=HeadLoss\('cross_entropy', head='fc3'"):
        relative_flatness(model, batch, "fc3", "closed_form")
    with pytest.raises(ValueError, match=r"loss is computed outside the model .*head_loss=HeadLoss"):
        relative_flatness(model, batch, "fc3", "closed_form", loss_fn=loss_fn)
    with pytest.raises(ValueError, match=r"'fc2' is not the output layer that head_loss names \('fc3'\)"):
        relative_flatness(model, batch, "fc2", "closed_form", loss_fn=loss_fn, head_loss=CE)
    with pytest.raises(ValueError, match=r"gauss_newton.* head_loss=HeadLoss\('cross_entropy'.*head=NAME"):
        relative_flatness(model, batch, "fc2", "gauss_newton", loss_fn=loss_fn)
    with pytest.raises(ValueError, match=r"the batch has no 'labels' \(its keys: 'x', 'y'\)"):
        relative_flatness(model, batch, "fc3", "closed_form", loss_fn=loss_fn, head_loss="cross_entropy")
    with pytest.raises(ValueError, match="loss_type='hinge' is not one of"):
        HeadLoss("hinge")


def test_a_head_loss_that_does_not_describe_the_loss_is_refused():
    model, batch = make()

    def summed(model, batch):
        return F.cross_entropy(model(batch["x"]), batch["y"], reduction="sum")

    with pytest.raises(ValueError, match=r"head_loss says the loss is the mean cross_entropy of the output of 'fc3'"):
        relative_flatness(model, batch, "fc3", "closed_form", loss_fn=summed, head_loss=CE)
    with pytest.raises(ValueError, match="head_loss says"):  # fc2's output is not the logits
        relative_flatness(model, batch, "fc2", "gauss_newton", loss_fn=loss_fn, head_loss=HeadLoss("cross_entropy", labels="y"))


# -- estimator="auto" -----------------------------------------------------------------------------------------------


def test_auto_measures_small_layers_exactly_and_says_so(caplog):
    model, batch = make()
    with caplog.at_level(logging.INFO, logger="fam_hf.flatness.registry"):
        small = relative_flatness(model, batch, "fc2", loss_fn=loss_fn)
        head = relative_flatness(model, batch, "fc3", loss_fn=loss_fn, head_loss=CE)
    assert (small.estimator, head.estimator) == ("exact", "closed_form")
    assert "chose 'exact' for κ of 'fc2' (5×8 weights" in caplog.text
    torch.testing.assert_close(small.value, brute_kappa(model, batch, "fc2"), rtol=1e-10, atol=0)
    torch.manual_seed(0)
    wide = MLP(widths=(6, 40, 30, 3)).double()  # fc2: 1200 weights, more than "auto" takes exactly
    assert relative_flatness(wide, batch, "fc2", loss_fn=loss_fn).estimator == "probe"
    assert relative_flatness(wide, batch, "fc2", loss_fn=loss_fn, max_exact_entries=100).estimator == "probe"


# -- neuron-wise feature normalisation ------------------------------------------------------------------------------


def rescale_neurons(model, layer, factors):
    """Multiply the output neurons of ``layer`` by ``factors`` and divide the next layer's columns by them: the same
    function for a ReLU network."""
    scaled = copy.deepcopy(model)
    nxt = {"fc1": "fc2", "fc2": "fc3"}[layer]
    with torch.no_grad():
        getattr(scaled, layer).weight.mul_(factors[:, None])
        getattr(scaled, layer).bias.mul_(factors)
        getattr(scaled, nxt).weight.div_(factors[None, :])
    return scaled


def normalised_by_hand(model, batch, layer):
    """The reference code's procedure: divide the feeding layer's neurons by σ, multiply the layer's columns by σ."""
    prev = {"fc2": "fc1", "fc3": "fc2"}[layer]
    features = []
    handle = getattr(model, layer).register_forward_hook(lambda m, i, o: features.append(i[0].detach()))
    loss_fn(model, batch)
    handle.remove()
    sigma = features[0].std(0, correction=0)
    dead = sigma == 0  # a dead ReLU: its column of the layer goes to 0 (the reference code divides by 0 there)
    scaled = rescale_neurons(model, prev, torch.where(dead, 1.0, 1 / sigma))
    with torch.no_grad():
        getattr(scaled, layer).weight[:, dead] = 0
    return scaled


@pytest.mark.parametrize("layer,estimator", [("fc2", "exact"), ("fc2", "probe"), ("fc3", "closed_form")])
def test_normalised_features_equal_kappa_of_the_normalised_network(layer, estimator):
    model, batch = make(activation=torch.relu, n=16)
    truth = brute_kappa(normalised_by_hand(model, batch, layer), batch, layer)
    result = relative_flatness(
        model, batch, layer, estimator, loss_fn=loss_fn, head_loss=CE, normalize_features=True, probes=300
    )
    if estimator == "probe":
        assert_within_stderr(result, truth)
    else:
        torch.testing.assert_close(result.value, truth, rtol=1e-9, atol=0)


def test_normalised_kappa_is_invariant_to_rescaling_the_neurons_that_feed_the_layer():
    model, batch = make(activation=torch.relu, n=16)
    factors = torch.tensor([0.1, 7.0, 1.0, 3.0, 0.5], dtype=F64)
    scaled = rescale_neurons(model, "fc2", factors)  # fc3's input features, one by one
    torch.testing.assert_close(scaled(batch["x"]), model(batch["x"]), rtol=1e-12, atol=1e-13)

    def kappa(m, normalize):
        return relative_flatness(m, batch, "fc3", loss_fn=loss_fn, head_loss=CE, normalize_features=normalize).value

    torch.testing.assert_close(kappa(scaled, True), kappa(model, True), rtol=1e-9, atol=0)
    assert abs(float(kappa(scaled, False) / kappa(model, False)) - 1) > 0.5  # plain κ moves


# -- the Gauss–Newton trace -------------------------------------------------------------------------------------------


def test_gauss_newton_trace_against_brute_force_and_the_hessian_on_a_head():
    model, batch = make()
    dict_model = DictMLP().double().eval()
    dict_model.load_state_dict(model.state_dict())
    spec = HeadLoss("cross_entropy", head="fc3", labels="y")
    truth = torch.einsum("aiai->", brute_gauss_newton(model, batch, "fc2"))
    exact = gauss_newton_trace(dict_model, batch, "fc2", method="exact", head_loss=spec)
    assert exact.method == "gauss_newton_exact" and exact.matvecs == 40
    torch.testing.assert_close(exact.value, truth, rtol=1e-10, atol=0)
    stochastic = gauss_newton_trace(dict_model, batch, "fc2", probes=400, head_loss=spec, block=7)
    assert_within_stderr(stochastic, truth)
    hessian = hessian_trace(dict_model, batch, "fc2", method="exact").value  # tanh: G ≠ H inside the network
    assert abs(float(hessian / truth) - 1) > 0.01
    head = gauss_newton_trace(dict_model, batch, "fc3", method="exact", head_loss=spec)  # on the head G = H
    torch.testing.assert_close(head.value, hessian_trace(dict_model, batch, "fc3", method="exact").value)
    everything = gauss_newton_trace(dict_model, batch, None, probes=8, head_loss=spec)  # parameters: functional_call
    assert everything.dim == sum(p.numel() for p in model.parameters()) and everything.value > 0
    with pytest.raises(ValueError, match="name the output layer and its loss: head_loss=HeadLoss"):
        gauss_newton_trace(dict_model, batch, "fc2")


def test_gauss_newton_trace_of_a_transformers_lm_head_is_its_hessian_trace():
    from models import tiny_gpt2

    model = tiny_gpt2()
    ids = torch.randint(0, 24, (3, 6))
    batch = {"input_ids": ids, "labels": ids.masked_fill(torch.rand(3, 6) < 0.3, -100)}
    torch.testing.assert_close(
        gauss_newton_trace(model, batch, "lm_head", method="exact").value,
        hessian_trace(model, batch, "lm_head", method="exact").value,
        rtol=1e-6,  # transformers' causal-LM loss casts the logits to float32 (.float()): the Hessian's side is
        atol=0,  # float32-accurate, the Gauss–Newton side (from the float64 logits) is not
    )

"""lab.scale_invariance: seed 003 Lemma 1 measured on BatchNorm models (float64), and the probe's purity."""

import math

import pytest
import torch
from torch import nn

from optiscope.lab.scale_invariance import parameter_groups, scale_invariance_report


def _bn_mlp(eps=1e-30, seed=0):  # torch rejects eps = 0 in training; 1e-30 is exact in float64
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, eps=eps), nn.ReLU(),
                          nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8, eps=eps, affine=False), nn.ReLU(),
                          nn.Linear(8, 3)).double()
    with torch.no_grad():  # with beta = 0, ReLU's homogeneity would make gamma scale-invariant too
        model[1].bias.copy_(torch.randn(8, dtype=torch.float64))
    return model


def _data(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_bn_fed_weights_satisfy_lemma_and_others_do_not():
    model = _bn_mlp()
    rep = scale_invariance_report(model, nn.functional.cross_entropy, _data(), scales=(0.3, 2.0, 7.0), tol=1e-10)
    for name in ("0.weight", "3.weight"):
        g = rep[name]
        assert g.invariant and g.depends
        assert g.loss_rel_change < 1e-12
        assert abs(g.cosine) < 1e-10  # <grad, theta> = 0
        assert g.grad_ratio_error < 1e-10  # grad(c theta) = grad(theta) / c
    # a bias feeding BatchNorm: the loss does not depend on it at all
    assert rep["0.bias"].invariant and not rep["0.bias"].depends
    # BN affine parameters and the final layer are not scale-invariant
    for name in ("1.weight", "1.bias", "6.weight", "6.bias"):
        g = rep[name]
        assert not g.invariant and g.loss_rel_change > 1e-4
    assert rep["6.weight"].grad_ratio_error > 0.1
    assert set(rep.invariant_params()) == {"0.weight", "3.weight"}
    assert "0.bias" in rep.invariant_params(include_independent=True)


def test_inner_product_matches_autograd_and_gradients_are_exact():
    model = _bn_mlp(eps=1e-5)
    X, y = _data()
    rep = scale_invariance_report(model, nn.functional.cross_entropy, (X, y), train_mode=True)
    model.zero_grad()
    loss = nn.functional.cross_entropy(model(X), y)
    loss.backward()
    w = dict(model.named_parameters())["6.weight"]
    assert rep["6.weight"].inner_product == pytest.approx(float((w.grad * w.detach()).sum()), rel=1e-10)
    assert rep.loss == pytest.approx(float(loss.detach()), rel=1e-12)
    # with BN eps > 0 the invariance is approximate but far inside the default tolerance
    assert rep["3.weight"].invariant and 0 < rep["3.weight"].loss_rel_change < 1e-4


def test_running_statistics_break_invariance_in_eval_mode():
    model = _bn_mlp(eps=1e-5)
    X, y = _data()
    model.train()
    for _ in range(3):
        model(X)  # populate running statistics
    rep = scale_invariance_report(model, nn.functional.cross_entropy, (X, y), train_mode=False)
    assert not rep["3.weight"].invariant


def test_probe_is_pure():
    model = _bn_mlp(eps=1e-5)
    model.train()
    X, y = _data()
    before_p = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    scale_invariance_report(model, nn.functional.cross_entropy, [(X[:16], y[:16]), (X[16:], y[16:])])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_p[k]), k
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert model.training


def test_module_groups_and_iterable_data_weighting():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randn(10, 2, generator=g, dtype=torch.float64)
    assert parameter_groups(model, "module") == {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}
    rep = scale_invariance_report(model, nn.functional.mse_loss, [(X[:3], y[:3]), (X[3:], y[3:])], groups="module")
    assert rep.loss == pytest.approx(float(nn.functional.mse_loss(model(X), y).detach()), rel=1e-12)
    assert rep.invariant_groups() == []  # no normalisation: nothing is scale-invariant
    assert all(math.isfinite(gr.cosine) for gr in rep.groups)


def test_bad_input():
    model = _bn_mlp()
    data = _data()
    with pytest.raises(ValueError, match="scales"):
        scale_invariance_report(model, nn.functional.cross_entropy, data, scales=(1.0,))
    with pytest.raises(ValueError, match="unknown or frozen"):
        scale_invariance_report(model, nn.functional.cross_entropy, data, groups={"a": ["nope"]})
    with pytest.raises(ValueError, match="groups must be"):
        parameter_groups(model, "layer")
    with pytest.raises(ValueError, match="batch"):
        scale_invariance_report(model, nn.functional.cross_entropy, [1, 2, 3])


def test_perturbations_expose_accidental_invariance_at_init():
    # zoo-style init: BN gamma = 1, beta = 0 and zero biases. gamma -> ReLU -> Linear -> BN is invariant while
    # beta = 0 (ReLU is positively homogeneous), and a zero final bias is unchanged by rescaling.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, eps=1e-30), nn.ReLU(), nn.Linear(8, 8),
                          nn.BatchNorm1d(8, eps=1e-30), nn.ReLU(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        model[6].bias.zero_()
    data = _data()
    at_init = scale_invariance_report(model, nn.functional.cross_entropy, data, tol=1e-10)
    assert at_init["1.weight"].invariant  # accidental
    assert not at_init["6.bias"].invariant  # zero tensor: vacuous test, never invariant
    robust = scale_invariance_report(model, nn.functional.cross_entropy, data, tol=1e-10, perturbations=2)
    assert not robust["1.weight"].invariant and not robust["6.bias"].invariant
    assert robust["0.weight"].invariant and robust["3.weight"].invariant and robust["0.bias"].invariant
    assert robust["1.weight"].cosine == at_init["1.weight"].cosine  # point measurements are at theta itself
    with pytest.raises(ValueError, match="perturbations"):
        scale_invariance_report(model, nn.functional.cross_entropy, data, perturbations=-1)

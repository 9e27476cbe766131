"""optim.flows: modified flows of Adam/RMSProp against direct simulation, dense Hessians and hand-computed steps."""

import math

import numpy as np
import pytest
import torch

from optiscope.optim.flows import (
    AdamHyper,
    NotTwiceDifferentiableError,
    ParamSpace,
    _Oracle,
    adam_iterates,
    full_batch_correction,
    full_batch_field,
    integrate_flow,
    minibatch_field,
    model_loss,
)
from optiscope.theory.adam import correction_coefficient

Y = 1.5
P0 = {"t": torch.tensor([2.8, 3.5], dtype=torch.float64)}


def bilinear(p):
    return 0.5 * (Y - p["t"][0] * p["t"][1]) ** 2


def max_err(a, b):
    return float((a.thetas - b.thetas).abs().max())


def test_adam_iterates_match_hand_computed_steps():
    hp = AdamHyper(h=0.1, beta1=0.5, beta2=0.8, eps=1e-2)
    tr = adam_iterates(bilinear, P0, hp, 2)
    th = np.array([2.8, 3.5])
    m = v = np.zeros(2)
    for n in range(2):
        r = Y - th[0] * th[1]
        g = np.array([-r * th[1], -r * th[0]])
        m = 0.5 * m + 0.5 * g
        v = 0.8 * v + 0.2 * g * g
        th = th - 0.1 * (m / (1 - 0.5 ** (n + 1))) / np.sqrt(v / (1 - 0.8 ** (n + 1)) + 1e-2)
        np.testing.assert_allclose(tr.thetas[n + 1].numpy(), th, rtol=1e-12)


@pytest.mark.parametrize("hp_kw,hs", [
    (dict(beta1=0.5, beta2=0.8, eps=1e-2), (4e-3, 2e-3)),
    (dict(beta1=0.5, beta2=0.8, eps=0.1, eps_inside_sqrt=False), (4e-3, 2e-3)),
    (dict(beta1=0.8, beta2=0.6, eps=1e-2, bias_correction=False), (2e-3, 1e-3)),  # asymptotic only for h <= 2e-3
    (dict(beta1=0.0, beta2=0.7, eps=1e-2, bias_correction=False), (4e-3, 2e-3)),   # RMSProp
])
def test_error_orders_on_bilinear(hp_kw, hs):
    """max_n |theta_n - theta~(nh)|: first-order flow O(h), second-order flow O(h^2) (001 Thm. 3.1, spec 1b)."""
    T = 0.2
    errs = {1: [], 2: []}
    for h in hs:
        hp = AdamHyper(h=h, **hp_kw)
        N = int(round(T / h))
        adam = adam_iterates(bilinear, P0, hp, N)
        for order in (1, 2):
            errs[order].append(max_err(adam, integrate_flow(bilinear, P0, hp, N, order=order, substeps=1)))
    r1 = errs[1][0] / errs[1][1]
    r2 = errs[2][0] / errs[2][1]
    assert 1.6 < r1 < 2.4, errs
    assert 3.2 < r2 < 4.8, errs
    assert errs[2][1] < 0.05 * errs[1][1]


def test_bilinear_numbers_match_spec_check():
    """spec 1b: beta=0.5, rho=0.8, eps=1e-2, T=0.5, h=4e-3: 6.99e-3 (first order) vs 2.21e-5 (second order)."""
    hp = AdamHyper(h=4e-3, beta1=0.5, beta2=0.8, eps=1e-2)
    adam = adam_iterates(bilinear, P0, hp, 125)
    e1 = max_err(adam, integrate_flow(bilinear, P0, hp, 125, order=1, substeps=1))
    e2 = max_err(adam, integrate_flow(bilinear, P0, hp, 125, order=2, substeps=1))
    assert e1 == pytest.approx(6.99e-3, rel=0.02)
    assert e2 == pytest.approx(2.21e-5, rel=0.03)


def _mlp_problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = torch.randn(40, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.GELU(), torch.nn.Linear(4, 2)).double()
    return net, X, y


@pytest.mark.parametrize("inside", [True, False])
def test_full_batch_field_against_dense_hessian(inside):
    net, X, y = _mlp_problem()
    f, params = model_loss(net, torch.nn.functional.mse_loss, (X, y))
    space = ParamSpace(params)
    theta = space.flatten(params)
    hp = AdamHyper(h=0.05, beta1=0.9, beta2=0.99, eps=1e-3, eps_inside_sqrt=inside)
    F = lambda x: f(space.unflatten(x))
    g = torch.func.grad(F)(theta)
    H = torch.func.hessian(F)(theta)
    r = torch.sqrt(g * g + hp.eps) if inside else g.abs() + hp.eps
    P = g / r
    for n in (0, 3, None):
        kappa = torch.as_tensor(correction_coefficient(g.numpy(), hp.h, hp.beta1, hp.beta2, hp.eps, n, inside))
        expect = -(g + kappa * (H @ P)) / r
        got = full_batch_field(f, theta, hp, n, order=2, exact=n is not None, space=space)
        torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(full_batch_field(f, theta, hp, 0, order=1, space=space), -P)


def test_minibatch_field_with_identical_batches_equals_full_batch_closed_form():
    space = ParamSpace(P0)
    theta = space.flatten(P0) + torch.tensor([0.1, -0.2], dtype=torch.float64)
    for hp in (AdamHyper(h=0.01, beta1=0.7, beta2=0.9, eps=1e-2),
               AdamHyper(h=0.01, beta1=0.7, beta2=0.9, eps=1e-2, eps_inside_sqrt=False),
               AdamHyper(h=0.01, beta1=0.7, beta2=0.9, eps=1e-2, bias_correction=False)):
        oracles = [_Oracle(bilinear, space), _Oracle(bilinear, space)]
        for n in (0, 1, 6):
            mb = minibatch_field(oracles, lambda k: k % 2, theta, hp, n, order=2, history=n)
            fb = full_batch_field(bilinear, theta, hp, n, order=2, space=space)
            torch.testing.assert_close(mb, fb, rtol=1e-10, atol=1e-13)
            # discrete (memoryless iteration) variant: -P - hQ without the 1/2 (grad P)P term
            mbd = minibatch_field(oracles, lambda k: 0, theta, hp, n, order=2, history=n, discrete=True)
            fbd = full_batch_field(bilinear, theta, hp, n, order=2, space=space, discrete=True)
            torch.testing.assert_close(mbd, fbd, rtol=1e-10, atol=1e-13)


def test_minibatch_piecewise_flow_is_second_order():
    """Three cyclic mini-batches E_k = (y_k - x_k t1 t2)^2/2 (spec 1c check): errors shrink ~h vs ~h^2."""
    xs, ys = [1.0, 0.5, 1.5], [1.5, 1.0, 2.0]
    losses = [lambda p, x=x, yk=yk: 0.5 * (yk - x * p["t"][0] * p["t"][1]) ** 2 for x, yk in zip(xs, ys)]
    e1, e2 = [], []
    for h in (4e-3, 2e-3):
        hp = AdamHyper(h=h, beta1=0.5, beta2=0.8, eps=1e-2)
        N = int(round(0.12 / h))
        adam = adam_iterates(losses, P0, hp, N)
        e1.append(max_err(adam, integrate_flow(losses, P0, hp, N, order=1, substeps=1, history=N)))
        e2.append(max_err(adam, integrate_flow(losses, P0, hp, N, order=2, substeps=1, history=N)))
    assert 3.0 < e2[0] / e2[1] < 5.0, e2
    assert e2[1] < 0.2 * e1[1]


@pytest.mark.slow
def test_minibatch_history_truncation_error_shrinks_with_K():
    """Truncating the history at K drops EMA weight 0.8^(K+1): the trajectory change shrinks geometrically."""
    xs, ys = [1.0, 0.5, 1.5], [1.5, 1.0, 2.0]
    losses = [lambda p, x=x, yk=yk: 0.5 * (yk - x * p["t"][0] * p["t"][1]) ** 2 for x, yk in zip(xs, ys)]
    hp = AdamHyper(h=2e-3, beta1=0.5, beta2=0.8, eps=1e-2)
    full = integrate_flow(losses, P0, hp, 50, order=2, substeps=1, history=50)
    d = [max_err(full, integrate_flow(losses, P0, hp, 50, order=2, substeps=1, history=K)) for K in (8, 25)]
    assert d[1] < 0.1 * d[0], d


def test_correction_term_cosine_sign_follows_one_norm_bias():
    """Small eps, beta1 < beta2: the correction anti-penalises ||grad E||_1 so it opposes g in the bilinear model."""
    anti = full_batch_correction(bilinear, P0, AdamHyper(h=1e-2, beta1=0.5, beta2=0.9, eps=1e-10))
    pen = full_batch_correction(bilinear, P0, AdamHyper(h=1e-2, beta1=0.9, beta2=0.5, eps=1e-10))
    g, H = anti["gradient"], torch.func.hessian(lambda t: bilinear({"t": t}))(P0["t"])
    one_norm_grad = H @ torch.sign(g)  # grad of ||grad E||_1
    torch.testing.assert_close(anti["correction"], 1e-2 * (0.5 / 0.5 - 0.9 / 0.1) * one_norm_grad, rtol=1e-6,
                               atol=1e-9)
    assert np.sign(anti["cosine"]) == -np.sign(pen["cosine"])
    assert anti["relative"] > 0


def test_non_twice_differentiable_loss_raises():
    f = lambda p: (p["t"].abs() ** 1.5).sum()
    with pytest.raises(NotTwiceDifferentiableError, match="not twice differentiable"):
        integrate_flow(f, {"t": torch.tensor([0.0, 1.0], dtype=torch.float64)}, AdamHyper(h=0.1), 3, order=2)


def test_divergence_is_an_outcome_not_a_crash():
    f = lambda p: -torch.log(p["t"]).sum()
    p0 = {"t": torch.tensor([0.05], dtype=torch.float64)}
    hp = AdamHyper(h=0.2, beta1=0.0, beta2=0.5, eps=1e-8)
    tr = integrate_flow(f, {"t": -p0["t"]}, hp, 5, order=1)
    assert tr.diverged_at == 0 and tr.status == "diverged at step 0"
    down = lambda p: torch.log(p["t"]).sum()
    a = adam_iterates(down, {"t": torch.tensor([0.3], dtype=torch.float64)}, hp, 10)
    assert a.diverged_at is not None and 1 <= a.diverged_at < 10 and a.status.startswith("diverged at step")
    fl = integrate_flow(down, {"t": torch.tensor([0.3], dtype=torch.float64)}, hp, 10, order=2)
    assert fl.diverged_at is not None and fl.diverged_at < 10


def test_bad_input():
    with pytest.raises(ValueError, match="eps must be > 0"):
        AdamHyper(h=1e-3, eps=0.0)
    with pytest.raises(ValueError, match="beta2"):
        AdamHyper(h=1e-3, beta2=1.0)
    with pytest.raises(ValueError, match="step size h"):
        AdamHyper(h=0.0)
    hp = AdamHyper(h=1e-2)
    with pytest.raises(ValueError, match="order"):
        integrate_flow(bilinear, P0, hp, 2, order=3)
    with pytest.raises(ValueError, match="steps"):
        integrate_flow(bilinear, P0, hp, -1)
    with pytest.raises(ValueError, match="non-finite"):
        integrate_flow(bilinear, {"t": torch.tensor([math.nan, 1.0])}, hp, 1)

"""theory.explr (seed 003) and the ExpLR scheduler: theta_t = a_t * phi_t on a scale-invariant model, float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from optiscope.optim import SGD, ExpLR
from optiscope.theory.explr import (
    equivalent_schedule,
    explr_alpha,
    exponential_lr,
    initial_momentum_buffer,
    step_decay_lrs,
)


def test_alpha_is_larger_root_and_limits():
    eta, lam, gamma = 0.1, 5e-3, 0.9
    a = explr_alpha(eta, lam, gamma)
    assert a ** 2 - (1 + gamma - lam * eta) * a + gamma == pytest.approx(0.0, abs=1e-15)
    other = gamma / a  # product of the roots is gamma
    assert other < a < 1
    assert explr_alpha(0.1, 0.01, 0.0) == pytest.approx(1 - 0.1 * 0.01, abs=1e-15)
    assert explr_alpha(1e-3, 1e-4, 0.9) == pytest.approx(1 - 1e-7 / 0.1, rel=1e-9)  # small lambda*eta limit
    assert explr_alpha(0.1, 0.0, 0.9) == 1.0


@pytest.mark.parametrize("kw,match", [
    ({"lr": 0.0, "weight_decay": 1e-3, "momentum": 0.9}, "lr"),
    ({"lr": 0.1, "weight_decay": -1.0, "momentum": 0.9}, "weight_decay"),
    ({"lr": 0.1, "weight_decay": 1e-3, "momentum": 1.0}, "momentum"),
    ({"lr": 1.0, "weight_decay": 0.5, "momentum": 0.9}, "no real alpha"),  # lambda*eta > (1 - sqrt(0.9))^2
])
def test_alpha_invalid(kw, match):
    with pytest.raises(ValueError, match=match):
        explr_alpha(**kw)


def test_recurrence_reduces_to_closed_form_for_constant_lr():
    eta, lam, gamma, T = 0.1, 5e-3, 0.9, 300
    sched = equivalent_schedule(np.full(T, eta), lam, gamma, start="exponential")
    a = explr_alpha(eta, lam, gamma)
    t = np.arange(T)
    np.testing.assert_allclose(sched.lrs, exponential_lr(eta, lam, gamma, t), rtol=1e-11)
    np.testing.assert_allclose(sched.scales, a ** np.arange(T + 1), rtol=1e-11)
    assert sched.buffer_factor == pytest.approx(-(1 - a) / (eta * a), rel=1e-12)
    theta0 = np.array([1.0, -2.0])
    np.testing.assert_allclose(initial_momentum_buffer(theta0, eta, lam, gamma), sched.initial_buffer(theta0),
                               rtol=1e-12)
    assert exponential_lr(eta, lam, gamma, 0) == pytest.approx(eta / a)


def test_step_decay_lrs_and_growth_relaxation():
    lrs = step_decay_lrs(0.1, 300, milestones=(150,), factor=0.1)
    assert lrs[149] == 0.1 and lrs[150] == pytest.approx(0.01) and len(lrs) == 300
    sched = equivalent_schedule(lrs, 5e-3, 0.9)
    ratio = sched.lrs[1:] / sched.lrs[:-1]
    # inside each constant phase the growth factor tends to alpha_I^{-2} (spec Paper 3 §3i)
    assert ratio[140] == pytest.approx(explr_alpha(0.1, 5e-3, 0.9) ** -2, rel=1e-6)
    assert ratio[298] == pytest.approx(explr_alpha(0.01, 5e-3, 0.9) ** -2, rel=1e-3)
    assert ratio[149] == pytest.approx(0.1, rel=0.05)  # the instant decay eta_I / eta_{I-1}
    with pytest.raises(ValueError, match="milestones"):
        step_decay_lrs(0.1, 10, milestones=(0,))


def test_theory_against_direct_simulation_of_both_recursions():
    """Scale-invariant quadratic-over-norm loss, simulated in numpy: theta_t = a_t phi_t for step decay."""
    rng = np.random.default_rng(0)
    M = rng.standard_normal((5, 5))
    M = M @ M.T

    def grad(x):  # L(x) = x^T M x / x^T x, scale-invariant
        n2 = x @ x
        return 2 * (M @ x) / n2 - 2 * (x @ M @ x) * x / n2 ** 2

    lam, gamma = 5e-3, 0.9
    lrs = step_decay_lrs(0.1, 300, (100, 200), 0.1)
    for start in ("exponential", "zero_buffer"):
        sched = equivalent_schedule(lrs, lam, gamma, start=start)
        theta = rng.standard_normal(5)
        phi, v, w = theta.copy(), np.zeros(5), sched.initial_buffer(theta.copy())
        for t in range(300):
            v = gamma * v + grad(theta) + lam * theta
            theta = theta - lrs[t] * v
            w = gamma * w + grad(phi)
            phi = phi - sched.lrs[t] * w
            assert np.linalg.norm(theta - sched.scales[t + 1] * phi) <= 1e-10 * np.linalg.norm(theta)


class ScaleInvariantNet(torch.nn.Module):
    """x -> LN(W1 x) -> tanh -> LN(W2 h) -> fixed readout; LN without eps or affine, so exactly scale-invariant."""

    def __init__(self, gen: torch.Generator):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(8, 4, generator=gen, dtype=torch.float64))
        self.w2 = torch.nn.Parameter(torch.randn(6, 8, generator=gen, dtype=torch.float64))
        self.register_buffer("readout", torch.randn(3, 6, generator=gen, dtype=torch.float64))

    @staticmethod
    def norm(z):
        z = z - z.mean(-1, keepdim=True)
        return z / z.pow(2).mean(-1, keepdim=True).sqrt()

    def forward(self, x):
        h = torch.tanh(self.norm(x @ self.w1.T))
        return self.norm(h @ self.w2.T) @ self.readout.T


@pytest.mark.parametrize("schedule", ["constant", "step_decay"])
def test_explr_scheduler_equivalence_300_steps_float64(schedule):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(64, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=gen)
    batches = [torch.randperm(64, generator=gen)[:16] for _ in range(300)]
    base = ScaleInvariantNet(torch.Generator().manual_seed(1))
    wd_net = ScaleInvariantNet(torch.Generator().manual_seed(1))
    exp_net = ScaleInvariantNet(torch.Generator().manual_seed(1))
    lr, lam, gamma = 0.1, 5e-3, 0.9
    opt_wd = SGD(wd_net.parameters(), lr=lr, momentum=gamma, weight_decay=lam)
    opt_exp = SGD(exp_net.parameters(), lr=lr, momentum=gamma)
    if schedule == "constant":
        sch_wd = None
        sch_exp = ExpLR(opt_exp, weight_decay=lam)
    else:
        sch_wd = torch.optim.lr_scheduler.MultiStepLR(opt_wd, milestones=[150], gamma=0.1)
        sch_exp = ExpLR.step_decay(opt_exp, weight_decay=lam, total_steps=300, milestones=(150,), factor=0.1)
    loss_fn = torch.nn.CrossEntropyLoss()
    worst_param, worst_out = 0.0, 0.0
    for t in range(300):
        idx = batches[t]
        for net, opt in ((wd_net, opt_wd), (exp_net, opt_exp)):
            opt.zero_grad()
            loss_fn(net(X[idx]), y[idx]).backward()
            opt.step()
        if sch_wd is not None:
            sch_wd.step()
        sch_exp.step()
        a = sch_exp.scale(t + 1)
        for pw, pe in zip(wd_net.parameters(), exp_net.parameters()):
            worst_param = max(worst_param, ((pw - a * pe).norm() / pw.norm()).item())
        with torch.no_grad():
            worst_out = max(worst_out, (wd_net(X) - exp_net(X)).abs().max().item())
    assert worst_param <= 1e-10
    assert worst_out <= 1e-10
    # the equivalence is non-trivial: the exp run's weights really grew relative to the WD run
    assert sch_exp.scale(300) < 0.5
    assert exp_net.w1.norm() > 1.5 * wd_net.w1.norm()
    del base


def test_explr_without_initial_buffer_is_not_exact():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(32, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=gen)
    nets = [ScaleInvariantNet(torch.Generator().manual_seed(1)) for _ in range(2)]
    opt_wd = SGD(nets[0].parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
    opt_exp = SGD(nets[1].parameters(), lr=0.1, momentum=0.9)
    sch = ExpLR(opt_exp, weight_decay=5e-3, set_initial_buffer=False)
    for t in range(20):
        for net, opt in zip(nets, (opt_wd, opt_exp)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(X), y).backward()
            opt.step()
        sch.step()
    a = sch.scale(20)
    assert ((nets[0].w1 - a * nets[1].w1).norm() / nets[0].w1.norm()).item() > 1e-6


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_explr_rejects_bad_optimizers():
    p = [torch.nn.Parameter(torch.ones(3))]
    with pytest.raises(ValueError, match="weight_decay"):
        ExpLR(SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3), weight_decay=1e-3)
    with pytest.raises(ValueError, match="momentum-SGD"):
        ExpLR(torch.optim.Adam(p, lr=0.1), weight_decay=1e-3)
    sch = ExpLR.step_decay(SGD(p, lr=0.1, momentum=0.9), 1e-3, total_steps=2)
    sch.step()
    sch.step()  # step 2 = T: defined (continues the last phase)
    with pytest.raises(ValueError, match="past its end"):
        sch.step()
    assert math.isfinite(sch.alpha)

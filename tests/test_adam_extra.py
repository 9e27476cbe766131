"""Cattaneo et al. 2024 experiments ``adam_eps_regimes`` and ``adam_rmsprop_variants``: tiny end-to-end runs, their
helpers against dense float64 computations and hand-computed steps, and verdicts that fail on synthetic input."""

import math

import numpy as np
import pytest
import torch
from experiment_runs import run_tiny

from optiscope.experiments.adam_implicit_bias import adam_eps_regimes as er
from optiscope.experiments.adam_implicit_bias import adam_rmsprop_variants as rv
from optiscope.experiments.base import resolve_config
from optiscope.optim.flows import AdamHyper, ParamSpace, model_loss
from optiscope.theory.adam import correction_coefficient
from optiscope.utils.config import ConfigError

_run = run_tiny  # shared with the other experiment tests (tests/experiment_runs.py)


def test_eps_regimes_tiny_run_produces_its_claims(tmp_path):
    res = _run("adam_eps_regimes", tmp_path, [
        "n_seeds=2", "n_train=24", "width=3", "small_steps=8", "large_steps=8", "sweep_steps=8", "n_checkpoints=2",
        "ref_factor=2", "sweep=[[1e-8,1e-4],[100,0.1]]"])
    ids = [c["id"] for c in res["claims"]]
    assert ids == ["small_eps_anti_penalised", "small_eps_penalised", "large_eps_penalised",
                   "large_eps_effective_step", "large_eps_flow_predicts_effect", "control_first_order_flow",
                   "sign_over_eps", "control_gd_analogy"]
    s = res["metrics"]["summary"]
    assert len(s["small/anti"]["effects"]) == 2 and all(np.isfinite(s["small/anti"]["effects"]))


def test_excess_one_norm_and_relative_effect():
    g = torch.tensor([0.3, -1e-3, 0.0, 2.0], dtype=torch.float64)
    for eps in (1e-8, 1.0, 1e4):
        direct = float(torch.sqrt(g * g + eps).sum() - 4 * math.sqrt(eps))
        assert er.excess_one_norm(g, eps) == pytest.approx(direct, rel=1e-6, abs=1e-12)
    # large eps: the excess is ||g||^2 / (2 sqrt(eps)) (Eq. 6)
    assert er.excess_one_norm(g, 1e8) == pytest.approx(float(g @ g) / (2 * 1e4), rel=1e-6)
    # the first checkpoint (the common start) is skipped
    assert er.relative_effect([5.0, 2.2, 1.1], [5.0, 2.0, 1.0]) == pytest.approx(0.1)
    assert math.isnan(er.relative_effect([1.0, 2.0], [1.0, 0.0]))


def test_predicted_rate_against_dense_hessian():
    """grad N . (-kappa (H P) / R) with N the perturbed one-norm, from a dense float64 Hessian."""
    torch.manual_seed(0)
    X, y = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 2, (12,))
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    f, p0 = model_loss(net, torch.nn.CrossEntropyLoss(), (X, y))
    space = ParamSpace(p0)
    theta = space.flatten(p0)
    F = lambda t: f(space.unflatten(t))
    g = torch.func.grad(F)(theta)
    H = torch.func.hessian(F)(theta)
    for hp, n in ((AdamHyper(h=1e-3, beta1=0.9, beta2=0.99, eps=1e-6), 5),
                  (AdamHyper(h=1e-2, beta1=0.9, beta2=0.99, eps=10.0), 40)):
        r = torch.sqrt(g * g + hp.eps)
        p = g / r
        kappa = torch.as_tensor(correction_coefficient(g.numpy(), hp.h, hp.beta1, hp.beta2, hp.eps, n))
        expect = float((H @ (g / r)) @ (-(kappa * (H @ p)) / r))
        got = er._Norms(f, p0).predicted_rate(theta, hp, n)
        assert got == pytest.approx(expect, rel=1e-8)
    # the sign flips with the regime for beta1 < beta2: anti-penalising (> 0) at small eps, penalising at large eps
    small = er._Norms(f, p0).predicted_rate(theta, AdamHyper(h=1e-3, beta1=0.9, beta2=0.99, eps=1e-10), 400)
    large = er._Norms(f, p0).predicted_rate(theta, AdamHyper(h=1e-3, beta1=0.9, beta2=0.99, eps=1e4), 400)
    assert small > 0 > large


def test_eps_regime_verdicts_can_fail():
    # measured effects below zero where anti-penalisation (+) is predicted
    v = er._sign_verdict([-0.1, -0.12, -0.09], +1)
    assert v.holds is False
    assert er._sign_verdict([0.1, 0.12, 0.09], +1).holds is True
    assert er._sign_verdict([0.1, 0.12, 0.09], -1).holds is False
    T, F, N = (er.Verdict(True, "t"), er.Verdict(False, "f"), er.Verdict(None, "n"))
    assert er._sweep_verdict([T, F, N], ["a", "b", "c"]).holds is False   # a decided contradiction fails
    assert er._sweep_verdict([T, N], ["a", "b"]).holds is None
    assert er._sweep_verdict([T, T], ["a", "b"]).holds is True
    with pytest.raises(ConfigError, match="anti_betas"):
        resolve_config("adam_eps_regimes", "quick", ["anti_betas=[0.99,0.9]"])


def test_rmsprop_variants_tiny_run_produces_its_claims(tmp_path):
    res = _run("adam_rmsprop_variants", tmp_path, [
        "hs=[4e-3,2e-3]", "order_horizon=0.02", "bias_hs=[0.02,0.04]", "gd_hs=[0.02,0.04]", "bias_horizon=0.4"])
    ids = [c["id"] for c in res["claims"]]
    assert ids == ["order_adam_eps_outside", "control_wrong_eps_placement_adam_eps_outside",
                   "order_rmsprop_eps_inside", "control_wrong_eps_placement_rmsprop_eps_inside",
                   "order_rmsprop_eps_outside", "control_wrong_eps_placement_rmsprop_eps_outside",
                   "rmsprop_eps_inside_anti_penalised", "rmsprop_eps_outside_anti_penalised",
                   "rmsprop_eps_inside_large_eps_penalised", "rmsprop_eps_outside_large_eps_penalised",
                   "adam_eps_outside_sign_follows_betas", "inside_outside_same_behaviour", "control_gradient_descent"]
    # every variant's second-order flow beats its first-order flow even on this short horizon
    for m in res["metrics"]["order"].values():
        for r in m["rows"]:
            assert r["second"] < r["first"]


def test_variant_hyper_and_gd_steps():
    hp = rv.variant_hyper("rmsprop_eps_outside", 0.01, (0.5, 0.9), 0.1)
    assert (hp.beta1, hp.beta2, hp.bias_correction, hp.eps_inside_sqrt) == (0.0, 0.9, False, False)
    hp = rv.variant_hyper("adam_eps_outside", 0.01, (0.5, 0.9), 0.1, eps_inside=True)
    assert (hp.beta1, hp.bias_correction, hp.eps_inside_sqrt) == (0.5, True, True)
    with pytest.raises(ValueError, match="unknown variant"):
        rv.variant_hyper("sgd_eps_inside", 0.01, (0.5, 0.9), 0.1)
    f, p0 = rv.bilinear_problem(1.5, (2.8, 3.5))
    th = rv.gd_iterates(f, p0, 0.01, 2)
    t = ParamSpace(p0).flatten(p0).numpy().copy()  # (2.8, 3.5) as the model stores them
    for k in range(2):
        r = 1.5 - t[0] * t[1]
        t = t - 0.01 * np.array([-r * t[1], -r * t[0]])
        np.testing.assert_allclose(th[k + 1], t, rtol=1e-12)
    assert rv.imbalance(np.array([2.0, 0.5])) == pytest.approx(math.log(4.0))


def test_ordering_verdict_can_fail():
    rows = [{"status": "finished", "residual": 0.0, "imbalance": x} for x in (0.3, 0.2, 0.1)]
    assert rv._ordering_verdict(rows, increasing=True).holds is False
    assert rv._ordering_verdict(rows, increasing=False).holds is True
    off = [dict(r, residual=0.5) for r in rows]
    assert rv._ordering_verdict(off, increasing=False).holds is None  # not converged: untestable


def test_minibatch_flow_tiny_run_and_failing_control(tmp_path):
    """A control margin no flow can meet: the negative-control claims must come out False, the ids stay."""
    from optiscope.experiments.adam_implicit_bias import adam_minibatch_flow  # noqa: F401  (registers)

    res = _run("adam_minibatch_flow", tmp_path, [
        "hs=[4e-3,2e-3]", "bilinear_horizon=0.03", "mlp_hs=[2e-3,1e-3]", "mlp_horizon=0.004", "mlp_n_train=24",
        "mlp_width=3", "n_batches=2", "control_margin=1e12"])
    by = {c["id"]: c for c in res["claims"]}
    assert list(by) == ["bilinear_minibatch_orders", "bilinear_control_full_batch_flow",
                        "digits_mlp_minibatch_orders", "digits_mlp_control_full_batch_flow"]
    assert by["bilinear_control_full_batch_flow"]["holds"] is False
    for r in res["metrics"]["bilinear"]["rows"]:
        assert r["minibatch_second"] < r["minibatch_first"] < r["full_batch_second"]


def test_minibatch_bilinear_batches_average_to_the_full_loss():
    from optiscope.experiments.adam_implicit_bias.adam_minibatch_flow import bilinear_batches

    losses, f_full, p0 = bilinear_batches((1.0, 0.5, 1.5), (1.5, 1.0, 2.0))
    t = next(iter(p0.values()))
    for fk, x, y in zip(losses, (1.0, 0.5, 1.5), (1.5, 1.0, 2.0)):
        assert float(fk(p0)) == pytest.approx(0.5 * (y - x * float(t[0]) * float(t[1])) ** 2, rel=1e-12)
    assert float(f_full(p0)) == pytest.approx(float(sum(fk(p0) for fk in losses)) / 3, rel=1e-12)


def test_one_norm_cnn_tiny_run_and_hill_detector(tmp_path):
    from optiscope.experiments.adam_implicit_bias.adam_one_norm_cnn import hill

    res = _run("adam_one_norm_cnn", tmp_path, [
        "model=small_cnn:channels=[2,2,2],hidden=4", "n_train=32", "n_test=16", "steps=12", "probe_every=3",
        "beta2_sweep=[0.95,0.99]", "beta1_sweep=[0.8,0.9]"])
    assert [c["id"] for c in res["claims"]] == ["one_norm_hill", "beta2_hill_height", "beta2_test_accuracy",
                                                 "beta1_hill_height", "beta1_test_accuracy"]
    s = np.arange(8.0)
    up_down = hill(s, [5, 2, 1, 2, 3, 2.5, 2, 1.9], 0.05)
    assert up_down["hill"] and up_down["peak_step"] == 4.0
    assert not hill(s, [5, 4, 3, 2.5, 2, 1.5, 1.2, 1.0], 0.05)["hill"]      # monotone fall: no hill
    assert not hill(s, [5, 2, 1, 1.5, 2, 2.5, 3, 3.5], 0.05)["hill"]        # still rising at the end: no hill

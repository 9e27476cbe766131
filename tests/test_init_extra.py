"""Orvieto et al. 2022 experiments ``init_variance`` and ``init_deep_resnet``: tiny end-to-end runs, the exact
layer-factor law against direct simulation, and verdicts that fail on synthetic input."""

import math

import numpy as np
import pytest
import torch
from experiment_runs import run_tiny

from optiscope.experiments.vanishing_curvature import init_deep_resnet as dr
from optiscope.experiments.vanishing_curvature import init_variance as iv
from optiscope.utils.config import ConfigError

_run = run_tiny  # shared with the other experiment tests (tests/experiment_runs.py)


def test_init_variance_tiny_run_produces_its_claims(tmp_path):
    res = _run("init_variance", tmp_path, ["widths=[8,16]", "depths=[2,4]", "n_nets=60", "n_boot=50"])
    ids = [c["id"] for c in res["claims"]]
    assert ids == ["median_matches_exact_law", "control_mean_rule", "optimal_gain_above_he",
                   "optimal_gain_function_of_width_to_depth", "orthogonal_linear_isometry",
                   "orthogonal_relu_still_vanishes", "linear_decays_slower_than_relu"]
    by = {c["id"]: c for c in res["claims"]}
    assert by["orthogonal_linear_isometry"]["holds"] is True   # exact: orthogonal linear layers are isometries
    assert set(res["metrics"]["cells"]) == set(iv.FAMILIES)


@pytest.mark.parametrize("family", ["linear", "relu", "relu_orthogonal"])
def test_layer_factor_cumulants_against_direct_simulation(family):
    """Mean and variance of log Y from the closed forms vs samples of ||x_1||^2 / ||x_0||^2 of one layer."""
    m = 12
    d = iv.forward_backward_factors(family, "normal", m, [1], 40000, seed=3)
    logs = d["forward"][0]
    logs = logs[np.isfinite(logs)]
    c1, c2, _ = iv.log_factor_cumulants(family, m)
    se = math.sqrt(c2 / len(logs))
    assert abs(logs.mean() - c1) < 5 * se
    assert logs.var() == pytest.approx(c2, rel=0.05)
    # the mean of Y itself is 1 at the critical variance (Xavier / He), although E log Y < 0
    assert np.exp(logs).mean() == pytest.approx(1.0, abs=0.02)
    assert c1 < 0


def test_orthogonal_layers_and_median_prediction():
    g = torch.Generator().manual_seed(0)
    w = iv._weights("relu_orthogonal", "normal", 3, 6, g, "cpu")
    eye = torch.eye(6, dtype=torch.float64)
    for k in range(3):
        torch.testing.assert_close(w[k] @ w[k].T, 2.0 * eye)   # orthogonal times sqrt(2)
    d = iv.forward_backward_factors("relu", "normal", 16, [6], 6000, seed=4)
    assert np.median(d["forward"][0]) == pytest.approx(iv.predicted_log_median("relu", 16, 6), abs=0.06)
    # the two-moment log-normal of Prop. 8 matches Eq. (6): -(L/2) log(1 + 5/m) for Gaussian ReLU layers
    assert iv.lognormal_log_median("relu", 16, 6) == pytest.approx(-3 * math.log1p(5 / 16), rel=1e-9)
    assert iv.lognormal_log_median("linear", 16, 6) == pytest.approx(-3 * math.log1p(2 / 16), rel=1e-9)


def test_init_variance_ratio_claim_can_fail():
    """Synthetic cells whose optimal gain depends on the width only: the width-to-depth reading must fail."""
    cfg = iv.InitVarianceConfig(widths=(16, 32), depths=(8, 16, 32), n_boot=50)
    rows, boot = [], {"relu": {}}
    for m in cfg.widths:
        lg = 0.5 * math.log1p(5 / m)                   # log gain depends on m only
        meds = np.array([-lg * L for L in cfg.depths])
        boot["relu"][m] = np.tile(meds, (cfg.n_boot, 1)) + 1e-4 * np.random.default_rng(m).normal(
            size=(cfg.n_boot, len(cfg.depths)))
        rows += [{"width": m, "depth": L, "log_median": med, "gain": math.exp(lg)} for L, med in zip(cfg.depths, meds)]
    claim = iv._ratio_claim(rows, cfg, boot)
    assert claim.holds is False
    with pytest.raises(ConfigError, match="widths"):
        iv.InitVarianceConfig(widths=(4, 16))


def test_deep_resnet_tiny_run_produces_its_claims(tmp_path):
    res = _run("init_deep_resnet", tmp_path, ["stages=[2,1,1,1]", "shallow_stages=[1,1,1,1]", "channels=[2,2,2,2]",
                                              "n_train=64", "batch_size=16", "steps=3", "eval_every=3", "n_eval=32",
                                              "sgd_lrs=[0.1]", "rmsprop_lrs=[1e-3]"])
    assert [c["id"] for c in res["claims"]] == ["rmsprop_trains_deep", "sgd_stalls_deep",
                                                 "control_shallow_sgd_trains"]
    assert res["metrics"]["depths"] == {"deep": 7, "shallow": 6}


def test_deep_resnet_verdict_can_fail(tmp_path):
    """RMSprop with a learning rate too small to move: the gap claim must come out False (premise forced on)."""
    res = _run("init_deep_resnet", tmp_path, ["stages=[2,1,1,1]", "shallow_stages=[1,1,1,1]", "channels=[2,2,2,2]",
                                              "n_train=64", "batch_size=16", "steps=3", "eval_every=3", "n_eval=32",
                                              "sgd_lrs=[0.1]", "rmsprop_lrs=[1e-12]", "vanish_ratio=0.999999",
                                              "init=torch"])
    by = {c["id"]: c for c in res["claims"]}
    if res["metrics"]["init_grad_ratio"] < 0.999999:
        assert by["rmsprop_trains_deep"]["holds"] is False
    else:
        assert by["rmsprop_trains_deep"]["holds"] is None


def test_deep_resnet_helpers():
    cfg = dr.DeepResNetConfig(stages=(2, 1, 1, 1), channels=(2, 2, 2, 2), n_train=64, batch_size=16, steps=4,
                              eval_every=2, n_eval=32, sgd_lrs=(0.1,), rmsprop_lrs=(1e-3,))
    X, y, _ = dr._data(cfg)
    model = dr._model(cfg, cfg.stages, 0)
    loss = torch.nn.functional.cross_entropy(model(X[:32]), y[:32])
    grads = torch.autograd.grad(loss, list(model.parameters()))
    expect = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    assert dr.grad_norm_at_init(model, X[:32], y[:32], "cpu") == pytest.approx(expect, rel=1e-6)
    # a huge step diverges: an outcome (accuracy at chance afterwards), not a crash
    r = dr.train_one(cfg, cfg.stages, 0, "sgd", 1e12, X, y)
    assert r["diverged_at"] is not None and r["final_train_accuracy"] == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="shallow_stages"):
        dr.DeepResNetConfig(shallow_stages=(12, 12, 12, 12))

"""Seed-002 experiments: building blocks against hand computation, and each experiment end to end (tiny configs)."""

import json
import math

import numpy as np
import pytest
import torch

from optiscope.experiments.base import run_experiment
from optiscope.experiments.vanishing_curvature.init_chain import chain_monte_carlo
from optiscope.experiments.vanishing_curvature.init_escape import (
    EscapeConfig,
    chain_loss_and_grad,
    simulate_escape,
)
from optiscope.theory.init import chain_gf_escape_time


def test_chain_loss_and_grad_matches_autograd():
    g = torch.Generator().manual_seed(0)
    w = (torch.rand(5, 7, generator=g, dtype=torch.float64) - 0.3).requires_grad_(True)
    w.data[2, 3] = 0.0  # exact zero: prefix/suffix products still exact
    loss, grad = chain_loss_and_grad(w.detach(), 1.5, 0.7)
    ref = 0.5 * (0.7 - 1.5 * w.prod(dim=1)) ** 2
    ref.sum().backward()
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(grad, w.grad)


def test_gd_on_chain_matches_gradient_flow_time_and_rmsprop_first_step():
    cfg = EscapeConfig(depths=(4, 6), w0=0.5, n_seeds=1, max_iters=20000)
    lr = 0.01
    tracks = simulate_escape(cfg, "gd", (lr,), (0.0,), torch.Generator().manual_seed(0))
    for tr in tracks:
        t_flow = chain_gf_escape_time(tr.depth, 0.5, 0.5)
        assert tr.escape[0] == pytest.approx(t_flow / lr, rel=0.02)
    # RMSprop (eps = 0, v0 = 0): the first step is lr * g / sqrt((1 - beta) g^2) = lr / sqrt(1 - beta) per weight
    cfg1 = EscapeConfig(depths=(5, 6), w0=0.5, n_seeds=1, max_iters=1, rmsprop_beta=0.99)
    tracks = simulate_escape(cfg1, "rmsprop", (1e-3,), (0.0,), torch.Generator().manual_seed(0))
    for tr in tracks:
        torch.testing.assert_close(tr.param.detach(), torch.full_like(tr.param, 0.5 + 1e-3 / math.sqrt(0.01)))


def test_chain_monte_carlo_streaming_equals_direct_computation():
    n, L = 3001, 6  # odd: the median is one order statistic (exp commutes with it)
    out = chain_monte_carlo(n, L, "uniform", math.sqrt(3), 1.0, 1.0, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    W = torch.stack([(torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * math.sqrt(3) for _ in range(L)], 1)
    for depth in range(2, L + 1):
        w = W[:, :depth]
        f = w.prod(1)
        assert out["median_forward"][depth - 1] == pytest.approx(float(np.median(f.abs().numpy())), rel=1e-9)
        grad = (w[:, 1:].prod(1)).abs()
        assert out["median_gradient"][depth - 1] == pytest.approx(float(np.median(grad.numpy())), rel=1e-9)
        h = (w[:, 2:].prod(1)).abs() if depth > 2 else torch.ones(n, dtype=torch.float64)
        assert out["median_hessian_offdiag"][depth - 1] == pytest.approx(float(np.median(h.numpy())), rel=1e-9)
        assert out["mean_f2"][depth - 1] == pytest.approx(float((f ** 2).mean()), rel=1e-9)
        assert out["lo_forward"][depth - 1] <= out["median_forward"][depth - 1] <= out["hi_forward"][depth - 1]


def _run(name, tmp_path, overrides):
    store = run_experiment(name, preset="quick", out=tmp_path / name, overrides=overrides)
    res = json.loads((tmp_path / name / "results.json").read_text())
    assert res["experiment"] == name and res["claims"]
    for c in res["claims"]:
        assert set(c) == {"id", "claim", "paper", "measured", "holds", "reason", "tier"}
        assert c["reason"], c["id"]   # every verdict says why
    assert list((tmp_path / name / "figures").glob("*.png"))
    return res, store


def test_init_chain_end_to_end(tmp_path):
    res, _ = _run("init_chain", tmp_path, ["n_samples=200000", "max_depth=6"])
    claims = {c["id"]: c for c in res["claims"]}
    assert claims["medians"]["holds"] is True
    assert claims["trade_off"]["holds"] is True
    # the wrong-depth theory fails the same test, so "medians" could have failed
    assert claims["control_wrong_depth"]["holds"] is True
    assert all(c["reason"] for c in res["claims"])
    with pytest.raises(ValueError, match="n_samples"):
        run_experiment("init_chain", out=tmp_path / "bad", overrides=["n_samples=10"])


def test_init_chain_control_can_fail(tmp_path):
    """Fed the right-depth theory itself as the control (offset 0), the control claim must come out False."""
    res, _ = _run("init_chain", tmp_path, ["n_samples=20000", "max_depth=4", "control_depth_offset=0"])
    claims = {c["id"]: c for c in res["claims"]}
    assert claims["medians"]["holds"] is True
    assert claims["control_wrong_depth"]["holds"] is False


def test_init_escape_end_to_end(tmp_path):
    res, store = _run("init_escape", tmp_path, ["depths=4,8", "max_iters=3000", "n_seeds=2", "gd_lrs=0.1",
                                                 "pgd_noise=0.01", "rmsprop_lrs=0.01"])
    m = res["metrics"]
    assert m["best_rmsprop"]["4"] is not None and m["best_rmsprop"]["8"] is not None
    # GD needs the exponential gradient-flow time: about t/lr iterations
    assert m["escape_iterations"]["gd:lr=0.1"]["4"] == pytest.approx(m["gradient_flow_time"]["4"] / 0.1, rel=0.1)
    assert not store.read_metrics().empty


def test_init_mlp_end_to_end(tmp_path):
    res, _ = _run("init_mlp", tmp_path, ["grad_depths=2,4,8", "grad_seeds=2", "narrow_width=3",
                                         "narrow_depths=2,3,4", "narrow_seeds=2", "wide_depths=2,3", "wide_seeds=2",
                                         "n_samples=8", "width=8"])
    v = res["metrics"]["vanishing_depth_width32"]
    assert set(v) >= {"relu/he_uniform", "relu/lecun_uniform", "linear/torch"}
    assert v["relu/lecun_uniform"]["gain"] == pytest.approx(0.5)


def test_init_arch_end_to_end(tmp_path):
    res, _ = _run("init_arch", tmp_path, ["mlp_width=3", "mlp_depths=3,5,8", "fcn_depths=1,2,3", "fcn_channels=1",
                                          "resnet_blocks=1,2,3", "resnet_channels=2,2,2,2", "resolution=8",
                                          "n_seeds=2", "n_samples=4", "n_probes=2"])
    assert set(res["metrics"]["mlp"]) == {"plain", "residual", "batchnorm", "residual+batchnorm"}


def test_init_fashion_end_to_end(tmp_path):
    res, _ = _run("init_fashion", tmp_path, ["depth=3", "width=8", "n_train=256", "n_test=64", "steps=4",
                                             "n_evals=2", "sgd_lrs=0.1", "sgdm_lrs=0.01", "rmsprop_lrs=0.001",
                                             "adam_lrs=0.001"])
    best = res["metrics"]["best_accuracy"]
    assert set(best) == {"sgd", "sgdm", "rmsprop", "adam"}
    assert all(0.0 <= b["train_accuracy"] <= 1.0 for b in best.values())

"""The batch-scaling, divergence-onset and noise-model experiments of Velikanov et al. 2023: their formulas against
direct simulation, tiny end-to-end runs, and verdicts that can fail."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from optiscope.experiments.base import registry, run_experiment
from optiscope.experiments.sgd_generating_functions import sgd_batch_scaling as bs
from optiscope.experiments.sgd_generating_functions import sgd_divergence_onset as do
from optiscope.experiments.sgd_generating_functions import sgd_noise_models as nm
from optiscope.theory.sgd import Spectrum, critical_learning_rate, noise_amplitude, se_loss_curve
from optiscope.theory.sgd_sim import exact_second_moments
from optiscope.utils.config import ConfigError

NAMES = ["sgd_batch_scaling", "sgd_divergence_onset", "sgd_noise_models"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_registered():
    reg = registry()
    for name in NAMES:
        assert name in reg and reg[name].paper == "004"
        assert {"quick", "medium", "full"} <= set(reg[name].presets)


def _ids(store):
    res = store.read_results()
    for c in res["claims"]:
        assert c["holds"] in (True, False, None) and c["reason"], c["id"]
    assert list(store.figures_dir.glob("*.png"))
    return res, {c["id"]: c for c in res["claims"]}


# ------------------------------------------------------------------------------------------------ batch scaling
def test_full_batch_gd_equals_the_spectral_formula():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((30, 8))
    K = X @ X.T
    e0 = rng.standard_normal(30)
    spec = Spectrum.from_kernel(K, -e0)
    lr = 1.0 / spec.lambda_max
    L = bs.full_batch_gd_loss(K, e0, lr, 0.0, 40)
    t = np.arange(41)[:, None]
    ref = 0.5 * np.sum(spec.coefficients * (1 - lr * spec.eigenvalues) ** (2 * t), axis=1)
    np.testing.assert_allclose(L, ref, rtol=1e-10)
    # with momentum: the noiseless SE recursion (tau1 = tau2 = 0) is the same dynamics
    Lm = bs.full_batch_gd_loss(K, e0, 0.5 * lr, 0.6, 40)
    se = se_loss_curve(spec, 0.5 * lr, 0.6, 1, 40, tau1=0.0, tau2=0.0).loss
    np.testing.assert_allclose(Lm, se, rtol=1e-9)


def test_gd_power_law_constant_on_an_exact_power_law():
    spec = Spectrum.power_law(1.5, 0.9, 20_000)
    T = 2000
    L = se_loss_curve(spec, 0.5, 0.0, 1, T, tau1=0.0, tau2=0.0).loss
    pred = bs.gd_power_law_loss(np.array([T]), 0.9 / 1.5, 1.0, 1.0, 0.5, 0.0)[0]
    assert L[-1] / pred == pytest.approx(1.0, abs=0.03)
    lo, hi = bs.gd_power_law_window(spec.eigenvalues, (10, 300), 0.5, 0.0)
    assert lo == pytest.approx(1 / (2 * 0.5 * 10 ** -1.5)) and hi > lo


def test_loglog_slope_interval_by_hand():
    x = np.array([1.0, 2.0, 4.0])
    y = 3 * x ** 0.8
    s, lo, hi = bs.loglog_slope_interval(x, y, y, y)
    assert s == pytest.approx(0.8) and lo == hi == pytest.approx(0.8)
    s, lo, hi = bs.loglog_slope_interval(x, y, y / 1.1, y * 1.1)
    # weights (u - mean u) / sum(u - mean u)^2 = (-1, 0, 1) / (2 ln 2): worst case moves 2 ln(1.1) / (2 ln 2)
    assert hi - s == pytest.approx(math.log(1.1) / math.log(2))


def test_batch_scaling_tiny(tmp_path):
    store = run_experiment("sgd_batch_scaling", "quick", out=tmp_path / "bs", overrides=[
        "n_points=80", "width=30", "batch_sizes=[1,2,4,8]", "critical_steps=150", "critical_seeds=2",
        "critical_lrs_per_round=3", "critical_rounds=1", "loss_steps=40", "loss_runs=4", "gd_max_steps=400"])
    res, ids = _ids(store)
    assert {"critical_lr_b1", "critical_lr_b8", "critical_lr_scaling", "prop4_cap_respected",
            "control_batch_blind_critical_lr", "loss_vs_batch", "control_noiseless_loss_vs_batch", "gd_exponent",
            "gd_constant", "control_gd_classical_rate"} <= set(ids)
    crit = res["metrics"]["critical_lr"]
    assert [r["predicted"] for r in crit] == sorted(r["predicted"] for r in crit)   # grows with b


def test_batch_scaling_verdicts_can_fail():
    cfg = bs.BatchScalingConfig()
    rows = [{"batch_size": b, "predicted": 0.1 * b, "simulated": 0.2 * b, "bracket_half_width": 0.001,
             "rel_error": 1.0, "noise_limited": True, "prop4_cap": 0.15 * b} for b in (1, 2, 4, 8)]
    metrics = {"noiseless_bound": 4.0}
    claims = {c.id: c for c in bs._critical_claims(cfg, rows, metrics)}
    assert claims["critical_lr_b1"].holds is False
    assert claims["prop4_cap_respected"].holds is False      # simulated above the cap
    assert claims["critical_lr_scaling"].holds is True       # the slope itself is right
    gd = {"measured_exponent": 1.0, "predicted_exponent": 0.45, "window": [10, 1000], "modes": [10, 300],
          "median_ratio_to_power_law": 0.5}
    g = {c.id: c for c in bs._gd_claims(cfg, gd)}
    assert g["gd_exponent"].holds is False and g["gd_constant"].holds is False
    assert g["control_gd_classical_rate"].holds is False


# ------------------------------------------------------------------------------------------------ divergence onset
def test_torus_problem_is_translation_invariant_and_se_is_exact():
    K, e0, spec = do.torus_power_law_problem(40, 0.7, 1.5, seed=1)
    assert np.allclose(K, np.roll(np.roll(K, 1, axis=0), 1, axis=1))
    base = Spectrum.power_law(0.7, 1.5, 40)
    assert spec.eigenvalues[0] == pytest.approx(base.eigenvalues[0])
    assert spec.initial_loss == pytest.approx(base.initial_loss, rel=1e-10)
    for beta in (0.0, 0.5):
        lr = 2.0 * critical_learning_rate(spec, beta, 1, 40)
        exact, _ = exact_second_moments(K, e0, lr, beta, 1, 50)
        se = se_loss_curve(spec, lr, beta, 1, 50, dataset_size=40).loss
        np.testing.assert_allclose(se, exact, rtol=1e-9)


def test_onset_and_rate_helpers_by_hand():
    noiseless = 1.0 / (1 + np.arange(50.0))
    div = 0.05 * np.exp(0.1 * np.arange(50.0))
    t = do.divergence_onset_time(div, noiseless)
    assert div[t] >= noiseless[t] and div[t - 1] < noiseless[t - 1]
    assert do.measured_onset_time(noiseless + div, noiseless) == t
    assert do.measured_onset_time(noiseless, noiseless) is None
    L = np.concatenate([np.linspace(1.0, 0.1, 10), 0.1 * np.exp(0.2 * np.arange(1, 40))])
    rate, start, end = do.growth_rate_fit(L, 3.0)
    assert rate == pytest.approx(0.2) and L[start] >= 0.3 and end == L.size - 1


def test_divergence_onset_tiny(tmp_path):
    store = run_experiment("sgd_divergence_onset", "quick", out=tmp_path / "do", overrides=[
        "n_points=64", "lr_factors=[1.3,2.0]", "n_runs=16", "bootstrap=20", "max_steps=400"])
    res, ids = _ids(store)
    assert {"growth_rate_f1.3", "onset_time_f1.3", "se_exact_translation_invariant_f1.3",
            "control_noiseless_growth_rate", "control_tdiv_as_onset"} <= set(ids)
    assert res["metrics"]["lrs"][0]["kind"] == "eventual divergence"


def test_divergence_verdicts_can_fail():
    cfg = do.DivergenceOnsetConfig()
    row = {"factor": 1.3, "kind": "eventual divergence", "measured_rate": 0.01, "predicted_rate": 0.02,
           "rate_ci": [0.009, 0.011], "predicted_onset": 10, "measured_onset": 100, "se_onset": 10,
           "divergence_time": 50.0, "se_vs_sampled_median_rel_error": 0.5, "noiseless_log_growth": -0.01}
    claims = {c.id: c for c in do._claims_for(cfg, row) + do._controls(cfg, [row])}
    assert claims["growth_rate_f1.3"].holds is False
    assert claims["onset_time_f1.3"].holds is False
    assert claims["se_exact_translation_invariant_f1.3"].holds is False
    assert claims["control_tdiv_as_onset"].holds is False     # t_div (50) is closer to 100 than 10 is


# ------------------------------------------------------------------------------------------------ noise models
def test_sampling_noise_covariance_is_the_batch_gradient_covariance():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((12, 3))
    dw = rng.standard_normal(3)
    g = X * (X @ dw)[:, None]                                # per-sample gradients at w* + dw
    cov = g.T @ g / 12 - np.outer(g.mean(0), g.mean(0))      # covariance of a batch of one, exactly
    np.testing.assert_allclose(nm.sampling_noise_covariance(X, np.outer(dw, dw)), cov, atol=1e-12)


def test_additive_noise_formula_equals_the_moment_recursion():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((40, 4))
    H = X.T @ X / 40
    lam, V = np.linalg.eigh(H)
    lr = 1.0 / lam.max()
    dw = rng.standard_normal(4)
    S = rng.standard_normal((4, 4))
    Sigma = S @ S.T
    C = np.outer(dw, dw)
    A = np.eye(4) - lr * H
    ref = []
    for _ in range(31):
        ref.append(0.5 * np.sum(H * C))
        C = A @ C @ A + lr ** 2 * Sigma                      # App. G, Eq. 243 (beta = 0)
    pred = nm.additive_noise_loss(lam, (V.T @ dw) ** 2, np.einsum("ik,ij,jk->k", V, Sigma, V), lr, 30)
    np.testing.assert_allclose(pred, ref, rtol=1e-10)
    lim = nm.additive_noise_limit(lam, np.einsum("ik,ij,jk->k", V, Sigma, V), lr)
    assert nm.additive_noise_loss(lam, (V.T @ dw) ** 2, np.einsum("ik,ij,jk->k", V, Sigma, V), lr,
                                  3000)[-1] == pytest.approx(lim, rel=1e-6)


def test_simulations_match_their_recursions():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((30, 3)) / 2
    w_star = rng.standard_normal(3)
    lr = 0.3
    L, _, _ = nm.simulate_parameter_sgd(X, w_star, lr, 40, 4000, seed=0, batch_size=2)
    exact, _ = nm.exact_parameter_moments(X, -w_star, lr, 2, 40)
    np.testing.assert_allclose(L.mean(0)[1:], exact[1:], rtol=0.06)
    H = X.T @ X / 30
    lam, V = np.linalg.eigh(H)
    sq = 0.1 * np.eye(3)
    La, proj, mm = nm.simulate_parameter_sgd(X, w_star, lr, 40, 4000, seed=1, noise_sqrt=sq, modes=V, mode_steps=5)
    pred = nm.additive_noise_loss(lam, (V.T @ w_star) ** 2, np.full(3, 0.01), lr, 40)
    np.testing.assert_allclose(La.mean(0), pred, rtol=0.06)
    assert proj.shape == (4000, 6, 3) and mm.shape == (41, 3)
    np.testing.assert_allclose(mm[:6], proj.mean(0))
    np.testing.assert_allclose(0.5 * mm @ lam, La.mean(0), rtol=1e-10)   # the loss is sum_k lambda_k M_k / 2
    with pytest.raises(ValueError, match="exactly one"):
        nm.simulate_parameter_sgd(X, w_star, lr, 5, 2, seed=0)


def test_mode_decay_rate_by_hand():
    t = np.arange(30)
    p = np.tile(0.2 + 3.0 * 0.8 ** t, (50, 1)) * np.random.default_rng(0).uniform(0.99, 1.01, (50, 1))
    rate, ci, snr = nm.mode_decay_rate(p, 0.2, 20, np.random.default_rng(1), bootstrap=30)
    assert rate == pytest.approx(math.log(0.8), rel=0.02) and snr > 5 and ci[0] <= rate <= ci[1]
    rate, _, _ = nm.mode_decay_rate(p, 0.5, 20)            # crosses the limit: no rate
    assert math.isnan(rate)
    # rho = 10.5 at 512 runs: excess 0.95 C_inf over a standard error 0.0625 x 1.95 C_inf
    assert nm.expected_excess_snr(10.5, 512) == pytest.approx(0.95 / (0.0625 * 1.95))
    assert nm.expected_excess_snr(0.5, 512) == 0.0


def test_noise_models_tiny(tmp_path):
    store = run_experiment("sgd_noise_models", "quick", out=tmp_path / "nm", overrides=[
        "n_points=80", "steps=120", "n_runs=8", "strengths=[0.1,1.0]", "batch_sizes=[1,8]", "bootstrap=20"])
    res, ids = _ids(store)
    assert {"additive_curve", "additive_limit_positive", "additive_rate_is_noiseless",
            "sampling_rate_depends_on_noise", "sampling_rate_matches_exact", "sampling_noise_vanishes",
            "exact_recursion_vs_sampled", "se_vs_exact_recursion", "control_additive_surrogate"} <= set(ids)
    assert res["metrics"]["lr"] == pytest.approx(0.5 * res["metrics"]["critical_lr_b1"])


def test_noise_model_verdicts_can_fail():
    cfg = nm.NoiseModelsConfig(n_runs=2048)
    rate = {"mode": 0, "rate": -0.5, "rate_ci": (-0.55, -0.45), "ratio_to_noiseless": 0.5, "ratio_ci": [0.45, 0.55],
            "exact_rate": -1.0, "start_over_limit": 100.0}
    add = [{"strength": s, "curve_median_rel_error": 0.3, "plateau_mean": 2.0, "plateau_ci": [1.9, 2.1],
            "limit_predicted": 1.0, "predicted_transient_at_window": 0.0, "mode_rates": [rate]} for s in (0.1, 1.0)]
    samp = [{"batch_size": b, "mode_rates": [rate], "final_mean": 1.0, "final_ci": [0.9, 1.1],
             "additive_surrogate_limit": 1.0, "exact_vs_sampled_median_rel_error": 0.3,
             "se_vs_exact_median_rel_error": 0.5, "exact_vs_sampled_late_median_rel_error": 1.0,
             "surrogate_vs_sampled_late_median_rel_error": 1.0} for b in (1, 8)]
    claims = {c.id: c for c in nm._claims(cfg, {"additive": add, "sampling": samp})}
    for cid in ("additive_curve", "additive_limit_positive", "additive_rate_is_noiseless", "sampling_noise_vanishes",
                "exact_recursion_vs_sampled", "se_vs_exact_recursion", "control_additive_surrogate",
                "sampling_rate_matches_exact", "sampling_rate_depends_on_noise"):
        assert claims[cid].holds is False, cid


def test_config_validation():
    with pytest.raises(ConfigError, match="batch_sizes"):
        bs.BatchScalingConfig(batch_sizes=(1, 2, 4))
    with pytest.raises(ConfigError, match="lr_factors"):
        do.DivergenceOnsetConfig(lr_factors=(0.9,))
    with pytest.raises(ConfigError, match="n_points"):
        do.DivergenceOnsetConfig(n_points=63)
    with pytest.raises(ConfigError, match="strengths"):
        nm.NoiseModelsConfig(strengths=(1.0,))
    assert noise_amplitude(1, 10) == 1.0

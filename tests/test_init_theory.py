"""theory.init (seed 002) against direct simulation and dense torch.func derivatives."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from optiscope.theory import init as ti


def _median_ci(samples, sigmas=4.0):
    s = np.sort(samples)
    n = len(s)
    half = sigmas * math.sqrt(n) / 2
    return s[int(n / 2 - half)], s[int(n / 2 + half)]


@pytest.mark.parametrize("dist,scale", [("uniform", math.sqrt(3)), ("uniform", 0.7), ("normal", 1.0), ("normal", 1.7)])
@pytest.mark.parametrize("n", [1, 3, 12])
def test_chain_product_median_matches_simulation(dist, scale, n):
    rng = np.random.default_rng(n)
    w = rng.uniform(-scale, scale, (200_000, n)) if dist == "uniform" else rng.normal(0, scale, (200_000, n))
    lo, hi = _median_ci(np.abs(w).prod(axis=1))
    med = ti.chain_product_median(n, dist, scale)
    assert lo <= med <= hi
    if n == 1:  # closed forms: a/2 and s * Phi^{-1}(3/4)
        expect = scale / 2 if dist == "uniform" else scale * stats.norm.ppf(0.75)
        assert med == pytest.approx(expect, rel=1e-8)


def test_log_product_cdf_gaussian_matches_simulation_across_quantiles():
    rng = np.random.default_rng(0)
    logs = np.log(np.abs(rng.normal(0, 1.3, (400_000, 5)))).sum(axis=1)
    for u in np.quantile(logs, [0.05, 0.3, 0.7, 0.95]):
        assert ti.chain_log_product_cdf(u, 5, "normal", 1.3) == pytest.approx(np.mean(logs <= u), abs=3e-3)


def test_uniform_median_choi_bounds_and_approximation():
    for n in (2, 10, 50, 100):
        m_n = stats.gamma.median(a=n)
        assert n - 1 / 3 < m_n <= n - 1 / 3 + 2 * 8 / (405 * n)
        exact = ti.chain_product_median(n)
        approx = ti.chain_product_median_approx(n)
        assert 0 < math.log(approx / exact) <= 2 * 8 / (405 * n)
    # the Gaussian CLT approximation is well off at moderate depth (spec: ~30%): the exact median is larger
    assert ti.chain_product_median(30, "normal", 1.0) / ti.chain_product_median_approx(30, "normal", 1.0) > 1.15


def test_weight_moments_and_trade_off():
    rng = np.random.default_rng(1)
    w = rng.uniform(-2, 2, 1_000_000)
    z = rng.normal(0, 0.8, 1_000_000)
    for p in (1.0, 2.0, 4.0):
        assert ti.weight_abs_moment(p, "uniform", 2.0) == pytest.approx(np.mean(np.abs(w) ** p), rel=1e-2)
        assert ti.weight_abs_moment(p, "normal", 0.8) == pytest.approx(np.mean(np.abs(z) ** p), rel=1e-2)
    assert ti.moment_stabilizing_scale(2, "uniform") == pytest.approx(math.sqrt(3))
    assert ti.moment_stabilizing_scale(1, "uniform") == pytest.approx(2.0)
    assert ti.moment_stabilizing_scale(2, "normal") == pytest.approx(1.0)
    for dist in ("uniform", "normal"):
        assert ti.weight_abs_moment(3.0, dist, ti.moment_stabilizing_scale(3.0, dist)) == pytest.approx(1.0)
        assert ti.moment_trade_off(2, 4, dist) > 1 > ti.moment_trade_off(2, 1, dist)
    assert ti.moment_trade_off(2, 4, "uniform") == pytest.approx(9 / 5)
    assert ti.chain_abs_moment(1, 10) == pytest.approx((math.sqrt(3) / 2) ** 10)
    with pytest.raises(ValueError, match="p"):
        ti.weight_abs_moment(-2)
    with pytest.raises(ValueError, match="distribution"):
        ti.weight_abs_moment(2, "cauchy")


def test_chain_medians_are_medians_of_torch_func_derivatives():
    """Gradient / Hessian entries from torch.func.hessian of the chain loss (float64) vs the exact medians."""
    L, n = 6, 4000
    g = torch.Generator().manual_seed(0)
    W = (torch.rand(n, L, generator=g, dtype=torch.float64) * 2 - 1) * math.sqrt(3)
    x, y = 1.0, 1.0

    def loss(w):
        return 0.5 * (y - x * torch.prod(w)) ** 2

    H = torch.vmap(torch.func.hessian(loss))(W)
    G = torch.vmap(torch.func.grad(lambda w: x * torch.prod(w)))(W)
    Hf = torch.vmap(torch.func.hessian(lambda w: x * torch.prod(w)))(W)
    cm = ti.chain_medians(L)
    for sample, theory in [(G[:, 0].abs(), cm.gradient), (Hf[:, 0, 1].abs(), cm.hessian_offdiag),
                           (H[:, 0, 0], cm.hessian_diag), ((W.prod(1) * x).abs(), cm.forward)]:
        lo, hi = _median_ci(sample.numpy())
        assert lo <= theory <= hi
    # loss Hessian diagonal is exactly (df/dw_i)^2: d2f/dw_i^2 = 0
    torch.testing.assert_close(torch.diagonal(H, dim1=1, dim2=2), G ** 2)
    assert torch.all(torch.diagonal(Hf, dim1=1, dim2=2) == 0)


def test_gradient_flow_escape_time_matches_ode_integration():
    from scipy.integrate import solve_ivp

    for L, w0 in [(4, 0.5), (8, 0.6), (12, 0.7)]:
        t_exact = ti.chain_gf_escape_time(L, w0, 0.5)
        target = ti.chain_escape_target(L, w0, 0.5)
        ev = lambda t, w, target=target: w[0] - target
        ev.terminal = True
        sol = solve_ivp(lambda t, w, L=L: [w[0] ** (L - 1) * (1 - w[0] ** L)], (0, 10 * t_exact + 10), [w0], events=ev,
                        rtol=1e-10, atol=1e-12)
        assert sol.t_events[0][0] == pytest.approx(t_exact, rel=1e-5)
        assert ti.chain_gf_escape_time_lower_bound(L, w0, 0.5) <= t_exact
        # the bounding ODE dominates the true flow and blows up at t*
        tt = np.linspace(0, 0.99 * t_exact, 5)
        sol2 = solve_ivp(lambda t, w, L=L: [w[0] ** (L - 1) * (1 - w[0] ** L)], (0, tt[-1]), [w0], t_eval=tt, rtol=1e-10)
        assert np.all(ti.chain_gf_upper_bound(tt, L, w0) >= sol2.y[0] - 1e-9)
        assert math.isinf(ti.chain_gf_upper_bound(ti.chain_gf_blowup_time(L, w0) * 1.01, L, w0))
    # exponential in depth: 2^(L-2)/(L-2) for w0 = 1/2
    assert ti.chain_gf_blowup_time(22, 0.5) == pytest.approx(2 ** 20 / 20)
    with pytest.raises(ValueError, match="w0"):
        ti.chain_gf_escape_time(5, 1.5)


def _simulate_norms(widths, dist, var, act, x, n=40_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.as_tensor(x, dtype=torch.float64).expand(n, -1)
    m2, m4 = [float((h[0] ** 2).sum())], [float((h[0] ** 2).sum()) ** 2]
    L = len(widths) - 1
    for l in range(1, L + 1):
        shape = (n, widths[l], widths[l - 1])
        if dist == "normal":
            W = torch.randn(shape, generator=g, dtype=torch.float64) * math.sqrt(var[l - 1])
        else:
            a = ti.uniform_bound(var[l - 1])
            W = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * a
        h = torch.einsum("nij,nj->ni", W, h)
        if act == "relu" and l < L:
            h = torch.relu(h)
        s = (h ** 2).sum(1)
        m2.append(float(s.mean()))
        m4.append(float((s ** 2).mean()))
    return np.array(m2), np.array(m4)


@pytest.mark.parametrize("act", ["linear", "relu"])
@pytest.mark.parametrize("dist", ["normal", "uniform"])
def test_mlp_norm_moment_recursion_matches_simulation(act, dist):
    widths = [3, 4, 5, 4]
    var = [ti.init_variance("he" if act == "relu" else "xavier", widths[i], widths[i + 1]) for i in range(3)]
    mu4 = [ti.weight_fourth_moment(v, dist) for v in var]
    x = np.array([1.0, -0.5, 2.0])
    m2, m4 = ti.mlp_norm_moments(widths, var, mu4, act, x)
    s2, s4 = _simulate_norms(widths, dist, var, act, x)
    np.testing.assert_allclose(s2, m2, rtol=0.03)
    np.testing.assert_allclose(s4, m4, rtol=0.06)


def test_gaussian_closed_forms_and_width_condition():
    m, L = 8, 6
    for act, c in (("linear", 2), ("relu", 5)):
        var = 1.0 / m if act == "linear" else 2.0 / m
        m2, m4 = ti.mlp_norm_moments([m] * (L + 1), [var] * L, [3 * var ** 2] * L, act, np.ones(m),
                                     activate_last=True)
        assert m2[-1] == pytest.approx(m2[0])  # critical variance keeps the mean
        assert m4[-1] / m2[-1] ** 2 == pytest.approx(ti.normalized_second_moment_growth(m, L, act))
        assert ti.normalized_second_moment_growth(m, L, act) == pytest.approx((1 + c / m) ** L)
        width = ti.min_width_for_median(L, act, 0.5)
        var_ratio = ti.normalized_second_moment_growth(width, L, act) - 1
        assert ti.mallows_median_lower_bound(1.0, var_ratio) == pytest.approx(0.5)
    assert ti.min_width_for_median(100, "relu") / ti.min_width_for_median(50, "relu") == pytest.approx(2, rel=0.02)
    assert ti.lognormal_median(1.0, (1 + 5 / 32) ** 10) == pytest.approx((1 + 5 / 32) ** -5)
    assert ti.layer_gain(ti.init_variance("he", 32), 32, "relu") == pytest.approx(1.0)
    assert ti.layer_gain(ti.init_variance("lecun", 32), 32, "relu") == pytest.approx(0.5)
    assert ti.layer_gain(ti.init_variance("torch_default", 32), 32, "linear") == pytest.approx(1 / 3)
    sc = ti.hessian_block_scaling(10, 0.5)
    assert sc["diag_sq"] == pytest.approx(sc["gradient_sq"] ** 2)
    with pytest.raises(ValueError, match="scheme"):
        ti.init_variance("orthogonal", 3)
    with pytest.raises(ValueError, match="widths"):
        ti.mlp_norm_moments([3], [], [], "linear", np.ones(3))

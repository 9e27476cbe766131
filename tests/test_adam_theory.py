"""theory.adam: correction coefficients of seed 001 against direct sums, the paper's printed form and its limits."""

import math

import numpy as np
import pytest

from optiscope.theory import adam as T


@pytest.mark.parametrize("b", [0.0, 0.5, 0.9, 0.999])
def test_memory_coefficient_is_the_ema_weighted_mean_age(b):
    for n in [0, 1, 2, 7, 40]:
        ks = np.arange(n + 1)
        w = (1 - b) * b ** (n - ks)
        direct = float(np.sum(w * (n - ks)) / (1 - b ** (n + 1))) if b > 0 else 0.0
        assert T.memory_coefficient(b, n) == pytest.approx(direct, rel=1e-10, abs=1e-12)
    assert T.memory_coefficient(b, 0) == 0.0
    assert T.memory_coefficient(b, None) == pytest.approx(b / (1 - b))
    if b > 0:
        assert T.memory_coefficient(b, 20000) == pytest.approx(b / (1 - b), rel=1e-6)


def test_asymptotic_coefficient_matches_paper_eq3():
    rng = np.random.default_rng(0)
    g = rng.normal(size=50) * 10 ** rng.uniform(-4, 0, size=50)
    h, b1, b2, eps = 1e-3, 0.9, 0.999, 1e-6
    kappa = T.correction_coefficient(g, h, b1, b2, eps, n=None)
    paper = h / 2 * ((1 + b1) / (1 - b1) - (1 + b2) / (1 - b2) + (1 + b2) / (1 - b2) * eps / (g**2 + eps))
    np.testing.assert_allclose(kappa, paper, rtol=1e-12)


def test_exact_coefficient_tends_to_asymptotic_and_starts_with_discretisation_term():
    g = np.array([0.3, -1e-3, 2.0])
    h, b1, b2, eps = 1e-2, 0.8, 0.95, 1e-4
    k0 = T.correction_coefficient(g, h, b1, b2, eps, n=0)
    # n = 0: no memory yet, only the Euler term 1/2 eps/(g^2+eps)
    np.testing.assert_allclose(k0, h * 0.5 * eps / (g**2 + eps), rtol=1e-12)
    np.testing.assert_allclose(T.correction_coefficient(g, h, b1, b2, eps, n=5000),
                               T.correction_coefficient(g, h, b1, b2, eps, n=None), rtol=1e-9)


def test_small_and_large_eps_limits_give_table1_coefficients():
    h, b1, b2 = 1e-3, 0.9, 0.999
    # small eps (|g| >> sqrt eps): kappa -> one-norm coefficient lambda_1
    k = T.correction_coefficient(np.array([1.0, -2.0]), h, b1, b2, 1e-16)
    np.testing.assert_allclose(k, T.one_norm_coefficient(h, b1, b2), rtol=1e-9)
    assert T.one_norm_coefficient(h, b1, b2) == pytest.approx(-990 * h)  # spec 1b: (h/2)(19 - 1999)
    # large eps (|g| << sqrt eps): E~ = E + kappa/(2 sqrt eps) ||g||^2, kappa/(2 sqrt eps) = lambda_2
    eps = 1.0
    k = T.correction_coefficient(np.array([1e-7]), h, b1, b2, eps)
    assert k[0] / (2 * math.sqrt(eps)) == pytest.approx(T.two_norm_coefficient(h, b1, eps), rel=1e-9)
    # eps outside: kappa/(2 eps) -> h(1+b1)/(4 eps (1-b1))
    k = T.correction_coefficient(np.array([1e-9]), h, b1, b2, 0.5, eps_inside_sqrt=False)
    assert k[0] / (2 * 0.5) == pytest.approx(T.two_norm_coefficient(h, b1, 0.5, eps_inside_sqrt=False), rel=1e-6)
    assert T.large_eps_effective_lr(1e-3, 1e-4) == pytest.approx(1e-1)
    assert T.large_eps_effective_lr(1e-3, 1e-4, eps_inside_sqrt=False) == pytest.approx(10.0)


def test_table1_signs_and_regimes():
    assert T.one_norm_bias(0.9, 0.999) == "anti-penalized" and T.one_norm_coefficient(1e-3, 0.9, 0.999) < 0
    assert T.one_norm_bias(0.95, 0.9) == "penalized" and T.one_norm_coefficient(1e-3, 0.95, 0.9) > 0
    assert T.one_norm_bias(0.9, 0.9) == "none" and T.one_norm_coefficient(1e-3, 0.9, 0.9) == 0
    assert T.one_norm_coefficient(1e-3, 0.0, 0.99) == pytest.approx(-1e-3 * 99)  # RMSProp: -h rho/(1-rho)
    assert T.two_norm_coefficient(1e-3, 0.0, 1e-4) == pytest.approx(1e-3 / (4 * 1e-2))  # RMSProp: h/(4 sqrt eps)
    assert T.eps_regime([1.0, -0.5], 1e-8) == "small"
    assert T.eps_regime([1e-9, 1e-8], 1e-8) == "large"
    assert T.eps_regime([1.0, 1e-9], 1e-8) == "intermediate"


def test_rmsprop_is_adam_without_first_moment_and_bias_correction():
    g = np.array([0.1, -3.0, 1e-3])
    for n in [0, None]:
        r = T.correction_coefficient(g, 1e-2, 0.0, 0.9, 1e-3, n=n, algorithm="rmsprop")
        a = T.correction_coefficient(g, 1e-2, 0.0, 0.9, 1e-3, n=n, bias_correction=False)
        np.testing.assert_allclose(r, a)
    with pytest.raises(ValueError, match="beta1 must be 0"):
        T.correction_coefficient(g, 1e-2, 0.5, 0.9, 1e-3, algorithm="rmsprop")


def test_no_bias_correction_has_no_transient_coefficient():
    g = np.array([0.5])
    np.testing.assert_allclose(T.correction_coefficient(g, 1.0, 0.5, 0.9, 1e-2, n=None, bias_correction=False),
                               T.correction_coefficient(g, 1.0, 0.5, 0.9, 1e-2, n=None))
    assert T.correction_coefficient(g, 1.0, 0.5, 0.9, 1e-2, n=0, bias_correction=False)[0] == pytest.approx(
        0.5 * 1e-2 / (0.1 * 0.25 + 1e-2))
    with pytest.raises(ValueError, match="without bias correction"):
        T.correction_coefficient(g, 1.0, 0.5, 0.9, 1e-2, n=2, bias_correction=False)


def test_eps_outside_norm_gradient_and_limits():
    v = np.array([0.7, -0.2, 1e-3])
    eps = 0.05
    d = 1e-6
    for i in range(3):
        e = np.zeros(3)
        e[i] = d
        fd = (T.eps_outside_norm(v + e, eps) - T.eps_outside_norm(v - e, eps)) / (2 * d)
        assert fd == pytest.approx(v[i] / (abs(v[i]) + eps), rel=1e-5)
    assert T.eps_outside_norm(v, 1e-12) == pytest.approx(np.abs(v).sum(), rel=1e-9)
    assert T.eps_outside_norm(v * 1e-4, 10.0) == pytest.approx(np.sum((v * 1e-4) ** 2) / 20.0, rel=1e-4)


def test_truncation_horizon():
    K = T.truncation_horizon(0.9, 0.99, tol=1e-4)
    assert 0.99 ** K <= 1e-4 < 0.99 ** (K - 1)
    assert T.truncation_horizon(0.0, 0.0) == 0


@pytest.mark.parametrize("kw,match", [
    (dict(h=0.0), "step size h"), (dict(h=-1.0), "step size h"), (dict(h=float("nan")), "finite"),
    (dict(beta1=1.0), "beta1"), (dict(beta2=-0.1), "beta2"), (dict(beta2=1.0), "beta2"),
    (dict(eps=0.0), "eps must be > 0"), (dict(eps=-1e-8), "eps"),
])
def test_bad_input_raises_clear_errors(kw, match):
    args = dict(h=1e-3, beta1=0.9, beta2=0.999, eps=1e-8) | kw
    with pytest.raises(ValueError, match=match):
        T.correction_coefficient(np.ones(2), args["h"], args["beta1"], args["beta2"], args["eps"])
    with pytest.raises(ValueError, match=match):
        T.check_hyperparameters(**args)


def test_eps_zero_allowed_outside_only_and_bad_n():
    T.check_hyperparameters(1e-3, 0.9, 0.99, 0.0, eps_inside_sqrt=False)
    with pytest.raises(ValueError, match="iteration index"):
        T.memory_coefficient(0.9, -1)
    with pytest.raises(ValueError, match="non-finite"):
        T.correction_coefficient(np.array([np.nan]), 1e-3, 0.9, 0.99, 1e-8)

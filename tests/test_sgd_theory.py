"""optiscope.theory.sgd (seed 004): SE recursion, generating functions, stability, power laws, Prop. 5."""

from __future__ import annotations

import math

import numpy as np
import pytest

from optiscope.theory import sgd as th
from optiscope.theory.sgd import Spectrum, SpectrumError
from optiscope.theory.sgd_sim import exact_second_moments


def small_spectrum(n=40, nu=1.5, kappa=1.0):
    return Spectrum.power_law(nu, kappa, n)


# ------------------------------------------------------------------------------------------- spectrum
def test_spectrum_validation_errors():
    with pytest.raises(SpectrumError, match="negative"):
        Spectrum.from_arrays([1.0, -0.1], [1.0, 1.0])
    with pytest.raises(SpectrumError, match="length mismatch"):
        Spectrum.from_arrays([1.0, 0.5], [1.0])
    with pytest.raises(SpectrumError, match="non-finite"):
        Spectrum.from_arrays([1.0, np.nan], [1.0, 1.0])
    with pytest.raises(SpectrumError, match="non-finite"):
        Spectrum.from_arrays([1.0, 0.5], [np.inf, 1.0])
    with pytest.raises(SpectrumError, match="empty"):
        Spectrum.from_arrays([], [])
    with pytest.raises(SpectrumError, match="square"):
        Spectrum.from_kernel(np.ones((3, 2)), np.ones(3))
    with pytest.raises(SpectrumError, match="positive semi-definite"):
        Spectrum.from_kernel(np.diag([1.0, -1.0]), np.ones(2))
    with pytest.raises(SpectrumError, match="batch size 5 is larger"):
        th.noise_amplitude(5, 4)
    with pytest.raises(SpectrumError, match="nu"):
        Spectrum.power_law(-1.0, 1.0, 10)


def test_from_kernel_normalisation_and_sorting():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((12, 5))
    K = X @ X.T
    y = rng.standard_normal(12)
    f0 = rng.standard_normal(12)
    sp = Spectrum.from_kernel(K, y, initial_outputs=f0)
    assert sp.initial_loss == pytest.approx(0.5 * np.mean((f0 - y) ** 2), rel=1e-12)
    assert np.all(np.diff(sp.eigenvalues) <= 0)
    np.testing.assert_allclose(np.sort(sp.eigenvalues), np.sort(np.clip(np.linalg.eigvalsh(K / 12), 0, None)),
                               atol=1e-12)
    spn = Spectrum.from_kernel(K, y, initial_outputs=f0, normalize=True)
    assert spn.lambda_max == pytest.approx(1.0)
    assert spn.scale == pytest.approx(sp.lambda_max)


def test_noise_amplitude_values():
    assert th.noise_amplitude(10) == pytest.approx(0.1)
    assert th.noise_amplitude(10, 100) == pytest.approx(90 / (10 * 99))
    assert th.noise_amplitude(100, 100) == 0.0


# ------------------------------------------------------------------------------------------ SE recursion
def test_se_recursion_matches_hand_computed_steps():
    lam = np.array([1.0, 0.3])
    c = np.array([0.5, 0.2])
    sp = Spectrum.from_arrays(lam, c)
    a_lr, b, g, t1, t2 = 0.4, 0.6, 0.25, 1.0, 0.5
    C, J, P = c.copy(), np.zeros(2), np.zeros(2)
    losses = [0.5 * C.sum()]
    for _ in range(3):
        a = a_lr * lam
        noise = g * a ** 2 * (t1 * C.sum() - t2 * C)
        Pn = a ** 2 * C - 2 * b * a * J + b ** 2 * P + noise
        Cn = C - 2 * a * C + 2 * b * J + Pn
        Jn = b * J - a * C + Pn
        C, J, P = Cn, Jn, Pn
        losses.append(0.5 * C.sum())
    curve = th.se_loss_curve(sp, a_lr, b, batch_size=4, steps=3, tau1=t1, tau2=t2)  # gamma = 1/4
    np.testing.assert_allclose(curve.loss, losses, rtol=1e-13)


def test_se_exact_for_translation_invariant_kernel():
    """Seed 004 Prop. 2: on a regular grid of the torus with a translation-invariant kernel, SE with
    tau1 = tau2 = 1 is exact -> equals the exact second-moment dynamics (non-spectral noise term)."""
    N = 24
    x = np.arange(N)
    d = np.minimum(x, N - x)
    row = np.exp(-d / 2.5) + 0.1 * np.cos(2 * np.pi * x / N)
    K = np.array([np.roll(row, i) for i in range(N)])
    y = np.random.default_rng(1).standard_normal(N)
    sp = Spectrum.from_kernel(K, y)
    lr, mom, b = 0.7 / sp.lambda_max, 0.4, 5
    se = th.se_loss_curve(sp, lr, mom, b, 60, dataset_size=N)
    ex, _ = exact_second_moments(K, -y, lr, mom, b, 60)
    np.testing.assert_allclose(se.loss, ex, rtol=1e-9)


def test_se_not_exact_for_generic_kernel():
    """A kernel with localised eigenvectors breaks SE: the exact dynamics differ measurably (the test above can
    therefore fail)."""
    rng = np.random.default_rng(2)
    X = rng.standard_normal((20, 3)) * np.linspace(0.2, 3, 20)[:, None]
    K = X @ X.T
    y = rng.standard_normal(20)
    sp = Spectrum.from_kernel(K, y)
    lr = 0.8 / sp.lambda_max
    se = th.se_loss_curve(sp, lr, 0.0, 2, 40, dataset_size=20)
    ex, _ = exact_second_moments(K, -y, lr, 0.0, 2, 40)
    assert np.max(np.abs(se.loss - ex) / ex) > 0.01


def test_multiplicities_merge_equal_eigenvalues_exactly():
    lam = np.array([1.0, 0.5, 0.5, 0.5, 0.1])
    c = np.array([0.2, 0.1, 0.3, 0.05, 0.4])
    full = Spectrum.from_arrays(lam, c)
    merged = Spectrum.from_arrays([1.0, 0.5, 0.1], [0.2, 0.45, 0.4], multiplicities=[1, 3, 1])
    a = th.se_loss_curve(full, 0.5, 0.3, 2, 50)
    b = th.se_loss_curve(merged, 0.5, 0.3, 2, 50)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-12)
    assert th.noise_at_one(full, 0.5, 0.3, 0.5) == pytest.approx(th.noise_at_one(merged, 0.5, 0.3, 0.5))


def test_grid_matches_single_curves():
    sp = small_spectrum()
    lrs, moms = np.array([0.2, 0.4, 0.3]), np.array([0.0, 0.5, -0.3])
    grid, div = th.se_loss_grid(sp, lrs, moms, 4, 30, record=True, max_elements=50)
    for i in range(3):
        np.testing.assert_allclose(grid[i], th.se_loss_curve(sp, lrs[i], moms[i], 4, 30).loss, rtol=1e-12)
    assert np.all(div == -1)


# ---------------------------------------------------------------------------------- generating functions
def test_characteristic_polynomial_is_det():
    x, beta, gt, z = 0.37, 0.6, 0.3, 0.71
    A = np.array([[(1 - x) ** 2 - gt * x ** 2, 2 * beta * (1 - x), beta ** 2],
                  [-x * (1 - x) - gt * x ** 2, beta * (1 - 2 * x), beta ** 2],
                  [x ** 2 - gt * x ** 2, -2 * beta * x, beta ** 2]])
    assert th.characteristic_polynomial(x, z, beta, gt) == pytest.approx(np.linalg.det(np.eye(3) - z * A),
                                                                         rel=1e-12)


@pytest.mark.parametrize("mom,tau2", [(0.0, 1.0), (0.7, 1.0), (-0.4, 0.0), (0.5, -1.0)])
def test_loss_generating_function_taylor_coefficients(mom, tau2):
    """The Taylor coefficients of L~(z) = V~/(2(1-U~)) (Cauchy integral on |z| = r via FFT) equal the SE losses."""
    sp = small_spectrum(30)
    lr, b = 0.5, 3
    g = th.noise_amplitude(b)
    T = 40
    curve = th.se_loss_curve(sp, lr, mom, b, T, tau2=tau2)
    M, r = 512, 0.9
    z = r * np.exp(2j * np.pi * np.arange(M) / M)
    vals = th.loss_generating_function(sp, z, lr, mom, g, 1.0, tau2)
    coef = np.real(np.fft.fft(vals) / M) / r ** np.arange(M)
    np.testing.assert_allclose(coef[:T + 1], curve.loss, rtol=1e-8, atol=1e-12)


def test_noise_and_signal_functions_at_one_agree_with_closed_forms():
    sp = small_spectrum(30)
    lr, mom, b = 0.3, 0.6, 4
    g = th.noise_amplitude(b)
    assert float(th.noise_generating_function(sp, 1.0, lr, mom, g)) == pytest.approx(
        float(th.noise_at_one(sp, lr, mom, g)), rel=1e-12)
    assert float(th.signal_generating_function(sp, 1.0, lr, mom, g)) == pytest.approx(
        th.signal_at_one(sp, lr, mom, g), rel=1e-12)
    # and the loss series sums to L~(1) for a convergent configuration
    curve = th.se_loss_curve(sp, lr, mom, b, 20000)
    assert curve.loss.sum() == pytest.approx(float(th.loss_generating_function(sp, 1.0, lr, mom, g)), rel=2e-3)


# -------------------------------------------------------------------------------------------- stability
def test_critical_lr_closed_form_at_gamma_tau_one():
    """gamma tau = 1, beta = 0: D_k = 2, U~(1) = gamma alpha sum(lambda)/2 -> alpha_c = 2/(gamma sum lambda)."""
    sp = Spectrum.power_law(1.5, 1.0, 200)
    crit = th.critical_learning_rate(sp, 0.0, 1)
    assert crit == pytest.approx(2 / sp.eigenvalues.sum(), rel=1e-9)
    assert float(th.noise_at_one(sp, crit, 0.0, 1.0)) == pytest.approx(1.0, rel=1e-8)


@pytest.mark.parametrize("mom", [0.0, 0.5, 0.9])
def test_critical_lr_separates_convergent_and_divergent_se_dynamics(mom):
    sp = Spectrum.power_law(1.3, 1.0, 60)
    b = 2
    crit = th.critical_learning_rate(sp, mom, b)
    lo = th.se_loss_curve(sp, 0.9 * crit, mom, b, 4000)
    hi = th.se_loss_curve(sp, 1.1 * crit, mom, b, 4000, divergence_threshold=1e6)
    assert not lo.diverged and lo.loss[-1] < lo.loss[0]
    assert hi.diverged or hi.loss[-1] > hi.loss[-200] > hi.loss[0]
    assert th.stability(sp, 0.9 * crit, mom, b).converges
    assert not th.stability(sp, 1.1 * crit, mom, b).converges


def test_eventual_divergence_rate_and_constant():
    sp = Spectrum.power_law(0.8, 0.5, 3000)
    lr, mom, b = 0.1, 0.5, 1
    st = th.stability(sp, lr, mom, b)
    assert st.kind == "eventual divergence" and st.noiseless_stable
    curve = th.se_loss_curve(sp, lr, mom, b, 3000, divergence_threshold=1e200)
    t = np.arange(2000, 3001)
    rate = np.polyfit(t, np.log(curve.loss[t]), 1)[0]
    assert rate == pytest.approx(math.log(st.growth_rate), rel=1e-3)
    assert curve.loss[3000] / (st.divergence_constant * st.growth_rate ** 3000) == pytest.approx(1.0, rel=1e-2)
    assert st.divergence_time == pytest.approx(1 / math.log(st.growth_rate))


def test_immediate_divergence_is_an_outcome_not_nan():
    sp = small_spectrum()
    st = th.stability(sp, 5.0, 0.0, 4)
    assert st.kind == "immediate divergence" and not st.converges and st.growth_rate > 1
    d = st.to_dict()
    assert all(not (isinstance(v, float) and math.isnan(v)) for v in d.values())
    curve = th.se_loss_curve(sp, 5.0, 0.0, 4, 500)
    assert curve.diverged and curve.diverged_at < 500
    assert not np.any(np.isnan(curve.loss))
    assert curve.loss_list()[-1] is None


def test_prop4_bound_is_the_beta_to_one_limit():
    sp = Spectrum.power_law(1.5, 1.0, 500)
    b = 8
    bound = th.effective_lr_bound(sp, b)
    eff = [th.critical_learning_rate(sp, m, b) / (1 - m) for m in (0.9, 0.99, 0.999)]
    assert all(e <= bound * (1 + 1e-9) for e in eff)
    assert eff[-1] == pytest.approx(bound, rel=0.01)
    assert eff[0] < eff[1] < eff[2]


def test_stability_map_boundary_matches_critical_lr():
    sp = small_spectrum(50)
    lrs = np.linspace(0.01, 3, 40)
    moms = np.array([0.0, 0.5, 0.9])
    m = th.stability_map(sp, lrs, moms, 4)
    for i, mom in enumerate(moms):
        conv = m["converges"][i]
        assert np.all(conv == (lrs < m["critical_lr"][i]))


# ------------------------------------------------------------------------------------------- power laws
def test_fit_power_law_recovers_exponents():
    sp = Spectrum.power_law(1.7, 1.2, 100_000, scale=2.0, amplitude=3.0)
    fit = th.fit_power_law(sp)
    assert fit.nu == pytest.approx(1.7, abs=1e-6)
    assert fit.Lambda == pytest.approx(2.0, rel=1e-5)
    # finite count truncates the tail sums: sum_{l>=k}^{n} = K (k^-kappa - (n+1)^-kappa)
    assert fit.kappa == pytest.approx(1.2, abs=0.01)
    assert fit.K == pytest.approx(3.0, rel=0.03)
    assert fit.eig_range == (5, 300)


def test_power_law_phases():
    assert th.power_law_phase(0.4, 1.0)["phase"] == "immediate divergence"
    assert th.power_law_phase(0.8, 1.0)["phase"] == "eventual divergence"
    p = th.power_law_phase(1.5, 0.5)
    assert p["phase"] == "signal-dominated" and p["exponent"] == pytest.approx(1 / 3)
    p = th.power_law_phase(2.0, 4.0)
    assert p["phase"] == "noise-dominated" and p["exponent"] == pytest.approx(1.5)


def test_noise_dominated_asymptotics_match_se_recursion():
    nu, kappa = 2.0, 4.0
    sp = Spectrum.power_law(nu, kappa, 3000)
    lr = 0.3 * th.critical_learning_rate(sp, 0.5, 1)
    asym = th.asymptotic_loss(sp, lr, 0.5, 1, nu, kappa)
    curve = th.se_loss_curve(sp, lr, 0.5, 1, 4000)
    assert curve.loss[4000] / asym.loss(4000) == pytest.approx(1.0, abs=0.02)
    assert asym.transition_time == pytest.approx((asym.C_signal / asym.C_noise) ** (1 / (asym.zeta - asym.xi)))


def test_prop5_sign_matches_noise_constant_derivative():
    """gamma tau = 1, beta = 0, alpha at the C_noise optimum: sign(d ln C_noise/d beta) = sign(S) (Eq. 30)."""
    for nu, kappa in [(2.0, 3.5), (1.5, 2.5)]:
        sp = Spectrum.power_law(nu, kappa, 2000)
        a = th.optimal_lr_noise_dominated(sp, nu, 1)
        S = th.negative_momentum_criterion(sp, nu)
        d = th.log_constant_momentum_derivative(sp, nu, a, 1)
        assert np.sign(d) == np.sign(S) and S > 0
    with pytest.raises(SpectrumError):
        th.log_constant_momentum_derivative(sp, nu, a, 1, which="signal")


def test_advise_beats_a_default_choice():
    sp = small_spectrum(200)
    adv = th.advise(sp, 4, 300, n_lr=8, momenta=[0.0, 0.5, 0.9])
    base = th.se_loss_curve(sp, 0.5 * th.critical_learning_rate(sp, 0.0, 4), 0.0, 4, 300).loss[-1]
    assert np.isfinite(adv.loss) and adv.loss <= base
    assert adv.lr < th.critical_learning_rate(sp, adv.momentum, 4)

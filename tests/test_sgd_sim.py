"""optiscope.theory.sgd_sim: sampled output-space SGD with momentum and the exact second-moment dynamics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optiscope.theory.sgd import Spectrum, SpectrumError, se_loss_curve
from optiscope.theory.sgd_sim import exact_second_moments, simulate_sampled_sgd


def problem(n=14, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 4))
    K = X @ X.T
    y = rng.standard_normal(n)
    lam = np.linalg.eigvalsh(K / n).max()
    return K / lam, -y


def test_full_batch_is_deterministic_heavy_ball_by_hand():
    K, e0 = problem()
    n = K.shape[0]
    lr, mom = 0.3, 0.7
    runs = simulate_sampled_sgd(K, e0, lr, mom, batch_size=n, steps=5, n_runs=3, seed=4)
    e, p = e0.copy(), np.zeros(n)
    expected = [0.5 * np.mean(e ** 2)]
    for _ in range(5):
        g = K @ e / n
        p = mom * p + g
        e = e - lr * p
        expected.append(0.5 * np.mean(e ** 2))
    for r in range(3):
        np.testing.assert_allclose(runs.loss[r], expected, rtol=1e-12)


def test_sampled_mean_matches_exact_second_moments():
    K, e0 = problem(12, seed=3)
    lr, mom, b, T = 0.6, 0.5, 3, 25
    ex, div = exact_second_moments(K, e0, lr, mom, b, T)
    assert div is None
    runs = simulate_sampled_sgd(K, e0, lr, mom, b, T, n_runs=3000, seed=11)
    mean = runs.mean_loss()
    se = runs.loss.std(axis=0) / np.sqrt(runs.n_runs)
    z = np.abs(mean[1:] - ex[1:]) / se[1:]
    assert np.max(z) < 4.5
    # and the noise matters: the noiseless (full-batch) curve is clearly different
    gd, _ = exact_second_moments(K, e0, lr, mom, K.shape[0], T)
    assert np.max(np.abs(gd[1:] - ex[1:]) / se[1:]) > 10


def test_exact_moments_with_full_batch_equal_gd_and_se():
    K, e0 = problem(10, seed=5)
    n = K.shape[0]
    ex, _ = exact_second_moments(K, e0, 0.4, 0.3, n, 30)
    sp = Spectrum.from_kernel(K, -e0)
    se = se_loss_curve(sp, 0.4, 0.3, n, 30, dataset_size=n)  # gamma = 0
    np.testing.assert_allclose(ex, se.loss, rtol=1e-10)


def test_divergence_is_recorded_not_nan():
    K, e0 = problem()
    runs = simulate_sampled_sgd(K, e0, [0.1, 50.0], 0.0, 4, 200, n_runs=2, seed=0)
    assert runs.diverged_at[0] == -1 and runs.diverged_at[1] > 0
    assert np.isinf(runs.loss[1, -1]) and not np.any(np.isnan(runs.loss))
    ex, d = exact_second_moments(K, e0, 50.0, 0.0, 4, 200)
    assert d is not None and not np.any(np.isnan(ex))


def test_seeded_reproducibility_and_independence():
    K, e0 = problem()
    a = simulate_sampled_sgd(K, e0, 0.5, 0.2, 3, 20, n_runs=4, seed=7)
    b = simulate_sampled_sgd(K, e0, 0.5, 0.2, 3, 20, n_runs=4, seed=7)
    c = simulate_sampled_sgd(K, e0, 0.5, 0.2, 3, 20, n_runs=4, seed=8)
    np.testing.assert_array_equal(a.loss, b.loss)
    assert not np.allclose(a.loss, c.loss)
    assert not np.allclose(a.loss[0], a.loss[1])  # runs draw different batches


def test_record_every_and_float32():
    K, e0 = problem()
    r = simulate_sampled_sgd(K, e0, 0.5, 0.2, 3, 23, n_runs=2, seed=1, record_every=5, dtype=torch.float32)
    assert list(r.steps) == [0, 5, 10, 15, 20, 23]
    assert r.loss.shape == (2, 6)


def test_bad_inputs():
    K, e0 = problem()
    with pytest.raises(SpectrumError, match="batch size"):
        simulate_sampled_sgd(K, e0, 0.5, 0.0, 100, 5)
    with pytest.raises(SpectrumError, match="one value per run"):
        simulate_sampled_sgd(K, e0, [0.1, 0.2], 0.0, 2, 5, n_runs=3)
    with pytest.raises(SpectrumError, match="square"):
        simulate_sampled_sgd(K[:3], e0, 0.5, 0.0, 2, 5)

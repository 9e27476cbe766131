"""theory.two_layer (seed 000 §5, App. E, F) against dense torch.func Hessians, torch optimizers and simulation."""

import numpy as np
import pytest
import torch
from torch.func import hessian as torch_hessian

from optiscope.theory import two_layer as tl


def _torch_loss(theta, m, d, k, A, cov):
    W1 = theta[: m * d].reshape(m, d)
    W2 = theta[m * d:].reshape(k, m)
    R = W2 @ W1 - A
    return 0.5 * torch.trace(R @ cov @ R.T)


def _problem(m=4, d=3, k=2, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((k, d))
    B = rng.standard_normal((d, d))
    cov = B @ B.T / d + 0.5 * np.eye(d)          # non-whitened, to exercise Sigma_jj factors
    W1 = rng.standard_normal((m, d))
    W2 = rng.standard_normal((k, m))
    return W1, W2, tl.TwoLayerProblem(A, cov=cov)


def _dense_truth(W1, W2, prob):
    m, d = W1.shape
    k = W2.shape[0]
    theta = torch.tensor(np.concatenate([W1.ravel(), W2.ravel()]), dtype=torch.float64)
    A = torch.tensor(prob.A, dtype=torch.float64)
    cov = torch.tensor(prob.cov, dtype=torch.float64)
    return torch_hessian(lambda t: _torch_loss(t, m, d, k, A, cov))(theta).numpy()


def test_hessian_and_diagonal_match_torch_func_dense_hessian():
    W1, W2, prob = _problem()
    H_true = _dense_truth(W1, W2, prob)
    np.testing.assert_allclose(tl.hessian(W1, W2, prob), H_true, rtol=1e-10, atol=1e-10)
    D1, D2 = tl.hessian_diagonal(W1, W2, prob.cov)
    np.testing.assert_allclose(np.concatenate([D1.ravel(), D2.ravel()]), np.diag(H_true), rtol=1e-10)


def test_population_loss_and_gradient_match_autograd():
    W1, W2, prob = _problem(m=5, d=3, k=1, seed=1)
    t1 = torch.tensor(W1, requires_grad=True)
    t2 = torch.tensor(W2, requires_grad=True)
    R = t2 @ t1 - torch.tensor(prob.A)
    loss = 0.5 * torch.trace(R @ torch.tensor(prob.cov) @ R.T)
    loss.backward()
    assert tl.population_loss(W1, W2, prob) == pytest.approx(loss.item(), rel=1e-12)
    g1, g2 = tl.population_gradient(W1, W2, prob)
    np.testing.assert_allclose(g1, t1.grad.numpy(), rtol=1e-11)
    np.testing.assert_allclose(g2, t2.grad.numpy(), rtol=1e-11)


def test_population_loss_is_the_mean_over_a_large_gaussian_sample():
    W1, W2, prob = _problem(m=3, d=4, k=1, seed=2)
    prob = tl.TwoLayerProblem(prob.A, cov=None, noise_var=0.25)
    rng = np.random.default_rng(3)
    n = 400_000
    X = rng.standard_normal((n, 4))
    y = X @ prob.A.T + 0.5 * rng.standard_normal((n, 1))
    mc = 0.5 * np.mean(np.sum((X @ (W2 @ W1).T - y) ** 2, axis=1))
    assert tl.population_loss(W1, W2, prob) == pytest.approx(mc, rel=1e-2)


def test_rank_one_diagonal_gives_r_med_equal_to_r_u():
    rng = np.random.default_rng(4)
    m, d = 60, 7
    u = rng.standard_normal(m)
    u /= np.linalg.norm(u)
    v = rng.standard_normal(d)
    v /= np.linalg.norm(v)
    W1 = 2.5 * np.outer(u, v)
    w2 = 0.7 * u
    D1, D2 = tl.rank_one_diagonal(2.5, u, v, w2)
    E1, E2 = tl.hessian_diagonal(W1, w2[None, :])
    np.testing.assert_allclose(D1, E1, rtol=1e-12)
    np.testing.assert_allclose(D2, E2, rtol=1e-12)
    r_u = np.max(u ** 2) / np.median(u ** 2)
    assert np.max(D2) / np.median(D2) == pytest.approx(r_u, rel=1e-12)
    assert np.max(D1) / np.median(D1) == pytest.approx(r_u, rel=1e-12)
    uh, frac = tl.hidden_singular_vector(W1, hidden_axis=0)
    assert frac == pytest.approx(1.0) and abs(abs(uh @ u) - 1) < 1e-12


def test_gaussian_uniformity_matches_monte_carlo():
    rng = np.random.default_rng(5)
    med = 0.45493642311957
    for m in (50, 400):
        g2 = rng.standard_normal((20_000, m)) ** 2
        mc = np.mean(g2.max(axis=1)) / med
        assert tl.gaussian_uniformity(m) == pytest.approx(mc, rel=0.02)
    assert tl.gaussian_uniformity(400) > tl.gaussian_uniformity(50)
    assert tl.gaussian_uniformity(10**6, "asymptotic") / tl.gaussian_uniformity(10**6) == pytest.approx(1, abs=0.15)
    with pytest.raises(ValueError, match="kind"):
        tl.gaussian_uniformity(10, "bogus")


@pytest.mark.parametrize("opt", ["sgdm", "adam"])
def test_simulate_matches_torch_optimizers_step_by_step(opt):
    W1, W2, prob = _problem(m=4, d=3, k=1, seed=6)
    t1 = torch.tensor(W1, requires_grad=True)
    t2 = torch.tensor(W2, requires_grad=True)
    if opt == "sgdm":
        o = torch.optim.SGD([t1, t2], lr=0.01, momentum=0.9)
        traj = tl.simulate(W1, W2, prob, "sgdm", lr=0.01, steps=7, momentum=0.9)
    else:
        o = torch.optim.Adam([t1, t2], lr=0.01, betas=(0.9, 0.99), eps=1e-6)
        traj = tl.simulate(W1, W2, prob, "adam", lr=0.01, steps=7, betas=(0.9, 0.99), eps=1e-6,
                           bias_correction=True)
    for _ in range(7):
        o.zero_grad()
        R = t2 @ t1 - torch.tensor(prob.A)
        (0.5 * torch.trace(R @ torch.tensor(prob.cov) @ R.T)).backward()
        o.step()
    np.testing.assert_allclose(traj.W1[-1], t1.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(traj.W2[-1], t2.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_adam_without_bias_correction_first_step_is_hand_computed():
    W1, W2, prob = _problem(m=3, d=2, k=1, seed=7)
    g1, _ = tl.population_gradient(W1, W2, prob)
    traj = tl.simulate(W1, W2, prob, "adam", lr=0.1, steps=1, betas=(0.9, 0.999), eps=1e-8)
    expected = W1 - 0.1 * (0.1 * g1) / (np.sqrt(0.001 * g1 ** 2) + 1e-8)
    np.testing.assert_allclose(traj.W1[-1], expected, rtol=1e-12)


def test_simulation_reproduces_theorem1_ordering_and_sgd_gaussian_value():
    """Direct simulation of Eq. (3): R_med(Adam) < R_med(SGD+M) in both layers; SGD+M near the Gaussian value."""
    m = d = 100
    rng = np.random.default_rng(0)
    A = rng.standard_normal((1, d))
    A /= np.linalg.norm(A)
    prob = tl.TwoLayerProblem(A)
    sgd_r, adam_r = [], []
    for seed in range(3):
        W1, W2 = tl.small_gaussian_init(m, d, 1, 1e-3, np.random.default_rng(seed + 10))
        res = {}
        for opt, lr in (("sgdm", 0.02), ("adam", 1e-3)):
            tr = tl.simulate(W1, W2, prob, opt, lr=lr, steps=600)
            assert tr.diverged_at is None and tr.loss[-1] < 1e-3 * tr.loss[0]
            D1, D2 = tl.hessian_diagonal(tr.W1[-1], tr.W2[-1])
            res[opt] = (D1.max() / np.median(D1), D2.max() / np.median(D2))
            u, frac = tl.hidden_singular_vector(tr.W1[-1], 0)
            if opt == "sgdm":                                            # approximately rank one (App. B) ...
                assert frac > 0.99                                       # ... so R_med = R_u (App. F)
                assert res[opt][1] == pytest.approx(np.max(u ** 2) / np.median(u ** 2), rel=0.05)
            else:                                                        # Adam's sign-like steps leave more
                assert frac > 0.7                                        # energy off the leading direction
        assert res["adam"][0] < res["sgdm"][0] and res["adam"][1] < res["sgdm"][1]
        sgd_r.append(res["sgdm"][1])
        adam_r.append(res["adam"][1])
    pred = tl.theorem1_prediction(m)
    g2 = np.random.default_rng(1).standard_normal((4000, m)) ** 2
    lo, hi = np.quantile(g2.max(1) / np.median(g2, 1), [0.02, 0.98])
    assert all(lo <= r <= hi for r in sgd_r)                             # SGD+M's u is Gaussian-like
    assert np.mean(sgd_r) == pytest.approx(pred["sgdm"], rel=0.5)
    assert max(adam_r) < 3.0                                             # Adam: O(1)


def test_hessian_becomes_more_diagonal_during_training():
    """App. E, Theorem 2: mean off-diagonal/diagonal row ratio of the full Hessian is smaller after training."""
    m, d = 12, 6
    rng = np.random.default_rng(1)
    A = rng.standard_normal((1, d))
    A /= np.linalg.norm(A)
    prob = tl.TwoLayerProblem(A)
    W1, W2 = tl.small_gaussian_init(m, d, 1, 1e-2, rng)

    def ratio(a, b):
        H = np.abs(tl.hessian(a, b, prob))
        diag = np.diag(H)
        return np.mean((H.sum(1) - diag) / diag)

    for opt, lr in (("sgdm", 0.02), ("adam", 1e-3)):
        tr = tl.simulate(W1, W2, prob, opt, lr=lr, steps=2000)
        assert ratio(tr.W1[-1], tr.W2[-1]) < 0.1 * ratio(tr.W1[0], tr.W2[0])


def test_divergence_is_recorded_and_bad_input_rejected():
    W1, W2, prob = _problem(m=3, d=2, k=1, seed=8)
    tr = tl.simulate(10 * W1, 10 * W2, prob, "sgdm", lr=10.0, steps=200)
    assert tr.diverged_at is not None and tr.diverged_at <= 200
    with pytest.raises(ValueError, match="optimizer"):
        tl.simulate(W1, W2, prob, "lbfgs", lr=0.1, steps=1)
    with pytest.raises(ValueError, match="hidden width"):
        tl.hessian_diagonal(W1, np.ones((1, 5)))
    with pytest.raises(ValueError, match="teacher"):
        tl.population_loss(W1, W2, tl.TwoLayerProblem(np.ones((1, 5))))
    with pytest.raises(ValueError, match="noise_var"):
        tl.TwoLayerProblem(np.ones((1, 2)), noise_var=-1)

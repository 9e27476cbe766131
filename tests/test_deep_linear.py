"""theory.deep_linear against dense matrices and against GD on the factors (torch autograd, float64)."""

import numpy as np
import pytest
import torch

from optiscope.theory import deep_linear as dl


def _vec(A):
    return np.asarray(A).reshape(-1, order="F")


def _unvec(v, shape):
    return np.asarray(v).reshape(shape, order="F")


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_kronecker_form_equals_matrix_free_and_is_psd(depth):
    rng = np.random.default_rng(depth)
    W = rng.standard_normal((3, 5))
    G = rng.standard_normal((3, 5))
    P = dl.preconditioner_kronecker(W, depth)
    assert P.shape == (15, 15)
    np.testing.assert_allclose(_unvec(P @ _vec(G), G.shape), dl.apply_preconditioner(W, G, depth), atol=1e-12)
    np.testing.assert_allclose(P, P.T, atol=1e-12)
    assert np.linalg.eigvalsh(P).min() > -1e-10
    if depth == 1:
        np.testing.assert_allclose(P, np.eye(15), atol=1e-12)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (5, 2)])
def test_eigenvalues_from_svd_match_dense(depth, shape):
    rng = np.random.default_rng(10 * depth + shape[0])
    W = rng.standard_normal(shape)
    P = dl.preconditioner_kronecker(W, depth)
    spec = dl.preconditioner_eigenvalues(W, depth)
    np.testing.assert_allclose(spec.sorted(), np.linalg.eigvalsh(P), rtol=1e-9, atol=1e-10)
    # eigenvectors vec(u_r v_r'^T)
    for r in range(shape[0]):
        for rp in range(shape[1]):
            x = _vec(np.outer(spec.U[:, r], spec.V[:, rp]))
            np.testing.assert_allclose(P @ x, spec.eigenvalues[r, rp] * x, atol=1e-9)


def test_eigenvalues_of_rank_deficient_matrix_use_zero_power_identity():
    # rank-1 W, depth 2: lambda_{r,r'} = sigma_r^{0}... with 0^0 = 1: lambda_{0,0} = 2 s, lambda_{0,1} = s, others 0
    u, v = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    W = 3.0 * np.outer(u, v)
    spec = dl.preconditioner_eigenvalues(W, 2)
    np.testing.assert_allclose(np.sort(spec.eigenvalues.ravel()), [0.0, 3.0, 3.0, 6.0], atol=1e-12)
    np.testing.assert_allclose(spec.sorted(), np.linalg.eigvalsh(dl.preconditioner_kronecker(W, 2)), atol=1e-10)


@pytest.mark.parametrize("depth", [2, 3])
def test_balanced_factors_reproduce_matrix_and_are_balanced(depth):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((4, 2)) @ rng.standard_normal((2, 6))  # rank 2
    fs = dl.balanced_factors(W, depth, hidden=5, rng=rng)
    assert [f.shape for f in fs][0] == (5, 6) and fs[-1].shape == (4, 5)
    np.testing.assert_allclose(dl.end_to_end_matrix(fs), W, atol=1e-10)
    assert dl.balancedness(fs) < 1e-10
    with pytest.raises(ValueError, match="hidden width"):
        dl.balanced_factors(W, depth, hidden=1)


def _factor_gd_change(factors, loss_of_product, lr, weight_decay=0.0):
    """Delta W_e after one GD step on the factors of loss_of_product(W_e) + wd/2 sum ||W_j||^2 (torch float64)."""
    ts = [torch.tensor(f, dtype=torch.float64, requires_grad=True) for f in factors]
    We = ts[0]
    for t in ts[1:]:
        We = t @ We
    loss = loss_of_product(We) + 0.5 * weight_decay * sum((t**2).sum() for t in ts)
    grads = torch.autograd.grad(loss, ts)
    with torch.no_grad():
        new = [t - lr * g for t, g in zip(ts, grads)]
        We_new = new[0]
        for t in new[1:]:
            We_new = t @ We_new
    return We.detach().numpy(), We_new.numpy()


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_factor_gd_one_step_matches_preconditioner_formula(depth):
    rng = np.random.default_rng(depth)
    k, d, n = 3, 4, 20
    X = torch.tensor(rng.standard_normal((d, n)))
    Y = torch.tensor(rng.standard_normal((k, n)))

    def loss(We):
        return 0.5 * ((We @ X - Y) ** 2).sum() / n

    W0 = rng.standard_normal((k, d))
    fs = dl.balanced_factors(W0, depth, hidden=5, rng=rng)
    errs = []
    for lr in (1e-4, 1e-5):
        We, We_new = _factor_gd_change(fs, loss, lr)
        grad = ((torch.tensor(We) @ X - Y) @ X.T / n).numpy()
        predicted = dl.end_to_end_step(We, grad, depth, lr) - We
        errs.append(np.linalg.norm((We_new - We) - predicted) / np.linalg.norm(predicted))
    if depth == 1:
        assert errs[0] < 1e-10  # depth 1: the formula is plain GD, exact
    else:
        assert errs[0] < 1e-3
        assert 5 < errs[0] / errs[1] < 20  # the mismatch is O(lr): second-order terms only


def test_factor_gd_with_weight_decay_matches_first_order():
    rng = np.random.default_rng(7)
    depth, lr, wd = 3, 1e-5, 0.3
    T = torch.tensor(rng.standard_normal((4, 4)))

    def loss(We):
        return 0.5 * ((We - T) ** 2).sum()

    fs = dl.balanced_factors(rng.standard_normal((4, 4)), depth, rng=rng)
    We, We_new = _factor_gd_change(fs, loss, lr, weight_decay=wd)
    predicted = dl.end_to_end_step(We, We - T.numpy(), depth, lr, weight_decay=wd) - We
    assert np.linalg.norm((We_new - We) - predicted) / np.linalg.norm(predicted) < 1e-3
    # dropping the decay term makes it clearly wrong
    wrong = dl.end_to_end_step(We, We - T.numpy(), depth, lr) - We
    assert np.linalg.norm((We_new - We) - wrong) / np.linalg.norm(predicted) > 1e-2


def test_unbalanced_factors_do_not_follow_the_formula():
    # the formula needs balancedness: a strongly unbalanced factorization moves differently
    rng = np.random.default_rng(3)
    W1 = 10.0 * rng.standard_normal((4, 4))
    W2 = 0.1 * rng.standard_normal((4, 4))
    T = torch.tensor(rng.standard_normal((4, 4)))
    We, We_new = _factor_gd_change([W1, W2], lambda W: 0.5 * ((W - T) ** 2).sum(), 1e-6)
    predicted = dl.end_to_end_step(We, We - T.numpy(), 2, 1e-6) - We
    assert dl.balancedness([W1, W2]) > 1.0
    assert np.linalg.norm((We_new - We) - predicted) / np.linalg.norm(predicted) > 0.1


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_singular_value_velocity_matches_finite_difference_of_flow(depth):
    rng = np.random.default_rng(11)
    W = np.diag([3.0, 1.5, 0.5]) @ np.linalg.qr(rng.standard_normal((3, 3)))[0]
    G = rng.standard_normal((3, 3))
    h = 1e-7
    s0 = np.linalg.svd(W, compute_uv=False)
    s1 = np.linalg.svd(W - h * dl.apply_preconditioner(W, G, depth), compute_uv=False)
    np.testing.assert_allclose((s1 - s0) / h, dl.singular_value_velocity(W, G, depth), rtol=1e-5, atol=1e-6)


def test_large_singular_values_move_faster_for_depth_at_least_two():
    W = np.diag([4.0, 1.0, 0.25])
    G = -np.eye(3)  # equal pull on every singular direction
    v1 = dl.singular_value_velocity(W, G, 1)
    np.testing.assert_allclose(v1, [1.0, 1.0, 1.0])
    for depth in (2, 3, 4):
        v = dl.singular_value_velocity(W, G, depth)
        assert v[0] > v[1] > v[2] > 0
        np.testing.assert_allclose(v, depth * np.array([4.0, 1.0, 0.25]) ** (2 - 2 / depth))


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_single_output_form_equals_general_step(depth):
    rng = np.random.default_rng(5)
    w, g = rng.standard_normal(6), rng.standard_normal(6)
    np.testing.assert_allclose(dl.single_output_step(w, g, depth, 0.1, 0.01),
                               dl.end_to_end_step(w[None], g[None], depth, 0.1, 0.01)[0], rtol=1e-10)


def test_psd_power_and_bad_input():
    A = np.diag([4.0, 0.0])
    np.testing.assert_allclose(dl.psd_power(A, 0.5), np.diag([2.0, 0.0]), atol=1e-12)
    np.testing.assert_allclose(dl.psd_power(A, 0), np.eye(2))
    with pytest.raises(ValueError, match="depth"):
        dl.preconditioner_kronecker(np.eye(2), 0)
    with pytest.raises(ValueError, match="shape"):
        dl.apply_preconditioner(np.eye(2), np.eye(3), 2)
    with pytest.raises(ValueError, match="non-finite"):
        dl.preconditioner_eigenvalues(np.array([[np.nan]]), 2)
    with pytest.raises(ValueError, match="columns"):
        dl.end_to_end_matrix([np.eye(2), np.eye(3)])
    with pytest.raises(ValueError, match="power"):
        dl.psd_power(A, -1)

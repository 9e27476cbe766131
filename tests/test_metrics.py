"""Geometry metrics (issue 2 §3): hand-computed values and the identities behind them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import grad

from optiscope.curvature import Hessian
from optiscope.metrics import (
    diagonal_dominance,
    effective_rank,
    perturbed_one_norm,
    r_med,
    singular_vector_uniformity,
)

DT = torch.float64


def test_r_med_hand_computed():
    r = r_med(torch.tensor([4.0, 1.0, 2.0, -0.5, 0.0]), zeros="keep")
    assert r.median == 1.0 and r.max == 4.0 and r.value == 4.0
    assert r.n_nonpositive == 2 and r.n == 5 and r.n_zero == 0
    r2 = r_med([4.0, 1.0, 2.0, -0.5, 0.0], delta=1.0, zeros="keep")
    assert r2.value == 2.0 and r2.delta == 1.0
    r3 = r_med([4.0, 1.0, 2.0, -3.0], absolute=True)  # |h| = 4,1,2,3 -> median 2.5
    assert r3.value == pytest.approx(4 / 2.5) and r3.n_nonpositive == 1
    r4 = r_med([1.0, -2.0, -3.0])  # median <= 0: not a condition-number analogue -> undefined, never inf
    assert math.isnan(r4.value) and not r4.defined and r4.n_nonpositive == 2 and "<= 0" in r4.reason
    # exact zeros (unused embedding rows, dead units) are left out by default: median of [4, 1, 2, -0.5] = 1.5
    r5 = r_med([4.0, 1.0, 2.0, -0.5, 0.0, 0.0])
    assert r5.n == 4 and r5.n_zero == 2 and r5.median == 1.5 and r5.value == pytest.approx(4 / 1.5)
    # mostly zeros: with zeros kept the median is 0 (the old silent inf); excluded, the ratio is over the rest
    many = [0.0] * 7 + [3.0, 1.0, 2.0]
    assert math.isnan(r_med(many, zeros="keep").value) and r_med(many).value == pytest.approx(1.5)
    r6 = r_med([0.0, 0.0])
    assert math.isnan(r6.value) and not r6.defined and r6.n_zero == 2 and "exactly 0" in r6.reason
    with pytest.raises(ValueError, match="zeros"):
        r_med([1.0], zeros="drop")
    d = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([2.0])}
    assert r_med(d).value == pytest.approx(1.5)


def test_r_med_is_max_over_median_of_exact_hessian_diagonal():
    """On a quadratic with a known diagonal, R_med of the sampled exact diagonal is max/median of that diagonal."""
    h = torch.tensor([0.5, 2.0, 1.0, 8.0, 3.0], dtype=DT)
    H = Hessian.from_function(lambda p: 0.5 * (h * p["w"] ** 2).sum() + p["w"][0] * p["w"][1],
                              {"w": torch.ones(5, dtype=DT)})
    d = H.diagonal(H.sample_coordinates(per_layer=200))
    assert r_med(d.values["w"]).value == pytest.approx(8.0 / 2.0)


def test_r_med_bad_input():
    with pytest.raises(ValueError, match="empty"):
        r_med([])
    with pytest.raises(ValueError, match="non-finite"):
        r_med([1.0, float("nan")])
    with pytest.raises(ValueError, match="delta"):
        r_med([1.0], delta=-1)


def test_diagonal_dominance_hand_computed():
    A = np.array([[2.0, -1.0, 0.5], [-1.0, 4.0, 0.0], [0.5, 0.0, -1.0]])
    r = diagonal_dominance(A)
    np.testing.assert_allclose(r.per_coordinate, [1.5 / 2, 1.0 / 4, 0.5 / 1])
    assert r.mean == pytest.approx((0.75 + 0.25 + 0.5) / 3) and r.median == pytest.approx(0.5)
    assert r.mass == pytest.approx(3.0 / 7.0)
    assert r.frobenius == pytest.approx(math.sqrt(2 * 1 + 2 * 0.25) / math.sqrt(4 + 16 + 1))
    assert diagonal_dominance(np.diag([1.0, 2.0, 3.0])).mean == 0.0
    # a completely uniform n x n block: every coordinate has ratio n - 1 (seed 000 App. E.2)
    assert diagonal_dominance(np.ones((6, 6))).median == pytest.approx(5.0)
    with pytest.raises(ValueError, match="square"):
        diagonal_dominance(np.ones((2, 3)))


def test_diagonal_dominance_accepts_hessian_block():
    A = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]], dtype=DT)
    H = Hessian.from_function(lambda p: 0.5 * p["x"] @ A @ p["x"], {"x": torch.zeros(3, dtype=DT)})
    blk = H.diagonal_block({"x": [0, 1, 2]})
    np.testing.assert_allclose(diagonal_dominance(blk).per_coordinate, [1 / 3, 1.5 / 2, 0.5 / 1])


def test_singular_vector_uniformity_rank_one():
    u = np.array([1.0, -2.0, 0.5, 1.0, 3.0])
    u = u / np.linalg.norm(u)
    v = np.array([0.6, 0.8])
    W = 3.0 * np.outer(u, v)
    u2 = u ** 2
    assert singular_vector_uniformity(W) == pytest.approx(u2.max() / np.median(u2))
    assert singular_vector_uniformity(W.T, side="right") == pytest.approx(u2.max() / np.median(u2))
    assert singular_vector_uniformity(np.ones((4, 3))) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="zero"):
        singular_vector_uniformity(np.zeros((3, 3)))


def test_r_u_approximates_r_med_on_two_layer_linear_network():
    """Spec Paper 2, 2f: with whitened data, d2L/d(W2)_{ci}^2 = ||W1[i,:]||^2, so for a rank-one W1 the exact R_med
    of layer W2 equals R_u of W1's left singular vector."""
    g = torch.Generator().manual_seed(0)
    m, d, k = 9, 4, 3
    u = torch.randn(m, generator=g, dtype=DT)
    W1 = torch.outer(u, torch.randn(d, generator=g, dtype=DT))
    W2 = torch.randn(k, m, generator=g, dtype=DT)
    A = torch.randn(k, d, generator=g, dtype=DT)

    def population_loss(p):  # 1/2 E||W2 W1 x - A x||^2 with E[x x^T] = I
        return 0.5 * ((p["W2"] @ p["W1"] - A) ** 2).sum()

    H = Hessian.from_function(population_loss, {"W1": W1, "W2": W2})
    d2 = H.diagonal(H.sample_coordinates(per_layer=10_000)).values
    torch.testing.assert_close(d2["W2"], (W1 ** 2).sum(1).repeat(k), atol=1e-12, rtol=0)
    torch.testing.assert_close(d2["W1"], (W2 ** 2).sum(0).repeat_interleave(d), atol=1e-12, rtol=0)
    assert r_med(d2["W2"]).value == pytest.approx(singular_vector_uniformity(W1), rel=1e-10)


def test_perturbed_one_norm():
    g = torch.tensor([3.0, -4.0, 0.0])
    assert perturbed_one_norm(g, 0.0) == pytest.approx(7.0)
    assert perturbed_one_norm(g, 1.0) == pytest.approx(math.sqrt(10) + math.sqrt(17) + 1.0)
    assert perturbed_one_norm({"a": g[:2], "b": g[2:]}, 1.0) == pytest.approx(perturbed_one_norm(g, 1.0))
    assert perturbed_one_norm([g[:1], g[1:]], 0.0) == pytest.approx(7.0)
    with pytest.raises(ValueError, match="eps"):
        perturbed_one_norm(g, -1e-3)


def test_perturbed_one_norm_gradient_is_one_hvp():
    """Spec Paper 1, 1b: grad_theta ||grad E||_{1,eps} = H (g / sqrt(g^2 + eps))."""
    eps = 0.3
    x0 = torch.tensor([0.4, -1.1, 0.7], dtype=DT)

    def E(p):
        x = p["x"]
        return (x[0] * x[1]) ** 2 + torch.sin(x[2]) * x[0] + 0.25 * x[1] ** 4

    def norm_of_grad(p):
        gr = grad(E)(p)["x"]
        return torch.sqrt(gr ** 2 + eps).sum()

    H = Hessian.from_function(E, {"x": x0})
    gvec = H.gradient()["x"]
    assert perturbed_one_norm(gvec, eps) == pytest.approx(float(norm_of_grad({"x": x0})), rel=1e-12)
    hv = H.hvp({"x": gvec / torch.sqrt(gvec ** 2 + eps)})["x"]
    torch.testing.assert_close(hv, grad(norm_of_grad)({"x": x0})["x"], atol=1e-12, rtol=0)


def test_effective_rank():
    assert effective_rank(np.eye(5)) == pytest.approx(5.0)
    assert effective_rank(np.outer([1.0, 2.0], [3.0, 1.0, 0.5])) == pytest.approx(1.0)
    W = np.diag([3.0, 1.0, 0.0])
    p = np.array([0.75, 0.25])
    assert effective_rank(W) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert effective_rank(W, log_eps=1e-10) == pytest.approx(effective_rank(W), rel=1e-8)
    rng = np.random.default_rng(0)
    Q1, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    Q2, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    assert effective_rank(Q1[:, :3] @ W @ Q2.T) == pytest.approx(effective_rank(W))  # orthogonal invariance
    with pytest.raises(ValueError, match="2-D"):
        effective_rank(np.ones(3))

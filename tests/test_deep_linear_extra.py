"""The invariance experiment of the research notes after Li & Arora 2020 / Arora et al. 2019: Adam's rescaling
identity step by step, the ratio penalty's gradient against autograd and finite differences, the span measures,
a tiny end-to-end run, and verdicts that can fail."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optiscope.experiments.base import registry, run_experiment
from optiscope.experiments.explr_deep_linear import deep_linear_invariances as di
from optiscope.experiments.explr_deep_linear.matrix_completion import ratio_penalty
from optiscope.optim import Adam
from optiscope.utils.config import ConfigError


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_registered():
    spec = registry()["deep_linear_invariances"]
    assert spec.paper == "003" and {"quick", "full"} <= set(spec.presets)


@pytest.mark.parametrize("inside", [True, False])
def test_adam_on_scaled_loss_equals_adam_with_equivalent_eps(inside):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 5, generator=g, dtype=torch.float64)
    x0 = torch.randn(5, generator=g, dtype=torch.float64)

    def run(scale, eps):
        x = x0.clone().requires_grad_(True)
        opt = Adam([x], lr=0.05, eps=eps, eps_inside_sqrt=inside)
        for _ in range(25):
            opt.zero_grad()
            (scale * ((A @ x) ** 2).sum()).backward()
            opt.step()
        return x.detach()

    eps = 1e-3                                       # large on purpose: the eps effect is visible
    for c in (1e-2, 7.0):
        same = run(c, eps)
        equiv = run(1.0, di.adam_equivalent_eps(eps, c, inside))
        assert torch.allclose(same, equiv, rtol=1e-12, atol=1e-14)
        assert not torch.allclose(same, run(1.0, eps), rtol=1e-6)   # eps matters at these scales
    assert di.adam_equivalent_eps(1e-8, 10.0, True) == pytest.approx(1e-10)
    assert di.adam_equivalent_eps(1e-8, 10.0, False) == pytest.approx(1e-9)
    with pytest.raises(ValueError, match="scale"):
        di.adam_equivalent_eps(1e-8, 0.0)


def test_ratio_gradient_against_autograd_and_finite_differences():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((6, 5))
    G = di.ratio_penalty_gradient(W)
    Wt = torch.tensor(W, requires_grad=True)
    ratio_penalty(Wt).backward()
    np.testing.assert_allclose(G, Wt.grad.numpy(), rtol=1e-10, atol=1e-12)
    E = rng.standard_normal(W.shape)
    h = 1e-6
    fd = (float(ratio_penalty(torch.tensor(W + h * E))) - float(ratio_penalty(torch.tensor(W - h * E)))) / (2 * h)
    assert fd == pytest.approx(float(np.sum(G * E)), rel=1e-6)
    Gn = di.entrywise_ratio_gradient(W)
    f = lambda M: np.abs(M).sum() / np.linalg.norm(M)
    assert (f(W + h * E) - f(W - h * E)) / (2 * h) == pytest.approx(float(np.sum(Gn * E)), rel=1e-6)


def test_span_measures_at_a_rank_deficient_point():
    rng = np.random.default_rng(1)
    U = np.linalg.qr(rng.standard_normal((8, 8)))[0]
    V = np.linalg.qr(rng.standard_normal((8, 8)))[0]
    s = np.array([3.0, 2.0, 1.0, 0.5, 0, 0, 0, 0])
    W = U * s @ V.T
    assert di.misaligned_fraction(W, di.ratio_penalty_gradient(W)) < 1e-12
    assert di.misaligned_fraction(W, di.nuclear_norm_gradient(W)) < 1e-12
    assert di.misaligned_fraction(W, di.entrywise_ratio_gradient(W)) > 0.3
    # autograd's subgradient of svdvals at a rank-deficient point includes the null directions: it leaves the span
    Wt = torch.tensor(W, requires_grad=True)
    ratio_penalty(Wt).backward()
    assert di.misaligned_fraction(W, Wt.grad.numpy()) > 0.1
    assert np.isnan(di.misaligned_fraction(W, np.zeros_like(W)))
    # drift: zero for a matrix with the same singular vectors and spans, positive after a rotation
    assert di.singular_basis_drift(U[:, :4] * [1.0, 5.0, 2.0, 0.1] @ V[:, :4].T, U, V, 4) < 1e-12
    R = np.linalg.qr(rng.standard_normal((8, 8)))[0]
    assert di.singular_basis_drift(R @ W, U, V, 4) > 0.1
    traj = np.stack([W, 2 * W])
    assert di.trajectory_deviation(traj, traj) == 0.0
    assert di.trajectory_deviation(traj * (1 + 1e-3), traj) == pytest.approx(1e-3)


def test_gd_on_the_penalty_keeps_a_rank_deficient_start_in_its_span():
    rng = np.random.default_rng(2)
    W0 = rng.standard_normal((10, 3)) @ rng.standard_normal((3, 10))
    U0, _, V0t = np.linalg.svd(W0)
    traj = di._gd(W0, di.ratio_penalty_gradient, 0.01 * float(np.sum(W0 ** 2)), 50)
    assert max(di.singular_basis_drift(W, U0, V0t.T, 3) for W in traj) < 1e-10
    assert di._ratio(traj[-1]) < di._ratio(W0)                 # the penalty decreases
    ad = di._adam_numpy(W0, di.ratio_penalty_gradient, 1e-3, 50)
    assert di.singular_basis_drift(ad[-1], U0, V0t.T, 3) > 1e-4  # per-coordinate steps leave it


def test_tiny_run(tmp_path):
    store = run_experiment("deep_linear_invariances", "quick", out=tmp_path / "di", overrides=[
        "size=8", "rank=1", "n_observed=30", "steps=20", "penalty_steps=15", "scales=[0.1,10,100]",
        "control_scales=[2.0]", "span_rank=2"])
    res = store.read_results()
    ids = {c["id"] for c in res["claims"]}
    assert ids == {"adam_rescaling_equals_eps_change", "adam_trajectory_invariant", "adam_deviation_is_the_eps_effect",
                   "control_gd_not_invariant", "ratio_gradient_in_span_along_gd",
                   "gd_on_penalty_keeps_singular_vectors", "control_entrywise_penalty_leaves_span",
                   "adam_leaves_span", "depth_frees_gd_from_span"}
    assert all(c["reason"] for c in res["claims"])
    by_id = {c["id"]: c for c in res["claims"]}
    assert by_id["adam_rescaling_equals_eps_change"]["holds"] is True
    assert by_id["ratio_gradient_in_span_along_gd"]["holds"] is True
    assert list(store.figures_dir.glob("*.png"))


def test_verdicts_can_fail():
    cfg = di.DeepLinearInvariancesConfig()
    a = {"rows": [{"scale": c, "equivalent_eps": 1e-8 / c, "deviation": 0.3, "deviation_from_equivalent": 1e-3,
                   "predicted_deviation": 1e-4} for c in (0.1, 10.0, 100.0)],
         "gd_control": [{"scale": 2.0, "gd_deviation": 0.3, "adam_deviation": 0.3}]}
    claims = {c.id: c for c in di._adam_claims(cfg, a)}
    for cid in ("adam_rescaling_equals_eps_change", "adam_trajectory_invariant", "adam_deviation_is_the_eps_effect",
                "control_gd_not_invariant"):
        assert claims[cid].holds is False, cid
    drift = [0.0, 0.5]
    s = {"completion_gd": {"penalty_weight": 0.01, "max_misaligned_ratio": 0.5, "max_misaligned_nuclear": 0.5,
                           "min_misaligned_entrywise": 0.5, "min_misaligned_data": 0.5},
         "penalty_only": {"full_rank": {"rank": 8, "gd_ratio": drift, "gd_entrywise": [0.0, 1e-6],
                                        "adam_ratio": [0.0, 1e-6], "penalty_start": 2.0, "penalty_end_gd": 1.0},
                          "rank_deficient": {"rank": 2, "gd_ratio": drift, "gd_entrywise": [0.0, 1e-6],
                                             "adam_ratio": [0.0, 1e-6]},
                          "depth2": {"balanced": drift, "unbalanced": [0.0, 1e-6]}}}
    claims = {c.id: c for c in di._span_claims(cfg, s)}
    for cid in claims:
        assert claims[cid].holds is False, cid


def test_config_validation():
    with pytest.raises(ConfigError, match="device"):
        di.DeepLinearInvariancesConfig(device="nonsense")
    with pytest.raises(ConfigError, match="scales"):
        di.DeepLinearInvariancesConfig(scales=(1.0, 2.0))
    with pytest.raises(ConfigError, match="span_rank"):
        di.DeepLinearInvariancesConfig(span_rank=20)

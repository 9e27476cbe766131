"""experiments.explr_deep_linear.deep_linear_dynamics end-to-end on a tiny config, plus its building
blocks."""

import json

import numpy as np
import pytest

from optiscope.experiments.base import run_experiment
from optiscope.experiments.explr_deep_linear import deep_linear_dynamics as dld


def _tiny(**kw):
    base = dict(depths=(1, 2, 3), rows=3, cols=4, hidden=4, n_samples=10, step_sizes=(1e-4, 1e-5), dim=4,
                target_singular_values=(4.0, 1.0), init_scale=1e-2, max_steps=4000, log_every=5)
    base.update(kw)
    return dld.DeepLinearDynamicsConfig(**base)


def test_one_step_check_errors_shrink_linearly_with_lr():
    out = dld.one_step_check(_tiny(), 3, np.random.default_rng(0))
    e = out["formula_error"]
    assert e[1e-4] < 1e-3 and 5 < e[1e-4] / e[1e-5] < 20
    assert out["plain_gd_error"][1e-5] > 0.1  # depth 3 is not plain GD on W_e
    assert out["eigenvalue_error"] < 1e-12 and out["kronecker_vs_matrix_free"] < 1e-12


def test_trajectory_learns_large_singular_value_first():
    cfg = _tiny()
    W_star = np.diag([4.0, 1.0, 0.0, 0.0])
    tr = dld.trajectory(cfg, 2, W_star)
    assert tr["diverged_at"] is None
    t_big, t_small = tr["learned_at"]
    assert t_big < t_small
    # GD on W_e alone (depth 1) learns both at the same step
    tr1 = dld.trajectory(cfg, 1, W_star)
    assert tr1["learned_at"][0] == tr1["learned_at"][1]
    assert np.median(tr["velocity_error"]) < 0.05


def test_end_to_end_tiny_run(tmp_path):
    run_experiment("deep_linear_dynamics", config=_tiny(), out=tmp_path / "d")
    res = json.loads((tmp_path / "d" / "results.json").read_text())
    claims = {c["id"]: c for c in res["claims"]}
    assert set(claims) == {"one_step_preconditioner", "plain_gd_is_wrong_for_depth", "preconditioner_eigenvalues",
                           "singular_value_velocity", "large_singular_values_move_faster"}
    assert claims["one_step_preconditioner"]["holds"] is True
    assert claims["preconditioner_eigenvalues"]["holds"] is True
    spread = claims["large_singular_values_move_faster"]["measured"]["log_learning_time_spread"]
    assert spread["1"] == pytest.approx(0.0) and spread["2"] > 0.5
    assert (tmp_path / "d" / "figures" / "singular_value_dynamics.png").exists()


def test_config_validation():
    with pytest.raises(ValueError, match="step_sizes"):
        dld.DeepLinearDynamicsConfig(step_sizes=(1e-3,))
    with pytest.raises(ValueError, match="target_singular_values"):
        dld.DeepLinearDynamicsConfig(dim=2, target_singular_values=(3.0, 2.0, 1.0))

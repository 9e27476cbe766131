"""explr_equivalence and explr_scale_invariance end-to-end on tiny configs (float64, Fashion-MNIST subset)."""

import json

import numpy as np
import pytest

from optiscope.experiments.base import run_experiment
from optiscope.experiments.explr_deep_linear import explr_equivalence as ee
from optiscope.experiments.explr_deep_linear import explr_scale_invariance as esi
from optiscope.theory.explr import explr_alpha


def _tiny(**kw):
    base = dict(n_train=256, n_test=64, batch_size=64, width=16, steps=12, log_every=3, weight_decay=2e-2,
                milestones=(0.5,))
    base.update(kw)
    return ee.ExpLRConfig(**base)


def _results(path):
    return json.loads((path / "results.json").read_text())


def test_equivalence_holds_to_rounding_in_float64(tmp_path):
    cfg = _tiny()
    run_experiment("explr_equivalence", config=cfg, out=tmp_path / "e")
    res = _results(tmp_path / "e")
    claims = {c["id"]: c for c in res["claims"]}
    for s in ("constant", "step_decay"):
        assert claims[f"function_equivalence_{s}"]["holds"] is True
        m = claims[f"function_equivalence_{s}"]["measured"]
        assert m["max_loss_rel_diff"] < 1e-10 and m["max_output_rel_diff"] < 1e-10
        assert claims[f"norm_growth_{s}"]["holds"] is True
        # the run without the schedule is far from the WD run: the equivalence test could have failed
        assert claims[f"control_no_schedule_{s}"]["holds"] is True
        assert claims[f"control_no_schedule_{s}"]["measured"]["control_max_loss_rel_diff"] > 1e-4
    assert all(c["reason"] for c in res["claims"])
    # norms grow like alpha^-t: the logged ratio at step t equals alpha^-t
    alpha = explr_alpha(cfg.lr, cfg.weight_decay, cfg.momentum)
    m = claims["norm_growth_constant"]["measured"]
    assert m["ratio_measured_at_last_logged"] == pytest.approx(alpha ** -m["last_logged_step"], rel=1e-10)
    assert m["ratio_measured_at_last_logged"] > 1.05
    assert res["metrics"]["invariant_params"] == ["layers.0.bias", "layers.0.weight", "layers.1.bias",
                                                  "layers.1.weight"]
    assert (tmp_path / "e" / "figures" / "explr_equivalence.png").exists()


def test_control_fails_when_weight_decay_is_negligible(tmp_path):
    """With weight decay ~ 0 the schedule is ~ constant, so the control equals the exp run: its claim is False."""
    run_experiment("explr_equivalence", config=_tiny(weight_decay=1e-13, schedules=("constant",)),
                   out=tmp_path / "tiny_wd")
    claims = {c["id"]: c for c in _results(tmp_path / "tiny_wd")["claims"]}
    assert claims["function_equivalence_constant"]["holds"] is True
    assert claims["control_no_schedule_constant"]["holds"] is False


def test_including_non_invariant_parameters_breaks_the_identity(tmp_path):
    run_experiment("explr_equivalence", config=_tiny(non_invariant="include", schedules=("constant",)),
                   out=tmp_path / "inc")
    claims = {c["id"]: c for c in _results(tmp_path / "inc")["claims"]}
    assert claims["function_equivalence_constant"]["holds"] is None  # not claimed exact
    assert claims["function_equivalence_constant"]["measured"]["max_output_rel_diff"] > 1e-6


def test_step_decay_multipliers_and_validation():
    cfg = _tiny(steps=8, milestones=(0.5, 0.75), decay_factor=0.1)
    np.testing.assert_allclose(ee.lr_multipliers(cfg, "step_decay"), [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    np.testing.assert_allclose(ee.lr_multipliers(cfg, "constant"), np.ones(8))
    with pytest.raises(ValueError, match="weight_decay"):
        ee.ExpLRConfig(lr=1.0, weight_decay=0.5, momentum=0.9)
    with pytest.raises(ValueError, match="non_invariant"):
        ee.ExpLRConfig(non_invariant="ignore")


def test_scale_invariance_experiment(tmp_path):
    cfg = esi.ScaleInvarianceConfig(n_train=256, batch_size=64, width=16, steps=6, checkpoints=(0, 6))
    run_experiment("explr_scale_invariance", config=cfg, out=tmp_path / "s")
    claims = {c["id"]: c for c in _results(tmp_path / "s")["claims"]}
    for cid in ("invariant_groups", "grad_orthogonal_to_weights", "grad_scales_inverse", "norm_increases"):
        assert claims[cid]["holds"] is True, (cid, claims[cid]["measured"])
    usual = claims["usual_bn_eps_is_approximate"]["measured"]["max_abs_cos"]
    assert all(1e-12 < v < 1e-2 for v in usual.values())  # eps = 1e-5: visibly inexact, still small

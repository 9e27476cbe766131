"""The three-valued verdict rule (optiscope.metrics.verdicts): True, False and None cases for every claim kind."""

import math

import numpy as np
import pytest
from scipy import stats

from optiscope.metrics.verdicts import (
    Verdict,
    band_claim,
    check_premises,
    direction_claim,
    fraction_claim,
    mean_ci,
    negative_control_claim,
    tolerance_claim,
    verdict_label,
)

BAND = (1.4, 2.0)
WIDE = (1.2, 3.0)


def test_band_claim_holds_inside_and_overlapping():
    assert band_claim((1.5, 1.9), BAND, widen_to=WIDE).holds is True
    # overlaps the widened band from above only
    assert band_claim((2.8, 4.6), BAND, widen_to=WIDE).holds is True
    holds, reason = band_claim((1.1, 1.3), BAND, widen_to=WIDE)
    assert holds is True and "overlaps" in reason


def test_band_claim_false_far_above_band_the_old_one_sided_rule_passed():
    # the reported 33x ratio: a one-sided ">= 1.4" rule passed it; the band rule must not
    v = band_claim((25.0, 40.0), BAND, widen_to=WIDE, estimate=33.2)
    assert v.holds is False and "above" in v.reason
    # CI [3.25, 4.61] lies above [1.2, 3]
    assert band_claim((3.25, 4.61), BAND, widen_to=WIDE).holds is False


def test_band_claim_false_when_direction_not_established():
    v = band_claim((0.4, 1.7), BAND, widen_to=WIDE)
    assert v.holds is False and "direction" in v.reason
    assert band_claim((0.3, 0.9), BAND, widen_to=WIDE).holds is False
    # without a null value, only the band counts
    assert band_claim((0.9, 1.7), BAND, widen_to=WIDE, null=None).holds is True


def test_band_claim_none_on_failed_premise_or_missing_ci():
    v = band_claim((1.5, 1.9), BAND, widen_to=WIDE, premises=[(False, "SGD+M still on the plateau")])
    assert v.holds is None and "plateau" in v.reason
    assert band_claim(None, BAND).holds is None
    assert band_claim((float("nan"), 2.0), BAND).holds is None


def test_band_claim_validates():
    with pytest.raises(ValueError, match="band"):
        band_claim((1, 2), (2.0, 1.0))
    with pytest.raises(ValueError, match="contain"):
        band_claim((1, 2), BAND, widen_to=(1.5, 3.0))
    with pytest.raises(ValueError, match="low <= high"):
        band_claim((2, 1), BAND)


def test_direction_claim_all_three_values():
    assert direction_claim((1.1, 2.0)).holds is True
    assert direction_claim((0.8, 2.0)).holds is False
    v = direction_claim((0.2, 0.9))
    assert v.holds is False and "below" in v.reason
    assert direction_claim((-0.5, -0.1), null=0.0, direction="less").holds is True
    assert direction_claim((-0.5, 0.1), null=0.0, direction="less").holds is False
    assert direction_claim((1.1, 2.0), premises=[(True, "ok"), (False, "Adam not faster")]).holds is None
    assert "Adam not faster" in direction_claim((1.1, 2), premises=[(False, "Adam not faster")]).reason
    with pytest.raises(ValueError):
        direction_claim((1, 2), direction="up")


def test_fraction_claim_matches_clopper_pearson_bound():
    # one-sided 95% Clopper-Pearson lower bound for k of n is the beta quantile Beta(0.05; k, n-k+1)
    for k, n in [(9, 10), (7, 10), (15, 20), (5, 5)]:
        low = float(stats.beta.ppf(0.05, k, n - k + 1))
        v = fraction_claim(k, n)
        assert v.holds is (low > 0.5), (k, n, low)
    assert fraction_claim(9, 10).holds is True
    assert fraction_claim(7, 10).holds is False      # 0.7 but lower bound 0.39
    assert fraction_claim(3, 5).holds is False       # the old "3 of 5 is most" rule
    assert fraction_claim(5, 5).holds is True        # (0.05)^(1/5) = 0.549 > 0.5


def test_fraction_claim_untestable_with_too_few_units():
    v = fraction_claim(4, 4)      # (0.05)^(1/4) = 0.473 <= 0.5
    assert v.holds is None and "too few" in v.reason
    assert fraction_claim(0, 0).holds is None
    assert fraction_claim(9, 10, premises=[(False, "neither optimizer learns")]).holds is None
    with pytest.raises(ValueError):
        fraction_claim(6, 5)
    with pytest.raises(ValueError):
        fraction_claim(1, 5, threshold=1.5)


def test_tolerance_claim():
    assert tolerance_claim(1.05, 1.0, rel_tol=0.1).holds is True
    v = tolerance_claim(1.2, 1.0, rel_tol=0.1)
    assert v.holds is False and "20.0%" in v.reason
    assert tolerance_claim(0.3, 0.0, abs_tol=0.5).holds is True
    assert tolerance_claim(1.02, 1.0, rel_tol=0.1, ci=(0.95, 1.08)).holds is True       # CI inside
    assert tolerance_claim(1.5, 1.0, rel_tol=0.1, ci=(1.2, 1.9)).holds is False          # CI outside
    v = tolerance_claim(1.5, 1.0, rel_tol=0.1, ci=(-3.0, 5.0))                           # too wide to decide
    assert v.holds is None and "straddles" in v.reason
    assert tolerance_claim(float("nan"), 1.0, rel_tol=0.1).holds is None
    assert tolerance_claim(1.0, 1.0, rel_tol=0.1, premises=[(False, "diverged")]).holds is None
    with pytest.raises(ValueError):
        tolerance_claim(1.0, 1.0)


def test_negative_control_claim():
    assert negative_control_claim(0.02, 0.5).holds is True
    v = negative_control_claim(0.114, 0.10)       # noiseless GD as close as the theory: the test cannot tell
    assert v.holds is False and "cannot tell" in v.reason
    assert negative_control_claim(0.1, 0.15, margin=2.0).holds is False
    assert negative_control_claim(0.1, 0.5, ratio_ci=(3.0, 6.0), margin=2.0).holds is True
    assert negative_control_claim(0.1, 0.5, ratio_ci=(1.5, 6.0), margin=2.0).holds is False
    assert negative_control_claim(float("inf"), 0.5).holds is None
    with pytest.raises(ValueError):
        negative_control_claim(0.1, 0.2, margin=0.5)


def test_check_premises_and_labels():
    assert check_premises([(True, "a"), (1, "b")]) is None
    v = check_premises([(True, "a"), (False, "b"), (False, "c")])
    assert v == Verdict(None, "untestable here: b")
    assert [verdict_label(x) for x in (True, False, None)] == ["holds", "does not hold", "untestable"]


def test_mean_ci_coverage_by_simulation():
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(400):
        m, lo, hi = mean_ci(rng.normal(2.0, 1.0, size=6))
        hits += lo <= 2.0 <= hi
    assert 0.92 <= hits / 400 <= 0.98
    m, lo, hi = mean_ci([3.0])
    assert m == 3.0 and math.isnan(lo)


def test_claim_reason_and_tier_in_results_json(tmp_path):
    import json
    from dataclasses import dataclass

    from optiscope.experiments.base import TIERS, Claim, Result, register, run_experiment
    from optiscope.utils.config import Config

    # old positional constructor calls keep working
    old = Claim("a", "text", 1.0, 2.0, True)
    assert old.to_dict(tier="quick") == {"id": "a", "claim": "text", "paper": 1.0, "measured": 2.0,
                                         "holds": True, "reason": "", "tier": "quick"}
    j = Claim.judged("b", "text", "1.4-2x", 5.0, band_claim((4.0, 6.0), BAND, widen_to=WIDE), tier="medium")
    assert j.holds is False and "above" in j.reason and j.to_dict(tier="quick")["tier"] == "medium"
    assert TIERS == ("quick", "medium", "full")

    @dataclass(frozen=True)
    class _Cfg(Config):
        seed: int = 0

    def _fn(cfg, store):
        return Result(claims=[Claim("x", "c", 1, 1, None, "untestable here: premise"),
                              Claim("y", "c", 1, 1, True, tier="full")])

    from optiscope.experiments import base

    register("_verdict_probe", paper="000", title="t", config=_Cfg,
             presets={"full": _Cfg(), "medium": _Cfg(), "quick": _Cfg()})(_fn)
    try:
        assert list(base.get("_verdict_probe").presets) == ["quick", "medium", "full"]
        run_experiment("_verdict_probe", preset="medium", out=tmp_path / "r")
    finally:
        base._REGISTRY.pop("_verdict_probe", None)
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert [(c["id"], c["holds"], c["tier"]) for c in res["claims"]] == [("x", None, "medium"), ("y", True, "full")]
    assert res["claims"][0]["reason"] == "untestable here: premise"
    with pytest.raises(ValueError, match="unknown preset"):
        register("_verdict_bad", paper="000", title="t", config=_Cfg,
                 presets={"quick": _Cfg(), "full": _Cfg(), "huge": _Cfg()})(_fn)

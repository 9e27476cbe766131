"""Probe budget before a run: HVPs per checkpoint, ETA from one timed HVP, the 3x-training warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_lab_common import tiny_problem

from optiscope.lab import Run
from optiscope.lab.probes import (PROBE_BUDGET_WARN_RATIO, ProbeBudget, RMedProbe, make_probes, probe_budget,
                                  probe_hvps)


def test_hvp_counts_per_probe():
    pb = tiny_problem(d=5, hidden=6, classes=3)  # weights 6x5 = 30 and 3x6 = 18 entries; biases 6 and 3
    assert RMedProbe().params == "weights"  # the default: weight matrices only
    r_med, r_all, sharp, trace, dd = make_probes(["r_med:per_layer=10", "r_med:per_layer=10,params=None",
                                                  "sharpness:max_iter=40", "trace:n_probes=12",
                                                  "diag_dominance:per_layer=4"])
    assert probe_hvps(r_med, pb) == 10 + 10
    assert probe_hvps(r_all, pb) == 10 + 6 + 10 + 3
    assert probe_hvps(r_med, pb, structured={"0.weight"}) == 10  # exact diagonal by second-order backprop
    assert probe_hvps(sharp, pb) == 40 and probe_hvps(trace, pb) == 12
    assert probe_hvps(dd, pb) == 4 + 4 + 4 + 3
    assert probe_hvps(make_probes(["loss"])[0], pb) == 0


def test_budget_eta_and_purity():
    pb = tiny_problem()
    state = {k: v.clone() for k, v in pb.model.state_dict().items()}
    rng = torch.get_rng_state()
    b = probe_budget(["loss", "sharpness:max_iter=20", "trace:n_probes=9"], pb, n_checkpoints=5, steps=100,
                     batch_size=32)
    assert b.hvps == {"loss": 0, "sharpness": 20, "trace": 9} and b.total_hvps == 29
    assert b.seconds_per_hvp > 0 and b.training_seconds > 0
    assert b.seconds_per_checkpoint == pytest.approx(b.graph_seconds + 29 * b.seconds_per_hvp)
    assert b.total_seconds == pytest.approx(5 * b.seconds_per_checkpoint)
    assert b.ratio == pytest.approx(b.total_seconds / b.training_seconds)
    assert "29 HVPs per checkpoint" in b.summary() and "ETA" in b.summary()
    for k, v in pb.model.state_dict().items():
        assert torch.equal(v, state[k])
    assert torch.equal(torch.get_rng_state(), rng)


def test_warning_above_three_times_training():
    cheap = ProbeBudget({"trace": 10}, 2, 1e-3, 0.0, training_seconds=1.0)
    assert not cheap.too_expensive and cheap.warning() is None
    costly = ProbeBudget({"r_med": 1000}, 10, 1e-3, 0.0, training_seconds=1.0)
    assert costly.ratio == pytest.approx(10.0) and costly.ratio > PROBE_BUDGET_WARN_RATIO
    assert "10.0x the training time" in costly.warning()


def test_run_prints_the_budget_and_warns(capsys, monkeypatch):
    from optiscope.utils import progress

    # earlier tests (CLI --quiet through CliRunner) may have silenced output process-wide
    monkeypatch.setattr(progress, "_QUIET", False)
    monkeypatch.delenv("OPTISCOPE_QUIET", raising=False)
    pb = tiny_problem()
    run = Run(pb, "sgd:lr=0.1", steps=4, batch_size=16, probe_every=1, probes=["loss", "sharpness:max_iter=200"],
              checkpoint=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.execute()
    err = capsys.readouterr().err
    assert "probe budget: up to 200 HVPs per checkpoint (sharpness 200) x 5 checkpoints" in err
    assert any("x the training time" in str(w.message) for w in caught)  # 200 HVPs x 5 >> 4 SGD steps
    quiet = Run(pb, "sgd:lr=0.1", steps=4, batch_size=16, probes=["loss"], checkpoint=False)
    quiet.execute()
    assert "probe budget" not in capsys.readouterr().err  # no Hessian probe: nothing to estimate

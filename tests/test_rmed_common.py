"""experiments.diagonal_uniformity.common: headline statistics (hand-computed), R_med summaries, probe
against a dense Hessian."""

import math

import numpy as np
import pandas as pd
import pytest

from optiscope.experiments.diagonal_uniformity import common as rc


def _frame(values: dict, steps=(0, 10, 20)):
    """values[(optimizer, repeat, layer)] = list of R_med per step."""
    rows = []
    for (opt, r, layer), vs in values.items():
        for s, v in zip(steps, vs):
            rows.append({"run": opt, "optimizer": opt, "step": s, "metric": "r_med", "layer": layer,
                         "value": v, "repeat": r})
    return pd.DataFrame(rows)


def test_rmed_values_late_mean_final_and_step():
    df = _frame({("adam", 0, "a"): [9, 2, 4], ("adam", 1, "a"): [9, 6, 8], ("adam", 0, "b"): [1, 1, 1],
                 ("adam", 1, "b"): [1, 3, 5]})
    v = rc.rmed_values(df, "adam", ["a", "b", "missing"])
    np.testing.assert_allclose(v[:, :2], [[3, 1], [7, 4]])          # mean of steps >= 10
    assert np.isnan(v[:, 2]).all()
    np.testing.assert_allclose(rc.rmed_values(df, "adam", ["a"], at="final"), [[4], [8]])
    np.testing.assert_allclose(rc.rmed_values(df, "adam", ["a"], step=0), [[9], [9]])
    with pytest.raises(ValueError, match="at ="):
        rc.rmed_values(df, "adam", ["a"], at="best")


def test_gap_summary_hand_computed():
    layers = ["emb", "l1", "l2", "l3", "l4"]
    adam = np.array([[10.0, 1, 2, 4, 8], [10.0, 3, 2, 4, 8]])
    sgd = np.array([[1.0, 4, 6, 2, 16], [1.0, 4, 2, 2, 16]])
    s = rc.gap_summary(adam, sgd, layers, exclude_first=1, n_resamples=500, seed=0)
    # kept layers l1..l4: mean adam = [2, 2, 4, 8], mean sgd = [4, 4, 2, 16]; ratios = [2, 2, 0.5, 2]
    assert s["frac_layers_a_smaller"] == pytest.approx(0.75)
    assert s["median_ratio"] == pytest.approx(2.0)
    lo, hi = s["ci95"]
    # resampling the two repeats: {0,0} -> ratios [4, 3, .5, 2], median 2.5 (prob 1/4); {1,1} -> [4/3, 1, .5, 2],
    # median 7/6 (prob 1/4); mixed -> 2. The 2.5% / 97.5% percentiles are therefore 7/6 and 2.5.
    assert lo == pytest.approx(7 / 6) and hi == pytest.approx(2.5)
    assert s["per_layer"][0]["excluded"] and not s["per_layer"][1]["excluded"]
    assert s["per_layer"][3]["ratio"] == pytest.approx(0.5)
    one = rc.gap_summary(adam[:1], sgd[:1], layers, exclude_first=2)
    assert all(math.isnan(x) for x in one["ci95"])
    with pytest.raises(ValueError, match="no layers left"):
        rc.gap_summary(adam, sgd, layers, exclude_first=5)
    with pytest.raises(ValueError, match="shapes"):
        rc.gap_summary(adam, sgd[:, :3], layers)


def test_median_ratio_and_checkpoints():
    assert rc.median_ratio(np.array([[1.0, 2.0, np.nan]]), np.array([[3.0, 2.0, 1.0]])) == pytest.approx(2.0)
    assert rc.checkpoint_steps(100, 4) == (25, 50, 75, 100)
    assert rc.checkpoint_steps(3, 10) == (0, 1, 2, 3) or rc.checkpoint_steps(3, 10)[-1] == 3
    with pytest.raises(ValueError):
        rc.checkpoint_steps(10, 0)


def test_layer_table_markdown_lists_every_layer():
    s = rc.gap_summary(np.array([[1.0, 2.0, 3.0]]), np.array([[2.0, 2.0, 9.0]]), ["x", "y", "z"], exclude_first=1)
    md = rc.layer_table_markdown(s)
    assert "| x (excluded) |" in md and "| z |" in md and "3" in md.splitlines()[-1]


def test_unigram_entropy_hand_computed():
    import torch

    assert rc.unigram_entropy(torch.tensor([[0, 0, 1, 1]])) == pytest.approx(math.log(2))
    assert rc.unigram_entropy(torch.tensor([3, 3, 3])) == pytest.approx(0.0)
    p = np.array([0.5, 0.25, 0.25])
    assert rc.unigram_entropy(torch.tensor([0, 0, 1, 2])) == pytest.approx(float(-(p * np.log(p)).sum()))
    with pytest.raises(ValueError):
        rc.unigram_entropy(torch.tensor([0.5, 1.0]))


def test_equal_loss_pairs_hand_computed():
    sgd = pd.Series({0: 5.0, 10: 4.0, 20: 2.5, 30: 2.0})
    adam = pd.Series({0: 5.0, 2: 3.0, 4: 2.6, 6: 2.45, 8: 1.9, 10: 1.5})
    # t2=10 (4.0) is above max_loss; t2=20 (2.5): first Adam step <= 2.5 is 6 (2.45), nearer than 4 (2.6);
    # t2=30 (2.0): first <= 2.0 is 8 (1.9), nearer than 6 (2.45)
    assert rc.equal_loss_pairs(sgd, adam, [0, 10, 20, 30], max_loss=3.0) == [(6, 20), (8, 30)]
    assert rc.equal_loss_pairs(sgd, adam, [20], max_loss=2.0) == []              # above the plateau cut
    assert rc.equal_loss_pairs(sgd, pd.Series({0: 5.0, 5: 4.5}), [20, 30], max_loss=3.0) == []   # never reached


def test_scheduled_probe_runs_only_at_its_steps():
    calls = []

    class P:
        name = "x"

        def __call__(self, problem, state):
            calls.append(state.step)
            return {"x": 1.0}

    class S:
        def __init__(self, step):
            self.step = step

    sp = rc.ScheduledProbe(P(), [0, 20])
    assert sp.name == "x"
    assert [sp(None, S(t)) for t in (0, 10, 20)] == [{"x": 1.0}, {}, {"x": 1.0}] and calls == [0, 20]


def test_tune_lr_widens_until_the_best_is_inside():
    """On a tiny LM the lr grid (0.001, 0.003) is far too small: the best sits at the top edge, so widening adds
    0.009, 0.027 ... until the best is inside or max_widen is spent."""
    import dataclasses

    from optiscope.experiments.diagonal_uniformity.rmed_lm import QUICK

    cfg = dataclasses.replace(QUICK, seq_len=8, n_train=64, probe_size=4, d_model=8, n_heads=2, steps=10,
                              batch_size=32)
    problem = rc.lm_problem(cfg)
    out = rc.tune_lr(problem, lambda lr: rc.sgdm_spec(cfg, lr), (0.001, 0.003), 10, 0, max_widen=2, batch_size=32,
                     checkpoint=False)
    assert out.widened[:1] == [0.009] and len(out.widened) <= 2
    assert set(out.losses) == {0.001, 0.003, *out.widened}
    assert out.best == min(out.losses, key=out.losses.get)
    lrs = sorted(out.losses)
    assert out.inside == (lrs[0] < out.best < lrs[-1])
    best, losses = out                                   # tuple unpacking keeps working
    assert best == out.best and losses is out.losses
    pick = rc.pick_adaptive_lr(problem, lambda lr: rc.adam_spec(cfg, lr), (0.01, 0.03), 10, 0, float("inf"),
                               batch_size=32, checkpoint=False)
    assert pick.faster and pick.lr in (0.01, 0.03)
    never = rc.pick_adaptive_lr(problem, lambda lr: rc.adam_spec(cfg, lr), (1e-6,), 10, 0, 0.0, batch_size=32,
                                checkpoint=False)
    assert not never.faster                               # nothing beats a baseline loss of 0: reported, not hidden

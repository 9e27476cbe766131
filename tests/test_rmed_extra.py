"""rmed_restart, rmed_init_gain, rmed_adagrad_init, rmed_lm_large_wd and rmed_hessian_structure: end-to-end runs with
tiny configs, their helpers against dense float64 truth and direct re-simulation, and verdicts that can fail."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch.func import functional_call, hessian

from optiscope.experiments.base import run_experiment
from optiscope.experiments.diagonal_uniformity import _extra as x
from optiscope.experiments.diagonal_uniformity import rmed_hessian_structure as hs
from optiscope.experiments.diagonal_uniformity import rmed_init_gain as ig
from optiscope.experiments.diagonal_uniformity import rmed_lm_large_wd as wd
from optiscope.experiments.diagonal_uniformity import rmed_restart as rr
from optiscope.metrics import diagonal_dominance, singular_vector_uniformity

torch.set_num_threads(1)

LM_TINY = ["seq_len=8", "n_train=48", "probe_size=4", "d_model=8", "n_heads=2", "n_layers=1", "steps=8",
           "batch_size=24", "sgdm_lrs=[0.1,0.3]", "adam_lrs=[0.01]", "n_checkpoints=1", "per_layer=4",
           "loss_every=4", "n_bootstrap=100", "max_widen=0", "repeats=2"]


def _results(tmp_path, name, overrides):
    out = tmp_path / name
    run_experiment(name, "quick", out=out, overrides=overrides)
    res = json.loads((out / "results.json").read_text())
    assert res["experiment"] == name and res["claims"]
    for c in res["claims"]:
        assert c["holds"] in (True, False, None) and c["reason"] and c["tier"] == "quick"
    assert any((out / "figures").glob("*.png"))
    return res, {c["id"]: c for c in res["claims"]}


def _mlp_problem(n=40, seed=0):
    from optiscope.lab import Problem

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    X = torch.randn(n, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    return Problem(model, torch.nn.CrossEntropyLoss(), train=(X, y), probe_batch=(X, y))


# ------------------------------------------------------------------------------------------------------ end to end
def test_experiments_end_to_end(tmp_path):
    _, c = _results(tmp_path, "rmed_restart", LM_TINY + ["restart_steps=4", "steps=12"])
    assert set(c) == {"restart_from_adam_faster", "control_sgdm_pairs_no_gap"}
    _, c = _results(tmp_path, "rmed_lm_large_wd", LM_TINY + ["control=true"])
    assert {"adam_faster", "adam_larger_equal_step_most_layers", "adam_larger_equal_step_ratio",
            "adam_larger_equal_loss_ratio", "control_small_wd_equal_loss_ratio"} <= set(c)
    _, c = _results(tmp_path, "rmed_hessian_structure", LM_TINY + ["block_per_layer=3"])
    assert {"dominance_mean_decreases_adam", "dominance_median_decreases_sgdm", "right_vectors_no_uniformity",
            "left_vectors_uniform", "control_null_fits_right_better", "dominance_median_decreases_adam",
            "dominance_mean_decreases_sgdm"} == set(c)
    _, c = _results(tmp_path, "rmed_adagrad_init", LM_TINY + ["gains=[1.0]", "dists=[normal]", "sgd_lrs=[0.3,1.0]"])
    assert {"normal_g1_adagrad_faster", "normal_g1_equal_step_ratio", "all_inits_equal_step_most_layers"} <= set(c)
    res, c = _results(tmp_path, "rmed_init_gain", ["seq_len=4", "probe_size=4", "d_model=4", "n_heads=1",
                                                   "repeats=2", "max_dim=80", "dists=[uniform]"])
    assert set(c) == {"top_huge_uniform", "condition_huge_uniform", "control_same_gain_not_huge_uniform"}
    assert res["metrics"]["gains"] == [1.0, 800.0]


def test_restart_config_rejects_bad_values():
    from optiscope.utils.config import ConfigError

    with pytest.raises(ConfigError, match="pair_fraction"):
        rr.RestartConfig(pair_fraction=1.0)
    with pytest.raises(ConfigError, match="device"):
        rr.RestartConfig(device="tpu")
    with pytest.raises(ConfigError, match="control_weight_decay"):
        wd.LargeWDConfig(weight_decay=1e-3, control_weight_decay=1e-2)


# ------------------------------------------------------------------------------------------------------ helpers
def test_reinit_weights_follows_xavier_with_gain():
    from optiscope.zoo.models import TinyTransformer

    m = TinyTransformer(n_outputs=256, seq_len=8, vocab_size=256, d_model=16, n_heads=2, n_layers=1, causal=True)
    emb = m.embed.weight.detach().clone()
    names = x.reinit_weights_(m, "uniform", 800.0, seed=3)
    assert "embed.weight" not in names and "pos" not in names and "head.weight" in names
    assert torch.equal(m.embed.weight, emb)
    W = dict(m.named_parameters())["encoder.layers.0.linear1.weight"]     # 64 x 16
    bound = 800.0 * math.sqrt(6 / (16 + 64))
    assert float(W.abs().max()) <= bound and float(W.abs().max()) > 0.9 * bound
    x.reinit_weights_(m, "normal", 2.0, seed=3)
    W = dict(m.named_parameters())["head.weight"]                         # 256 x 16
    assert float(W.std()) == pytest.approx(2.0 * math.sqrt(2 / (256 + 16)), rel=0.05)
    with pytest.raises(ValueError, match="dist"):
        x.reinit_weights_(m, "laplace", 1.0, seed=0)


def test_layer_block_spectrum_matches_dense_float64():
    p = _mlp_problem()
    model, (X, y) = p.model, p.train
    params = {n: q.detach() for n, q in model.named_parameters()}
    name = "0.weight"
    H = hessian(lambda w: p.loss_fn(functional_call(model, {**params, name: w}, (X,)), y))(params[name])
    ev = np.linalg.eigvalsh(H.reshape(params[name].numel(), -1).numpy())
    s = x.layer_block_spectrum(model, p.loss_fn, (X, y), name, tol=1e-9)
    assert s.top == pytest.approx(ev[-1], rel=1e-9) and s.bottom == pytest.approx(ev[0], abs=1e-12)
    pos = ev[ev > 1e-9 * ev[-1]]
    assert s.condition == pytest.approx(ev[-1] / pos[0], rel=1e-6) and s.n_below == ev.size - pos.size


def test_match_loss_finds_the_nearest_step_and_its_parameters():
    p = _mlp_problem()
    spec = ("sgdm", {"lr": 0.2, "momentum": 0.9})
    fine, _ = x.train(p, spec, p.model, 12, data_seed=1, seed=0, batch_size=40, loss_every=1)
    fine = x.loss_series(fine.metrics)
    coarse = fine[fine.index % 4 == 0]
    target = float(0.5 * (fine[5] + fine[6]) + 1e-4)          # between steps 5 and 6, nearer to 5 or 6
    it = x.match_loss(p, spec, p.model, coarse, target, data_seed=1, seed=0, batch_size=40)
    window = fine[(fine.index >= 4) & (fine.index <= 8)]
    assert it.step == int((window - target).abs().idxmin())
    assert it.loss == pytest.approx(float(fine[it.step]), rel=1e-12)
    m = __import__("copy").deepcopy(p.model)
    m.load_state_dict(it.state)
    X, y = p.train
    assert float(p.loss_fn(m(X), y)) == pytest.approx(it.loss, rel=1e-10)
    assert x.match_loss(p, spec, p.model, coarse, -1.0, data_seed=1, seed=0, batch_size=40) is None


def test_block_dominance_probe_matches_the_dense_block():
    from optiscope.lab import compare

    p = _mlp_problem()
    probe = x.BlockDominanceProbe(["0.weight", "2.weight"], per_layer=5)
    res = compare(p, {"a": ("sgd", {"lr": 0.1})}, 0, probes=[probe, x.SingularVectorProbe()], checkpoint=False,
                  full_batch=True)
    from optiscope.curvature import Hessian

    Hs = Hessian(p.model, p.loss_fn, p.probe_batch)
    coords = Hs.sample_coordinates(per_layer=5, seed=0, layers=["0.weight", "2.weight"])
    dense = Hs.dense().numpy()
    flat = np.concatenate([coords["0.weight"].numpy(), Hs.offsets["2.weight"] + coords["2.weight"].numpy()])
    want = diagonal_dominance(dense[np.ix_(flat, flat)])
    got = res.metrics.set_index("metric")["value"]
    assert got["block_dominance_mean"] == pytest.approx(want.mean, rel=1e-9)
    assert got["block_dominance_median"] == pytest.approx(want.median, rel=1e-9)
    W = dict(p.model.named_parameters())["2.weight"].detach().numpy()
    sv = res.metrics[res.metrics["layer"] == "2.weight"].set_index("metric")["value"]
    assert sv["r_u_left"] == pytest.approx(singular_vector_uniformity(W, "left"))
    assert sv["r_u_right"] == pytest.approx(singular_vector_uniformity(W, "right"))
    assert x.spread_layers(list("abcdefg"), 4) == ["a", "c", "e", "g"] and x.spread_layers(["a"], 4) == ["a"]


# ------------------------------------------------------------------------------------------------------ verdicts
def _restart_out(gap, control, mismatch=0.0, decrease=1.0):
    R = len(gap)
    ls = np.full(R, 2.0)
    return rr.gaps([{"loss_sgdm": 2.0, "loss_adam": 2.0 - mismatch, "loss_control": 2.0} for _ in range(R)],
                   {"from_adam": [pd.Series([2.0, 2.0 - decrease - g]) for g in gap],
                    "from_sgdm": [pd.Series([2.0, v]) for v in ls - decrease],
                    "control_from_sgdm_other_order": [pd.Series([2.0, 2.0 - decrease - c]) for c in control]}, 10)


def test_restart_claims_can_hold_fail_and_be_untestable():
    ok = [(True, "")]
    out = _restart_out([0.10, 0.12, 0.11, 0.09], [0.01, -0.01, 0.0, 0.005])
    v = {c.id: c.holds for c in rr.restart_claims(out, ok, 0.1, 0.5, 4)}
    assert v == {"restart_from_adam_faster": True, "control_sgdm_pairs_no_gap": True}
    out = _restart_out([-0.10, -0.12, -0.11, -0.09], [0.0] * 4)
    assert rr.restart_claims(out, ok, 0.1, 0.5, 4)[0].holds is False
    out = _restart_out([0.10, 0.12, 0.11, 0.09], [0.10, 0.12, 0.11, 0.10])     # the pairing alone makes the gap
    assert rr.restart_claims(out, ok, 0.1, 0.5, 4)[1].holds is False
    out = _restart_out([0.10, 0.12, 0.11, 0.09], [0.0] * 4, mismatch=0.5)     # starts too far apart
    cl = rr.restart_claims(out, ok, 0.1, 0.5, 4)
    assert cl[0].holds is None and "mismatch" in cl[0].reason
    cl = rr.restart_claims(out, [(False, "Adam is not faster")], 0.1, 0.5, 4)
    assert cl[0].holds is None and "not faster" in cl[0].reason


def _gain_df(factor, spread=1.01):
    rows = []
    for g, scale in ((1.0, 1.0), (800.0, factor)):
        for d in range(4 if g == 1.0 else 3):
            for k, lname in enumerate(("a", "b", "c")):
                v = (1 + k) * scale * (spread ** d)
                rows.append({"dist": "uniform", "gain": g, "draw": d, "layer": lname, "top": v, "condition": 10 * v})
    return pd.DataFrame(rows)


def test_gain_claims_can_hold_and_fail():
    cfg = ig.InitGainConfig(repeats=3, dists=("uniform",))
    v = {c.id: c.holds for c in ig.gain_claims(_gain_df(1e5), cfg)}
    assert v == {"top_huge_uniform": True, "condition_huge_uniform": True, "control_same_gain_not_huge_uniform": True}
    v = {c.id: c.holds for c in ig.gain_claims(_gain_df(3.0, spread=50.0), cfg)}
    assert v["top_huge_uniform"] is False and v["control_same_gain_not_huge_uniform"] is False


def _dominance_metrics(trend, r_left=(1.0, 1.0), r_right=(1.0, 1.0)):
    rows = []
    for opt in hs.OPTS:
        for r in range(3):
            for step in (0, 5, 10):
                for stat in hs.STATS:
                    rows.append({"optimizer": opt, "repeat": r, "step": step, "layer": "",
                                 "metric": f"block_dominance_{stat}", "value": 4.0 * trend ** (step / 5) + 0.01 * r})
                for k, lname in enumerate(("u", "v", "w")):
                    left = r_left[0] if opt == "adam" else r_left[1]
                    right = r_right[0] if opt == "adam" else r_right[1]
                    rows += [{"optimizer": opt, "repeat": r, "step": step, "layer": lname, "metric": m,
                              "value": val * (1 + 0.01 * (k + r))} for m, val in
                             (("r_u_left", left), ("r_u_right", right), ("erank", 2.0))]
    return pd.DataFrame(rows)


def test_hessian_structure_claims_can_hold_and_fail():
    ok = [(True, "")]
    v = {c.holds for c in hs.dominance_claims(_dominance_metrics(0.5), "late_mean", ok, ["u"], 3)}
    assert v == {True}
    v = {c.holds for c in hs.dominance_claims(_dominance_metrics(2.0), "final", ok, ["u"], 3)}
    assert v == {False}
    cfg = hs.HessianStructureConfig(n_bootstrap=200)
    shapes = {n: (4, 4) for n in "uvw"}
    claims, _ = hs.singular_vector_claims(_dominance_metrics(0.5, r_left=(2.0, 8.0), r_right=(3.0, 3.1)),
                                          list("uvw"), shapes, cfg, ok)
    assert [c.holds for c in claims] == [True, True, True]
    claims, _ = hs.singular_vector_claims(_dominance_metrics(0.5, r_left=(3.0, 3.0), r_right=(2.0, 8.0)),
                                          list("uvw"), shapes, cfg, ok)
    assert [c.holds for c in claims] == [False, False, False]
    claims, _ = hs.singular_vector_claims(_dominance_metrics(0.5), list("uvw"), shapes,
                                          hs.HessianStructureConfig(low_rank_fraction=0.1), ok)
    assert {c.holds for c in claims} == {None} and "effective rank" in claims[0].reason


def test_swapped_equal_loss_counts_layers_where_adam_is_larger():
    cfg = wd.LargeWDConfig(n_bootstrap=200, exclude_first=0)
    pairs = [{"repeat": r, "r_med_adam": [4.0, 5.0, 6.0, 1.0], "r_med_sgdm": [2.0, 2.0, 2.0, 2.0]} for r in range(3)]
    s = wd.swapped_equal_loss(pairs, list("abcd"), cfg)
    assert s["n_layers_a_smaller"] == 3 and s["n_layers_compared"] == 4      # SGD+M below Adam in 3 of 4
    assert s["median_ratio"] == pytest.approx(np.median([2.0, 2.5, 3.0, 0.5]))
    assert wd.swapped_equal_loss([], list("abcd"), cfg) is None

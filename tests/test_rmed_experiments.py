"""End-to-end runs of the nine R_med experiments with tiny configs, the protocol helpers, and R_med vs dense truth."""

import json

import numpy as np
import pytest
import torch
from torch.func import functional_call, hessian

from optiscope.experiments.base import run_experiment
from optiscope.experiments.diagonal_uniformity import common as rc
from optiscope.lab.probes import weight_matrix_params

LM_TINY = ["seq_len=8", "n_train=64", "probe_size=4", "d_model=8", "n_heads=2", "n_layers=1", "steps=6",
           "batch_size=32", "sgdm_lrs=[0.1,0.3]", "n_checkpoints=2", "per_layer=4", "loss_every=2",
           "n_bootstrap=100", "max_widen=1"]


def _results(tmp_path, name, overrides):
    out = tmp_path / name
    run_experiment(name, "quick", out=out, overrides=overrides)
    res = json.loads((out / "results.json").read_text())
    assert res["experiment"] == name and res["claims"]
    for c in res["claims"]:
        assert set(c) == {"id", "claim", "paper", "measured", "holds", "reason", "tier"}
        assert c["holds"] in (True, False, None) and c["tier"] == "quick" and c["reason"]
    assert (out / "metrics.parquet").exists() and any((out / "figures").glob("*.png"))
    return res


def test_sampled_rmed_probe_matches_dense_hessian_diagonal():
    from optiscope.lab import Problem, compare

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    X = torch.randn(40, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    loss_fn = torch.nn.CrossEntropyLoss()
    problem = Problem(model, loss_fn, train=(X, y), probe_batch=(X, y))
    names = weight_matrix_params(model)
    assert names == ["0.weight", "2.weight"]
    probe = rc.rmed_probe(names, per_layer=6, save_diagonal=True)
    res = compare(problem, {"a": ("sgd", {"lr": 0.1}), "b": ("adam", {"lr": 0.01})}, 3, probes=[probe],
                  checkpoint=False, full_batch=True)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_of(w, n):
        return loss_fn(functional_call(model, {**params, n: w}, (X,)), y)

    from optiscope.curvature import Hessian
    coords = Hessian(model, loss_fn, (X, y)).sample_coordinates(per_layer=6, seed=0, layers=names)
    from optiscope.metrics import r_med

    truth = []
    for n in names:
        H = hessian(lambda w: loss_of(w, n))(params[n]).reshape(params[n].numel(), -1)
        d = torch.diagonal(H)[coords[n]].numpy()
        truth.append(d)
        got = res.metrics[(res.metrics["metric"] == "r_med") & (res.metrics["layer"] == n)
                          & (res.metrics["step"] == 0)]["value"].to_numpy()
        assert len(got) == 2
        np.testing.assert_allclose(got, r_med(d).value, rtol=1e-8)   # both runs, identical init
    for run in ("a", "b"):
        np.testing.assert_allclose(res.runs[run].arrays["hessian_diagonal"][0], np.concatenate(truth), rtol=1e-8)
    later = res.metrics[(res.metrics["metric"] == "r_med") & (res.metrics["step"] == 3)]
    assert later.groupby("run")["value"].sum().nunique() == 2        # different trajectories, measured anew
    with pytest.raises(ValueError, match="per_layer"):
        rc.rmed_probe(names, per_layer=0)


def test_rmed_two_layer_end_to_end(tmp_path):
    res = _results(tmp_path, "rmed_two_layer", ["widths=[6,12,24]", "steps=80", "repeats=2", "n_checkpoints=2"])
    ids = {c["id"] for c in res["claims"]}
    assert {"sgd_slope_matches_theorem", "sgd_grows", "adam_bounded", "adam_below_sgd", "control_sgd_not_uniform",
            "control_adam_not_gaussian", "r_med_equals_r_u", "dominance_decreases"} == ids
    pw = res["metrics"]["per_width"]
    assert set(pw) == {"6", "12", "24"} and pw["24"]["input_dim"] == 24          # d = width, as in the theorem
    assert pw["24"]["predicted_sgdm"] > pw["6"]["predicted_sgdm"]
    assert pw["12"]["init_std"] == pytest.approx(2 * pw["24"]["init_std"])       # sigma0 ~ 1/d


def test_two_layer_r_med_uses_the_exact_diagonal_of_every_coordinate():
    """layer_r_med = max/median over the dense autograd Hessian diagonal of 1/2 ||W1^T w2 - a||^2 (float64)."""
    from optiscope.experiments.diagonal_uniformity.rmed_two_layer import layer_r_med
    from optiscope.metrics import r_med

    g = torch.Generator().manual_seed(3)
    m, d = 5, 4
    W1 = torch.randn(m, d, generator=g, dtype=torch.float64)
    w2 = torch.randn(m, generator=g, dtype=torch.float64)
    a = torch.randn(d, generator=g, dtype=torch.float64)

    def loss(flat):
        A, b = flat[:m * d].reshape(m, d), flat[m * d:]
        r = A.T @ b - a
        return 0.5 * r @ r

    H = hessian(loss)(torch.cat([W1.reshape(-1), w2]))
    diag = torch.diagonal(H).numpy()
    r1, r2 = layer_r_med(W1.numpy(), w2.numpy())
    assert r1 == pytest.approx(r_med(diag[:m * d]).value, rel=1e-12)
    assert r2 == pytest.approx(r_med(diag[m * d:]).value, rel=1e-12)


@pytest.mark.parametrize("name", ["rmed_lm", "rmed_lm_random", "rmed_lm_wd"])
def test_lm_experiments_end_to_end(tmp_path, name):
    res = _results(tmp_path, name, LM_TINY + ["repeats=2", "adam_lrs=[0.01,0.03]"])
    m = res["metrics"]
    assert m["sgdm_lr"] in (0.1, 0.3, 0.9, 1 / 30) and {"0.1", "0.3"} <= set(m["lr_tuning"]["losses"])
    assert set(m["adaptive_lr"]["losses"]) == {"0.01", "0.03"}
    s = m["summary_equal_step"]
    assert s["repeats"] == 2 and len(s["per_layer"]) == len(m["layers"]) == 7
    assert m["hvp_cost"]["r_med_n_hvp"] == 7 * 4
    assert 0 < m["plateau"]["unigram_entropy"] <= np.log(256) + 1e-9
    ids = [c["id"] for c in res["claims"]]
    assert ids == ["adam_faster", "equal_loss_most_layers", "equal_loss_ratio", "equal_step_most_layers",
                   "equal_step_ratio"]
    assert (tmp_path / name / "layer_table.md").exists()


def test_lm_equal_loss_pairs_retrace_the_first_run(tmp_path):
    """With the plateau check off (fraction 1), equal-loss pairs exist; the second Adam run retraces the first."""
    res = _results(tmp_path, "rmed_lm", LM_TINY + ["repeats=2", "steps=40", "adam_lrs=[0.03]",
                                                   "plateau_fraction=1.0"])
    pairs = res["metrics"]["equal_loss_pairs"]
    assert pairs
    for p in pairs:
        assert p["loss_adam_second_pass"] == pytest.approx(p["loss_adam"], rel=1e-6)
        assert p["step_adam"] % 2 == 0 and p["step_sgdm"] in (20, 40)


def test_same_loss_end_to_end(tmp_path):
    res = _results(tmp_path, "rmed_same_loss", LM_TINY + ["repeats=2", "adam_lrs=[0.03]", "steps=40",
                                                          "plateau_fraction=1.0", "n_checkpoints=2"])
    assert {c["id"] for c in res["claims"]} == {"same_loss_most_layers", "same_loss_ratio"}
    for p in res["metrics"]["equal_loss_pairs"]:
        assert abs(p["loss_adam"] - p["loss_sgdm"]) < 0.5


def test_switch_end_to_end(tmp_path):
    res = _results(tmp_path, "rmed_switch", LM_TINY + ["repeats=2", "sgd_lrs=[0.3]", "n_checkpoints=2"])
    gaps = res["metrics"]["gaps"]
    assert gaps[0]["step"] == res["metrics"]["switch_step"] == 3 and gaps[-1]["step"] == 6
    assert len(res["metrics"]["gaps_per_repeat"]) == 2 * len(gaps)


def test_adaptive_end_to_end(tmp_path):
    res = _results(tmp_path, "rmed_adaptive", LM_TINY + ["repeats=2", "sgd_lrs=[0.3,1.0]", "n_checkpoints=1"])
    assert set(res["metrics"]["pairs"]) == {"adagrad_vs_sgd", "rmsprop_vs_sgdm", "amsgrad_vs_sgdm"}
    assert len(res["claims"]) == 3 * 5


def test_lowrank_end_to_end(tmp_path):
    res = _results(tmp_path, "rmed_lowrank", LM_TINY + ["repeats=1", "align_per_layer=4"])
    rows = res["metrics"]["r_u"]
    assert len(rows) == 7 and all(r["r_u_adam"] >= 1 and r["r_u_sgdm"] >= 1 for r in rows)


def test_cnn_end_to_end(tmp_path):
    res = _results(tmp_path, "rmed_cnn", ["n_train=64", "probe_size=8", "channels=[2,2]", "hidden=8", "steps=4",
                                          "batch_size=32", "sgdm_lrs=[0.1,0.3]", "adam_lrs=[0.001,0.01]", "max_widen=1",
                                          "repeats=2", "n_checkpoints=1", "per_layer=4", "n_bootstrap=100"])
    assert {c["id"] for c in res["claims"]} == {"adam_not_faster", "r_med_not_smaller", "speed_geometry_consistent"}


def test_bad_config_rejected():
    from optiscope.utils.config import ConfigError

    with pytest.raises(ConfigError, match="d_model"):
        rc.LMConfig(d_model=10, n_heads=4)
    with pytest.raises(ConfigError, match="widths"):
        from optiscope.experiments.diagonal_uniformity.rmed_two_layer import TwoLayerRMedConfig
        TwoLayerRMedConfig(widths=(50, 100))
    with pytest.raises(ConfigError, match="band_widened"):
        rc.LMConfig(band=(1.4, 2.0), band_widened=(1.5, 3.0))
    with pytest.raises(ConfigError, match="plateau_fraction"):
        rc.LMConfig(plateau_fraction=1.5)


def test_two_layer_closed_form_hessian_is_the_population_hessian():
    """theory.two_layer.hessian (whitened, the experiment's dominance check) = dense autograd Hessian (float64)."""
    from optiscope.theory.two_layer import TwoLayerProblem
    from optiscope.theory.two_layer import hessian as closed_form

    g = torch.Generator().manual_seed(5)
    m, d = 4, 3
    W1 = torch.randn(m, d, generator=g, dtype=torch.float64)
    w2 = torch.randn(m, generator=g, dtype=torch.float64)
    a = torch.randn(d, generator=g, dtype=torch.float64)

    def loss(flat):
        A, b = flat[:m * d].reshape(m, d), flat[m * d:]
        r = A.T @ b - a
        return 0.5 * r @ r

    dense = hessian(loss)(torch.cat([W1.reshape(-1), w2])).numpy()
    got = closed_form(W1.numpy(), w2.numpy()[None, :], TwoLayerProblem(a.numpy()[None, :]))
    np.testing.assert_allclose(got, dense, rtol=1e-10, atol=1e-12)


def test_adaptive_config_refuses_bad_rmsprop_constants():
    """rmsprop_beta and rmsprop_momentum are validated (they once sat after a return and never ran)."""
    import dataclasses

    from optiscope.experiments.diagonal_uniformity.rmed_adaptive import QUICK
    from optiscope.utils.config import ConfigError

    QUICK.validate()
    for field, bad in (("rmsprop_beta", 1.5), ("rmsprop_momentum", -0.1)):
        with pytest.raises(ConfigError, match=field):
            dataclasses.replace(QUICK, **{field: bad}).validate()

"""End-to-end runs of the nine R_med experiments (issue 8) with tiny configs, and the R_med probe vs dense truth."""

import json

import numpy as np
import pytest
import torch
from torch.func import functional_call, hessian

from optiscope.experiments import _rmed_common as rc
from optiscope.experiments.base import run_experiment
from optiscope.lab.probes import weight_matrix_params

LM_TINY = ["seq_len=8", "n_train=64", "probe_size=4", "d_model=8", "n_heads=2", "n_layers=1", "steps=6",
           "batch_size=32", "tune_steps=2", "sgdm_lrs=[0.1,0.3]", "n_checkpoints=2", "per_layer=4",
           "n_bootstrap=100"]


def _results(tmp_path, name, overrides):
    out = tmp_path / name
    run_experiment(name, "quick", out=out, overrides=overrides)
    res = json.loads((out / "results.json").read_text())
    assert res["experiment"] == name and res["claims"]
    for c in res["claims"]:
        assert set(c) == {"id", "claim", "paper", "measured", "holds"} and c["holds"] in (True, False, None)
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
    res = _results(tmp_path, "rmed_two_layer", ["widths=8,16", "input_dim=6", "n_train=64", "steps=40",
                                                "repeats=2", "per_layer=10", "dominance_per_layer=4",
                                                "n_checkpoints=2", "n_bootstrap=100", "adam_lr=0.01"])
    ids = {c["id"] for c in res["claims"]}
    assert {"thm1_ordering", "sgd_log_growth", "adam_bounded", "r_med_equals_r_u", "dominance_decreases"} <= ids
    pw = res["metrics"]["per_width"]
    assert set(pw) == {"8", "16"} and len(pw["8"]["r_med_sgdm"]) == 2
    assert pw["16"]["prediction"]["sgdm"] > pw["8"]["prediction"]["sgdm"]


@pytest.mark.parametrize("name", ["rmed_lm", "rmed_lm_random", "rmed_lm_wd"])
def test_lm_experiments_end_to_end(tmp_path, name):
    res = _results(tmp_path, name, LM_TINY + ["repeats=2"])
    m = res["metrics"]
    assert m["sgdm_lr"] in (0.1, 0.3) and set(m["lr_tuning"]) == {"0.1", "0.3"}
    s = m["summary"]
    assert s["repeats"] == 2 and len(s["per_layer"]) == len(m["layers"]) == 7
    assert m["hvp_cost"]["r_med_n_hvp"] == 7 * 4
    assert (tmp_path / name / "layer_table.md").exists()


def test_same_loss_end_to_end(tmp_path):
    res = _results(tmp_path, "rmed_same_loss", LM_TINY + ["repeats=1", "loss_every=1", "adam_lr=0.01"])
    pairs = res["metrics"]["pairs"]
    assert pairs                                         # Adam at lr 0.01 reaches SGD+M's checkpoint losses
    for p in pairs:                                      # matched: Adam's loss has just dropped to SGD+M's
        assert p["loss_adam"] <= p["loss_sgdm"] + 1e-12 and p["step_sgdm"] in (3, 6)


def test_switch_end_to_end(tmp_path):
    res = _results(tmp_path, "rmed_switch", LM_TINY + ["repeats=1", "sgd_lrs=[0.3]", "n_checkpoints=2"])
    gaps = res["metrics"]["gaps"]
    assert gaps[0]["step"] == res["metrics"]["switch_step"] == 3 and gaps[-1]["step"] == 6


def test_adaptive_end_to_end(tmp_path):
    res = _results(tmp_path, "rmed_adaptive", LM_TINY + ["repeats=1", "sgd_lrs=[0.3]", "n_checkpoints=1"])
    assert set(res["metrics"]["pairs"]) == {"adagrad_vs_sgd", "rmsprop_vs_sgdm", "amsgrad_vs_sgdm"}


def test_lowrank_end_to_end(tmp_path):
    res = _results(tmp_path, "rmed_lowrank", LM_TINY + ["repeats=1", "align_per_layer=4"])
    rows = res["metrics"]["r_u"]
    assert len(rows) == 7 and all(r["r_u_adam"] >= 1 and r["r_u_sgdm"] >= 1 for r in rows)


def test_cnn_end_to_end(tmp_path):
    res = _results(tmp_path, "rmed_cnn", ["n_train=64", "probe_size=8", "channels=[2,2]", "hidden=8", "steps=4",
                                          "batch_size=32", "tune_steps=2", "sgdm_lrs=[0.1]", "adam_lrs=[0.001]",
                                          "repeats=2", "n_checkpoints=1", "per_layer=4", "n_bootstrap=100"])
    assert {c["id"] for c in res["claims"]} == {"adam_not_faster", "r_med_not_smaller", "speed_geometry_consistent"}


def test_bad_config_rejected():
    from optiscope.utils.config import ConfigError

    with pytest.raises(ConfigError, match="d_model"):
        rc.LMConfig(d_model=10, n_heads=4)
    with pytest.raises(ConfigError, match="widths"):
        from optiscope.experiments.rmed_two_layer import TwoLayerRMedConfig
        TwoLayerRMedConfig(widths=(50,))


def test_two_layer_closed_form_hessian_is_the_training_loss_hessian():
    """theory.two_layer.hessian with the empirical covariance = dense Hessian of the zoo problem's loss (float64)."""
    from optiscope.curvature import Hessian
    from optiscope.experiments.rmed_two_layer import ExactDominanceProbe, two_layer_problem
    from optiscope.theory.two_layer import hessian as closed_form

    problem, ds = two_layer_problem(5, 4, 64, 0.3, seed=1, data_seed=2)
    problem.model.double()
    X, y = ds.train[0].double(), ds.train[1].double()
    dense = Hessian(problem.model, problem.loss_fn, (X, y)).dense().numpy()
    probe = ExactDominanceProbe(ds.meta["teacher"], X)
    W1, W2 = problem.model.W1.detach().numpy(), problem.model.W2.detach().numpy()
    np.testing.assert_allclose(closed_form(W1, W2, probe.problem), dense, rtol=1e-4, atol=1e-6)

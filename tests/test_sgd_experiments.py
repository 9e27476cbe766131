"""The four seed-004 experiments end to end with tiny configs, and the sgd-theory CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from optiscope.experiments.base import registry, run_experiment
from optiscope.utils.config import ConfigError

NAMES = ["sgd_loss_curves", "sgd_stability_map", "sgd_phase_diagram", "sgd_negative_momentum"]


def test_registered_with_presets():
    reg = registry()
    for n in NAMES:
        assert n in reg and {"quick", "full"} <= set(reg[n].presets) and reg[n].paper == "004"


def _check(store, min_claims):
    res = store.read_results()
    assert len(res["claims"]) >= min_claims
    for c in res["claims"]:
        assert c["holds"] in (True, False, None) and c["measured"] is not None
    assert list(store.figures_dir.glob("*.png"))
    return res


def test_loss_curves_tiny(tmp_path):
    store = run_experiment("sgd_loss_curves", "quick", out=tmp_path / "lc", overrides=[
        "datasets=[digits]", "n_points=[80]", "width=30", "steps=30", "n_runs=4", "nn_runs=1",
        "batch_sizes=[5,20]", "taus=[0,1]"])
    res = _check(store, 5)
    b = res["metrics"]["problems"]["digits"]["batches"]["b5"]
    assert b["best_tau"] in (0.0, 1.0) and 0 <= b["median_rel_error_best_tau"] < 1
    arr = store.read_arrays("curves_digits_b5")
    assert arr["sampled_mean"].shape == (31,) and np.all(np.isfinite(arr["se_best"]))


def test_stability_map_tiny(tmp_path):
    store = run_experiment("sgd_stability_map", "quick", out=tmp_path / "sm", overrides=[
        "n_points=120", "width=30", "batch_size=5", "critical_momenta=[0.0,0.9]", "critical_steps=150",
        "critical_seeds=2", "critical_lrs_per_round=4", "critical_rounds=1", "map_points=40", "map_lrs=4",
        "map_momenta=3", "map_steps=60", "map_seeds=1", "theory_lrs=10", "theory_momenta=5"])
    res = _check(store, 3)
    for row in res["metrics"]["critical_lr"]:
        assert row["predicted"] <= row["noiseless_bound"] + 1e-12


def test_phase_diagram_tiny(tmp_path):
    store = run_experiment("sgd_phase_diagram", "quick", out=tmp_path / "pd", overrides=[
        "points=[[2.0,4.0]]", "modes=400", "steps=300", "divergence_steps=1500", "transition_lr=0.1"])
    res = _check(store, 3)
    assert res["metrics"]["points"][0]["phase"] == "noise-dominated"


def test_negative_momentum_tiny(tmp_path):
    store = run_experiment("sgd_negative_momentum", "quick", out=tmp_path / "nm", overrides=[
        "noise_modes=200", "noise_steps=300", "noise_betas=[-0.05,0.0,0.05]", "noise_lr_factors=[1.0]",
        "signal_modes=200", "signal_steps=200", "signal_betas=[0.0,0.5,0.9]", "signal_lr_fractions=[0.5]"])
    res = _check(store, 3)
    assert res["metrics"]["noise_dominated"]["prop5_criterion_S"] > 0


def test_config_validation():
    from optiscope.experiments.sgd_loss_curves import LossCurvesConfig
    from optiscope.experiments.sgd_negative_momentum import NegativeMomentumConfig

    with pytest.raises(ConfigError, match="noise_kappa"):
        NegativeMomentumConfig(noise_kappa=1.0)
    with pytest.raises(ConfigError, match="n_points"):
        LossCurvesConfig(datasets=("digits",), n_points=(0, 1))


# ------------------------------------------------------------------------------------------------- CLI
def _cli(args):
    from optiscope.cli.main import app

    return CliRunner().invoke(app, ["sgd-theory", *args])


def test_cli_powerlaw_json(tmp_path):
    out = tmp_path / "o.json"
    r = _cli(["--spectrum", "powerlaw:nu=1.5,kappa=0.5,n=2000", "--lr", "0.5", "--momentum", "0.9", "--batch",
              "32", "--steps", "200", "--json", str(out), "--plot", str(tmp_path / "o.png")])
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert len(d["loss"]) == 201 and d["converges"] is True and d["phase"] == "signal-dominated"
    assert 0 < d["critical_lr"] and d["loss"][-1] < d["loss"][0]
    assert (tmp_path / "o.png").exists()


def test_cli_kernel_file_divergent_and_advise(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((30, 6))
    np.savez(tmp_path / "k.npz", kernel=X @ X.T, targets=rng.standard_normal(30))
    out = tmp_path / "o.json"
    r = _cli(["--kernel", str(tmp_path / "k.npz"), "--lr", "100", "--batch", "4", "--dataset-size", "30",
              "--steps", "50", "--json", str(out)])
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert d["converges"] is False and d["verdict"] == "immediate divergence" and d["diverged_at"] is not None
    assert "NaN" not in out.read_text()
    r = _cli(["--kernel", str(tmp_path / "k.npz"), "--lr", "0.01", "--batch", "4", "--steps", "30", "--advise",
              "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["advice"]["lr"] > 0


@pytest.mark.parametrize("arrays,msg", [
    ({"eigenvalues": [1.0, -0.5], "coefficients": [1.0, 1.0]}, "negative"),
    ({"eigenvalues": [1.0, 0.5], "coefficients": [1.0]}, "length mismatch"),
    ({"eigenvalues": [1.0, np.nan], "coefficients": [1.0, 1.0]}, "non-finite"),
])
def test_cli_bad_spectrum_files(tmp_path, arrays, msg):
    np.savez(tmp_path / "s.npz", **{k: np.asarray(v) for k, v in arrays.items()})
    r = _cli(["--spectrum", str(tmp_path / "s.npz"), "--lr", "0.1", "--batch", "2", "--steps", "5"])
    assert r.exit_code == 2 and msg in r.output


def test_cli_batch_larger_than_dataset():
    r = _cli(["--spectrum", "powerlaw:nu=1.5,kappa=0.5,n=100", "--lr", "0.1", "--batch", "64", "--dataset-size",
              "32", "--steps", "5"])
    assert r.exit_code == 2 and "larger than the dataset" in r.output

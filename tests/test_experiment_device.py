"""Devices of the registered experiments: every one has a validated ``device`` config field or a registered reason to
run on the CPU only; a bad device is a clear error (``ConfigError``; exit 2 on the CLI); ``device="cpu"`` given
explicitly gives the same results as the default; and the device reaches every model and tensor an experiment
builds (checked by running each experiment with its device replaced by ``meta``: every op must run there, until the
first read of a number, and no op may mix devices)."""

import dataclasses
import inspect
import json
import re
import sys
from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from typer.testing import CliRunner

from optiscope.cli.main import app
from optiscope.experiments import base
from optiscope.experiments.base import (
    device_support,
    experiment_device,
    registry,
    require_device,
    run_experiment,
)
from optiscope.utils.config import ConfigError

REG = registry()
WITH_DEVICE = sorted(n for n, s in REG.items() if device_support(s)[0])
CPU_ONLY = sorted(n for n, s in REG.items() if not device_support(s)[0])
META = torch.device("meta")
MIXED = re.compile(r"is not on the expected device|same device|at least two devices|Expected .* device",
                   re.IGNORECASE)

# tiny settings: the same-results runs take about a second each; the meta runs stop at the first read of a number
TINY = {
    "matrix_completion": ["size=12", "rank=2", "n_observed=[80]", "depths=[1,2]", "init_scales=[1e-3]",
                          "optimizers=[gd,adam,global_rmsprop]", "repeats=1", "max_steps=40", "log_every=10",
                          "nn_mu_steps=5", "nn_max_iter_per_mu=50", "penalty_steps=20", "penalty_depths=[1]",
                          "penalty_weights=[1e-2]", "penalty_gd_lr_factors=[1.0]"],
    "explr_equivalence": ["n_train=256", "n_test=64", "batch_size=64", "width=16", "steps=12", "log_every=3",
                          "weight_decay=2e-2", "milestones=[0.5]"],
    "adam_flow_order": ["hs=[4e-3,2e-3]", "bilinear_horizon=0.1", "mlp_hs=[2e-3,1e-3]", "mlp_horizon=0.004",
                        "mlp_n_train=20", "mlp_width=4"],
    "explr_scale_invariance": ["n_train=256", "batch_size=64", "width=16", "steps=6", "checkpoints=[0,6]"],
    "deep_linear_dynamics": ["depths=[1,2]", "max_steps=50"],
    "adam_trajectory_closeness": ["n_train=40", "epochs=3", "width=4", "dataset=digits"],
    "init_chain": ["n_samples=2000", "max_depth=4"],
    "sgd_loss_curves": ["datasets=[digits]", "n_points=[200]", "width=50"],
    "sgd_stability_map": ["n_points=200", "width=50"],
}
SAME_RESULTS = ("matrix_completion", "explr_equivalence", "adam_flow_order")


def _spec_fields(spec):
    return {f.name: f for f in dataclasses.fields(spec.config)}


# ------------------------------------------------------------------------------------------------ registry
def test_every_experiment_has_a_device_field_or_a_cpu_only_reason():
    assert len(REG) >= 26 and len(WITH_DEVICE) >= 20
    for name, spec in REG.items():
        has = "device" in spec.config.field_names()
        assert has != bool(spec.cpu_only), f"{name}: needs exactly one of a device field and a cpu_only reason"
        if has:
            assert _spec_fields(spec)["device"].default == "cpu", name
            assert spec.presets["quick"].device == "cpu", name     # quick: the tested CPU default
        else:
            assert device_support(spec) == (False, spec.cpu_only) and len(spec.cpu_only) >= 20, name
            # a CPU-only experiment builds no torch tensors itself
            assert not re.search(r"^\s*(import torch|from torch)", inspect.getsource(sys.modules[spec.fn.__module__]),
                                 re.MULTILINE), f"{name} imports torch: give it a device field instead"
    assert set(CPU_ONLY) == {"sgd_divergence_onset", "sgd_negative_momentum", "sgd_phase_diagram"}


def test_register_refuses_a_cpu_only_reason_next_to_a_device_field():
    spec = REG["rmed_two_layer"]
    with pytest.raises(ValueError, match="cpu_only is given but config"):
        base.register("x_device_twice", paper="000", title="t", config=spec.config, presets=spec.presets,
                      cpu_only="no")


@pytest.mark.parametrize("name", WITH_DEVICE)
def test_device_field_is_validated(name):
    quick = REG[name].presets["quick"]
    for bad in ("cuda:7", "tpu", "meta", "", "cpu:x"):
        with pytest.raises(ConfigError, match=r"field 'device' = .* is invalid.*this machine has: cpu"):
            quick.with_overrides([f"device={bad}"])
    assert quick.with_overrides(["device=cpu"]) == quick
    assert experiment_device(quick.with_overrides(["device=auto"])).type == ("cuda" if torch.cuda.is_available()
                                                                              else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_names_the_device_and_what_exists():
    with pytest.raises(ConfigError) as e:
        require_device("cuda")
    assert "'cuda'" in str(e.value) and "CUDA is not available" in str(e.value) and "no CUDA device" in str(e.value)


# ------------------------------------------------------------------------------------------------ CLI
def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("args, needle", [
    (["--device", "cuda:7"], "cuda:7"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--set", "device=cuda:7"], "field 'device' = 'cuda:7' is invalid"),
    (["--set", "device=meta"], "field 'device' = 'meta' is invalid"),
])
def test_run_cli_refuses_a_bad_device(tmp_path, args, needle):
    r = _invoke("run", "adam_bilinear", *args, "--out", tmp_path / "o")
    assert r.exit_code == 2, r.output
    assert needle in " ".join(r.output.split()) and "Traceback" not in r.output
    assert not (tmp_path / "o" / "results.json").exists()


def test_run_cli_runs_a_cpu_only_experiment_on_the_cpu_and_says_why(tmp_path, monkeypatch, capsys):
    from optiscope.cli import _common

    monkeypatch.setattr(_common, "check_device", lambda device, cpu_only=None: "cuda")   # as on a CUDA machine
    cfg, store = _common.prepare_experiment("sgd_phase_diagram", "quick", tmp_path / "pd", [], None, "cuda",
                                            False, False)
    store.release_lock()
    err = " ".join(capsys.readouterr().err.split())
    assert "experiment sgd_phase_diagram runs on the CPU (SE loss curves of power-law spectra" in err
    assert "--device cuda does not apply" in err and "device" not in cfg.to_dict()
    # an experiment with a device field gets it: on this machine CUDA is then refused by its config
    if not torch.cuda.is_available():
        with pytest.raises(__import__("typer").Exit) as e:
            _common.prepare_experiment("adam_bilinear", "quick", tmp_path / "ab", [], None, "cuda", False, False)
        assert e.value.exit_code == 2


# ------------------------------------------------------------------------------------------------ same numbers
def _results(path):
    res = json.loads((path / "results.json").read_text())
    res["metrics"].pop("seconds", None)
    return res


@pytest.mark.parametrize("name", SAME_RESULTS)
def test_explicit_cpu_gives_the_default_results(tmp_path, name):
    run_experiment(name, "quick", out=tmp_path / "default", overrides=TINY[name])
    run_experiment(name, "quick", out=tmp_path / "cpu", overrides=[*TINY[name], "device=cpu"])
    assert _results(tmp_path / "cpu") == _results(tmp_path / "default")
    for d in ("default", "cpu"):
        assert base.RunStore.open(tmp_path / d).read_config()["device"] == "cpu"


# ------------------------------------------------------------------------------------------------ the device is used
class _NeverOnTheDevice(AssertionError):
    pass


class _Devices(TorchFunctionMode):
    """Counts the devices of the tensors every torch function returns; stops a run that has made ``limit`` CPU
    tensors and none on the configured device (it ignores the device: no need to run it to the end)."""

    def __init__(self, limit: int = 200_000):
        super().__init__()
        self.seen = Counter()
        self.limit = limit

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.seen[t.device.type] += 1
        if not self.seen["meta"] and self.seen["cpu"] > self.limit:
            raise _NeverOnTheDevice(f"{self.limit} CPU tensors made and none on the configured device")
        return out


def _on_meta(monkeypatch):
    """Every experiment's ``experiment_device`` answers ``meta`` (configs still validate against this machine)."""
    def fake(config):
        return META

    monkeypatch.setattr(base, "experiment_device", fake)
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("optiscope.experiments.") and hasattr(mod, "experiment_device"):
            monkeypatch.setattr(mod, "experiment_device", fake)


@pytest.mark.parametrize("name", WITH_DEVICE)
def test_the_configured_device_reaches_every_tensor(tmp_path, monkeypatch, name):
    """Run with the device replaced by ``meta``: the run must stop at the first read of a number from a meta tensor
    (so its models and data were there), never at an op that mixes devices, and never finish (the CPU was used)."""
    from optiscope.experiments.base import resolve_config

    cfg = resolve_config(name, "quick", TINY.get(name, []))
    _on_meta(monkeypatch)
    mode = _Devices()
    with pytest.raises(Exception) as e, mode:   # the message is checked below
        REG[name].fn(cfg, base.RunStore(tmp_path / name))
    msg = str(e.value)
    assert "meta" in msg and not MIXED.search(msg), f"{name}: {type(e.value).__name__}: {msg}"
    assert mode.seen["meta"] > 0, name


def test_lm_and_cnn_problems_put_model_and_data_on_the_device():
    from optiscope.experiments.diagonal_uniformity import common as rc
    from optiscope.experiments.diagonal_uniformity.rmed_cnn import CNNConfig, cnn_problem
    from optiscope.lab.problem import tensor_leaves

    lm = rc.LMConfig(n_train=64, probe_size=8, d_model=8, n_heads=2, n_layers=1, seq_len=8)
    for problem in (rc.lm_problem(lm, device=META), cnn_problem(CNNConfig(n_train=32, probe_size=8), device=META)):
        tensors = [*problem.model.parameters(), *problem.model.buffers(), *tensor_leaves(problem.train),
                   *tensor_leaves(problem.eval), *tensor_leaves(problem.probe_batch)]
        assert tensors and all(t.device == META for t in tensors)
    cpu = rc.lm_problem(lm)      # the default: the config's device
    assert all(p.device.type == "cpu" for p in cpu.model.parameters())


def test_move_helpers_keep_the_cpu_initialisation():
    from optiscope.experiments.adam_implicit_bias.common import bilinear_problem
    from optiscope.experiments.vanishing_curvature.init_mlp import _factory, teacher_on

    with pytest.raises(ValueError, match="parameters are on the 'meta' device"):   # moved before the loss is built
        bilinear_problem(device=META)
    cpu_model = _factory("relu", "he_uniform")(3, 4, 0)
    meta_model = _factory("relu", "he_uniform", META)(3, 4, 0)
    assert all(p.device == META for p in meta_model.parameters())
    assert [p.shape for p in meta_model.parameters()] == [p.shape for p in cpu_model.parameters()]
    assert teacher_on(torch.device("cpu"), 8) is None          # the CPU keeps init_check's own teacher data
    X, y = teacher_on(META, 8)(4, 0)
    assert X.device == META and y.device == META and X.shape == (8, 4)


def test_reproduce_says_why_a_cpu_only_experiment_runs_on_the_cpu(tmp_path):
    from optiscope.experiments.reproduce import reproduce

    tiny = ["points=[[2.0,4.0]]", "modes=100", "steps=100", "divergence_steps=100", "transition_lr=0.1"]
    res = reproduce(tmp_path / "r", only=["sgd_phase_diagram"], device="cuda", parallel=False,
                    overrides={"sgd_phase_diagram": tiny})
    entry = res.experiments["sgd_phase_diagram"]
    assert entry["status"] == "finished", entry
    assert entry["device_note"] == f"sgd_phase_diagram runs on the CPU: {REG['sgd_phase_diagram'].cpu_only}"
    assert "device" not in base.RunStore.open(tmp_path / "r" / "sgd_phase_diagram").read_config()

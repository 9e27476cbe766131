"""CLI: compare / show / plot / resume / demo, and the error messages for bad input."""

from __future__ import annotations

import pytest
import test_lab_common  # noqa: F401  (single-threaded torch for tiny tensors)
from typer.testing import CliRunner

from optiscope.cli.main import app
from optiscope.lab import RunStore

TINY = ["--model", "mlp:depth=2,width=8", "--data", "digits:n_train=120,n_test=40", "--steps", "6", "--batch",
        "32", "--probe-every", "3", "--quiet"]


def invoke(*args):
    return CliRunner().invoke(app, list(args))


def test_compare_show_plot_resume_end_to_end(tmp_path):
    out = tmp_path / "x"
    r = invoke("compare", *TINY, "--opt", "sgdm:lr=0.1,momentum=0.9", "--opt", "adam:lr=1e-3",
               "--probes", "loss,r_med:per_layer=20,sharpness,one_norm", "--seed", "1", "--out", str(out))
    assert r.exit_code == 0, r.output
    st = RunStore.open(out)
    df = st.read_metrics()
    assert set(df["run"]) == {"sgdm", "adam"}
    assert {"loss", "r_med", "sharpness", "one_norm"} <= set(df["metric"])
    assert sorted({p.name for p in (out / "figures").iterdir()}) == ["loss.png", "one_norm.png", "r_med.png",
                                                                    "sharpness.png"]
    assert "R_med per layer" in (out / "report.md").read_text()
    cfg = st.read_config()
    assert cfg["kind"] == "compare" and cfg["seed"] == 1
    r = invoke("show", str(out))
    assert r.exit_code == 0 and "sgdm" in r.output and "R_med" in r.output
    r = invoke("plot", str(out))
    assert r.exit_code == 0 and "r_med.png" in r.output
    before = st.read_metrics()
    r = invoke("resume", str(out), "--quiet")
    assert r.exit_code == 0, r.output
    assert st.read_metrics().equals(before)
    r = invoke("compare", *TINY, "--out", str(out))  # refuses to overwrite a run
    assert r.exit_code == 2 and "resume" in r.output


def test_compare_from_config_file_with_set(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: mlp:depth=2,width=8\ndata: digits:n_train=100,n_test=20\nsteps: 4\nbatch_size: 25\n"
                   "probe_every: 2\nprobes: [loss]\noptimizers: ['sgd:lr=0.1']\n")
    out = tmp_path / "y"
    r = invoke("compare", "--config", str(cfg), "--set", "steps=2", "--out", str(out), "--quiet")
    assert r.exit_code == 0, r.output
    assert RunStore.open(out).read_metrics()["step"].max() == 2


@pytest.mark.parametrize("args, needle", [
    (["--opt", "adamw:lr=1"], "unknown optimizer 'adamw'.*valid: .*adam"),
    (["--opt", "adam:lr"], "token 'lr' is not key=value"),
    (["--model", "resnet9"], "unknown model 'resnet9'.*valid: .*mlp"),
    (["--data", "cifar10"], "unknown dataset 'cifar10'.*valid: .*digits"),
    (["--probes", "loss,rmed"], "unknown probe 'rmed'.*valid: .*r_med"),
    (["--set", "steps"], "malformed override 'steps'"),
    (["--set", "stepz=3"], "unknown config field"),
    (["--steps", "0"], "field 'steps' = 0 is invalid"),
    (["--probes", ""], "field 'probes' = \\(\\) is invalid; allowed: at least one probe"),
    (["--model", "mlp:gain=nan"], "gain = nan is not a finite number"),
    (["--opt", "adam:lr=inf"], "lr = inf is not a finite number"),
    (["--set", "steps=2.7"], "field 'steps' = 2.7 is invalid; allowed: an integer"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--keep-checkpoints", "0"], "keep-checkpoints"),
])
def test_bad_input_errors(tmp_path, args, needle):
    import re

    r = invoke("compare", *TINY, *args, "--out", str(tmp_path / "z"))
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert re.search(needle, text), text
    assert "Traceback" not in r.output


def test_show_missing_dir_and_resume_non_lab(tmp_path):
    r = invoke("show", str(tmp_path / "nope"))
    assert r.exit_code == 2 and "does not exist" in r.output
    (tmp_path / "config.yaml").write_text("a: 1\n")
    r = invoke("resume", str(tmp_path))
    assert r.exit_code == 2 and "not a lab comparison" in " ".join(r.output.split())


def test_demo_short(tmp_path):
    out = tmp_path / "demo"
    r = invoke("demo", "--out", str(out), "--data", "digits:n_train=200,n_test=50", "--steps", "4", "--quiet")
    assert r.exit_code == 0, r.output
    st = RunStore.open(out)
    assert {"sgdm", "adam"} == set(st.read_manifest()["runs"])
    assert {"loss", "r_med", "sharpness", "one_norm"} <= set(st.read_metrics()["metric"])
    assert (out / "report.md").exists() and (out / "figures" / "r_med.png").exists()


def test_sgd_theory_bad_spectrum_and_kernel_files(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("eigenvalues: [1, 2]\n")
    for args, needle in ((["--spectrum", ""], "--spectrum is empty"),
                         (["--spectrum", str(bad)], f"spectrum file {bad} is not a NumPy .npz archive"),
                         (["--kernel", str(bad)], f"kernel file {bad} is not a NumPy .npz archive"),
                         (["--spectrum", "powerlaw:nu=2,kappa=1,n=2.5"], "powerlaw n = 2.5 must be an integer")):
        r = invoke("sgd-theory", *args, "--lr", "0.1", "--batch", "4", "--steps", "10", "--quiet")
        text = " ".join(r.output.split())
        assert r.exit_code == 2 and needle in text and "Traceback" not in text, text


def test_config_file_errors_name_the_file(tmp_path):
    for text, needle in (("steps: [1\n", "is not valid YAML"),
                         ("steps: !!python/object/apply:os.system ['true']\n", "could not determine a constructor"),
                         ("- 1\n", "must hold a mapping")):
        p = tmp_path / "c.yaml"
        p.write_text(text)
        r = invoke("compare", "--config", str(p), "--out", str(tmp_path / "o"))
        out = " ".join(r.output.split())
        assert r.exit_code == 2 and str(p) in out and needle in out, out

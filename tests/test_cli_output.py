"""CLI output: plain text without box drawing when piped, --json with the documented keys, cells never cut."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import pytest
import test_lab_common  # noqa: F401  (single-threaded torch for tiny tensors)
from rich.table import Table
from typer.testing import CliRunner

from optiscope import __version__
from optiscope.cli import _output
from optiscope.cli.main import app

BOX = set("│─┃━┏┓┗┛┡┩╇╭╮╰╯├┤┬┴┼═║╔╗╚╝")
TINY = ["--model", "mlp:depth=2,width=8", "--data", "digits:n_train=120,n_test=40", "--steps", "6", "--batch",
        "32", "--probe-every", "3", "--quiet"]
LONG_CLAIM = ("a deliberately long claim text that names every step of the argument so that a table which cuts "
              "cells at seventy characters would lose its final words: supercalifragilisticexpialidocious-ending")


def invoke(*args):
    return CliRunner().invoke(app, list(args))


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and r.output.strip() == f"optiscope {__version__}"


def test_list_plain_and_json():
    r = invoke("list")
    assert r.exit_code == 0, r.output
    assert not BOX & set(r.output), "piped output must not draw boxes"
    assert "…" not in r.output
    lines = r.output.splitlines()
    assert lines[0].split()[:2] == ["name", "paper"]
    r = invoke("list", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    exps = data["experiments"]
    assert exps and all(set(e) == {"name", "paper", "paper_key", "reference", "title", "presets"} for e in exps)
    by_name = {e["name"]: e for e in exps}
    assert by_name["rmed_two_layer"]["paper"] == "Jiang et al. 2023"
    assert "quick" in by_name["rmed_two_layer"]["presets"]
    # every registered title is printed whole in the plain listing
    text = invoke("list").output
    assert all(e["title"] in text for e in exps)


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_output") / "x"
    r = invoke("compare", *TINY, "--opt", "sgdm:lr=0.1,momentum=0.9", "--opt", "adam:lr=1e-3",
               "--probes", "loss,accuracy,r_med:per_layer=10", "--seed", "1", "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    return out, r


def _check_store_json(data, out):
    assert set(data) >= {"run_dir", "status", "problems", "runs", "r_med", "claims"}
    assert data["run_dir"] == str(out)
    assert set(data["runs"]) == {"sgdm", "adam"}
    for run in data["runs"].values():
        assert set(run) >= {"status", "optimizer", "final"}
        assert run["status"] == "finished"
        assert run["final"]["step"] == 6
        assert run["final"]["loss"] > 0
    assert data["r_med"] and all(set(v) == {"sgdm", "adam"} for v in data["r_med"].values())


def test_compare_json_stdout_is_one_document(compare_dir):
    out, r = compare_dir
    data = json.loads(r.stdout)  # nothing but the JSON document on stdout
    _check_store_json(data, out)


def test_show_json_and_plain(compare_dir):
    out, _ = compare_dir
    r = invoke("show", str(out), "--json")
    assert r.exit_code == 0, r.output
    _check_store_json(json.loads(r.stdout), out)
    r = invoke("show", str(out))
    assert r.exit_code == 0, r.output
    assert not BOX & set(r.stdout) and "…" not in r.stdout
    assert "eval_accuracy" in r.stdout and "R_med per layer" in r.stdout


@pytest.fixture
def long_claim_experiment():
    from optiscope.experiments import base
    from optiscope.utils.config import Config

    @dataclass(frozen=True)
    class TinyConfig(Config):
        seed: int = 0

        def validate(self):
            pass

    name = "cli_output_long_claim"

    @base.register(name, paper="000", title="test-only experiment", config=TinyConfig,
                   presets={"quick": TinyConfig(), "full": TinyConfig()})
    def _run(config, store):
        return base.Result(claims=[base.Claim("long", LONG_CLAIM, paper="a paper value | with a pipe",
                                              measured=float("nan"), holds=None, reason="premise absent")],
                           metrics={"x": 1.0})

    try:
        yield name
    finally:
        base._REGISTRY.pop(name, None)


def test_run_json_and_long_claims_not_cut(tmp_path, long_claim_experiment):
    r = invoke("run", long_claim_experiment, "--out", str(tmp_path / "r"), "--quiet", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert set(data) >= {"experiment", "preset", "seed", "claims", "metrics", "paths"}
    assert set(data["paths"]) == {"run_dir", "results", "report"}
    (claim,) = data["claims"]
    assert set(claim) >= {"id", "claim", "paper", "measured", "holds", "reason"}
    assert claim["claim"] == LONG_CLAIM and claim["measured"] is None and claim["holds"] is None
    r = invoke("run", long_claim_experiment, "--out", str(tmp_path / "r2"), "--quiet")
    assert r.exit_code == 0, r.output
    assert LONG_CLAIM in r.stdout and not BOX & set(r.stdout)
    md = (tmp_path / "r2" / "report.md").read_text()
    assert "a paper value \\| with a pipe" in md and "/ with a pipe" not in md


def test_terminal_tables_wrap_instead_of_cutting(monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "60")
    table = Table("run", "eval_accuracy", "claim", title="t")
    table.add_row("sgdm", "0.93", LONG_CLAIM)
    buf = io.StringIO()
    _output.print_table(table, file=buf)
    out = buf.getvalue()
    assert "…" not in out
    assert BOX & set(out)  # a terminal gets the box
    words = [w for w in LONG_CLAIM.split() if len(w) < 20]
    assert all(w in out for w in words)
    # the long word is folded, not dropped: its pieces concatenate back
    flat = "".join(ch for ch in out if ch not in BOX and not ch.isspace())
    assert "supercalifragilisticexpialidocious-ending" in flat.replace("\x1b", "") or \
        "supercalifragilistic" in flat


def test_plain_table_alignment_and_json_helpers():
    table = Table("name", "value", title="numbers")
    table.columns[1].justify = "right"
    table.add_row("a", "1")
    table.add_row("long name", "12345")
    text = _output.table_to_text(table)
    assert text.splitlines() == ["numbers", "name       value", "a              1", "long name  12345"]
    import numpy as np

    assert _output.jsonable({"a": np.float64("nan"), "b": (np.int64(3), float("inf")), 1: [np.arange(2)]}) == \
        {"a": None, "b": [3, None], "1": [[0, 1]]}


def test_narrow_terminal_numeric_table_becomes_records(monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "50")
    names = ["eval_accuracy", "precond_sharpness", "one_norm", "sharpness", "eval_loss", "accuracy"]
    table = Table("run", *names, title="runs")
    table.add_row("sgdm", "0.861", "1846.455", "67.13", "10.42", "0.5189", "0.9062")
    buf = io.StringIO()
    _output.print_table(table, file=buf)
    out = buf.getvalue()
    for name, value in zip(names, ["0.861", "1846.455", "67.13", "10.42", "0.5189", "0.9062"]):
        assert f"{name}: {value}" in out  # whole header and whole number on one line
    assert "…" not in out

"""RunStore behaviour the lab relies on: corrupt/partial files named with valid data kept, disk-full and
permission errors reported clearly with nothing already written lost."""

from __future__ import annotations

import errno
import os

import pandas as pd
import pytest
import torch
from test_lab_common import tiny_problem

from optiscope.lab import Run, RunStore, StoreError, compare


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def _small_run(path):
    return compare(tiny_problem(), {"a": _sgd, "b": "adam:lr=1e-2"}, steps=6, batch_size=16, probe_every=3,
                   probes=["loss", "weight_spectrum"], store=path)


def test_corrupt_files_are_named_and_valid_data_kept(tmp_path):
    _small_run(tmp_path)
    st = RunStore.open(tmp_path)
    assert st.check() == []
    metrics_before = st.read_metrics()
    arrays = sorted((tmp_path / "arrays").glob("*.npz"))
    assert arrays
    arrays[0].write_bytes(arrays[0].read_bytes()[:40])  # a partial file
    (tmp_path / "results.json").write_text('{"claims": [')
    problems = st.check()
    assert any(arrays[0].name in p for p in problems)
    assert any("results.json" in p for p in problems)
    pd.testing.assert_frame_equal(st.read_metrics(), metrics_before)  # the rest is still readable
    assert st.read_arrays(arrays[1].stem)  # other arrays intact
    (tmp_path / "metrics.parquet").write_bytes(b"PAR1 broken")
    with pytest.raises(StoreError, match="metrics.parquet"):
        st.read_metrics()


def test_show_reports_corrupt_file_and_still_shows(tmp_path):
    from typer.testing import CliRunner

    from optiscope.cli.main import app

    _small_run(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    r = CliRunner().invoke(app, ["show", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "manifest.json" in r.output and "corrupt" in r.output
    assert "a" in r.output and "loss" in r.output


def test_disk_full_is_a_clear_error_and_nothing_is_lost(tmp_path, monkeypatch):
    pb = tiny_problem()
    st = RunStore(tmp_path)
    calls = {"n": 0}
    real_replace = os.replace

    def flaky_replace(src, dst):
        calls["n"] += 1
        if calls["n"] > 6 and "metrics" in str(dst):  # a metrics part or the compacted file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    run = Run(pb, _sgd, steps=12, batch_size=16, probe_every=3, probes=["loss"], name="a")
    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(StoreError, match="No space left on device"):
        run.execute(store=st)
    monkeypatch.setattr(os, "replace", real_replace)
    df = st.read_metrics()  # what was written before is intact and readable
    assert not df.empty and st.check() == []
    assert not [p for p in tmp_path.rglob("*.tmp")]  # no temp files left behind


def test_unwritable_directory_is_a_clear_error(tmp_path, monkeypatch):
    target = tmp_path / "ro" / "run"

    def deny(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(type(target), "mkdir", deny)
    with pytest.raises(StoreError, match="cannot create run directory .*Permission denied"):
        RunStore(target)


def test_checkpoint_holds_model_optimizer_and_rng(tmp_path):
    res = Run(tiny_problem(), "adam:lr=1e-2", steps=4, batch_size=16, probe_every=2, probes=["loss"],
              name="adam").execute(store=tmp_path)
    st = RunStore.open(tmp_path)
    steps = [s for s, _ in st.list_checkpoints("adam")]
    assert steps == [0, 2, 4]
    ck = st.load_checkpoint(st.list_checkpoints("adam")[-1][1])
    assert ck["step"] == 4 and set(ck) >= {"model", "optimizer", "torch_rng", "probe_cache", "phase"}
    for k, v in res.model.state_dict().items():
        assert torch.equal(ck["model"][k], v)
    assert ck["optimizer"]["state"]  # Adam moments saved

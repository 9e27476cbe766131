"""``optiscope sweep`` / ``lab.sweep.sweep``: the grid's optimizer specs, parallel cells equal to sequential ones
(same metrics, bit for bit on CPU), one store per cell plus the combined tidy table, resume keeps finished cells,
bad input is a clear error (exit code 2 on the CLI)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner


@pytest.fixture(scope="module")
def ray_session():
    from optiscope.lab.pool import start_pool, stop_pool

    pool = start_pool(workers=2)
    yield pool
    stop_pool(pool)


def _base():
    from optiscope.lab.config import CompareConfig

    return CompareConfig(model="mlp:depth=2,width=16", data="digits", optimizers=("sgdm:lr=0.1,momentum=0.9",),
                         steps=20, batch_size=64, probe_every=10, probes=("loss",), probe_size=256)


def test_cell_spec_sets_lr_and_momentum():
    from optiscope.lab.sweep import cell_spec, format_spec, grid

    assert cell_spec("sgdm:lr=0.1,momentum=0.9", lr=0.05, momentum=0.5) == "sgdm:lr=0.05,momentum=0.5"
    assert cell_spec("heavyball", momentum=-0.3) == "heavyball:momentum=-0.3"
    assert cell_spec("adam:lr=1e-3,betas=[0.8,0.99]", momentum=0.5) == "adam:lr=0.001,betas=[0.5,0.99]"
    assert format_spec("adam", {"lr": 0.001, "betas": [0.9, 0.999]}) == "adam:lr=0.001,betas=[0.9,0.999]"
    with pytest.raises(ValueError, match="neither a momentum nor betas"):
        cell_spec("signgd:lr=0.01", momentum=0.9)
    with pytest.raises(ValueError, match="unknown optimizer 'nadam'"):
        cell_spec("nadam:lr=0.1")
    cells = grid(_base(), lrs=[0.01, 0.1, 1.0], seeds=[0, 1, 2])
    assert len(cells) == 9 and len({c.id for c in cells}) == 9
    assert {(c.lr, c.seed) for c in cells} == {(lr, s) for lr in (0.01, 0.1, 1.0) for s in (0, 1, 2)}
    assert all(c.config.optimizers == (f"sgdm:lr={c.lr!r},momentum=0.9",) and c.config.seed == c.seed
               for c in cells)
    with pytest.raises(ValueError, match="learning rates must be > 0"):
        grid(_base(), lrs=[0.1, 0.0])


def test_parallel_equals_sequential_and_resume_keeps_cells(ray_session, tmp_path):
    from optiscope.lab.sweep import sweep

    kw = dict(lrs=[0.05, 0.2], seeds=[0, 1])
    par = sweep(_base(), tmp_path / "par", workers=2, **kw)
    seq = sweep(_base(), tmp_path / "seq", parallel=False, **kw)
    assert all(s["status"] == "finished" for s in par.status.values())
    key = ["cell", "run", "step", "metric", "layer"]
    a = par.metrics.sort_values(key).reset_index(drop=True)
    b = seq.metrics.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    assert set(a["cell"]) == {c.id for c in par.cells} and len(par.summary) == 4
    on_disk = pd.read_parquet(tmp_path / "par" / "sweep.parquet")
    assert len(on_disk) == len(a) and list(on_disk.columns[:6]) == ["cell", "spec", "optimizer", "lr", "momentum",
                                                                     "seed"]
    # each cell is an ordinary comparison store
    cell = par.cells[0]
    stored = pd.read_parquet(tmp_path / "par" / "cells" / cell.id / "metrics.parquet")
    assert set(stored["run"]) == {"sgdm"}
    # best() is the cell with the smallest last loss
    best = par.best("loss")
    last = a[(a["metric"] == "loss") & (a["step"] == 20)].set_index("cell")["value"]
    assert best.id == last.idxmin() and len(last) == 4
    mtimes = {c.id: (tmp_path / "par" / "cells" / c.id / "manifest.json").stat().st_mtime_ns for c in par.cells}
    again = sweep(_base(), tmp_path / "par", workers=2, **kw)
    assert {c.id: (tmp_path / "par" / "cells" / c.id / "manifest.json").stat().st_mtime_ns
            for c in again.cells} == mtimes
    pd.testing.assert_frame_equal(again.metrics.sort_values(key).reset_index(drop=True), a)


def test_bad_output_and_changed_base(tmp_path):
    from optiscope.lab.sweep import sweep

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "mine.txt").write_text("1")
    with pytest.raises(ValueError, match="holds something else"):
        sweep(_base(), tmp_path / "x", lrs=[0.1], parallel=False)
    sweep(_base(), tmp_path / "s", lrs=[0.1], parallel=False)
    with pytest.raises(ValueError, match="another base config .*steps"):
        sweep(_base().replace(steps=30), tmp_path / "s", lrs=[0.1], parallel=False)


def test_cli(ray_session, tmp_path):
    from optiscope.cli.main import app

    runner = CliRunner()
    common = ["--model", "mlp:depth=2,width=16", "--data", "digits", "--steps", "10", "--probe-every", "5",
              "--probes", "loss"]
    r = runner.invoke(app, ["sweep", "--out", str(tmp_path / "a"), "--lr", "0.1,0", *common])
    assert r.exit_code == 2 and "learning rates must be > 0" in r.output
    r = runner.invoke(app, ["sweep", "--out", str(tmp_path / "a"), "--workers", "0", *common])
    assert r.exit_code == 2 and "--workers 0" in r.output
    r = runner.invoke(app, ["sweep", "--out", str(tmp_path / "a"), "--lr", "abc", *common])
    assert r.exit_code == 2 and "'abc' is not a number" in r.output
    r = runner.invoke(app, ["sweep", "--out", str(tmp_path / "ok"), "--opt", "sgdm:momentum=0.9", "--lr", "0.05,0.1",
                            "--seed", "0", "--workers", "2", "--quiet", *common])
    assert r.exit_code == 0, r.output
    summary = pd.read_csv(tmp_path / "ok" / "summary.csv")
    assert sorted(summary["lr"]) == [0.05, 0.1] and (summary["status"] == "finished").all()
    marker = json.loads((tmp_path / "ok" / "sweep.json").read_text())
    assert marker["grid"]["lrs"] == [0.05, 0.1]

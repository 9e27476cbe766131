"""--resume reproduces an uninterrupted run exactly, after SIGKILL of a subprocess mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

HERE = Path(__file__).resolve().parent
STEPS = 24


def experiment(out: str, resume: bool = False, slow: float = 0.0):
    """A comparison whose outcome depends on every piece of saved state: Adam moments, dropout RNG, the
    Lanczos warm start and the sampled coordinates."""
    from test_lab_common import tiny_problem

    from optiscope.lab import compare

    def slow_probe(problem, state):
        time.sleep(slow)
        return {}

    pb = tiny_problem(dropout=0.3)
    return compare(pb, {"sgdm": "sgdm:lr=0.1,momentum=0.9", "adam": "adam:lr=1e-2"}, steps=STEPS, batch_size=16,
                   probe_every=4, probes=["loss", "r_med:per_layer=5", "sharpness", "update_norm",
                                          slow_probe], store=out, resume=resume, lr_schedule="cosine")


def _frame(store_dir) -> pd.DataFrame:
    from optiscope.lab import RunStore

    df = RunStore.open(store_dir).read_metrics()
    return df.sort_values(["run", "step", "metric", "layer"]).reset_index(drop=True)


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, __file__, str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    target = killed / "checkpoints" / "adam_step_00000008.pt"
    while time.time() < deadline and not target.exists() and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, f"child ended early: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    from optiscope.lab import RunStore

    st = RunStore.open(killed)
    assert st.read_manifest()["runs"]["adam"]["status"] == "running"
    assert st.list_checkpoints("adam")[-1][0] < STEPS
    res = experiment(str(killed), resume=True)
    assert all(r.status == "finished" for r in res.runs.values())
    experiment(str(clean))
    pd.testing.assert_frame_equal(_frame(killed), _frame(clean), check_exact=True)
    assert RunStore.open(killed).read_manifest()["status"] == "finished"


def test_resume_skips_a_corrupt_checkpoint_and_still_matches(tmp_path):
    from optiscope.lab import RunStore

    a, b = tmp_path / "a", tmp_path / "b"
    experiment(str(a))
    experiment(str(b))
    st = RunStore.open(a)
    # simulate a crash: the last two checkpoints of adam are lost / damaged, manifest says running
    cks = st.list_checkpoints("adam")
    cks[-1][1].unlink()
    cks[-2][1].write_bytes(b"\x00garbage")
    st.update_run("adam", status="running")
    res = experiment(str(a), resume=True)
    assert res["adam"].status == "finished"
    assert any("corrupt" in w for w in st.read_manifest()["runs"]["adam"].get("warnings", []))
    pd.testing.assert_frame_equal(_frame(a), _frame(b), check_exact=True)


def test_resume_of_finished_run_is_a_no_op(tmp_path):
    experiment(str(tmp_path))
    before = _frame(tmp_path)
    experiment(str(tmp_path), resume=True)
    pd.testing.assert_frame_equal(_frame(tmp_path), before, check_exact=True)
    assert torch.isfinite(torch.tensor(before["value"].to_numpy())).all()


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    experiment(sys.argv[1], slow=0.05)

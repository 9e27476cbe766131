"""The data-parallel Hessian under ``torchrun --nproc_per_node=2`` (gloo, CPU, one thread per rank).

The checks run in tests/_distributed_worker.py (see its docstring): every estimator against a single process
holding all the data (float64, 1e-10) and against the dense Hessian, bit-identity across ranks, a DDP model,
and the error cases (mismatched parameters, empty shards, a rank that never joins) ending in clear errors.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def torchrun(script: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node=2 script args`` (a free rendezvous port
    chosen by torchrun), one thread per rank; killed after ``timeout`` seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args]
    try:
        return subprocess.run(cmd, check=False, env=env, cwd=str(ROOT), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish within {timeout} s (a hang): {(e.stdout or '')[-2000:]}")


def test_distributed_hessian_matches_single_process_and_errors_do_not_hang():
    r = torchrun(HERE / "_distributed_worker.py")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    for rank in (0, 1):
        assert f"WORKER OK rank={rank}" in out, out[-4000:]
        assert f"rank {rank} mismatch error: DistributedHessian: parameter '2.bias' differs across ranks" in out
        assert f"rank {rank} empty-shard error: DistributedHessian: the data shard of rank(s) [1] is empty" in out
    assert "rank 0 timeout error after" in out


def test_distributed_hessian_needs_an_initialised_process_group():
    import torch
    from torch import nn

    from optiscope.curvature import DistributedHessian

    with pytest.raises(ValueError, match="torch.distributed initialised"):
        DistributedHessian(nn.Linear(2, 1), nn.MSELoss(), (torch.zeros(3, 2), torch.zeros(3, 1)))


def test_tracker_under_torchrun_with_ddp_training(tmp_path):
    store = tmp_path / "store"
    r = torchrun(HERE / "_distributed_worker.py", "tracker", str(store))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "TRACKER OK rank=0" in out and "TRACKER OK rank=1" in out, out[-4000:]
    assert (store / "metrics.parquet").exists() or any(store.rglob("*.parquet"))

"""Wall time of ``reproduce`` and ``sweep`` on the Ray pool against the same jobs run one after another in this
process (the sequential baseline, one thread), measured side by side and interleaved (seq, par, seq, par, ...).

    python benchmarks/reproduce_speedup.py [--experiments a,b,c] [--rounds 1] [--skip-reproduce] [--skip-sweep]

Prints one JSON object: per round the sequential and parallel wall seconds, the ratios parallel / sequential and
their median, the load average before and after and the thread count. Targets (issue): <= 0.6 for both with 2
workers on 2 cores. Run directories go to a temporary directory that is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_EXPERIMENTS = "adam_bilinear,explr_scale_invariance,rmed_lowrank,deep_linear_dynamics"


def _reproduce_round(names: list[str], root: Path, k: int) -> dict:
    from optiscope.experiments.reproduce import reproduce

    out = {}
    t = time.perf_counter()
    r = reproduce(root / f"seq{k}", only=names, parallel=False)
    out["sequential_s"] = time.perf_counter() - t
    out["sequential_failed"] = r.failed
    t = time.perf_counter()
    r = reproduce(root / f"par{k}", only=names, workers=2)
    out["parallel_s"] = time.perf_counter() - t
    out["parallel_failed"] = r.failed
    out["ratio"] = out["parallel_s"] / out["sequential_s"]
    return out


def _sweep_round(root: Path, k: int) -> dict:
    from optiscope.lab.config import CompareConfig
    from optiscope.lab.sweep import sweep

    base = CompareConfig(model="mlp:depth=3,width=64", data="digits", optimizers=("sgdm:momentum=0.9",),
                         steps=1000, batch_size=64, probe_every=250, probes=("loss", "sharpness:max_iter=20"),
                         probe_size=512)
    kw = dict(lrs=[0.01, 0.03, 0.1], seeds=[0, 1, 2])
    out = {}
    t = time.perf_counter()
    sweep(base, root / f"sw_seq{k}", parallel=False, **kw)
    out["sequential_s"] = time.perf_counter() - t
    t = time.perf_counter()
    sweep(base, root / f"sw_par{k}", workers=2, **kw)
    out["parallel_s"] = time.perf_counter() - t
    out["ratio"] = out["parallel_s"] / out["sequential_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and print the JSON summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiments", default=DEFAULT_EXPERIMENTS)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--skip-reproduce", action="store_true")
    ap.add_argument("--skip-sweep", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    names = [n for n in args.experiments.split(",") if n]
    res: dict = {"threads_per_job": 1, "workers": 2, "cpu_count": os.cpu_count(), "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="optiscope-speedup-") as tmp:
        root = Path(tmp)
        if not args.skip_reproduce:
            res["reproduce"] = {"experiments": names,
                                "rounds": [_reproduce_round(names, root, k) for k in range(args.rounds)]}
            res["reproduce"]["median_ratio"] = statistics.median(r["ratio"] for r in res["reproduce"]["rounds"])
        if not args.skip_sweep:
            res["sweep_3x3"] = {"rounds": [_sweep_round(root, k) for k in range(args.rounds)]}
            res["sweep_3x3"]["median_ratio"] = statistics.median(r["ratio"] for r in res["sweep_3x3"]["rounds"])
    res["load_after"] = os.getloadavg()
    json.dump(res, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

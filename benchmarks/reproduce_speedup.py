"""Wall time of ``reproduce`` and ``sweep`` on the Ray pool against the same jobs run one after another in this
process (the sequential baseline, one thread), measured side by side and interleaved (seq, par, seq, par, ...).

    python benchmarks/reproduce_speedup.py [--experiments a,b,c] [--rounds 1] [--skip-reproduce] [--skip-sweep]
                                           [--sweep-steps 1000] [--from-run runs/all] [--write]

Prints one JSON object: per round the sequential and parallel wall seconds, the ratios parallel / sequential and
their median, the load average before and after and the thread count. Targets: <= 0.6 for both with 2 workers on
2 cores. Run directories go to a temporary directory that is removed afterwards.

``--from-run DIR`` reads a finished ``optiscope reproduce`` directory instead: its wall time against the sum of its
experiments' own run times (each measured inside its worker, one thread), and the best any schedule on that many
workers could do (the longest experiment, or the sum over the workers). ``--write`` puts the result in the
``reproduce_speedup`` section of docs/benchmarks.md.
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


def _sweep_round(root: Path, k: int, steps: int = 1000) -> dict:
    from optiscope.lab.config import CompareConfig
    from optiscope.lab.sweep import sweep

    base = CompareConfig(model="mlp:depth=3,width=64", data="digits", optimizers=("sgdm:momentum=0.9",),
                         steps=steps, batch_size=64, probe_every=250, probes=("loss", "sharpness:max_iter=20"),
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


def from_run(run_dir: Path) -> dict:
    """Wall time of a finished reproduction against the sum of its experiments' run times (see the module doc)."""
    marker = json.loads((Path(run_dir) / "reproduce.json").read_text())
    exps = marker.get("experiments", {})
    sessions = marker.get("sessions", [])
    ran = [n for n, e in exps.items() if e.get("status") == "finished" and e.get("seconds")]
    secs = {n: float(exps[n]["seconds"]) for n in ran}
    walls = {n: float(exps[n].get("wall_seconds") or exps[n]["seconds"]) for n in ran}
    wall = sum(float(x.get("wall_seconds", 0.0)) for x in sessions)
    workers = 2
    pool = str(marker.get("pool", ""))
    for tok in pool.split(","):
        if "workers" in tok:
            try:
                workers = int(tok.strip().split()[0])
            except ValueError:
                pass
    total = sum(walls.values())
    best = max(max(walls.values(), default=0.0), total / max(1, workers))
    return {"dir": str(run_dir), "experiments": len(ran), "failed": [n for n, e in exps.items()
                                                                     if e.get("status") == "failed"],
            "pool": pool, "sessions": len(sessions), "wall_s": wall, "sum_job_wall_s": total,
            "sum_job_run_s": sum(secs.values()), "ratio": wall / total if total else None,
            "best_possible_ratio": best / total if total else None,
            "longest": max(walls, key=walls.get) if walls else None,
            "longest_s": max(walls.values(), default=None),
            "load_average": [x.get("load_average") for x in sessions]}


def _markdown(res: dict) -> str:
    from _report import machine

    lines = ["## Reproduce and sweep on the Ray pool (`benchmarks/reproduce_speedup.py`)", "",
             f"Machine: {machine()}. One thread per job, 2 workers. Load average (1/5/15 min) before "
             f"{' / '.join(f'{x:.2f}' for x in res['load_before'])}, after "
             f"{' / '.join(f'{x:.2f}' for x in res['load_after'])}.", ""]
    if "full_run" in res:
        f = res["full_run"]
        lines += [f"Full reproduction `{f['dir']}` ({f['pool']}): {f['experiments']} experiments, wall "
                  f"{f['wall_s'] / 60:.1f} min against {f['sum_job_wall_s'] / 60:.1f} min summed over the "
                  f"experiments' own wall times (each alone on one core): ratio **{f['ratio']:.2f}** (target "
                  f"<= 0.6); the best any 2-worker schedule can do is {f['best_possible_ratio']:.2f} (longest: "
                  f"`{f['longest']}`, {f['longest_s'] / 60:.1f} min). Failed: {', '.join(f['failed']) or 'none'}.",
                  ""]
    for key, title in (("reproduce", "reproduce, short experiments"), ("sweep_3x3", "3x3 lr-by-seed sweep")):
        if key in res:
            r = res[key]
            extra = f" ({', '.join(r['experiments'])})" if "experiments" in r else f" ({r.get('steps')} steps per cell)"
            lines.append(f"- {title}{extra}: " + "; ".join(
                f"sequential {x['sequential_s']:.1f} s, 2 workers {x['parallel_s']:.1f} s, ratio {x['ratio']:.2f}"
                for x in r["rounds"]) + f"; median ratio **{r['median_ratio']:.2f}**")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and print the JSON summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiments", default=DEFAULT_EXPERIMENTS)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--skip-reproduce", action="store_true")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--sweep-steps", type=int, default=1000, help="training steps per sweep cell")
    ap.add_argument("--from-run", type=Path, default=None, help="a finished reproduce directory to evaluate")
    ap.add_argument("--write", action="store_true", help="write the docs/benchmarks.md section")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    names = [n for n in args.experiments.split(",") if n]
    res: dict = {"threads_per_job": 1, "workers": 2, "cpu_count": os.cpu_count(), "load_before": os.getloadavg()}
    if args.from_run is not None:
        res["full_run"] = from_run(args.from_run)
    with tempfile.TemporaryDirectory(prefix="optiscope-speedup-") as tmp:
        root = Path(tmp)
        if not args.skip_reproduce:
            res["reproduce"] = {"experiments": names,
                                "rounds": [_reproduce_round(names, root, k) for k in range(args.rounds)]}
            res["reproduce"]["median_ratio"] = statistics.median(r["ratio"] for r in res["reproduce"]["rounds"])
        if not args.skip_sweep:
            res["sweep_3x3"] = {"steps": args.sweep_steps,
                                "rounds": [_sweep_round(root, k, args.sweep_steps) for k in range(args.rounds)]}
            res["sweep_3x3"]["median_ratio"] = statistics.median(r["ratio"] for r in res["sweep_3x3"]["rounds"])
    res["load_after"] = os.getloadavg()
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _report import write_section

        write_section("reproduce_speedup", _markdown(res))
    json.dump(res, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

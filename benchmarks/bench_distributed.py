"""Data-parallel Hessian: HVP and Lanczos time with 2 ranks x 1 thread vs 1 rank x 2 threads vs 1 rank x 1 thread.

The problem is the benchmark transformer of ``_bench_problems.py`` (4-layer encoder, d_model=64, 64x32 tokens,
float32). The single-process runs hold the whole batch in one ``Hessian``; the 2-rank run (``torchrun``, gloo,
CPU, one thread per rank) holds 32 sequences per rank in a ``DistributedHessian`` (one all-reduce per HVP batch).
Per configuration: the steady-state HVP time (gradient graph built; median of ``--repeats``), the time of a
Lanczos run of ``--lanczos-steps`` HVPs (``k=1``, fixed number of steps), and for 2 ranks the share of the time
spent in the all-reduce (``DistributedHessian.allreduce_seconds``, which includes waiting for the slower rank).

The configurations run as separate processes, interleaved in ``--rounds`` rounds (1x1, 1x2, 2x1, 1x1, ...); each
number is the median over rounds of the per-process medians; the load average is recorded before and after.
Run: ``.venv/bin/python benchmarks/bench_distributed.py [--rounds 3] [--write]`` (``--write`` appends a section to
``docs/benchmarks.md``). The NCCL path (one GPU per rank; ``benchmarks/gpu_check.sh`` runs it with one rank):
``torchrun --nproc_per_node=G benchmarks/bench_distributed.py --backend-check nccl``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def worker(out: str, repeats: int, lanczos_steps: int) -> None:
    """Measure one configuration (distributed when ``WORLD_SIZE`` > 1) and write the result as JSON (rank 0)."""
    import torch

    sys.path.insert(0, str(HERE))
    from _bench_problems import build

    from optiscope.curvature import Hessian

    world = int(os.environ.get("WORLD_SIZE", "1"))
    threads = torch.get_num_threads()
    p = build("transformer")
    if world > 1:
        import torch.distributed as dist

        from optiscope.curvature import DistributedHessian

        dist.init_process_group("gloo")
        rank = dist.get_rank()
        n = p.X.shape[0] // world
        shard = (p.X[rank * n:(rank + 1) * n], p.y[rank * n:(rank + 1) * n])
        H = DistributedHessian(p.model, p.loss_fn, shard)
        sync = dist.barrier
    else:
        rank = 0
        H = Hessian(p.model, p.loss_fn, (p.X, p.y))
        sync = lambda: None
    g = torch.Generator().manual_seed(0)
    v = {n_: torch.randn(t.shape, generator=g) for n_, t in H.params.items()}
    H.hvp(v)  # builds and keeps the gradient graph
    times, shares = [], []
    for _ in range(repeats):
        sync()
        a0 = getattr(H, "allreduce_seconds", 0.0)
        t0 = time.perf_counter()
        H.hvp(v)
        dt = time.perf_counter() - t0
        times.append(dt)
        shares.append((getattr(H, "allreduce_seconds", 0.0) - a0) / dt)
    sync()
    a0 = getattr(H, "allreduce_seconds", 0.0)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev = H.eigenvalues(k=1, tol=1e-12, max_iter=lanczos_steps)
    lanczos = time.perf_counter() - t0
    lanczos_share = (getattr(H, "allreduce_seconds", 0.0) - a0) / lanczos
    if rank == 0:
        Path(out).write_text(json.dumps({
            "world": world, "threads": threads, "hvp_s": statistics.median(times),
            "allreduce_share": statistics.median(shares), "lanczos_s": lanczos, "lanczos_hvp": ev.n_hvp,
            "lanczos_allreduce_share": lanczos_share, "top": float(ev.values[0]), "numel": H.numel}))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def backend_check(backend: str) -> None:
    """Under ``torchrun`` with ``backend`` (``nccl``: one GPU per rank, ``cuda:LOCAL_RANK``; ``gloo``: CPU): the
    distributed Hessian of the benchmark MLP in float64 against one process holding all the data (hvp and top
    eigenvalue, relative error), and the HVP time. Prints one JSON line per rank; exit 1 if an error > 1e-10."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(HERE))
    from _bench_problems import build

    from optiscope.curvature import DistributedHessian, Hessian

    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    p = build("mlp", device=device, dtype=torch.float64)
    n = p.X.shape[0] // world
    H = DistributedHessian(p.model, p.loss_fn, (p.X[rank * n:(rank + 1) * n], p.y[rank * n:(rank + 1) * n]))
    R = Hessian(p.model, p.loss_fn, (p.X[: n * world], p.y[: n * world]))
    g = torch.Generator().manual_seed(0)
    v = {k: torch.randn(t.shape, generator=g, dtype=t.dtype).to(device) for k, t in H.params.items()}
    a, b = H.flatten(H.hvp(v)), R.flatten(R.hvp(v))
    hvp_err = float((a - b).abs().max() / b.abs().max())
    top, ref = H.eigenvalues(k=1, tol=1e-10).values[0], R.eigenvalues(k=1, tol=1e-10).values[0]
    times, a0 = [], H.allreduce_seconds
    for _ in range(10):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        H.hvp(v)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    res = {"backend": backend, "rank": rank, "world": world, "device": str(device), "hvp_rel_err": hvp_err,
           "top_rel_err": abs(top - ref) / abs(ref), "hvp_ms": 1e3 * statistics.median(times),
           "allreduce_share": (H.allreduce_seconds - a0) / max(sum(times), 1e-12)}
    print(json.dumps(res), flush=True)
    dist.destroy_process_group()
    if max(res["hvp_rel_err"], res["top_rel_err"]) > 1e-10:
        sys.exit(1)


def run_config(world: int, threads: int, repeats: int, steps: int) -> dict:
    """One configuration in its own process(es); returns the worker's JSON."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "r.json")
        args = [__file__, "--worker", out, "--repeats", str(repeats), "--lanczos-steps", str(steps)]
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *args]
               if world > 1 else [sys.executable, *args])
        subprocess.run(cmd, env=env, check=True, timeout=600, capture_output=True)
        return json.loads(Path(out).read_text())


def main() -> None:
    """Interleaved rounds over the three configurations; prints (and with ``--write`` appends) a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--backend-check", default=None, choices=["nccl", "gloo"],
                    help="under torchrun: float64 agreement and HVP time of the distributed Hessian on BACKEND")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--lanczos-steps", type=int, default=20)
    ap.add_argument("--write", action="store_true", help="append a section to docs/benchmarks.md")
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.repeats, a.lanczos_steps)
        return
    if a.backend_check:
        backend_check(a.backend_check)
        return
    configs = [(1, 1), (1, 2), (2, 1)]
    load0 = os.getloadavg()
    res: dict[tuple[int, int], list[dict]] = {c: [] for c in configs}
    for r in range(a.rounds):
        for c in configs:
            res[c].append(run_config(*c, a.repeats, a.lanczos_steps))
            print(f"round {r} {c[0]} rank(s) x {c[1]} thread(s): {res[c][-1]}", flush=True)
    load1 = os.getloadavg()
    med = {c: {k: statistics.median(x[k] for x in res[c]) for k in ("hvp_s", "lanczos_s", "allreduce_share",
                                                                   "lanczos_allreduce_share")} for c in configs}
    base = med[(1, 1)]
    tops = {c: res[c][0]["top"] for c in configs}
    lines = [
        "## Data-parallel Hessian: 2 ranks x 1 thread vs 1 rank (`benchmarks/bench_distributed.py`)",
        "",
        (f"Benchmark transformer (4-layer encoder, d_model=64, 64x32 tokens, float32, {res[(1, 1)][0]['numel']} "
         f"parameters); 2 ranks: `torchrun --nproc_per_node=2`, gloo, 32 sequences per rank. HVP: steady state "
         f"(graph kept), median of {a.repeats}; Lanczos: {a.lanczos_steps} HVPs (k=1). Configurations run as "
         f"separate processes interleaved over {a.rounds} rounds; medians over rounds. Load average (1/5/15 min) "
         f"{load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f} before, {load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f} "
         "after, on 2 cores shared with other jobs. Per-round 2-rank/1x1 HVP ratios: "
         + ", ".join(f"{x['hvp_s'] / y['hvp_s']:.2f}" for x, y in zip(res[(2, 1)], res[(1, 1)])) + "."),
        "",
        "| configuration | HVP (ms) | HVP / 1x1 | Lanczos (s) | Lanczos / 1x1 | all-reduce share (HVP, Lanczos) |",
        "|---|---|---|---|---|---|",
    ]
    for c in configs:
        m = med[c]
        share = (f"{100 * m['allreduce_share']:.1f}%, {100 * m['lanczos_allreduce_share']:.1f}%" if c[0] > 1
                 else "-")
        lines.append(f"| {c[0]} rank x {c[1]} thread{'s' if c[1] > 1 else ''} | {1e3 * m['hvp_s']:.1f} | "
                     f"{m['hvp_s'] / base['hvp_s']:.2f}x | {m['lanczos_s']:.2f} | "
                     f"{m['lanczos_s'] / base['lanczos_s']:.2f}x | {share} |")
    ratio = med[(2, 1)]["hvp_s"] / base["hvp_s"]
    lines += ["", f"Target: 2-rank HVP <= 0.6x the 1-rank 1-thread time; measured {ratio:.2f}x "
              f"({'met' if ratio <= 0.6 else 'not met'} under this load). Top eigenvalue after the Lanczos steps: "
              + ", ".join(f"{c[0]}x{c[1]}: {tops[c]:.6g}" for c in configs)
              + " (the same operator). The all-reduce share includes waiting for the slower rank.", ""]
    text = "\n".join(lines)
    print(text)
    if a.write:
        doc = ROOT / "docs" / "benchmarks.md"
        body = doc.read_text()
        doc.write_text(body.rstrip("\n") + "\n\n" + text)


if __name__ == "__main__":
    main()

"""Probe overhead of the demo and the cost of one R_med checkpoint (issue 4, "Benchmarks").

1. The demo (``optiscope demo``: SGD+M vs Adam, loss/accuracy/R_med/sharpness/one-norm probes) at
   ``--probe-every 50``: probe time as a fraction of training time, measured in the same process (target <= 25%),
   with the per-probe split at one checkpoint.
2. One R_med checkpoint: HVPs and seconds per layer (200 exact diagonal entries each, on the demo's probe batch),
   next to the time of one training step as the in-process baseline.

Run: ``.venv/bin/python benchmarks/bench_probes.py`` (writes the ``probes`` section of docs/benchmarks.md).
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _report import timeit, write_section

from optiscope.lab import ProbeState, Run, make_probes
from optiscope.lab.config import build_problem, demo_config
from optiscope.lab.probes import probe_guard


def main() -> None:
    cfg = demo_config()
    problem = build_problem(cfg)
    init = copy.deepcopy(problem.model)
    lines = [f"Demo problem: `{cfg.model}` on `{cfg.data}`, batch {cfg.batch_size}, probe batch {cfg.probe_size}, "
             f"{cfg.steps} steps, probes `{', '.join(cfg.probes)}`.", ""]

    # 1. overhead of the demo at probe_every = 50 ---------------------------------------------------------------
    lines += ["### Probe overhead of the demo (`--probe-every 50`)", "",
              "| optimizer | training s | probes s | probe / training | target |", "|---|---|---|---|---|"]
    results = {}
    for name, spec in zip(cfg.run_names(), cfg.optimizers):
        run = Run(problem, spec, cfg.steps, batch_size=cfg.batch_size, probe_every=50, probes=list(cfg.probes),
                  seed=cfg.seed, name=name, model=copy.deepcopy(init))
        res = run.execute()
        results[name] = res
        frac = res.probe_seconds / res.train_seconds
        lines.append(f"| {name} | {res.train_seconds:.2f} | {res.probe_seconds:.2f} | {frac:.0%} | "
                     f"<= 25%: {'met' if frac <= 0.25 else '**not met**'} |")

    # per-probe split at the last checkpoint of the Adam run
    res = results[cfg.run_names()[-1]]
    state = ProbeState(step=cfg.steps, model=res.model, optimizer=res.optimizer, problem=problem, seed=cfg.seed)
    lines += ["", "Per-probe cost at one checkpoint (Adam, last step; median of 3):", "",
              "| probe | seconds | HVPs |", "|---|---|---|"]
    for probe in make_probes(list(cfg.probes)):
        out = {}

        def call(probe=probe):
            state.scratch.clear()
            state.cache.clear()
            with probe_guard(res.model):
                out.update(probe(problem, state))

        sec = timeit(call, repeat=3, warmup=0)
        hvps = sum(v for k, v in out.items() if k.endswith("n_hvp"))
        lines.append(f"| {probe.name} | {sec:.3f} | {int(hvps) if hvps else 0} |")

    # 2. one R_med checkpoint per layer ------------------------------------------------------------------------------
    H_state = ProbeState(step=0, model=init, optimizer=None, problem=problem, seed=0)
    H = H_state.hessian()
    coords = H.sample_coordinates(per_layer=200, seed=0)
    X, y = problem.train
    model = copy.deepcopy(init)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def train_step():
        opt.zero_grad()
        problem.loss_fn(model(X[:cfg.batch_size]), y[:cfg.batch_size]).backward()
        opt.step()

    t_step = timeit(train_step, repeat=20, warmup=3)
    lines += ["", "### Cost of one R_med checkpoint (exact diagonal entries, one HVP column each)", "",
              f"Baseline: one training step (batch {cfg.batch_size}) = {t_step * 1e3:.2f} ms.", "",
              "| layer | numel | HVPs | seconds | seconds / HVP | training steps per layer |",
              "|---|---|---|---|---|---|"]
    total_h = total_s = 0
    for name, idx in coords.items():
        before = H.n_hvp
        t0 = time.perf_counter()
        H.diagonal({name: idx})
        sec = time.perf_counter() - t0
        n = H.n_hvp - before
        total_h += n
        total_s += sec
        lines.append(f"| {name} | {H.sizes[name]} | {n} | {sec:.3f} | {sec / n * 1e3:.2f} ms | {sec / t_step:.0f} |")
    lines.append(f"| **all** | {H.numel} | {total_h} | {total_s:.3f} | {total_s / total_h * 1e3:.2f} ms | "
                 f"{total_s / t_step:.0f} |")
    lines += ["", "R_med costs one HVP per sampled coordinate (200 per layer, all entries of smaller tensors); an HVP "
              f"on the {cfg.probe_size}-sample probe batch costs several training steps, so a probe every 50 steps "
              "cannot stay within 25% of training time for this small MLP: the overhead is dominated by R_med and "
              "shrinks in proportion to `probe_every` (or `per_layer`, or `--probe-size`)."]
    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines += ["", f"Load average during the run: {load:.1f} on {os.cpu_count()} cores (shared machine; absolute "
              "seconds are inflated, the ratios less so)."]
    text = "\n".join(lines)
    print(text)
    write_section("probes", "## Lab probes (bench_probes.py)\n\n" + text)


if __name__ == "__main__":
    main()

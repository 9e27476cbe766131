"""Cost of one R_med checkpoint on the issue-8 transformer (quick preset of ``rmed_lm``), as ratios.

1. ``SampledRMedProbe`` on the weight matrices only (the seed's "layers", 200 coordinates each) vs the lab's
   ``r_med`` probe on every parameter tensor (biases and LayerNorm included): HVPs, seconds, ratio.
2. The same checkpoint in units of training steps (one Adam step at the preset's batch size, same process).
3. Thread count: everything above runs with ``torch.set_num_threads(1)``; the same checkpoint is then repeated
   with one thread per core (``os.cpu_count()``), in the same process (on a shared, oversubscribed machine the
   single-thread run is much faster).

Run: ``.venv/bin/python benchmarks/bench_rmed.py`` (writes the ``rmed`` section of docs/benchmarks.md).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _report import timeit, write_section

from optiscope.experiments.diagonal_uniformity import common as rc
from optiscope.experiments.diagonal_uniformity.rmed_lm import QUICK
from optiscope.lab import ProbeState, make_probe
from optiscope.optim import make_optimizer


def _checkpoint(problem, probe) -> tuple[float, float]:
    state = ProbeState(step=1, model=problem.model, optimizer=None, problem=problem, seed=0)
    t0 = time.perf_counter()
    out = probe(problem, state)
    return time.perf_counter() - t0, float(out["r_med_n_hvp"])


def main() -> None:
    cfg = QUICK
    problem = rc.lm_problem(cfg)
    layers = rc.weight_matrix_params(problem.model)
    torch.set_num_threads(1)
    all_threads = os.cpu_count() or 1
    ours = rc.SampledRMedProbe(layers, cfg.per_layer)
    lab = make_probe("r_med", per_layer=cfg.per_layer)
    _checkpoint(problem, rc.SampledRMedProbe(layers, 2))                    # warm-up (mode resolution)
    t_ours, n_ours = _checkpoint(problem, ours)
    t_lab, n_lab = _checkpoint(problem, lab)
    opt = make_optimizer(rc.adam_spec(cfg), problem.model.parameters())
    X, y = problem.train

    def step():
        opt.zero_grad()
        problem.loss_fn(problem.model(X[:cfg.batch_size]), y[:cfg.batch_size]).backward()
        opt.step()

    t_step = timeit(step, repeat=5)
    torch.set_num_threads(all_threads)
    t_all, _ = _checkpoint(problem, rc.SampledRMedProbe(layers, cfg.per_layer))
    torch.set_num_threads(1)
    md = [
        f"Transformer of `rmed_lm --preset quick`: d_model {cfg.d_model}, {cfg.n_layers} block(s), seq_len "
        f"{cfg.seq_len}, Hessian batch {cfg.probe_size} sequences, {sum(p.numel() for p in problem.model.parameters())}"
        f" parameters, {len(layers)} weight matrices, {cfg.per_layer} coordinates per layer.", "",
        "| measurement | HVPs | seconds | ratio |", "|---|---|---|---|",
        f"| R_med checkpoint, weight matrices only (`SampledRMedProbe`) | {n_ours:.0f} | {t_ours:.2f} | 1 |",
        f"| R_med checkpoint, every parameter tensor (lab `r_med`, baseline) | {n_lab:.0f} | {t_lab:.2f} | "
        f"{t_lab / t_ours:.2f}x slower |",
        f"| one Adam training step, batch {cfg.batch_size} | - | {t_step:.3f} | checkpoint = "
        f"{t_ours / t_step:.0f} steps |",
        f"| R_med checkpoint with {all_threads} threads (all rows above: 1 thread) | {n_ours:.0f} | {t_all:.2f} | "
        f"{t_all / t_ours:.2f}x the 1-thread time |",
        "", f"Seconds per HVP (weight matrices): {t_ours / n_ours * 1e3:.1f} ms. Load average during the run: "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (absolute times scale with it; the ratios less so).",
    ]
    print("\n".join(md))
    write_section("rmed", "## R_med checkpoint cost (issue 8)\n\n" + "\n".join(md))


if __name__ == "__main__":
    main()

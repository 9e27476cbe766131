"""Speed of the seed-004 SGD theory engine (optiscope.theory.sgd), written to docs/benchmarks.md.

Targets (issue 5): SE loss curve with 10^4 steps x 10^5 eigenvalues <= 2 s; a 100 x 50 (lr, momentum) stability
map from theory <= 10 s; speed-up of the SE prediction over averaging 100 sampled runs for the same curve (digits
NTK). The baseline of the speed-up is measured in the same process (sampled runs on the same problem).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section

from optiscope.theory.sgd import TORCH_THREADS, Spectrum, se_loss_curve, stability_map
from optiscope.theory.sgd_sim import simulate_sampled_sgd


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call; on a shared machine the CPU time is the honest
    measure of the work (the recursions run single-threaded), the wall time includes waiting for a core."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    rows = []
    sp = Spectrum.power_law(1.5, 0.5, 100_000)
    t64 = timed(lambda: se_loss_curve(sp, 0.5, 0.9, 32, 10_000))
    t32 = timed(lambda: se_loss_curve(sp, 0.5, 0.9, 32, 10_000, dtype=torch.float32))
    rows.append(("SE loss curve, 1e4 steps x 1e5 eigenvalues, float64", t64, "<= 2 s"))
    rows.append(("SE loss curve, 1e4 steps x 1e5 eigenvalues, float32", t32, "<= 2 s"))
    lrs = np.linspace(0.01, 4.0, 100)
    moms = np.linspace(-0.98, 0.99, 50)
    tmap = timed(lambda: stability_map(sp, lrs, moms, 32))
    rows.append(("stability map 100 lr x 50 momenta from theory (1e5 eigenvalues, incl. 50 critical lrs)", tmap,
                 "<= 10 s"))
    # speed-up over 100 sampled runs on the digits NTK (same curve)
    from optiscope.experiments.sgd_generating_functions.common import ntk_problem

    prob = ntk_problem("digits", width=1000)
    steps = 1000
    t_se = timed(lambda: se_loss_curve(prob.spectrum, 1.0, 0.0, 10, steps, dataset_size=prob.n))
    t_sim = timed(lambda: simulate_sampled_sgd(prob.kernel, prob.initial_error, 1.0, 0.0, 10, steps, n_runs=100,
                                               seed=0))
    rows.append((f"SE curve, digits NTK (N={prob.n}), b=10, {steps} steps", t_se, "-"))
    rows.append(("100 sampled runs, same problem and steps (baseline)", t_sim, "-"))
    md = ["## SGD theory (seed 004, `benchmarks/bench_sgd_theory.py`)", "",
          "| what | CPU seconds | wall seconds | target |", "|---|---:|---:|---|"]
    md += [f"| {w} | {t[1]:.3f} | {t[0]:.3f} | {tg} |" for w, t, tg in rows]
    md += ["", (f"Speed-up of the SE prediction over averaging 100 sampled runs (digits NTK, b=10): "
                f"**{t_sim[1] / t_se[1]:.0f}x** (CPU time; {t_sim[0] / t_se[0]:.0f}x wall)."), "",
           (f"Load average at the start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; the recursion ran with "
            f"{TORCH_THREADS} torch thread(s) (`OPTISCOPE_THEORY_THREADS`; default 1, the better choice on a machine "
            "shared with other jobs; on an idle machine 2 threads halve the wall time). Targets are wall seconds; "
            "one run each.")]
    path = write_section("sgd_theory", "\n".join(md))
    print("\n".join(md))
    print(f"written to {path}")


if __name__ == "__main__":
    main()

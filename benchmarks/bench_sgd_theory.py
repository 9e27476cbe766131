"""Speed of the seed-004 SGD theory engine (optiscope.theory.sgd), written to docs/benchmarks.md.

Targets (issue 5): SE loss curve with 10^4 steps x 10^5 eigenvalues <= 2 s; a 100 x 50 (lr, momentum) stability
map from theory <= 10 s; speed-up of the SE prediction over averaging 100 sampled runs for the same curve (digits
NTK). The baseline of the speed-up is measured in the same process (sampled runs on the same problem).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import timeit, write_section

from optiscope.theory.sgd import Spectrum, se_loss_curve, stability_map
from optiscope.theory.sgd_sim import simulate_sampled_sgd


def main() -> None:
    rows = []
    sp = Spectrum.power_law(1.5, 0.5, 100_000)
    t64 = timeit(lambda: se_loss_curve(sp, 0.5, 0.9, 32, 10_000), repeat=3, warmup=0)
    t32 = timeit(lambda: se_loss_curve(sp, 0.5, 0.9, 32, 10_000, dtype=torch.float32), repeat=3, warmup=0)
    rows.append(("SE loss curve, 1e4 steps x 1e5 eigenvalues, float64", t64, "<= 2 s"))
    rows.append(("SE loss curve, 1e4 steps x 1e5 eigenvalues, float32", t32, "<= 2 s"))
    lrs = np.linspace(0.01, 4.0, 100)
    moms = np.linspace(-0.98, 0.99, 50)
    tmap = timeit(lambda: stability_map(sp, lrs, moms, 32), repeat=3, warmup=0)
    rows.append(("stability map 100 lr x 50 momenta from theory (1e5 eigenvalues, incl. 50 critical lrs)", tmap,
                 "<= 10 s"))
    # speed-up over 100 sampled runs on the digits NTK (same curve)
    from optiscope.experiments.sgd_common import ntk_problem

    prob = ntk_problem("digits", width=1000)
    steps = 1000
    t_se = timeit(lambda: se_loss_curve(prob.spectrum, 1.0, 0.0, 10, steps, dataset_size=prob.n), repeat=3)
    t0 = time.perf_counter()
    simulate_sampled_sgd(prob.kernel, prob.initial_error, 1.0, 0.0, 10, steps, n_runs=100, seed=0)
    t_sim = time.perf_counter() - t0
    rows.append((f"SE curve, digits NTK (N={prob.n}), b=10, {steps} steps", t_se, "-"))
    rows.append(("100 sampled runs, same problem and steps (baseline)", t_sim, "-"))
    md = ["## SGD theory (seed 004, `benchmarks/bench_sgd_theory.py`)", "",
          "| what | seconds | target |", "|---|---:|---|"]
    md += [f"| {w} | {t:.3f} | {tg} |" for w, t, tg in rows]
    md += ["", (f"Speed-up of the SE prediction over averaging 100 sampled runs (digits NTK, b=10): "
                f"**{t_sim / t_se:.0f}x**."), "",
           ("Measured on a 2-core machine shared with other jobs (load average well above 2 during the run), so "
            "absolute times are inflated; the recursion runs single-threaded (`OPTISCOPE_THEORY_THREADS=1`, default).")]
    path = write_section("sgd_theory", "\n".join(md))
    print("\n".join(md))
    print(f"written to {path}")


if __name__ == "__main__":
    main()

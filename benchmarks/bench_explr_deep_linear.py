"""Speed of the pieces behind the deep-linear / matrix-completion experiments (issue 9), as in-process ratios.

1. Batched training of B independent deep factorizations (one ``bmm`` chain over a leading batch axis, as
   ``experiments.explr_deep_linear.matrix_completion.train_batch`` does) vs a Python loop over the B problems,
   per GD step.
   Target: batched >= 2x faster for B = 8, depth 3, n = 100.
2. Matrix-free ``apply_preconditioner`` vs the dense Kronecker ``P_W`` matvec (including building P_W), 20 x 20.
   Target: matrix-free >= 5x faster.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import timeit, write_section  # noqa: E402

from optiscope.experiments.explr_deep_linear.matrix_completion import end_to_end, init_factors  # noqa: E402
from optiscope.theory.deep_linear import apply_preconditioner, preconditioner_kronecker  # noqa: E402


def _gd_step(params, target, mask, lr=1e-3):
    loss = (((end_to_end(params) - target) ** 2) * mask).sum()
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.sub_(lr * g)


def bench_batched(B=8, depth=3, n=100, steps=20):
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    fs = [f.requires_grad_(True) for f in init_factors(depth, n, 1e-3, B, gen)]
    target = torch.randn(B, n, n, generator=gen)
    mask = (torch.rand(B, n, n, generator=gen) < 0.2).float()
    singles = [[f[b:b + 1].detach().clone().requires_grad_(True) for f in fs] for b in range(B)]

    def batched():
        for _ in range(steps):
            _gd_step(fs, target, mask)

    def looped():
        for _ in range(steps):
            for b in range(B):
                _gd_step(singles[b], target[b:b + 1], mask[b:b + 1])

    tb, tl = timeit(batched, repeat=5), timeit(looped, repeat=5)
    return tb / steps, tl / steps


def bench_preconditioner(k=20, d=20, depth=3):
    rng = np.random.default_rng(0)
    W, G = rng.standard_normal((k, d)), rng.standard_normal((k, d))

    def free():
        apply_preconditioner(W, G, depth)

    def dense():
        preconditioner_kronecker(W, depth) @ G.reshape(-1, order="F")

    return timeit(free, repeat=7), timeit(dense, repeat=7)


def main() -> None:
    tb, tl = bench_batched()
    tf, td = bench_preconditioner()
    r1, r2 = tl / tb, td / tf
    md = (
        "## Deep linear / matrix completion (issue 9)\n\n"
        "| what | baseline | optiscope | speed-up | target | met |\n|---|---|---|---|---|---|\n"
        f"| GD step, 8 problems, depth 3, 100x100 (1 thread) | loop {tl * 1e3:.2f} ms | batched bmm "
        f"{tb * 1e3:.2f} ms | {r1:.1f}x | >= 2x | {'yes' if r1 >= 2 else 'no'} |\n"
        f"| P_W applied to a 20x20 matrix, depth 3 | dense Kronecker {td * 1e3:.2f} ms | matrix-free "
        f"{tf * 1e3:.2f} ms | {r2:.1f}x | >= 5x | {'yes' if r2 >= 5 else 'no'} |\n\n"
        "Measured on a CPU shared with other jobs: absolute times are inflated; the ratios come from the same process."
    )
    write_section("explr_deep_linear", md)
    print(md)


if __name__ == "__main__":
    main()

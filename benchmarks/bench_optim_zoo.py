"""Speed of optiscope's exact optimizers and of the zoo's data cache, as ratios against same-process baselines.

Targets:
* one optimizer step (Adam eps-inside, SGD+momentum, RMSProp, AMSGrad) on an MLP's parameters costs at most 1.5x
  the matching ``torch.optim`` step run with ``foreach=False`` (the same per-tensor loop);
* a warm Fashion-MNIST load (decoded arrays cached per process) costs at most 0.5x a cold load (decode from .gz).

Run: ``.venv/bin/python benchmarks/bench_optim_zoo.py``; writes the ``optim_zoo`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import timeit, write_section

from optiscope import optim
from optiscope.zoo import build_model, data


def optimizer_ratio(ours_factory, torch_factory, steps: int = 10) -> tuple[float, float, float]:
    net = build_model(("mlp", {"input_dim": 784, "output_dim": 10, "depth": 3, "width": 256}), seed=0)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in net.parameters()]

    def make_runner(factory):
        params = [p.detach().clone().requires_grad_(True) for p in net.parameters()]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt = factory(params)

        def run():
            for _ in range(steps):
                opt.step()
        return run

    run_ours, run_torch = make_runner(ours_factory), make_runner(torch_factory)
    run_ours(), run_torch()  # warm-up
    t_ours, t_torch = [], []
    for _ in range(5):  # interleaved, so load from other processes hits both alike; best of 5
        t_ours.append(timeit(run_ours, repeat=1, warmup=0) / steps)
        t_torch.append(timeit(run_torch, repeat=1, warmup=0) / steps)
    t_ours, t_torch = min(t_ours), min(t_torch)
    return t_ours, t_torch, t_ours / t_torch


def main() -> None:
    # one intra-op thread: on a shared, overloaded machine thread-pool synchronisation dominates small ops and
    # makes ratios meaningless
    torch.set_num_threads(1)
    rows = []
    cases = [
        ("Adam (eps inside sqrt) vs torch Adam", lambda p: optim.Adam(p, lr=1e-3),
         lambda p: torch.optim.Adam(p, lr=1e-3, foreach=False)),
        ("SGD momentum 0.9 vs torch SGD", lambda p: optim.SGD(p, lr=1e-2, momentum=0.9),
         lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, foreach=False)),
        ("RMSProp (eps outside) vs torch RMSprop", lambda p: optim.RMSProp(p, lr=1e-3, eps_inside_sqrt=False),
         lambda p: torch.optim.RMSprop(p, lr=1e-3, alpha=0.99, foreach=False)),
        ("AMSGrad vs torch Adam(amsgrad)", lambda p: optim.AMSGrad(p, lr=1e-3),
         lambda p: torch.optim.Adam(p, lr=1e-3, amsgrad=True, foreach=False)),
    ]
    for label, ours, ref in cases:
        t_o, t_t, r = optimizer_ratio(ours, ref)
        rows.append((label, f"{t_o * 1e3:.2f} ms", f"{t_t * 1e3:.2f} ms", r, 1.5))

    def cold():
        data._fashion_raw.cache_clear()
        data.fashion_mnist(n_train=5000, n_test=1000)

    def warm():
        data.fashion_mnist(n_train=5000, n_test=1000)

    t_cold = timeit(cold, repeat=3)
    warm()
    t_warm = timeit(warm, repeat=3)
    rows.append(("Fashion-MNIST load, warm cache vs cold decode", f"{t_warm:.3f} s", f"{t_cold:.3f} s",
                 t_warm / t_cold, 0.5))

    lines = ["## optim / zoo (`benchmarks/bench_optim_zoo.py`)", "",
             "Optimizer steps on a 784-256-256-10 MLP's parameters (fixed gradients, float32, best of 5 interleaved runs of 10"
             " steps); baseline: the same rule in `torch.optim` with `foreach=False`. Data: 5000/1000-sample "
             "Fashion-MNIST subsets.", "",
             "| case | ours | baseline | ratio | target | met |", "| --- | --- | --- | --- | --- | --- |"]
    for label, a, b, r, target in rows:
        lines.append(f"| {label} | {a} | {b} | {r:.2f} | <= {target} | {'yes' if r <= target else 'NO'} |")
    md = "\n".join(lines)
    print(md)
    write_section("optim_zoo", md)


if __name__ == "__main__":
    main()

"""Tracker overhead vs a hand-written PyHessian loop, side by side (section ``tracker`` of docs/benchmarks.md).

The digits MLP (``mlp:depth=3,width=64``, 8,970 parameters) trains ``--steps`` SGD+momentum updates (batch 128,
batches from a fixed generator); every 10 steps the top Hessian eigenvalue of the loss on the lab's probe batch (the
first 1024 training samples) is measured, by

* ``optiscope.Tracker(..., probes=[SPEC], every=10)`` in the loop (``tracker.step(t, optimizer=opt)``), and
* the loop a user writes with PyHessian: ``hessian(model, criterion, data=(X, y), cuda=False).eigenvalues(top_n=1)``
  every 10 steps (its defaults: power iteration, ``maxIter=100, tol=1e-3``).

Both loops train bit-identical trajectories (neither changes parameters or the batch generator), so every
checkpoint's error is taken against the same reference: Lanczos to a residual of 1e-10 on the same parameters
(untimed). Reported: probe time as % of the training time of the same loop without probes (rounds interleaved,
medians), the worst relative error over the checkpoints, HVPs per checkpoint. Times are this process's CPU time by
default (one torch thread, so CPU time is the work done, robust to other processes sharing the cores; ``--wall``
for wall clock); the load average is recorded before and after.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_tracker.py [--steps 200] [--rounds 3] [--no-write]

Also times the first curvature number on a ResNet-18 (torchvision's architecture, 11.2M parameters, train-mode
BatchNorm, ``--resnet-images`` random images of 3x32x32; section ``tracker_resnet``): the three lines ``from optiscope import Hessian``, ``H = Hessian(model, loss, (X,
y))``, ``H.eigenvalues(k=1).values[0]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

from _report import write_section  # noqa: E402

from optiscope import Hessian, Tracker  # noqa: E402
from optiscope.lab import Problem  # noqa: E402

EVERY = 10
CLOCK = time.process_time  # CPU seconds of this (1-thread) process: robust to other processes sharing the cores;
# ``--wall`` switches to time.perf_counter


def load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def setup():
    pb = Problem.from_specs("mlp:depth=3,width=64", "digits", seed=0)
    return pb


def train_loop(pb, steps: int, measure=None):
    """Train ``steps`` updates; ``measure(step, model, opt)`` after each (and at step 0). Returns (train s, probe s,
    list of (step, value, state_dict copy))."""
    import copy

    model = copy.deepcopy(pb.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    X, y = pb.train
    g = torch.Generator().manual_seed(0)
    t_train = t_probe = 0.0
    seen = []

    def probe(step):
        nonlocal t_probe
        if measure is None:
            return
        t0 = CLOCK()
        v = measure(step, model, opt)
        t_probe += CLOCK() - t0
        if v is not None:
            seen.append((step, v, {k: t.detach().clone() for k, t in model.state_dict().items()}))

    probe(0)
    for step in range(1, steps + 1):
        t0 = CLOCK()
        idx = torch.randint(0, len(X), (128,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
        t_train += CLOCK() - t0
        probe(step)
    return t_train, t_probe, seen, model


def tracker_measure(pb, spec):
    state = {}

    def measure(step, model, opt):
        if "tracker" not in state:
            state["tracker"] = Tracker(model, pb.loss_fn, pb.probe_batch, probes=[spec], every=EVERY)
        out = state["tracker"].step(step, optimizer=opt)
        if out is None:
            return None
        state.setdefault("hvps", []).append(out.get("sharpness_n_hvp", float("nan")))
        return out["sharpness"]

    return measure, state


def pyhessian_measure(pb):
    from pyhessian import hessian

    X, y = pb.probe_batch
    state = {}

    def measure(step, model, opt):
        if step % EVERY:
            return None
        h = hessian(model, torch.nn.CrossEntropyLoss(), data=(X, y), cuda=False)
        ev, _ = h.eigenvalues(top_n=1)
        model.train()  # PyHessian leaves the model in eval mode (same function here: no BatchNorm, no dropout)
        return float(ev[0])

    return measure, state


def reference(pb, model_template, sd) -> float:
    import copy

    m = copy.deepcopy(model_template)
    m.load_state_dict(sd)
    return float(Hessian(m, pb.loss_fn, pb.probe_batch).eigenvalues(k=1, tol=1e-10, max_iter=300).values[0])


def resnet_first_number(n_images: int) -> dict:
    from _resnet18 import resnet18

    torch.manual_seed(0)
    model, source = resnet18(num_classes=10)
    X = torch.randn(n_images, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (n_images,), generator=torch.Generator().manual_seed(1))
    t0, c0 = time.perf_counter(), time.process_time()
    H = Hessian(model, F.cross_entropy, (X, y))
    top = H.eigenvalues(k=1, max_iter=30)  # the default max_iter = min(n, 300) made the process exceed 8 GB here
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"source": source, "params": sum(p.numel() for p in model.parameters()), "value": float(top.values[0]),
            "n_hvp": int(top.n_hvp), "seconds": wall, "cpu_seconds": cpu, "n_images": n_images}


def write_resnet(rn: dict, load_before: str, write: bool) -> None:
    md = ["## First curvature number on a ResNet-18", "",
          f"`benchmarks/bench_tracker.py --resnet-only`: ResNet-18 ({rn['source']}, {rn['params'] / 1e6:.1f}M "
          f"parameters, train-mode BatchNorm), {rn['n_images']} random images 3x32x32: three lines of user code "
          "beyond the model and the data (`from optiscope import Hessian`; `H = Hessian(model, F.cross_entropy, "
          "(X, y))`; `H.eigenvalues(k=1, max_iter=30).values[0]`; `examples/resnet18_sharpness.py` has the same "
          "three lines). With the default `max_iter = min(n, 300)` the process grew past 8 GB and was terminated on "
          "this 23 GB machine (the engine's memory use at this size is an open problem); "
          + ("Lanczos reached its 1e-6 error bound. " if rn["n_hvp"] < 30 else
             "Lanczos stopped at the cap of 30 HVPs, before its 1e-6 error bound. ")
          + f"{rn['cpu_seconds']:.1f} s CPU ({rn['seconds']:.1f} s wall), {rn['n_hvp']} HVPs, value {rn['value']:.4g}; "
          f"1 torch thread, load average {load_before} before, {load()} after."]
    if write:
        print(write_section("tracker_resnet", "\n".join(md)))
    else:
        print("\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--spec", action="append", default=None,
                    help="a tracker probe spec to time (repeatable; default: 'sharpness' and 'sharpness:tol=3e-6')")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--no-resnet", action="store_true")
    ap.add_argument("--resnet-only", action="store_true")
    ap.add_argument("--resnet-images", type=int, default=16)
    ap.add_argument("--wall", action="store_true", help="time wall clock instead of this process's CPU time")
    args = ap.parse_args()
    global CLOCK
    if args.wall:
        CLOCK = time.perf_counter
    torch.set_num_threads(1)
    load_before = load()
    if args.resnet_only:
        write_resnet(resnet_first_number(args.resnet_images), load_before, not args.no_write)
        return
    pb = setup()
    specs = args.spec or ["sharpness", "sharpness:tol=3e-6"]
    kinds = ["plain", *specs, "pyhessian"]
    rows: dict[str, list[float]] = {k: [] for k in kinds}
    errors: dict[str, list[float]] = {}
    hvps: dict[str, list[float]] = {}
    refs: dict[int, float] = {}
    for r in range(args.rounds):
        for kind in (kinds if r % 2 == 0 else kinds[::-1]):
            if kind == "plain":
                t_train, t_probe, seen, model = train_loop(pb, args.steps)
                rows["plain"].append(t_train)
                continue
            measure, st = pyhessian_measure(pb) if kind == "pyhessian" else tracker_measure(pb, kind)
            t_train, t_probe, seen, model = train_loop(pb, args.steps, measure)
            rows[kind].append(t_probe)
            if r == 0:
                for step, _, sd in seen:
                    if step not in refs:
                        refs[step] = reference(pb, pb.model, sd)
                errors[kind] = [abs(v - refs[step]) / abs(refs[step]) for step, v, _ in seen]
                hvps[kind] = st.get("hvps", [])
    train_s = statistics.median(rows["plain"])
    med = {k: statistics.median(v) for k, v in rows.items()}
    load_after = load()
    n_ck = args.steps // EVERY + 1
    ph_s = med["pyhessian"]
    for k in kinds[1:]:
        print(f"{k}: {100 * med[k] / train_s:.0f}% of training ({med[k]:.2f} s, rounds {rows[k]}), worst error "
              f"{max(errors[k]):.2e}, median {np.median(errors[k]):.2e}")
    print(f"training {train_s:.2f} s (rounds {rows['plain']}); load {load_before} -> {load_after}")
    rn = None if args.no_resnet else resnet_first_number(args.resnet_images)
    md = [
        "## Tracker vs a hand-written PyHessian loop (digits MLP, sharpness every 10 steps)",
        "",
        f"`benchmarks/bench_tracker.py`: `mlp:depth=3,width=64` on digits (8,970 parameters), {args.steps} SGD+M "
        f"updates at batch 128, top Hessian eigenvalue on the 1024-sample probe batch at {n_ck} checkpoints (every "
        f"{EVERY} steps). Probe time as % of the same loop's training time without probes; {args.rounds} rounds, "
        f"interleaved, medians of {'wall-clock' if args.wall else 'process CPU'} time; error: worst (median) relative error over the checkpoints against Lanczos at "
        f"residual 1e-10 on the same parameters. 1 torch thread; load average (1/5/15 min) {load_before} before, "
        f"{load_after} after.",
        "",
        "| loop | probe time / training time | cost vs PyHessian | worst rel. error (median) | HVPs per checkpoint |",
        "|---|---|---|---|---|",
        f"| training only | {train_s:.2f} s training | - | - | - |",
    ]
    verdicts = []
    for k in specs:
        ok = med[k] <= ph_s and max(errors[k]) <= 1e-6
        verdicts.append(f"`{k}`: {med[k] / ph_s:.2f}x PyHessian's time, worst error {max(errors[k]):.1e} -> "
                        f"{'met' if ok else 'NOT met'}")
        md.append(f"| `Tracker(..., probes=[\"{k}\"], every=10)` | {100 * med[k] / train_s:.0f}% ({med[k]:.2f} s) | "
                  f"{med[k] / ph_s:.2f}x | {max(errors[k]):.1e} ({np.median(errors[k]):.1e}) | "
                  f"{np.median(hvps[k]):.0f} (median) |")
    md += [
        f"| PyHessian `hessian(...).eigenvalues(top_n=1)` every 10 steps | {100 * ph_s / train_s:.0f}% ({ph_s:.2f} s) "
        f"| 1 | {max(errors['pyhessian']):.1e} ({np.median(errors['pyhessian']):.1e}) | power iteration, up to 100 |",
        "",
        "Target (the Tracker costs no more than the PyHessian loop and is exact to 1e-6): " + "; ".join(verdicts)
        + ". Lanczos stops at a residual of `tol` times the Ritz value, which bounds the relative error by `tol` "
        "(Bauer-Fike) and in practice gives about its square over the relative gap; it starts from the previous "
        "checkpoint's eigenvector, so later checkpoints need few HVPs. PyHessian restarts power iteration from a "
        "random vector at every call and stops at a relative change of 1e-3, which leaves errors up to percent level "
        "where the top two eigenvalues are close. Where the time goes (cProfile, CPU): with 5-6 HVPs per checkpoint "
        "the Tracker's cost is mostly the per-checkpoint set-up of a new `Hessian` at the new parameters: the "
        "engine's validating forward pass and the gradient-graph build (measured while it is built; a separate "
        "sizing pass was removed, 1.18x -> 1.06x); the Tracker's own purity guard (snapshot and restore of "
        "parameters, buffers, gradients and RNG) is about 10%. PyHessian builds its graph once per call and runs "
        "few, cheap power iterations to a loose 1e-3 stop.",
    ]
    if rn:
        write_resnet(rn, load_after, not args.no_write)
    if not args.no_write:
        print(write_section("tracker", "\n".join(md)))
    else:
        print("\n".join(md))


if __name__ == "__main__":
    main()

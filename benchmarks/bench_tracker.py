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
medians), the worst relative error over the checkpoints, HVPs per checkpoint (PyHessian's counted in the first
round). Times are this process's CPU time by
default (one torch thread, so CPU time is the work done, robust to other processes sharing the cores; ``--wall``
for wall clock); the load average is recorded before and after.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_tracker.py [--steps 200] [--rounds 5] [--no-write]
        [--save-json now.json] [--before before.json]

``--before`` reports the same measurement of an earlier engine next to this one: run this script with
``PYTHONPATH`` pointing at that engine's ``src`` and ``--save-json``, then pass the file.

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


def pyhessian_measure(pb, count: bool = False):
    """PyHessian every ``EVERY`` steps; with ``count``, its HVPs per checkpoint go to ``state["hvps"]`` (a wrapper
    around ``pyhessian.hessian.hessian_vector_product``, installed only for the untimed-error round)."""
    import importlib

    ph = importlib.import_module("pyhessian.hessian")  # the module (the package re-exports the class as .hessian)

    X, y = pb.probe_batch
    state = {}
    hvp = ph.hessian_vector_product

    def counted(*args, **kwargs):
        state["n"] = state.get("n", 0) + 1
        return hvp(*args, **kwargs)

    def measure(step, model, opt):
        if step % EVERY:
            return None
        state["n"] = 0
        ph.hessian_vector_product = counted if count else hvp
        try:
            h = ph.hessian(model, torch.nn.CrossEntropyLoss(), data=(X, y), cuda=False)
            ev, _ = h.eigenvalues(top_n=1)
        finally:
            ph.hessian_vector_product = hvp
        model.train()  # PyHessian leaves the model in eval mode (same function here: no BatchNorm, no dropout)
        if count:
            state.setdefault("hvps", []).append(state["n"])
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


def measure_all(pb, specs: list[str], steps: int, rounds: int) -> dict:
    """Every loop ``rounds`` times, interleaved (the order reversed every other round); errors and HVP counts from
    the first round. Returns medians, per-round times, errors and HVPs per checkpoint by loop."""
    kinds = ["plain", *specs, "pyhessian"]
    rows: dict[str, list[float]] = {k: [] for k in kinds}
    errors: dict[str, list[float]] = {}
    hvps: dict[str, list[float]] = {}
    refs: dict[int, float] = {}
    for r in range(rounds):
        for kind in (kinds if r % 2 == 0 else kinds[::-1]):
            if kind == "plain":
                rows["plain"].append(train_loop(pb, steps)[0])
                continue
            measure, st = (pyhessian_measure(pb, count=r == 0) if kind == "pyhessian"
                           else tracker_measure(pb, kind))
            _, t_probe, seen, _ = train_loop(pb, steps, measure)
            rows[kind].append(t_probe)
            if r == 0:
                for step, _, sd in seen:
                    if step not in refs:
                        refs[step] = reference(pb, pb.model, sd)
                errors[kind] = [abs(v - refs[step]) / abs(refs[step]) for step, v, _ in seen]
                hvps[kind] = st.get("hvps", [])
    return {"specs": specs, "rounds": rows, "median": {k: statistics.median(v) for k, v in rows.items()},
            "errors": errors, "hvps": hvps}


def _git_commit() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             check=False)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _rows_md(res: dict, label: str) -> list[str]:
    med, train_s, ph_s = res["median"], res["median"]["plain"], res["median"]["pyhessian"]
    out = []
    for k in res["specs"]:
        e, h = res["errors"][k], res["hvps"][k]
        out.append(f"| {label}`Tracker(..., probes=[\"{k}\"], every=10)` | {100 * med[k] / train_s:.0f}% "
                   f"({med[k]:.2f} s) | **{med[k] / ph_s:.2f}x** | {max(e):.1e} ({np.median(e):.1e}) | "
                   f"{np.median(h):.0f} ({np.mean(h):.1f}) |")
    e, h = res["errors"]["pyhessian"], res["hvps"].get("pyhessian") or [float("nan")]
    out.append(f"| {label}PyHessian `hessian(...).eigenvalues(top_n=1)` every 10 steps | {100 * ph_s / train_s:.0f}% "
               f"({ph_s:.2f} s) | 1 | {max(e):.1e} ({np.median(e):.1e}) | {np.median(h):.0f} ({np.mean(h):.1f}) |")
    return out


def report(res: dict, before: dict | None, steps: int) -> str:
    """The ``tracker`` section of docs/benchmarks.md from ``res`` (and, if given, the same measurement of an
    earlier engine)."""
    n_ck = steps // EVERY + 1
    med, ph_s = res["median"], res["median"]["pyhessian"]
    clock = "wall-clock" if res["clock"] == "wall" else "process CPU"
    md = [
        "## Tracker vs a hand-written PyHessian loop (digits MLP, sharpness every 10 steps)",
        "",
        (f"`benchmarks/bench_tracker.py`: `mlp:depth=3,width=64` on digits (8,970 parameters), {steps} SGD+M "
         f"updates at batch 128, top Hessian eigenvalue on the 1024-sample probe batch at {n_ck} checkpoints "
         f"(every {EVERY} steps). Probe time as % of the same loop's training time without probes; "
         f"{res['n_rounds']} rounds, interleaved, medians of {clock} time; error: worst (median) relative error "
         "over the checkpoints against Lanczos at residual 1e-10 on the same parameters; HVPs per checkpoint: "
         f"median (mean). 1 torch thread; load average (1/5/15 min) {res['load_before']} before, "
         f"{res['load_after']} after (commit {res['commit']}{' + working tree' if res.get('dirty') else ''})."),
        "",
        "| loop | probe time / training time | cost vs PyHessian | worst rel. error (median) | HVPs per checkpoint |",
        "|---|---|---|---|---|",
        f"| training only | {med['plain']:.2f} s training | - | - | - |",
        *_rows_md(res, ""),
    ]
    if before is not None:
        md += [(f"| **before** (commit {before['commit']}, load {before['load_before']} -> "
                f"{before['load_after']}, training {before['median']['plain']:.2f} s) | | | | |"),
               *_rows_md(before, "before: ")]
    verdicts = []
    for k in res["specs"]:
        ok = med[k] <= ph_s and max(res["errors"][k]) <= 1e-6
        verdicts.append(f"`{k}`: {med[k] / ph_s:.2f}x PyHessian's time, worst error {max(res['errors'][k]):.1e} "
                        f"-> {'met' if ok else 'NOT met'}")
    md += [
        "",
        ("Target (the Tracker costs no more than the PyHessian loop and is exact to 1e-6): " + "; ".join(verdicts)
         + ". The probe's default `tol=1e-4` bounds the relative error by 1e-4, not 1e-6; `sharpness:tol=1e-6` is "
         "the setting that asks for 1e-6. Lanczos stops when the eigenvalue error bound `min(r, r^2 / gap) <= tol "
         "* theta` holds (Kato-Temple with the gap to the nearest other Ritz value) and the Ritz value moved by at "
         "most `tol * theta` in the last step; it starts from the previous checkpoint's eigenvector, so later "
         "checkpoints need few HVPs. PyHessian restarts power iteration from a random vector at every call and stops "
         "at a relative change of 1e-3, which leaves errors up to percent level where the top two eigenvalues are "
         "close."),
        "",
        ("Where the time went, and what changed (cProfile and per-HVP timing, CPU): (1) subnormal floats. The "
         "warm start carries the previous eigenvector's components on weights into dead ReLU units, which the "
         "Hessian annihilates; they shrink geometrically from checkpoint to checkpoint, through the subnormal "
         "range, and with a few hundred such entries every HVP took 4-6 ms instead of 1.3 ms (the middle third of "
         "training). Lanczos now zeroes entries below `tiny / eps` (1e-31 in float32) of its unit vectors, a change "
         "far below rounding; PyHessian's fresh random start never meets them. (2) The validating forward pass of "
         "a new `Hessian` at every checkpoint (0.7 ms of 1.1 ms set-up): the Tracker validates once per model "
         "structure (parameter names, dtypes, devices, shapes, storage; module modes) and later checkpoints take "
         "the loss and its finiteness check from the gradient-graph build. (3) Lanczos' own per-step overhead "
         "(reorthogonalisation of one vector without copies, two-kernel recurrence): 0.20 -> 0.16 ms per step on "
         "a cheap operator; between HVPs, with cold caches, about 0.35 ms. The purity guard (snapshot and restore "
         "of parameters, buffers, gradients, modes and RNG) and the rest of the Tracker's bookkeeping measure 0.15 "
         "ms per checkpoint (about 1%) and are unchanged. What remains is mostly HVPs (1.3-1.4 ms each, within 10% "
         "of PyHessian's), the graph build (1.5 ms) and Lanczos' bookkeeping. The stopping rule is unchanged: "
         "without its movement guard it would stop about one HVP earlier per checkpoint here, but on spectra with "
         "a tight cluster at the top it then stops orders of magnitude above `tol`."),
    ]
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--spec", action="append", default=None,
                    help="a tracker probe spec to time (repeatable; default: 'sharpness' and 'sharpness:tol=1e-6')")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--no-resnet", action="store_true")
    ap.add_argument("--resnet-only", action="store_true")
    ap.add_argument("--resnet-images", type=int, default=16)
    ap.add_argument("--wall", action="store_true", help="time wall clock instead of this process's CPU time")
    ap.add_argument("--save-json", type=Path, default=None, help="also write the measurement to this JSON file")
    ap.add_argument("--label", default=None,
                    help="what the measured engine is (default: this checkout's commit); e.g. for a --before run")
    ap.add_argument("--before", type=Path, default=None,
                    help="a --save-json file of an earlier engine, reported next to this measurement")
    args = ap.parse_args()
    global CLOCK
    if args.wall:
        CLOCK = time.perf_counter
    torch.set_num_threads(1)
    load_before = load()
    if args.resnet_only:
        write_resnet(resnet_first_number(args.resnet_images), load_before, not args.no_write)
        return
    import json
    import subprocess

    pb = setup()
    specs = args.spec or ["sharpness", "sharpness:tol=1e-6"]
    res = measure_all(pb, specs, args.steps, args.rounds)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", str(HERE.parent / "src")], cwd=HERE,
                           capture_output=True, text=True, check=False).stdout.strip() != ""
    import optiscope

    res.update(load_before=load_before, load_after=load(), commit=args.label or _git_commit(),
               dirty=dirty and args.label is None,
               clock="wall" if args.wall else "cpu", n_rounds=args.rounds, steps=args.steps,
               source=str(Path(optiscope.__file__).resolve().parent))
    for k in [*specs, "pyhessian"]:
        print(f"{k}: {100 * res['median'][k] / res['median']['plain']:.0f}% of training ({res['median'][k]:.3f} s, "
              f"{res['median'][k] / res['median']['pyhessian']:.2f}x PyHessian; rounds "
              f"{[round(x, 3) for x in res['rounds'][k]]}), worst error {max(res['errors'][k]):.2e}, median "
              f"{np.median(res['errors'][k]):.2e}, HVPs {res['hvps'].get(k)}")
    print(f"training {res['median']['plain']:.3f} s; load {load_before} -> {res['load_after']}; optiscope from "
          f"{res['source']}")
    if args.save_json:
        args.save_json.write_text(json.dumps(res, indent=1))
    before = json.loads(args.before.read_text()) if args.before else None
    if before is not None and before.get("steps") != args.steps:
        raise SystemExit(f"--before was measured with {before.get('steps')} steps, this run with {args.steps}")
    md = report(res, before, args.steps)
    if not args.no_resnet:
        write_resnet(resnet_first_number(args.resnet_images), res["load_after"], not args.no_write)
    print(write_section("tracker", md) if not args.no_write else md)


if __name__ == "__main__":
    main()

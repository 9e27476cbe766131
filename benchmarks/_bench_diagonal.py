"""Exact Hessian diagonals side by side (curvature.diagonal): structured second-order backpropagation, restricted
HVP columns, full HVP columns, a per-coordinate one-graph HVP loop and BackPACK's DiagHessian.

``run(report=None)`` measures, in one process, 1 thread, interleaved repeats, medians:

1. the full exact diagonal of a 20-50-10 and a 64-256-10 tanh MLP (batch 512, float32): ``Hessian.diagonal``
   (auto = structured) vs BackPACK ``DiagHessian`` (target: <= 2x BackPACK's time), and the old path (one HVP column
   per entry, extrapolated from 256 entries);
2. 200 sampled diagonal entries of one weight of the 4-layer benchmark transformer (``TRANSFORMER_LAYERS``: the
   first FFN weight of the second of four layers) and 10 entries of each of three weights (first, middle, last) of each benchmark problem: ``Hessian.diagonal`` (auto) vs the per-coordinate
   one-graph loop (gradient graph built once, one second backward per coordinate; targets: >= 2x faster on the
   transformer layer, per entry <= 1.0x the loop on every problem);
3. forward-over-forward second directional derivatives ``d^2/dt^2 L(theta + t e_i)`` vs restricted HVP columns on
   the transformer (time per entry and error: why the former is not used);
4. the demo's probe overhead (``optiscope demo``'s configuration, probe every 50 steps): the ``r_med`` probe alone and
   all probes as a fraction of training time, with the structured diagonal (now) and with one HVP column per entry
   (before), interleaved.

``report``: a callable ``report(section_name, markdown)``; default :func:`_report.write_section`, which replaces the
``structured_diagonal`` section of docs/benchmarks.md. Returns the measured numbers as a dict.
Run on its own: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/_bench_diagonal.py [--quick]``.
"""

# ruff: noqa: B023, ISC004
# (B023: every closure is called within the loop iteration that defines it; ISC004: markdown table rows)
from __future__ import annotations

import copy
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from torch import nn
from torch.func import functional_call, jvp, vmap

from optiscope.curvature import Hessian

SECTION = "structured_diagonal"
#: weights of the benchmark transformer whose 200 sampled entries are timed against the one-graph loop
TRANSFORMER_LAYERS = ("encoder.layers.1.linear1.weight",)


def _median_interleaved(fns: dict[str, Callable[[], Any]], repeat: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _load() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


# ------------------------------------------------------------------------------------------------------------------
def _mlp(dims, act=nn.Tanh):
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def bench_full_mlp(repeat: int = 5) -> list[dict[str, Any]]:
    """Full diagonal of two MLPs: ours (auto) vs BackPACK DiagHessian; the HVP-column path extrapolated."""
    try:
        from backpack import backpack, extend
        from backpack.extensions import DiagHessian
    except ImportError:
        print("backpack-for-pytorch is not installed: skipping the BackPACK comparison")
        return []
    rows = []
    for dims in ((20, 50, 10), (64, 256, 10)):
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        model = _mlp(dims)
        X, y = torch.randn(512, dims[0], generator=g), torch.randint(0, dims[-1], (512,), generator=g)
        bmodel = extend(copy.deepcopy(model))
        bloss = extend(nn.CrossEntropyLoss())
        out: dict[str, Any] = {}

        def ours():
            H = Hessian(model, nn.CrossEntropyLoss(), (X, y))
            out["ours"] = H.diagonal({n: torch.arange(s) for n, s in H.sizes.items()})

        def bp():
            bmodel.zero_grad()
            loss = bloss(bmodel(X), y)
            with backpack(DiagHessian()):
                loss.backward()
            out["bp"] = [p.diag_h.detach().reshape(-1).clone() for p in bmodel.parameters()]

        med = _median_interleaved({"ours": ours, "backpack": bp}, repeat)
        H = Hessian(model, nn.CrossEntropyLoss(), (X, y))
        numel = H.numel
        sub = H.sample_coordinates(per_layer=64, seed=0)
        n_sub = sum(int(v.numel()) for v in sub.values())
        H.diagonal(sub, method="hvp")  # warm-up (graph, chunk size)
        t_hvp = _median_interleaved({"hvp": lambda: H.diagonal(sub, method="hvp")}, 3)["hvp"] / n_sub * numel
        rel = max(float((v - b).abs().max() / b.abs().max()) for v, b in zip(out["ours"].values.values(), out["bp"]))
        rows.append({"problem": f"MLP {'-'.join(map(str, dims))} (tanh), batch 512, float32", "numel": numel,
                     "ours_s": med["ours"], "backpack_s": med["backpack"], "hvp_columns_s": t_hvp,
                     "ratio": med["ours"] / med["backpack"], "rel_diff_vs_backpack": rel,
                     "methods": sorted(set(out["ours"].method.values()))})
    return rows


# ------------------------------------------------------------------------------------------------------------------
def _one_graph_loop(H: Hessian, coords: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    """The per-coordinate loop a user writes: gradient graph of all parameters built once (create_graph=True), one
    second backward (all parameters) per coordinate."""
    problem = H._problem
    names = H.param_names

    def loop() -> torch.Tensor:
        out = []
        with problem.context():
            leaves = {n: p.detach().requires_grad_(True) for n, p in H.params.items()}
            loss = sum(w * problem.check_term(i, term(leaves)) for i, (w, term) in enumerate(problem.terms))
            grads = torch.autograd.grad(loss, [leaves[n] for n in names], create_graph=True, allow_unused=True,
                                        materialize_grads=True)
            for n, idx in coords.items():
                j = names.index(n)
                for i in idx.tolist():
                    v = [torch.zeros_like(leaves[m]) for m in names]
                    v[j].view(-1)[i] = 1
                    hv = torch.autograd.grad(grads, [leaves[m] for m in names], grad_outputs=v, retain_graph=True,
                                             allow_unused=True, materialize_grads=True)
                    out.append(hv[j].reshape(-1)[i])
        return torch.stack(out)

    return loop


def _weights(H: Hessian) -> list[str]:
    w = [n for n in H.param_names if len(H.shapes[n]) >= 2]
    return [w[0], w[len(w) // 2], w[-1]] if len(w) >= 3 else w


def bench_sampled(quick: bool = False, repeat: int = 3) -> list[dict[str, Any]]:
    """Sampled exact diagonal entries: Hessian.diagonal (auto) vs the one-graph loop, per entry."""
    cases: list[tuple[str, str | None, int]] = []
    for name in ("mlp", "cnn", "transformer", "resnet_bn"):
        cases.append((name, None, 5 if quick else 10))
    if not quick:
        for which in TRANSFORMER_LAYERS:
            cases.append(("transformer", which, 200))
    return bench_sampled_rows(cases, repeat)


def bench_sampled_rows(cases: list[tuple[str, str | None, int]], repeat: int = 3,
                       done: Callable[[dict[str, Any]], Any] | None = None) -> list[dict[str, Any]]:
    """One row per ``(problem, weight or None = first/middle/last weight, entries per weight)``; ``done(row)`` is
    called after each row."""
    from _bench_problems import build

    rows = []
    for name, layer, per in cases:
        P = build(name)
        H = Hessian(P.model, P.loss_fn, (P.X, P.y))
        layers = [layer] if layer else _weights(H)
        coords = H.sample_coordinates(per_layer=per, seed=0, layers=layers)
        n = sum(int(v.numel()) for v in coords.values())
        got: dict[str, Any] = {}

        def ours():
            Hn = Hessian(P.model, P.loss_fn, (P.X, P.y))
            got["ours"] = Hn.diagonal(coords)

        loop = _one_graph_loop(H, coords)

        def base():
            got["loop"] = loop()

        med = _median_interleaved({"ours": ours, "loop": base}, repeat)
        vals = torch.cat([got["ours"].values[k] for k in coords])
        scale = float(got["loop"].abs().max()) + 1e-30
        rows.append({"problem": name, "layers": ", ".join(layers), "entries": n,
                     "ours_ms_per_entry": 1e3 * med["ours"] / n, "loop_ms_per_entry": 1e3 * med["loop"] / n,
                     "speedup": med["loop"] / med["ours"],
                     "rel_diff": float((vals - got["loop"]).abs().max()) / scale,
                     "methods": ", ".join(sorted({got["ours"].method[k] for k in coords})), "repeat": repeat})
        if done is not None:
            done(rows[-1])
    return rows


# ------------------------------------------------------------------------------------------------------------------
def bench_forward_over_forward(n: int = 16, repeat: int = 3) -> dict[str, Any]:
    """``d^2/dt^2 L(theta + t e_i)`` by jvp of jvp (vmapped over coordinates, chunks of 8) vs restricted HVP
    columns, on one FFN weight of the benchmark transformer (float64)."""
    from _bench_problems import build, math_sdpa

    from optiscope.curvature.diagonal import _layer_hvp_diagonal

    P = build("transformer", dtype=torch.float64)
    H = Hessian(P.model, P.loss_fn, (P.X, P.y))
    layer = "encoder.layers.1.linear1.weight"
    coords = H.sample_coordinates(per_layer=n, seed=0, layers=[layer])
    idx = coords[layer]
    p0 = H.params[layer]
    # parameters that require grad keep nn.TransformerEncoderLayer off its fused fast path (no forward AD there)
    rest = {k: v.detach().requires_grad_(True) for k, v in H.params.items() if k != layer}

    def L(p):
        return P.loss_fn(functional_call(P.model, {**rest, layer: p}, (P.X,)), P.y)

    def second(e):
        return jvp(lambda p: jvp(L, (p,), (e,))[1], (p0,), (e,))[1]

    got: dict[str, torch.Tensor] = {}

    def fof():
        vals = []
        with math_sdpa():
            for s in range(0, idx.numel(), 8):
                sub = idx[s:s + 8]
                E = torch.zeros(sub.numel(), p0.numel(), dtype=p0.dtype)
                E[torch.arange(sub.numel()), sub] = 1
                vals.append(vmap(second)(E.reshape(-1, *p0.shape)))
        got["fof"] = torch.cat(vals)

    def restricted():
        got["layer"] = _layer_hvp_diagonal(H, coords)[0][layer]

    med = _median_interleaved({"fof": fof, "layer": restricted}, repeat)
    err = float((got["fof"] - got["layer"]).abs().max() / got["layer"].abs().max())
    return {"layer": layer, "entries": int(idx.numel()), "fof_ms": 1e3 * med["fof"] / idx.numel(),
            "layer_hvp_ms": 1e3 * med["layer"] / idx.numel(), "fof_rel_error": err}


# ------------------------------------------------------------------------------------------------------------------
class _Timed:
    """A probe wrapper that adds up the seconds spent in the probe."""

    def __init__(self, probe):
        self.probe = probe
        self.name = getattr(probe, "name", type(probe).__name__)
        self.seconds = 0.0

    def __getattr__(self, item):
        return getattr(self.probe, item)

    def __call__(self, problem, state):
        t0 = time.perf_counter()
        try:
            return self.probe(problem, state)
        finally:
            self.seconds += time.perf_counter() - t0


def bench_demo(steps: int | None = None) -> list[dict[str, Any]]:
    """The demo's probe overhead with the structured diagonal ("now") and with HVP columns ("before")."""
    from optiscope.lab import Run, make_probes
    from optiscope.lab.config import build_problem, demo_config

    cfg = demo_config()
    problem = build_problem(cfg)
    init = copy.deepcopy(problem.model)
    rows = []
    original = Hessian.diagonal
    for name, spec in zip(cfg.run_names(), cfg.optimizers):
        for mode in ("now", "before"):
            probes = [_Timed(p) for p in make_probes(list(cfg.probes))]
            Hessian.diagonal = (original if mode == "now"
                                else functools.partialmethod(original, method="hvp"))
            try:
                run = Run(problem, spec, steps or cfg.steps, batch_size=cfg.batch_size, probe_every=cfg.probe_every,
                          probes=probes, seed=cfg.seed, name=name, model=copy.deepcopy(init))
                res = run.execute()
            finally:
                Hessian.diagonal = original
            rmed = sum(p.seconds for p in probes if p.name == "r_med")
            rows.append({"optimizer": name, "mode": mode, "train_s": res.train_seconds,
                         "probes_s": res.probe_seconds, "r_med_s": rmed,
                         "r_med_frac": rmed / res.train_seconds, "all_frac": res.probe_seconds / res.train_seconds,
                         "per_probe": {p.name: p.seconds for p in probes}})
    return rows


# ------------------------------------------------------------------------------------------------------------------
def _markdown(full, sampled, fof, demo, load_before: str, load_after: str) -> str:
    lines = ["## Exact Hessian diagonal (`benchmarks/_bench_diagonal.py`, curvature.diagonal)", "",
             f"One process, {torch.get_num_threads()} thread(s), interleaved repeats, medians. Load average "
             f"(1, 5, 15 min) at start: {load_before}; at end: {load_after}. Date: {time.strftime('%Y-%m-%d %H:%M')}.",
             ""]
    if full:
        lines += ["### Full diagonal of an MLP vs BackPACK DiagHessian", "",
                  "| problem | parameters | optiscope (structured) | BackPACK | ratio | target <= 2x | HVP columns "
                  "(before, extrapolated) | max rel. diff. vs BackPACK |", "|---|---|---|---|---|---|---|---|"]
        for r in full:
            lines.append(f"| {r['problem']} | {r['numel']} | {r['ours_s']:.4f} s | {r['backpack_s']:.4f} s | "
                         f"{r['ratio']:.2f} | {'met' if r['ratio'] <= 2 else '**not met**'} | "
                         f"{r['hvp_columns_s']:.1f} s ({r['hvp_columns_s'] / r['backpack_s']:.0f}x BackPACK) | "
                         f"{r['rel_diff_vs_backpack']:.1e} |")
        lines.append("")
    if sampled:
        lines += ["### Sampled exact diagonal entries vs a per-coordinate one-graph HVP loop", "",
                  "Loop: the gradient graph of all parameters built once (`create_graph=True`), then one second "
                  "backward per coordinate. optiscope: `Hessian.diagonal(coords)` (method auto; a fresh `Hessian` "
                  "each time, so its setup is included).", "",
                  "| problem | parameters | entries | optiscope ms/entry | loop ms/entry | speedup | methods | "
                  "max rel. diff. |", "|---|---|---|---|---|---|---|---|"]
        for r in sampled:
            lines.append(f"| {r['problem']} | {r['layers']} | {r['entries']} | {r['ours_ms_per_entry']:.2f} | "
                         f"{r['loop_ms_per_entry']:.2f} | {r['speedup']:.2f} | {r['methods']} | "
                         f"{r['rel_diff']:.1e} |")
        per = all(r["speedup"] >= 1.0 for r in sampled)
        tr = [r for r in sampled if r["problem"] == "transformer" and r["entries"] >= 200]
        lines += ["", f"Targets: per entry <= 1.0x the loop on every problem: {'met' if per else '**not met**'}; "
                  f">= 2x on a transformer layer (200 entries): " +
                  (", ".join(f"{r['layers'].split('.')[2]}: {r['speedup']:.2f}x "
                             f"({'met' if r['speedup'] >= 2 else '**not met**'})" for r in tr) or "not run"), ""]
    if fof:
        lines += ["### Why not forward-over-forward", "",
                  f"`d^2/dt^2 L(theta + t e_i)` by `jvp` of `jvp` (vmapped, chunks of 8) on `{fof['layer']}` of the "
                  f"transformer, float64, {fof['entries']} entries: {fof['fof_ms']:.1f} ms/entry vs restricted HVP "
                  f"columns {fof['layer_hvp_ms']:.1f} ms/entry; max relative error of forward-over-forward "
                  f"{fof['fof_rel_error']:.1e} (LayerNorm's second-order forward rule is wrong in torch 2.13).", ""]
    if demo:
        lines += ["### Demo probe overhead (`optiscope demo` configuration, probe every 50 steps)", "",
                  "now: `Hessian.diagonal` default (structured); before: one HVP column per entry "
                  "(`method=\"hvp\"`), same process, interleaved.", "",
                  "| optimizer | diagonal | training s | r_med probe s | r_med / training | all probes s | "
                  "all / training |", "|---|---|---|---|---|---|---|"]
        for r in demo:
            lines.append(f"| {r['optimizer']} | {r['mode']} | {r['train_s']:.2f} | {r['r_med_s']:.2f} | "
                         f"{r['r_med_frac']:.0%} | {r['probes_s']:.2f} | {r['all_frac']:.0%} |")
        now = [r for r in demo if r["mode"] == "now"]
        lines += ["", "Targets (now): r_med <= 25% of training: " +
                  ("met" if all(r["r_med_frac"] <= 0.25 for r in now) else "**not met**") +
                  "; all probes <= 100%: " + ("met" if all(r["all_frac"] <= 1.0 for r in now) else "**not met**") +
                  ". Per probe (s, now): " + "; ".join(
                      f"{r['optimizer']}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["per_probe"].items())
                      for r in now), ""]
    return "\n".join(lines)


def run(report: Callable[[str, str], Any] | None = None, quick: bool = False) -> dict[str, Any]:
    """Run all measurements and hand the markdown section to ``report(name, markdown)`` (default: write it into
    docs/benchmarks.md). ``quick=True``: fewer entries, no 200-entry transformer rows, a short demo."""
    torch.set_num_threads(1)
    load_before = _load()
    full = bench_full_mlp(repeat=3 if quick else 5)
    sampled = bench_sampled(quick=quick, repeat=3)
    fof = bench_forward_over_forward(n=8 if quick else 16)
    demo = bench_demo(steps=100 if quick else None)
    md = _markdown(full, sampled, fof, demo, load_before, _load())
    if report is None:
        from _report import write_section

        write_section(SECTION, md)
    else:
        report(SECTION, md)
    return {"full_mlp": full, "sampled": sampled, "forward_over_forward": fof, "demo": demo, "markdown": md}


if __name__ == "__main__":
    out = run(quick="--quick" in sys.argv, report=(lambda name, md: print(md)) if "--print" in sys.argv else None)
    print(out["markdown"])

"""optiscope's Hessian engine side by side with PyHessian, curvlinops, BackPACK and hessian-eigenthings.

Four problems (``_bench_problems.py``): MLP 64-256-256-10 (batch 512), small CNN (28x28, batch 128), 4-layer
d_model=64 transformer (64x32 tokens), BatchNorm ResNet in train mode (32x32, batch 64). Sections:

1. HVP time / gradient time, steady state (graph built), against the PyHessian-style double backward through a
   gradient graph built once (``autograd.grad(g, params, v, retain_graph=True)``), for every library's HVP.
2. Top-1 and top-5 eigenvalues (largest magnitude) to 1e-3: time, HVPs and relative error against a tight
   ``scipy.sparse.linalg.eigsh``; for Lanczos also the best possible stop (first step whose Ritz values are all
   within 1e-3 of the reference).
3. Trace error at 30 and 99 HVPs (RMS over seeds) against the exact trace from the exact diagonal.
4. SLQ at equal HVPs: ``Hessian.density`` vs PyHessian's ``density()``.
5. Peak memory of 10 HVPs per library, each in its own subprocess (RSS, or CUDA peak allocation).
6. Each library's HVP against central finite differences of the gradient (float64).
7. The exact-diagonal sections of ``benchmarks/_bench_diagonal.py`` when that module exists (its own section).

Ratios are measured in one process, interleaved (round robin over the contestants), medians over repeats, with
torch on 1 thread (``--threads``); the load average is recorded. A library that is not importable is skipped with
a message. ``--old PATH`` adds a copy of an earlier ``hessian.py`` (importing ``old_problem`` beside it) as a
contestant, for before/after tables. Results go to a section of ``docs/benchmarks.md`` (``--device cuda``: its own
section). Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_side_by_side.py [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _bench_problems import NAMES, BenchProblem, build, math_sdpa  # noqa: E402
from _report import machine, write_section  # noqa: E402

from optiscope.curvature import Hessian  # noqa: E402

LIBS = ("optiscope", "optiscope-old", "graph-reuse", "pyhessian", "curvlinops", "backpack", "eigenthings")


def log(msg: str) -> None:
    print(msg, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]


# ------------------------------------------------------------------------------------------------ HVP adapters
def flat_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def split(v: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    out, s = [], 0
    for p in params:
        out.append(v[s:s + p.numel()].view_as(p))
        s += p.numel()
    return out


def flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def hvp_factory(lib: str, P: BenchProblem, old: Any = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A steady-state HVP ``v -> H v`` on flat vectors for library ``lib`` (construction outside the timing)."""
    if lib == "optiscope":
        H = Hessian(P.model, P.loss_fn, (P.X, P.y))
        H.hvp(H.unflatten(torch.zeros(H.numel, dtype=P.X.dtype if P.X.is_floating_point() else H.dtype,
                                      device=H.device)))
        return lambda v: H.flatten(H.hvp(H.unflatten(v)))
    if lib == "optiscope-old":
        if old is None:
            raise ImportError("no --old module given")
        H = old.Hessian(P.model, P.loss_fn, (P.X, P.y))
        return lambda v: H.flatten(H.hvp(H.unflatten(v)))
    if lib == "graph-reuse":  # PyHessian's scheme written out: gradient graph once, second backward per vector
        model = copy.deepcopy(P.model)
        params = flat_params(model)
        with math_sdpa():
            g = torch.autograd.grad(P.loss(model), params, create_graph=True)

        def f(v):
            with math_sdpa():
                return flat(torch.autograd.grad(g, params, grad_outputs=split(v, params), retain_graph=True))
        return f
    if lib == "pyhessian":
        from pyhessian import hessian as pyh
        from pyhessian.utils import hessian_vector_product

        with math_sdpa():
            comp = pyh(copy.deepcopy(P.model), P.loss_fn, data=(P.X, P.y), cuda=P.X.is_cuda)

        def f(v):
            with math_sdpa():
                return flat(hessian_vector_product(comp.gradsH, comp.params, split(v, comp.params)))
        return f
    if lib == "curvlinops":
        from curvlinops import HessianLinearOperator

        model = copy.deepcopy(P.model)
        if P.name == "transformer":
            fmodel, y = nn.Sequential(model, nn.Flatten(0, 1)), P.y.reshape(-1)
        else:
            fmodel, y = model, P.y
        with math_sdpa():
            op = HessianLinearOperator(fmodel, nn.CrossEntropyLoss(), flat_params(model), [(P.X, y)])

        def f(v):
            with math_sdpa():
                return op @ v
        return f
    if lib == "backpack":
        from backpack.hessianfree.hvp import hessian_vector_product

        model = copy.deepcopy(P.model)
        params = flat_params(model)

        def f(v):
            with math_sdpa():
                return flat(hessian_vector_product(P.loss(model), params, split(v, params)))
        return f
    if lib == "eigenthings":
        import hessian_eigenthings as he

        model = copy.deepcopy(P.model)
        op = he.HessianOperator(model, [(P.X, P.y)], he.supervised_loss(P.loss_fn))

        def f(v):
            with math_sdpa():
                return op.matvec(v)
        return f
    raise ValueError(lib)


def gradient_fn(P: BenchProblem) -> Callable[[], Any]:
    model = copy.deepcopy(P.model)
    params = flat_params(model)
    return lambda: torch.autograd.grad(P.loss(model), params)


def interleaved(fns: dict[str, Callable[[], Any]], repeat: int, device: str, warmup: int = 1) -> dict[str, float]:
    """Median wall time per contestant, timed round robin (``warmup`` untimed calls each first)."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(t) for k, t in times.items()}


def bench_hvp(P: BenchProblem, libs: list[str], old, repeat: int, device: str) -> dict:
    n = sum(p.numel() for p in flat_params(P.model))
    g = torch.Generator().manual_seed(0)
    v = torch.randn(n, generator=g).to(device=device, dtype=next(P.model.parameters()).dtype)
    fns = {"gradient": gradient_fn(P)}
    skipped = {}
    for lib in libs:
        try:
            h = hvp_factory(lib, P, old)
            h(v)
            fns[lib] = (lambda h=h: h(v))
        except Exception as e:  # missing or incompatible baseline: reported, not fatal
            skipped[lib] = first_line(e)
    t = interleaved(fns, repeat, device)
    out = {"t": t, "skipped": skipped, "numel": n}
    log(f"  hvp {P.name}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in t.items()))
    return out


# ------------------------------------------------------------------------------------------------ eigenvalues
class Counted:
    """Wraps a flat HVP and counts calls."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def __call__(self, v):
        self.n += 1 if v.dim() == 1 else v.shape[0]
        return self.f(v)


def scipy_op(f: Callable, n: int, dtype, device):
    from scipy.sparse.linalg import LinearOperator

    def mv(x):
        x = torch.as_tensor(np.asarray(x, dtype=np.float64).reshape(-1)).to(device=device, dtype=dtype)
        return f(x).double().cpu().numpy()

    return LinearOperator((n, n), matvec=mv, rmatvec=mv, dtype=np.float64)


def bench_eigen(P: BenchProblem, libs: list[str], device: str, ks=(1, 5)) -> dict:
    from scipy.sparse.linalg import eigsh

    H = Hessian(P.model, P.loss_fn, (P.X, P.y))
    ref_count = Counted(lambda x: H.flatten(H.hvp(H.unflatten(x))))
    t0 = time.perf_counter()
    ref = np.sort(eigsh(scipy_op(ref_count, H.numel, H.dtype, H.device), k=max(ks), which="LM", tol=1e-9,
                        return_eigenvectors=False, v0=np.ones(H.numel))[::-1])
    ref = ref[np.argsort(-np.abs(ref))]
    out: dict[str, Any] = {"ref": ref.tolist(), "ref_hvp": ref_count.n, "t_ref": time.perf_counter() - t0}
    log(f"  eig {P.name}: reference {ref[:5]} ({ref_count.n} HVPs)")
    for k in ks:
        want = ref[:k]
        rows = {}

        def err(vals):
            vals = np.asarray(sorted(vals, key=lambda x: -abs(x))[:k], dtype=float)
            return float(np.max(np.abs(vals - want) / np.abs(want)))

        # optiscope Lanczos: its own stop, and the best possible stop from the Ritz history
        t0 = time.perf_counter()
        r = H.eigenvalues(k=k, which="LM", tol=1e-3, seed=0)
        t = time.perf_counter() - t0
        oracle = next((i + 1 for i, th in enumerate(r.ritz_history) if len(th) >= k and
                       np.max(np.abs(np.asarray(sorted(th, key=lambda x: -abs(x))) - want) / np.abs(want)) <= 1e-3),
                      None)
        rows["optiscope"] = {"t": t, "hvp": r.n_hvp, "err": err(r.values), "oracle": oracle}
        for lib in libs:
            try:
                if lib == "pyhessian":
                    from pyhessian import hessian as pyh

                    phm = sys.modules["pyhessian.hessian"]  # the package re-exports the class under the same name

                    with math_sdpa():
                        comp = pyh(copy.deepcopy(P.model), P.loss_fn, data=(P.X, P.y), cuda=device.startswith("cuda"))
                        orig = phm.hessian_vector_product
                        count = [0]

                        def counted(*a, **kw):
                            count[0] += 1
                            return orig(*a, **kw)

                        phm.hessian_vector_product = counted
                        try:
                            torch.manual_seed(0)
                            t0 = time.perf_counter()
                            vals, _ = comp.eigenvalues(maxIter=100, tol=1e-3, top_n=k)
                            t = time.perf_counter() - t0
                        finally:
                            phm.hessian_vector_product = orig
                    rows[lib] = {"t": t, "hvp": count[0], "err": err(vals)}
                elif lib == "eigenthings":
                    import hessian_eigenthings as he

                    op = he.HessianOperator(copy.deepcopy(P.model), [(P.X, P.y)], he.supervised_loss(P.loss_fn))
                    orig = op.matvec
                    count = [0]

                    def mv(v, orig=orig, count=count):
                        count[0] += 1
                        with math_sdpa():
                            return orig(v)

                    op.matvec = mv
                    t0 = time.perf_counter()
                    res = he.lanczos(op, k=k, max_iter=100, tol=1e-3, which="LM", seed=0)
                    t = time.perf_counter() - t0
                    rows[lib] = {"t": t, "hvp": count[0], "err": err(np.asarray(res.eigenvalues.cpu()))}
                elif lib == "curvlinops":
                    f = Counted(hvp_factory("curvlinops", P))
                    t0 = time.perf_counter()
                    vals = eigsh(scipy_op(f, H.numel, H.dtype, H.device), k=k, which="LM", tol=1e-3,
                                 return_eigenvectors=False, v0=np.ones(H.numel))
                    rows[lib] = {"t": time.perf_counter() - t0, "hvp": f.n, "err": err(vals)}
            except Exception as e:
                rows[lib] = {"skipped": first_line(e)}
        out[f"top{k}"] = rows
        log(f"  eig {P.name} top{k}: {rows}")
    return out


# ------------------------------------------------------------------------------------------------ trace
def bench_trace(P: BenchProblem, libs: list[str], seeds: int) -> dict:
    H = Hessian(P.model, P.loss_fn, (P.X, P.y))
    t0 = time.perf_counter()
    try:
        d = H.diagonal(H.sample_coordinates(per_layer=10 ** 12), method="structured")
    except Exception as e:
        return {"skipped": f"no exact diagonal for this model in reasonable time ({first_line(e)})"}
    exact = float(sum(float(t.double().sum()) for t in d.values.values()))
    out: dict[str, Any] = {"exact": exact, "t_exact": time.perf_counter() - t0, "rows": {}}
    for m in (30, 99):
        rows = {}
        for method in ("adaptive", "xtrace", "hutch++", "hutchinson"):
            e = [H.trace(m, method=method, seed=s).value - exact for s in range(seeds)]
            rows[f"optiscope {method}"] = float(np.sqrt(np.mean(np.square(e))) / abs(exact))
        if "curvlinops" in libs:
            try:
                import curvlinops as cl

                f = hvp_factory("curvlinops", P)

                class Op(cl._torch_base.PyTorchLinearOperator):  # curvlinops' trace functions take its operators
                    def __init__(self):
                        super().__init__([(H.numel,)], [(H.numel,)])

                    def _matmat(self, X):
                        return [torch.stack([f(c) for c in X[0].T], 1)]

                    def _adjoint(self):
                        return self

                    @property
                    def device(self):
                        return H.device

                    @property
                    def dtype(self):
                        return H.dtype

                op = Op()
                for name, fn in (("hutchinson", cl.hutchinson_trace), ("hutch++", cl.hutchpp_trace),
                                 ("xtrace", cl.xtrace)):
                    mm = m if name != "xtrace" or m % 2 == 0 else m - 1
                    mm = mm if name != "hutch++" or mm % 3 == 0 else mm - mm % 3
                    e = []
                    for s in range(seeds):
                        torch.manual_seed(s)
                        e.append(float(fn(op, mm)) - exact)
                    rows[f"curvlinops {name} ({mm})"] = float(np.sqrt(np.mean(np.square(e))) / abs(exact))
            except Exception as ex:
                rows["curvlinops"] = first_line(ex)
        if "pyhessian" in libs:
            try:
                from pyhessian import hessian as pyh

                e = []
                for s in range(seeds):
                    torch.manual_seed(s)
                    with math_sdpa():
                        comp = pyh(copy.deepcopy(P.model), P.loss_fn, data=(P.X, P.y), cuda=P.X.is_cuda)
                        e.append(float(np.mean(comp.trace(maxIter=m, tol=0.0))) - exact)
                rows["pyhessian (Hutchinson, eval mode)"] = float(np.sqrt(np.mean(np.square(e))) / abs(exact))
            except Exception as ex:
                rows["pyhessian"] = first_line(ex)
        out["rows"][m] = rows
        log(f"  trace {P.name} m={m}: {rows}")
    return out


# ------------------------------------------------------------------------------------------------ SLQ
def _torch_eig_shim(T: torch.Tensor, eigenvectors: bool = False):
    """The removed ``torch.eig`` for a symmetric ``T``: eigenvalues as ``[n, 2]`` (real, imaginary), vectors."""
    w, V = torch.linalg.eigh(T)
    return torch.stack([w, torch.zeros_like(w)], 1), V


def bench_slq(P: BenchProblem, libs: list[str], n_v: int, m: int, repeat: int, device: str) -> dict:
    H = Hessian(P.model, P.loss_fn, (P.X, P.y))
    fns = {"optiscope": lambda: H.density(n_probes=n_v, n_lanczos=m, seed=0)}
    skipped = {}
    if "pyhessian" in libs:
        try:
            from pyhessian import hessian as pyh

            with math_sdpa():
                comp = pyh(copy.deepcopy(P.model), P.loss_fn, data=(P.X, P.y), cuda=device.startswith("cuda"))

            def ph():
                # PyHessian's density() calls torch.eig, removed from torch since 1.9; the same call through eigh
                # (the tridiagonal T is symmetric) is patched in for the duration of the call
                orig = getattr(torch, "eig", None)
                torch.eig = _torch_eig_shim
                try:
                    with math_sdpa():
                        return comp.density(iter=m, n_v=n_v)
                finally:
                    torch.eig = orig
            fns["pyhessian"] = ph
        except Exception as e:
            skipped["pyhessian"] = first_line(e)
    if "eigenthings" in libs:
        try:
            import hessian_eigenthings as he

            op = he.HessianOperator(copy.deepcopy(P.model), [(P.X, P.y)], he.supervised_loss(P.loss_fn))
            orig = op.matvec

            def mv(v):
                with math_sdpa():
                    return orig(v)
            op.matvec = mv
            fns["eigenthings"] = lambda: he.spectral_density(op, num_runs=n_v, lanczos_steps=m, seed=0)
        except Exception as e:
            skipped["eigenthings"] = first_line(e)
    t = {}
    try:
        t = interleaved(fns, repeat, device, warmup=0)
    except Exception as e:
        skipped["slq"] = first_line(e)
    log(f"  slq {P.name}: {t} {skipped}")
    return {"t": t, "skipped": skipped, "n_hvp": n_v * m}


# ------------------------------------------------------------------------------------------------ memory
def memory_child(problem: str, lib: str, device: str, old_path: str | None) -> None:
    torch.set_num_threads(1)
    P = build(problem, device)
    gradient_fn(P)()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    old = load_old(old_path) if lib == "optiscope-old" else None
    n = sum(p.numel() for p in flat_params(P.model))
    if lib != "gradient":
        f = hvp_factory(lib, P, old)
        v = torch.randn(n, device=device)
        for _ in range(10):
            f(v)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps({"peak_mb": peak / 2 ** 20}))


def bench_memory(problem: str, libs: list[str], device: str, old_path: str | None) -> dict:
    out = {}
    for lib in libs:
        cmd = [sys.executable, __file__, "--_memory", problem, lib, "--device", device]
        if old_path:
            cmd += ["--old", old_path]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
            out[lib] = (json.loads(r.stdout.strip().splitlines()[-1])["peak_mb"] if r.returncode == 0
                        else (r.stderr.strip().splitlines() or ["failed"])[-1][:120])
        except Exception as e:
            out[lib] = first_line(e)
    log(f"  memory {problem}: {out}")
    return out


# ------------------------------------------------------------------------------------------------ finite differences
def bench_fd(problem: str, libs: list[str], old) -> dict:
    P = build(problem, dtype=torch.float64)
    if problem == "transformer":
        P.model.train()  # dropout 0: the same function; train mode is what a user trains with
    model = copy.deepcopy(P.model)
    params = flat_params(model)
    n = sum(p.numel() for p in params)
    g = torch.Generator().manual_seed(3)
    v = torch.randn(n, generator=g, dtype=torch.float64)
    v /= v.norm()
    x0 = [p.detach().clone() for p in params]

    def grad_at(eps):
        with torch.no_grad():
            for p, x, dv in zip(params, x0, split(v, params)):
                p.copy_(x + eps * dv)
        m2 = copy.deepcopy(model)
        with math_sdpa():
            return flat(torch.autograd.grad(P.loss(m2), flat_params(m2)))

    h = 1e-5
    fd = (grad_at(h) - grad_at(-h)) / (2 * h)
    with torch.no_grad():
        for p, x in zip(params, x0):
            p.copy_(x)
    out = {}
    for lib in libs:
        if lib == "graph-reuse":
            continue
        try:
            Q = BenchProblem(P.name, copy.deepcopy(P.model), P.loss_fn, P.X, P.y, P.description)
            hv = hvp_factory(lib, Q, old)(v)
            out[lib] = float((hv.double() - fd).norm() / fd.norm())
        except Exception as e:
            out[lib] = first_line(e)
    log(f"  fd {problem}: {out}")
    return out


# ------------------------------------------------------------------------------------------------ report
def load_old(path: str | None):
    if not path:
        return None
    sys.path.insert(0, str(Path(path).resolve().parent))
    return importlib.import_module(Path(path).stem)


def fmt(x, spec=".2f"):
    return format(x, spec) if isinstance(x, (int, float)) and math.isfinite(x) else str(x)


def report(res: dict, args) -> str:
    L = []
    load = res["load"]
    L.append(f"Run {res['date']} on {res['device']}; torch threads {res['threads']}; load average at start "
             f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min), at end {res['load_end'][0]:.2f}. "
             "Absolute times inflate with load; ratios are interleaved in one process (medians of "
             f"{args.repeat}; SLQ: {args.slq_repeat}).")
    L.append("")
    L.append("Problems: " + "; ".join(f"**{k}**: {v}" for k, v in res["descriptions"].items()) + ".")
    L.append("")
    if "hvp" in res:
        libs = [lb for lb in LIBS if any(lb in r["t"] for r in res["hvp"].values())]
        L.append("### HVP time / gradient time (steady state)")
        L.append("")
        L.append("| problem | gradient ms | " + " | ".join(libs) + " | optiscope / graph-reuse | target <= 1.1 |")
        L.append("|---|---|" + "---|" * len(libs) + "---|---|")
        for p, r in res["hvp"].items():
            t = r["t"]
            ratio = t["optiscope"] / t["graph-reuse"] if "graph-reuse" in t and "optiscope" in t else float("nan")
            cells = [fmt(t[lb] / t["gradient"]) if lb in t else "skipped" for lb in libs]
            L.append(f"| {p} | {t['gradient'] * 1e3:.1f} | " + " | ".join(cells) +
                     f" | {fmt(ratio)} | {'met' if ratio <= 1.1 else '**missed**'} |")
        sk = {p: r["skipped"] for p, r in res["hvp"].items() if r["skipped"]}
        if sk:
            L.append("")
            L.append("Skipped: " + "; ".join(f"{p}: {s}" for p, s in sk.items()))
        L.append("")
        L.append("`graph-reuse` is PyHessian's scheme written out (gradient graph built once outside the timing, one "
                 "`autograd.grad(g, params, v, retain_graph=True)` per vector); `optiscope-old` is the engine before "
                 "graph reuse (rebuilt the forward and first backward per call). curvlinops, BackPACK and "
                 "hessian-eigenthings rebuild the graph per product by design.")
        L.append("")
    if "eig" in res:
        L.append("### Top eigenvalues (largest magnitude) to 1e-3")
        L.append("")
        L.append("| problem | k | library | seconds | HVPs | max rel. error vs eigsh | best possible stop (HVPs) |")
        L.append("|---|---|---|---|---|---|---|")
        for p, r in res["eig"].items():
            for k in ("top1", "top5"):
                for lib, row in r.get(k, {}).items():
                    if "skipped" in row:
                        L.append(f"| {p} | {k[3:]} | {lib} | skipped: {row['skipped']} | | | |")
                    else:
                        L.append(f"| {p} | {k[3:]} | {lib} | {row['t']:.2f} | {row['hvp']} | {row['err']:.1e} | "
                                 f"{row.get('oracle', '') or ''} |")
        L.append("")
        L.append("Reference: `scipy.sparse.linalg.eigsh(tol=1e-9)` on optiscope's operator. optiscope stops on the "
                 "residual `||H y - theta y|| <= 1e-3 |theta|`, which bounds the eigenvalue error far below 1e-3; the "
                 "best possible stop is the first Lanczos step whose k Ritz values are all within 1e-3. PyHessian "
                 "(power iteration, relative change < 1e-3, eval mode), hessian-eigenthings `lanczos(max_iter=100, "
                 "tol=1e-3)`, curvlinops through `eigsh(tol=1e-3)`.")
        L.append("")
    if "trace" in res:
        L.append("### Trace: RMS relative error over seeds")
        L.append("")
        for p, r in res["trace"].items():
            if "skipped" in r:
                L.append(f"- {p}: skipped ({r['skipped']})")
                continue
            L.append(f"- **{p}** (exact trace {r['exact']:.4g} from the structured exact diagonal, "
                     f"{r['t_exact']:.1f} s; {args.trace_seeds} seeds):")
            for m, rows in r["rows"].items():
                L.append(f"  - {m} HVPs: " + ", ".join(f"{k} {fmt(v, '.3g')}" for k, v in rows.items()))
        L.append("")
    if "slq" in res:
        L.append(f"### SLQ at equal HVPs ({args.slq_probes} probes x {args.slq_steps} Lanczos steps)")
        L.append("")
        L.append("| problem | optiscope s | PyHessian density() s | hessian-eigenthings s | optiscope / PyHessian | "
                 "target <= 1.0 |")
        L.append("|---|---|---|---|---|---|")
        for p, r in res["slq"].items():
            t = r["t"]
            ratio = t.get("optiscope", math.nan) / t.get("pyhessian", math.nan)
            L.append(f"| {p} | {fmt(t.get('optiscope', 'n/a'))} | {fmt(t.get('pyhessian', 'skipped'))} | "
                     f"{fmt(t.get('eigenthings', 'skipped'))} | {fmt(ratio)} | "
                     f"{'met' if ratio <= 1.0 else '**missed**'} |")
        L.append("")
    if "memory" in res:
        libs = [lb for lb in ("gradient",) + LIBS if any(lb in r for r in res["memory"].values())]
        L.append("### Peak memory of 10 HVPs, MB above the problem and one gradient (own subprocess each)")
        L.append("")
        L.append("| problem | " + " | ".join(libs) + " |")
        L.append("|---|" + "---|" * len(libs))
        for p, r in res["memory"].items():
            L.append(f"| {p} | " + " | ".join(fmt(r.get(lb, ''), '.0f') for lb in libs) + " |")
        L.append("")
    if "fd" in res:
        libs = [lb for lb in LIBS if any(lb in r for r in res["fd"].values())]
        L.append("### HVP relative error vs central finite differences of the gradient (float64, h = 1e-5)")
        L.append("")
        L.append("| problem | " + " | ".join(libs) + " |")
        L.append("|---|" + "---|" * len(libs))
        for p, r in res["fd"].items():
            L.append(f"| {p} | " + " | ".join(fmt(r.get(lb, ''), '.1e') for lb in libs) + " |")
        L.append("")
        L.append("The transformer is in train mode here (dropout 0, so the same function); PyHessian puts every "
                 "model in eval mode, which changes the BatchNorm ResNet's function.")
        L.append("")
    for extra in res.get("extra_sections", []):
        L.append(extra)
        L.append("")
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--problems", default=",".join(NAMES))
    ap.add_argument("--sections", default="hvp,eig,trace,slq,memory,fd,diagonal")
    ap.add_argument("--libs", default=",".join(lb for lb in LIBS if lb != "optiscope-old"))
    ap.add_argument("--old", default=None, help="path of an earlier hessian.py to compare (module name = stem)")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--trace-seeds", type=int, default=5)
    ap.add_argument("--slq-probes", type=int, default=3)
    ap.add_argument("--slq-steps", type=int, default=80)
    ap.add_argument("--slq-repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and seeds (a smoke run)")
    for sec in ("eig", "trace", "slq", "memory", "fd"):
        ap.add_argument(f"--{sec}-problems", default=None, help=f"problems for the {sec} section (default: all)")
    ap.add_argument("--section-name", default=None)
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--_memory", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args._memory:
        memory_child(args._memory[0], args._memory[1], args.device, args.old)
        return
    if args.quick:
        args.repeat, args.trace_seeds, args.slq_repeat = 3, 2, 1
    problems = [p for p in args.problems.split(",") if p]
    sections = set(args.sections.split(","))
    libs = [lb for lb in args.libs.split(",") if lb]
    old = load_old(args.old)
    if old is not None and "optiscope-old" not in libs:
        libs.insert(1, "optiscope-old")
    for lib, mod in (("pyhessian", "pyhessian"), ("curvlinops", "curvlinops"), ("backpack", "backpack"),
                     ("eigenthings", "hessian_eigenthings")):
        if lib in libs:
            try:
                importlib.import_module(mod)
            except Exception as e:
                log(f"skipping {lib}: not importable ({first_line(e)}); pip install -e '.[bench]'")
                libs.remove(lib)
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load": os.getloadavg(),
                           "threads": torch.get_num_threads(), "device": f"{args.device} ({machine()})",
                           "descriptions": {}}
    built = {p: build(p, args.device) for p in problems}
    res["descriptions"] = {p: P.description for p, P in built.items()}
    other = [lb for lb in libs if lb not in ("optiscope", "optiscope-old", "graph-reuse")]

    def wanted(sec: str, p: str) -> bool:
        chosen = getattr(args, f"{sec}_problems")
        return sec in sections and (chosen is None or p in chosen.split(","))

    for p, P in built.items():
        log(f"== {p}: {P.description}")
        if "hvp" in sections:
            res.setdefault("hvp", {})[p] = bench_hvp(P, libs, old, args.repeat, args.device)
        if wanted("eig", p):
            res.setdefault("eig", {})[p] = bench_eigen(P, other, args.device)
        if wanted("trace", p) and p != "transformer":
            res.setdefault("trace", {})[p] = bench_trace(P, other, args.trace_seeds)
        if wanted("slq", p):
            res.setdefault("slq", {})[p] = bench_slq(P, other, args.slq_probes, args.slq_steps, args.slq_repeat,
                                                     args.device)
    if wanted("trace", "transformer") and "transformer" in problems:
        res.setdefault("trace", {})["transformer"] = {
            "skipped": "no structured exact diagonal for attention, and 142k HVP columns are out of budget here"}
    if "memory" in sections:
        res["memory"] = {p: bench_memory(p, ["gradient"] + libs, args.device, args.old) for p in problems
                         if wanted("memory", p)}
    if "fd" in sections and not args.device.startswith("cuda"):
        res["fd"] = {p: bench_fd(p, libs, old) for p in problems if wanted("fd", p)}
    if "diagonal" in sections and (HERE / "_bench_diagonal.py").exists():
        try:  # its own section of docs/benchmarks.md (``run(report, quick)``; report(name, markdown))
            diag = importlib.import_module("_bench_diagonal")
            diag.run(report=(lambda name, md: log(md)) if args.no_write else None, quick=args.quick)
        except Exception as e:
            res["extra_sections"] = [f"Diagonal sections (`benchmarks/_bench_diagonal.py`) failed: {first_line(e)}"]
    res["load_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    text = report(res, args)
    log(text)
    if not args.no_write:
        name = args.section_name or ("side_by_side" if args.device == "cpu" else "side_by_side_gpu")
        title = "## Side by side with other Hessian libraries (`benchmarks/bench_side_by_side.py`"
        title += f", {args.device})" if args.device != "cpu" else ")"
        write_section(name, title + "\n\n" + text)


if __name__ == "__main__":
    main()

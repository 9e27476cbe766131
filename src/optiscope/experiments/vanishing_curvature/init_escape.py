"""Escape from the flat plateau of the neural chain: GD, perturbed GD and RMSprop vs depth (Orvieto et al. 2022, §3, Prop. 7,
Fig. 3; App. C.2, Eq. (89), Fig. 23-25).

Loss with one data point ``(x, y)``: ``l(w) = (1/2)(y - x prod_{i=1}^L w_i)^2``; every weight starts at the same small
``w0`` (plus optional ``init_jitter``), so gradients are ``O(w0^{L-1})`` and curvature ``O(w0^{L-2})``. We run, with
the library's optimizers (:class:`optiscope.optim.SGD` as plain GD, :class:`optiscope.optim.RMSProp`):

* GD for several step sizes,
* perturbed GD: a GD step followed by isotropic Gaussian noise ``N(0, r^2 I)`` on the weights (Du et al. 2017, the
  paper's "directly add noise to the updates"), several noise levels ``r``,
* RMSprop (Orvieto et al. 2022 form, no bias correction) for several learning rates,

each for ``n_seeds`` seeds (noise and jitter come from one ``torch.Generator``), at every depth, and record the
iterations until the loss first falls to ``loss_fraction * l(w(0))`` ("escape"; censored at ``max_iters``). Gradients
are the exact closed form ``dl/dw_i = (f - y) x prod_{j != i} w_j`` (prefix/suffix products), checked against autograd
in the tests. Theory overlays: the exact gradient-flow escape time (``t/eta`` iterations) and the RMSprop-flow bound.

RMSprop's ``eps`` must be far below ``g(0)^2 ~ w0^{2(L-1)}`` for the paper's argument to hold (``1e-60`` at depth 100
for ``w0 = 1/2``); the default here is ``eps = 0`` and ``rmsprop_eps_check`` reruns RMSprop with PyTorch's ``1e-8`` to
show what a standard ``eps`` does on this plateau.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from optiscope.experiments.base import Claim, Result, experiment_device, register, require_device
from optiscope.lab.init_check import limit_threads
from optiscope.lab.store import RunStore
from optiscope.metrics.verdicts import all_of, check_premises, direction_claim, tolerance_claim
from optiscope.optim import SGD, RMSProp
from optiscope.theory.init import (
    chain_gf_escape_time,
    chain_gf_escape_time_lower_bound,
    chain_rmsprop_escape_time_bound,
)
from optiscope.utils.config import Config, require
from optiscope.utils.plotting import plt
from optiscope.utils.progress import progress_task


@dataclass(frozen=True)
class EscapeConfig(Config):
    """Configuration of the plateau-escape experiment (Orvieto et al. 2022, Prop. 7, Fig. 3): depths, optimisers, grids."""

    seed: int = 0
    depths: tuple[int, ...] = (10, 20, 40, 60, 80, 100)
    w0: float = 0.5
    x: float = 1.0
    y: float = 1.0
    init_jitter: float = 0.0
    loss_fraction: float = 0.5
    n_seeds: int = 4
    gd_lrs: tuple[float, ...] = (0.01, 0.03, 0.1)
    pgd_lr: float = 0.1
    pgd_noise: tuple[float, ...] = (0.001, 0.01, 0.03)
    rmsprop_lrs: tuple[float, ...] = (0.001, 0.003, 0.01)
    rmsprop_beta: float = 0.99
    rmsprop_eps: float = 0.0
    rmsprop_eps_check: float = 1e-8
    max_iters: int = 20000
    spread_limit: float = 2.0
    growth_min: float = 10.0
    # where the chains and the optimizer state live (jitter and noise are drawn on the CPU, then moved); the
    # chains are tiny ([n_seeds, depth]) and checked every step, so the CPU is usually the faster choice
    device: str = "cpu"

    def validate(self) -> None:
        require_device(self.device)
        require(len(self.depths) >= 2 and all(d >= 3 for d in self.depths), "depths", self.depths,
                "at least two depths, each >= 3")
        require(0 < self.w0 < 1, "w0", self.w0, "in (0, 1) (a small-init plateau)")
        require(self.x > 0 and self.y > 0, "x/y", (self.x, self.y), "> 0")
        require(self.init_jitter >= 0, "init_jitter", self.init_jitter, ">= 0")
        require(0 <= self.loss_fraction < 1, "loss_fraction", self.loss_fraction, "in [0, 1)")
        require(self.n_seeds >= 1, "n_seeds", self.n_seeds, ">= 1")
        for name in ("gd_lrs", "rmsprop_lrs"):
            v = getattr(self, name)
            require(len(v) > 0 and all(lr > 0 for lr in v), name, v, "a non-empty list of positive numbers")
        require(self.pgd_lr > 0, "pgd_lr", self.pgd_lr, "> 0")
        require(all(r > 0 for r in self.pgd_noise), "pgd_noise", self.pgd_noise, "positive noise levels")
        require(0 <= self.rmsprop_beta < 1, "rmsprop_beta", self.rmsprop_beta, "in [0, 1)")
        require(self.rmsprop_eps >= 0 and self.rmsprop_eps_check >= 0, "rmsprop_eps",
                (self.rmsprop_eps, self.rmsprop_eps_check), ">= 0")
        require(self.max_iters >= 1, "max_iters", self.max_iters, ">= 1")
        require(self.spread_limit >= 1 and self.growth_min >= 1, "spread_limit/growth_min",
                (self.spread_limit, self.growth_min), ">= 1")


def chain_loss_and_grad(w: torch.Tensor, x: float, y: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise chain loss ``(1/2)(y - x prod_i w_i)^2`` (Orvieto et al. 2022, App. C.2, Eq. (89)) and its exact gradient.

    ``w``: ``[rows, L]``. ``dl/dw_i = (f - y) x prod_{j != i} w_j`` via exclusive prefix and suffix products
    (no division, so exact zeros are fine). Returns ``(loss [rows], grad [rows, L])``.
    """
    ones = torch.ones_like(w[:, :1])
    prefix = torch.cumprod(torch.cat([ones, w[:, :-1]], dim=1), dim=1)
    suffix = torch.flip(torch.cumprod(torch.flip(torch.cat([w[:, 1:], ones], dim=1), [1]), dim=1), [1])
    others = prefix * suffix
    f = x * prefix[:, -1] * w[:, -1]
    resid = f - y
    return 0.5 * resid * resid, resid[:, None] * x * others


@dataclass
class _Track:
    name: str
    method: str
    lr: float
    noise: float
    depth: int
    param: torch.Tensor
    loss0: torch.Tensor
    escape: np.ndarray
    diverged: np.ndarray


def simulate_escape(config: EscapeConfig, method: str, lrs: tuple[float, ...], noises: tuple[float, ...],
                    generator: torch.Generator, eps: float | None = None, label: str | None = None,
                    task=None) -> list[_Track]:
    """Run one optimizer family on every (lr, noise, depth) for ``n_seeds`` rows; return escape iterations.

    ``method``: ``"gd"`` (``optim.SGD``), ``"pgd"`` (``optim.SGD`` + Gaussian noise after each step) or ``"rmsprop"``
    (``optim.RMSProp``, ``beta = rmsprop_beta``, ``eps``). Escape iteration ``t``: the first ``t`` with
    ``l(w_t) <= loss_fraction * l(w_0)`` (``-1``: not within ``max_iters``). Non-finite losses are recorded as
    divergence at that step (the row is frozen), never raised.
    """
    dev = experiment_device(config)
    tracks: list[_Track] = []
    groups = []
    for lr in lrs:
        params = []
        for noise in noises:
            for depth in config.depths:
                w = torch.full((config.n_seeds, depth), config.w0, dtype=torch.float64)
                if config.init_jitter > 0:
                    w += config.init_jitter * torch.randn(w.shape, generator=generator, dtype=torch.float64)
                p = torch.nn.Parameter(w.to(dev))
                loss0, _ = chain_loss_and_grad(p.detach(), config.x, config.y)
                loss0 = loss0.cpu()
                tracks.append(_Track(label or method, method, lr, noise, depth, p, loss0,
                                     np.full(config.n_seeds, -1), np.full(config.n_seeds, -1)))
                params.append(p)
        groups.append({"params": params, "lr": lr})
    if method == "rmsprop":
        opt = RMSProp(groups, lr=lrs[0], beta=config.rmsprop_beta, eps=config.rmsprop_eps if eps is None else eps)
    else:
        opt = SGD(groups, lr=lrs[0], momentum=0.0)
    for t in range(config.max_iters + 1):
        alive = False
        with torch.no_grad():
            for tr in tracks:
                loss, g = chain_loss_and_grad(tr.param.detach(), config.x, config.y)
                ln = loss.cpu().numpy()
                open_ = (tr.escape < 0) & (tr.diverged < 0)
                bad = ~np.isfinite(ln) & open_
                tr.diverged[bad] = t
                hit = np.isfinite(ln) & (ln <= config.loss_fraction * tr.loss0.numpy()) & open_
                tr.escape[hit] = t
                if bad.any():  # freeze diverged rows at a finite value so that the optimizer state stays finite
                    tr.param[torch.from_numpy(bad).to(dev)] = config.w0
                open_ = (tr.escape < 0) & (tr.diverged < 0)
                g[torch.from_numpy(~open_).to(dev)] = 0.0
                tr.param.grad = g
                alive = alive or bool(open_.any())
        if not alive or t == config.max_iters:
            if task is not None:
                task.advance(config.max_iters - t)
            break
        opt.step()
        if method == "pgd":
            with torch.no_grad():
                for tr in tracks:
                    noise = (tr.noise * torch.randn(tr.param.shape, generator=generator, dtype=torch.float64)).to(dev)
                    active = torch.from_numpy((tr.escape < 0) & (tr.diverged < 0)).to(dev)
                    tr.param[active] += noise[active]
        if task is not None:
            task.advance()
    return tracks


def _median_escape(tr: _Track, censor: int) -> float:
    """Median escape iteration over seeds; not escaped -> ``inf`` (censored at ``censor``)."""
    vals = np.where(tr.escape >= 0, tr.escape, np.inf).astype(float)
    return float(np.median(vals))


@register("init_escape", paper="002", title="Plateau escape on the neural chain: GD, perturbed GD, RMSprop (Fig. 3, 23-25)",
          config=EscapeConfig,
          presets={"quick": EscapeConfig(),
                   "full": EscapeConfig(depths=(10, 20, 30, 40, 50, 60, 70, 80, 90, 100), max_iters=1_000_000,
                                        gd_lrs=(0.003, 0.01, 0.03, 0.1), pgd_noise=(0.0003, 0.001, 0.01, 0.03))})
def run(config: EscapeConfig, store: RunStore) -> Result:
    """Iterations to escape the small-init plateau vs depth for GD, perturbed GD and RMSprop."""
    with limit_threads(1):  # many small tensors: one thread avoids oversubscription
        return _run(config, store)


def _run(config: EscapeConfig, store: RunStore) -> Result:
    gen = torch.Generator().manual_seed(config.seed)
    families = [("gd", "gd", config.gd_lrs, (0.0,), None),
                ("pgd", "pgd", (config.pgd_lr,), config.pgd_noise, None),
                ("rmsprop", "rmsprop", config.rmsprop_lrs, (0.0,), None),
                (f"rmsprop_eps{config.rmsprop_eps_check:g}", "rmsprop", config.rmsprop_lrs[:1], (0.0,),
                 config.rmsprop_eps_check)]
    tracks: list[_Track] = []
    with progress_task("plateau escape", total=config.max_iters * len(families)) as task:
        for label, method, lrs, noises, eps in families:
            tracks += simulate_escape(config, method, lrs, noises, gen, eps=eps, label=label, task=task)

    depths = list(config.depths)
    table: dict[str, dict[int, float | None]] = {}
    rows = []
    for tr in tracks:
        key = f"{tr.name}:lr={tr.lr:g}" + (f",noise={tr.noise:g}" if tr.method == "pgd" else "")
        med = _median_escape(tr, config.max_iters)
        table.setdefault(key, {})[tr.depth] = None if math.isinf(med) else med
        rows += [{"run": key, "optimizer": tr.name, "step": int(tr.depth), "metric": "escape_iteration",
                  "layer": f"seed{s}", "value": float(e) if e >= 0 else float("nan")} for s, e in enumerate(tr.escape)]
        rows += [{"run": key, "optimizer": tr.name, "step": int(tr.depth), "metric": "diverged_at",
                  "layer": f"seed{s}", "value": float(d)} for s, d in enumerate(tr.diverged) if d >= 0]
    store.append_metrics(rows)

    def best(prefix: str) -> dict[int, float]:
        out = {}
        for L in depths:
            vals = [v[L] for k, v in table.items() if k.split(":")[0] == prefix and v.get(L) is not None]
            out[L] = min(vals) if vals else math.inf
        return out

    best_gd, best_pgd, best_rms = best("gd"), best("pgd"), best("rmsprop")
    theory_gd = {L: chain_gf_escape_time(L, config.w0, config.loss_fraction, config.x, config.y) for L in depths}
    lower_gd = {L: chain_gf_escape_time_lower_bound(L, config.w0, config.loss_fraction, config.x, config.y)
                for L in depths}

    # figure
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cap = config.max_iters
    for key, vals in table.items():
        ys = [vals[L] if vals.get(L) is not None else np.nan for L in depths]
        style = {"gd": "-o", "pgd": ":s", "rmsprop": "-^"}.get(key.split(":")[0], "--x")
        ax.semilogy(depths, ys, style, ms=4, lw=1, label=key)
    for lr in config.gd_lrs[-1:]:
        ax.semilogy(depths, [theory_gd[L] / lr for L in depths], "k--", lw=1, label=f"gradient flow / lr={lr:g}")
    ax.axhline(cap, color="gray", lw=0.8, ls="--", label=f"budget {cap}")
    ax.set_ylim(1, cap * 10)
    ax.set_xlabel("depth L")
    ax.set_ylabel(f"iterations until loss <= {config.loss_fraction:g} x initial")
    ax.set_title(f"chain plateau escape, w0 = {config.w0}, median of {config.n_seeds} seeds")
    ax.legend(fontsize=6, ncol=2)
    store.save_figure(fig, "escape_iterations")

    lo, hi = min(depths), max(depths)
    claims = []
    spreads = {}
    for lr in config.rmsprop_lrs:
        v = table[f"rmsprop:lr={lr:g}"]
        vals = [v[L] for L in depths]
        spreads[lr] = math.inf if any(a is None for a in vals) else max(vals) / min(vals)
    claims.append(Claim("rmsprop_depth_independent",
                        f"RMSprop escape iterations vary by at most {config.spread_limit:g}x from depth {lo} to {hi}",
                        paper="Fig. 3: RMSprop needs a number of iterations independent of depth",
                        measured={f"lr={lr:g}": (round(s, 3) if math.isfinite(s) else "did not escape")
                                  for lr, s in spreads.items()},
                        **_v(all_of([direction_claim((s, s), null=config.spread_limit, direction="less", premises=[(
                            math.isfinite(s), (f"RMSprop (lr={lr:g}) did not escape at some depth within {cap} "
                                               "iterations"))]) for lr, s in spreads.items()],
                            [f"lr={lr:g} spread" for lr in spreads]))))
    g_lo, g_hi = best_gd[lo], best_gd[hi]
    growth = g_hi / g_lo if math.isfinite(g_lo) else math.nan
    growth_text = (f">= {cap / g_lo:.3g}x (depth {hi} did not escape within {cap} iterations)" if math.isinf(g_hi)
                   else f"{growth:.3g}x") if math.isfinite(g_lo) else f"depth {lo} did not escape within {cap}"
    claims.append(Claim("gd_exponential", f"GD escape iterations (best step size) grow by >= {config.growth_min:g}x "
                        f"from depth {lo} to {hi}",
                        paper="Prop. 7: escape time exponential in depth",
                        measured=f"depth {lo}: {g_lo:g}; depth {hi}: "
                                 f"{'> ' + str(cap) if math.isinf(g_hi) else g_hi}; growth {growth_text}",
                        **_v(_gd_growth_verdict(g_lo, g_hi, cap, config.growth_min, lo, hi))))
    ratio = {L: (best_pgd[L] / best_rms[L] if math.isfinite(best_rms[L]) else math.nan) for L in depths}
    claims.append(Claim("pgd_slower", "perturbed GD (best noise level) is >= 10x slower than RMSprop at every depth",
                        paper="Fig. 23-25: noise helps GD but it stays orders of magnitude slower than RMSprop",
                        measured={L: ("PGD did not escape" if math.isinf(best_pgd[L]) else round(r, 2))
                                  for L, r in ratio.items()},
                        **_v(all_of([direction_claim(((best_pgd[L] if math.isfinite(best_pgd[L]) else cap)
                                                      / best_rms[L],) * 2, null=10.0, direction="greater",
                                                     premises=[(math.isfinite(best_rms[L]),
                                                                f"RMSprop did not escape at depth {L}")])
                                     for L in depths], [f"depth {L} PGD/RMSprop (cap if PGD did not escape)"
                                                        for L in depths]))))
    gd_lr_small = config.gd_lrs[0]
    g_meas = table[f"gd:lr={gd_lr_small:g}"].get(lo)
    pred = theory_gd[lo] / gd_lr_small
    claims.append(Claim("gd_matches_flow", f"GD at depth {lo} (lr={gd_lr_small:g}) takes the gradient-flow time / lr "
                        "(Eq. (3) bound is a lower bound)",
                        paper="Prop. 7 / Eq. (3)",
                        measured=f"measured {g_meas}, flow/lr {pred:.4g}, Eq.(3) bound/lr {lower_gd[lo] / gd_lr_small:.4g}",
                        **_v(all_of([tolerance_claim(g_meas if g_meas is not None else float("nan"), pred,
                                                     rel_tol=0.1, premises=[(g_meas is not None,
                                                                             f"GD did not escape at depth {lo}")]),
                                     direction_claim(((g_meas or 0) - 0.9 * lower_gd[lo] / gd_lr_small,) * 2,
                                                     null=0.0, direction="greater",
                                                     premises=[(g_meas is not None,
                                                                f"GD did not escape at depth {lo}")])],
                                    ["iterations vs flow time / lr", "Eq. (3) lower bound respected"]))))
    eps_key = f"rmsprop_eps{config.rmsprop_eps_check:g}:lr={config.rmsprop_lrs[0]:g}"
    metrics = {
        "escape_iterations": {k: {int(L): v for L, v in d.items()} for k, d in table.items()},
        "best_gd": {int(L): v for L, v in best_gd.items()},
        "best_pgd": {int(L): v for L, v in best_pgd.items()},
        "best_rmsprop": {int(L): v for L, v in best_rms.items()},
        "gradient_flow_time": {int(L): v for L, v in theory_gd.items()},
        "eq3_lower_bound_time": {int(L): v for L, v in lower_gd.items()},
        "rmsprop_flow_bound_iterations": {f"lr={lr:g}": chain_rmsprop_escape_time_bound(hi, config.w0, lr,
                                                                                          config.loss_fraction)
                                          for lr in config.rmsprop_lrs},
        "rmsprop_with_standard_eps": table.get(eps_key),
        "initial_gradient_entry": {int(L): config.x * config.w0 ** (L - 1) * (config.y - config.x * config.w0 ** L)
                                   for L in depths},
        "max_iters": cap,
    }
    return Result(claims=claims, metrics=metrics)


def _v(verdict) -> dict:
    """A verdict as the ``holds``/``reason`` keyword arguments of :class:`Claim`."""
    return {"holds": verdict.holds, "reason": verdict.reason}


def _gd_growth_verdict(g_lo: float, g_hi: float, cap: int, growth_min: float, lo: int, hi: int):
    """GD's escape-iteration growth from depth ``lo`` to ``hi`` against ``growth_min``; when depth ``hi`` did not
    escape within ``cap`` iterations, ``cap / g_lo`` is a lower bound (decisive only if it already exceeds
    ``growth_min``)."""
    if not math.isfinite(g_lo):
        return check_premises([(False, f"GD did not escape at depth {lo} within {cap} iterations")])
    if math.isinf(g_hi):
        lb = cap / g_lo
        return direction_claim((lb, lb), null=growth_min, direction="greater", premises=[(
            lb >= growth_min, (f"depth {hi} did not escape within {cap} iterations and the lower bound "
                               f"{lb:.3g}x is below {growth_min:g}x: undecided"))])
    return direction_claim((g_hi / g_lo,) * 2, null=growth_min, direction="greater")

"""Neural chain at initialization: Monte Carlo vs exact theory for medians at depths 1-100 (Orvieto et al. 2022, §3, Fig. 2).

For ``f = x prod_{l=1}^L w_l`` with i.i.d. uniform (``U[-sqrt 3, sqrt 3]``) and Gaussian (``N(0, 1)``) weights, the
variance-preserving ("optimal") scales, we draw ``n_samples`` chains (one ``torch.Generator``) and compare the sample
medians of ``|f|``, ``|df/dw_1|``, ``|d2f/dw_1 dw_2|`` and ``d2l/dw_1^2 = (df/dw_1)^2`` with the exact medians of
:func:`optiscope.theory.init.chain_medians`. Chains of different depths share their first weights (depth ``L`` uses
``w_1..w_L``), so the per-depth estimates are correlated but each is an exact-in-law sample. We also show that the
population mean ``E f^2 = 1`` is an atypical event: its Monte Carlo estimate collapses at large depth (fat tails).

Negative control (its own claim): the same exact theory evaluated at the wrong depth (``L + control_depth_offset``)
is scored by the same test and must fail it (max relative error above the tolerance, and far above the right-depth
theory's), so that the "medians match" test could have failed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from optiscope.experiments.base import Claim, Result, experiment_device, register, require_device
from optiscope.lab.init_check import limit_threads
from optiscope.lab.store import RunStore
from optiscope.metrics.verdicts import all_of, direction_claim, negative_control_claim, tolerance_claim
from optiscope.theory.init import (
    chain_abs_moment,
    chain_medians,
    chain_product_median,
    chain_product_median_approx,
    moment_stabilizing_scale,
    moment_trade_off,
)
from optiscope.utils.config import Config, require
from optiscope.utils.plotting import plt
from optiscope.utils.progress import track

QUANTITIES = ("forward", "gradient", "hessian_offdiag", "hessian_diag")


@dataclass(frozen=True)
class ChainConfig(Config):
    """Configuration of ``init_chain`` (Orvieto et al. 2022, §3, Thm. 6, Fig. 2): ``n_samples`` Monte Carlo
    neural chains up to ``max_depth`` for each weight distribution in ``dists`` at the variance-preserving scale, input
    ``x`` and target ``y``; ``tolerance`` is the relative error the medians must meet."""
    seed: int = 0
    max_depth: int = 100
    n_samples: int = 1_000_000
    dists: tuple[str, ...] = ("uniform", "normal")
    x: float = 1.0
    y: float = 1.0
    tolerance: float = 0.10
    control_depth_offset: int = 1
    device: str = "cpu"   # where the chains are accumulated (weights drawn on the CPU, then moved: same draws)

    def validate(self) -> None:
        require_device(self.device)
        require(self.max_depth >= 2, "max_depth", self.max_depth, ">= 2")
        require(self.n_samples >= 2000, "n_samples", self.n_samples, ">= 2000 (the paper's Fig. 2 resolution)")
        require(len(self.dists) > 0 and all(d in ("uniform", "normal") for d in self.dists), "dists", self.dists,
                "a non-empty subset of (uniform, normal)")
        require(self.x != 0 and math.isfinite(self.x), "x", self.x, "a finite non-zero number")
        require(math.isfinite(self.y), "y", self.y, "a finite number")
        require(0 < self.tolerance < 1, "tolerance", self.tolerance, "in (0, 1)")
        # 0 feeds the right-depth theory itself as the control: its claim must then come out False
        require(abs(self.control_depth_offset) <= self.max_depth, "control_depth_offset", self.control_depth_offset,
                f"an integer depth offset with |offset| <= max_depth = {self.max_depth}")


def chain_monte_carlo(n_samples: int, max_depth: int, dist: str, scale: float, x: float, y: float,
                      generator: torch.Generator, ci_sigmas: float = 3.0,
                      device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """Monte Carlo chain statistics at every depth ``1..max_depth`` (arrays of length ``max_depth``).

    Streams over depth: weight ``w_L`` is drawn (``n_samples`` values from ``generator``) and added to the running
    ``log|prod w|`` and sign, so memory is ``O(n_samples)``. Medians are taken of the logarithms (the median commutes
    with monotone maps, so ``median|f| = exp(median log|f|)``), which stays exact where products underflow.

    Returned: ``median_<q>`` for ``q`` in ``forward`` (``|f|``), ``gradient`` (``|df/dw_1|``), ``hessian_offdiag``
    (``|d2f/dw_1 dw_2|``, NaN at depth 1), ``hessian_diag`` (``d2l/dw_1^2 = (df/dw_1)^2``), each with a
    distribution-free ``ci_sigmas`` confidence interval ``lo_<q>``/``hi_<q>`` (order statistics at
    ``1/2 -+ ci_sigmas / (2 sqrt(n))``); ``median_loss_hessian_offdiag`` (``|d2l/dw_1 dw_2|`` with the residual term)
    and ``mean_f2`` (the sample mean of ``f^2``, whose population value is ``x^2 (E w^2)^L``).
    The weights are drawn from the CPU ``generator`` and moved to ``device``, where the chains are accumulated; the
    quantiles are taken on the CPU (numpy).
    """
    def draw() -> torch.Tensor:
        if dist == "uniform":
            w = (torch.rand(n_samples, generator=generator, dtype=torch.float64) * 2 - 1) * scale
        else:
            w = torch.randn(n_samples, generator=generator, dtype=torch.float64) * scale
        return w.to(device)

    q_lo = 0.5 - ci_sigmas / (2.0 * math.sqrt(n_samples))
    q_hi = 0.5 + ci_sigmas / (2.0 * math.sqrt(n_samples))
    out = {k: np.full(max_depth, np.nan) for k in
           [f"{p}_{q}" for p in ("median", "lo", "hi") for q in QUANTITIES] + ["median_loss_hessian_offdiag", "mean_f2"]}
    lx, sx = math.log(abs(x)), math.copysign(1.0, x)
    cum_log = torch.zeros(n_samples, dtype=torch.float64, device=device)
    cum_sign = torch.ones(n_samples, dtype=torch.float64, device=device)
    first: list[torch.Tensor] = []
    for i in range(max_depth):
        w = draw()
        if i < 2:
            first.append(w)
        cum_log += torch.log(w.abs())
        cum_sign *= torch.sign(w)
        log_f = cum_log + lx
        log_g = log_f - torch.log(first[0].abs())
        logs = {"forward": log_f, "gradient": log_g, "hessian_diag": 2 * log_g}
        if i >= 1:
            log_h = log_g - torch.log(first[1].abs())
            logs["hessian_offdiag"] = log_h
            f = sx * cum_sign * torch.exp(log_f)
            g1 = f / first[0]
            g2 = f / first[1]
            h12 = f / (first[0] * first[1])
            out["median_loss_hessian_offdiag"][i] = float(torch.median((g1 * g2 + (f - y) * h12).abs()))
        for q, v in logs.items():
            qs = np.quantile(v.cpu().numpy(), [0.5, q_lo, q_hi])
            out[f"median_{q}"][i], out[f"lo_{q}"][i], out[f"hi_{q}"][i] = np.exp(qs)
        out["mean_f2"][i] = float(torch.exp(2 * log_f).mean())
    return out


@register("init_chain", paper="002", title="Neural chain: Monte Carlo medians vs exact theory (Fig. 2)",
          config=ChainConfig,
          presets={"quick": ChainConfig(), "full": ChainConfig(n_samples=10_000_000)})
def run(config: ChainConfig, store: RunStore) -> Result:
    """Monte Carlo (>= 2000 chains) vs exact medians of forward, gradient and Hessian entries at depths 1..L."""
    with limit_threads(1):  # many small tensors: one thread avoids oversubscription
        return _run(config, store)


def _run(config: ChainConfig, store: RunStore) -> Result:
    gen = torch.Generator().manual_seed(config.seed)
    depths = np.arange(1, config.max_depth + 1)
    claims: list[Claim] = []
    metrics: dict = {"n_samples": config.n_samples, "max_depth": config.max_depth}
    worst: dict[str, float] = {}
    worst_control: dict[str, float] = {}
    control_outside = control_total = 0
    arrays: dict[str, np.ndarray] = {"depths": depths}
    # Row 1: medians (theory lines, Monte Carlo markers). The gradient and the off-diagonal Hessian entry are the
    # forward median one and two depths earlier (they would lie on top of it), so only the forward and diagonal
    # curves are drawn there. Row 2: MC / theory - 1 for all four quantities, interleaved in depth so that no
    # series hides another. Last column: the MC median of f^2 and the MC mean of f^2 / E f^2.
    ncol = len(config.dists) + 1
    fig, grid = plt.subplots(2, ncol, figsize=(4.6 * ncol, 6.4), sharex=True, layout="constrained",
                             gridspec_kw={"height_ratios": [3, 2]})
    axes, res_axes = grid[0], grid[1]
    markers = dict(zip(QUANTITIES, ("o", "s", "^", "D")))
    rows = []
    for k, dist in enumerate(track(config.dists, "neural chain Monte Carlo")):
        scale = moment_stabilizing_scale(2.0, dist)  # E f^2 = x^2 at every depth
        mc = chain_monte_carlo(config.n_samples, config.max_depth, dist, scale, config.x, config.y, gen,
                               device=experiment_device(config))
        off = config.control_depth_offset
        n_max = config.max_depth + max(off, 0)
        prod_medians = [chain_product_median(n, dist, scale) for n in range(n_max + 1)]
        theory = {q: np.empty(len(depths)) for q in QUANTITIES}
        ax_ = abs(config.x)
        for i, L in enumerate(depths):
            theory["forward"][i] = ax_ * prod_medians[L]
            theory["gradient"][i] = ax_ * prod_medians[L - 1]
            theory["hessian_offdiag"][i] = ax_ * prod_medians[L - 2] if L >= 2 else np.nan
            theory["hessian_diag"][i] = (ax_ * prod_medians[L - 1]) ** 2
        # the wrong-depth control: the same formulas at depth L + offset (NaN where that depth is < 1)
        wrong = {q: np.full(len(depths), np.nan) for q in QUANTITIES}
        for i, L in enumerate(depths):
            Lw = int(L) + off
            if Lw >= 1:
                wrong["forward"][i] = ax_ * prod_medians[Lw]
                wrong["gradient"][i] = ax_ * prod_medians[Lw - 1]
                wrong["hessian_offdiag"][i] = ax_ * prod_medians[Lw - 2] if L >= 2 and Lw >= 2 else np.nan
                wrong["hessian_diag"][i] = (ax_ * prod_medians[Lw - 1]) ** 2
        ax = axes[k]
        n_in_ci = n_total = 0
        for q, color in zip(QUANTITIES, ("C0", "C1", "C2", "C3")):
            med = mc[f"median_{q}"]
            rel = np.abs(med / theory[q] - 1.0)
            worst[f"{dist}/{q}"] = float(np.nanmax(rel))
            rel_w = np.abs(med / wrong[q] - 1.0)
            worst_control[f"{dist}/{q}"] = float(np.nanmax(rel_w))
            okw = ~np.isnan(wrong[q])
            control_outside += int(((wrong[q] < mc[f"lo_{q}"]) | (wrong[q] > mc[f"hi_{q}"]))[okw].sum())
            control_total += int(okw.sum())
            ok = (theory[q] >= mc[f"lo_{q}"]) & (theory[q] <= mc[f"hi_{q}"])
            valid = ~np.isnan(theory[q])
            n_in_ci += int(ok[valid].sum())
            n_total += int(valid.sum())
            arrays[f"{dist}_{q}_mc"] = med
            arrays[f"{dist}_{q}_theory"] = theory[q]
            if q in ("forward", "hessian_diag"):
                ax.semilogy(depths, theory[q], color=color, lw=1.5, label=f"{q} (theory)")
                ax.semilogy(depths[::3], med[::3], markers[q], color=color, ms=3, mfc="none", label=f"{q} (MC)")
            j = QUANTITIES.index(q)
            res_axes[k].plot(depths[j::4], (med / theory[q] - 1.0)[j::4], markers[q], color=color, ms=3,
                             mfc="none", label=q)
            for L in (1, 10, 50, 100):
                if L <= config.max_depth and not np.isnan(theory[q][L - 1]):
                    rows.append({"dist": dist, "quantity": q, "depth": L, "mc": float(med[L - 1]),
                                 "theory": float(theory[q][L - 1])})
        metrics[f"{dist}_theory_inside_3sigma_ci"] = f"{n_in_ci}/{n_total}"
        cm = chain_medians(int(depths[-1]), dist, scale, config.x)
        metrics[f"{dist}_theory_at_max_depth"] = {"forward": cm.forward, "gradient": cm.gradient,
                                                  "hessian_offdiag": cm.hessian_offdiag,
                                                  "hessian_diag": cm.hessian_diag}
        approx = np.array([chain_product_median_approx(int(L), dist, scale) for L in depths])
        metrics[f"{dist}_approx_max_rel_error"] = float(np.max(np.abs(approx / np.array(prod_medians[1:config.max_depth + 1]) - 1)))
        loss_offdiag = mc["median_loss_hessian_offdiag"]
        metrics[f"{dist}_loss_hessian_offdiag_over_y_f_offdiag_at_max_depth"] = float(
            loss_offdiag[-1] / (abs(config.y) * theory["hessian_offdiag"][-1]))
        # E f^2 = 1 exactly, but its Monte Carlo estimate collapses at large depth (fat tails; Orvieto et al. 2022, §3, Prop. 3)
        mean_f2 = mc["mean_f2"]
        arrays[f"{dist}_mean_f2_mc"] = mean_f2
        metrics[f"{dist}_mc_mean_f2"] = {int(L): float(mean_f2[L - 1]) for L in (1, 10, 30, 100) if L <= config.max_depth}
        metrics[f"{dist}_median_forward_at_max_depth"] = float(theory["forward"][-1])
        style = "-" if k == 0 else "--"
        axes[-1].semilogy(depths, mc["median_forward"] ** 2, style, color=f"C{k + 4}",
                          label=f"{dist}: MC median of $f^2$")
        res_axes[-1].semilogy(depths, mean_f2 / config.x ** 2, style, color=f"C{k + 4}", label=dist)
        ax.set_title(f"{dist} init (scale {scale:.3g})", fontsize=10)
        ax.set_ylabel("median (output units, log scale)")
        ax.legend(fontsize=7)
        res_axes[k].axhspan(-config.tolerance, config.tolerance, color="0.92", zorder=0,
                            label=f"$\\pm${config.tolerance:.0%} tolerance")
        res_axes[k].axhline(0.0, color="k", lw=0.8)
        res_axes[k].set_ylabel("MC / theory $-$ 1")
        res_axes[k].set_xlabel("depth $L$ (layers)")
        res_axes[k].legend(fontsize=6, ncols=2)
    axes[-1].axhline(config.x ** 2, color="k", lw=1, label="$E f^2$ (theory, every depth)")
    axes[-1].set_ylabel("$f^2$ (output units$^2$, log scale)")
    axes[-1].set_title("the mean is atypical: the median of $f^2$ falls", fontsize=10)
    axes[-1].legend(fontsize=7)
    res_axes[-1].axhline(1.0, color="k", lw=1)
    res_axes[-1].set_ylabel("MC mean of $f^2$ / $E f^2$")
    res_axes[-1].set_xlabel("depth $L$ (layers)")
    res_axes[-1].legend(fontsize=7)
    fig.suptitle(f"neural chain at init: medians vs exact theory, {config.n_samples} Monte Carlo chains",
                 fontsize=11)
    store.save_figure(fig, "chain_medians")
    store.write_arrays("chain", **arrays)
    metrics["max_rel_error"] = worst
    metrics["table"] = rows

    max_err = max(worst.values())
    max_ctl = max(worst_control.values())
    metrics["control_max_rel_error"] = worst_control
    metrics["control_outside_3sigma_ci"] = f"{control_outside}/{control_total}"
    v = tolerance_claim(max_err, 0.0, abs_tol=config.tolerance)
    claims.append(Claim("medians", "chain medians of forward, gradient and Hessian entries match Thm. 6 at every "
                        f"depth 1..{config.max_depth} (within {config.tolerance:.0%})",
                        paper="Fig. 2: theory 'very precise'", measured=f"max relative error {max_err:.3g}",
                        holds=v.holds, reason=v.reason))
    v = all_of([negative_control_claim(config.tolerance, max_ctl, margin=1.0),
                negative_control_claim(max_err, max_ctl, margin=3.0)], ["fails the tolerance", "worse than theory"])
    claims.append(Claim(
        "control_wrong_depth", f"negative control: the exact theory at the wrong depth (L{off:+d}) fails the same "
        f"test (max relative error > {config.tolerance:.0%}) and is >= 3x further from the Monte Carlo medians",
        paper="a wrong-depth prediction must do worse (control)",
        measured=f"max relative error {max_ctl:.3g} (right depth {max_err:.3g}); outside the 3-sigma CI at "
                 f"{control_outside}/{control_total} (depth, quantity) points", holds=v.holds, reason=v.reason))
    dist0 = config.dists[0]
    med_last = metrics[f"{dist0}_median_forward_at_max_depth"]
    claims.append(Claim("vanish", "at the variance-preserving init (E f^2 = 1) the median |f| vanishes in depth",
                        paper="all quantities vanish under the 'optimal' init",
                        measured=f"median |f| at depth {config.max_depth} ({dist0}) = {med_last:.3g}",
                        **_v(direction_claim((med_last, med_last), null=1e-3 * abs(config.x), direction="less",
                                             estimate=med_last))))
    up, down = moment_trade_off(2.0, 4.0, "uniform"), moment_trade_off(2.0, 1.0, "uniform")
    claims.append(Claim("trade_off", "stabilizing E f^2 makes E f^4 explode and E|f| vanish (no two moments at once)",
                        paper="Prop. 3: E|f| = (sqrt3/2)^L, E f^4 = (9/5)^L",
                        measured=f"per-layer factors E|f|: {down:.4f}, E f^4: {up:.4f}; "
                                 f"E|f| at L=10: {chain_abs_moment(1.0, 10):.3g}",
                        **_v(all_of([direction_claim((up, up), null=1.0, direction="greater"),
                                     direction_claim((down, down), null=1.0, direction="less")],
                                    ["E f^4 per-layer factor (exact)", "E|f| per-layer factor (exact)"]))))
    mean_last = float(arrays[f"{dist0}_mean_f2_mc"][-1])
    claims.append(Claim("mean_atypical", "the Monte Carlo mean of f^2 misses E f^2 = 1 at large depth (fat tails)",
                        paper="mean becomes an increasingly atypical event (Thm. 6, Fig. 21)",
                        measured=f"MC mean f^2 at depth {config.max_depth} = {mean_last:.3g} vs 1",
                        **_v(direction_claim((abs(mean_last - config.x ** 2),) * 2, null=0.5 * config.x ** 2,
                                             direction="greater"))))
    return Result(claims=claims, metrics=metrics)


def _v(verdict) -> dict:
    """A verdict as the ``holds``/``reason`` keyword arguments of :class:`Claim`."""
    return {"holds": verdict.holds, "reason": verdict.reason}

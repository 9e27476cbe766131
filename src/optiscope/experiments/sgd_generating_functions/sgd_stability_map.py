"""Velikanov et al. 2023, Fig. 2 and Figs. 12-14: where does mini-batch SGD with momentum diverge?

Theory (SE, tau1 = tau2 = 1): converges iff ``alpha lambda_max < 2 (1 + beta)`` and ``U~(1) < 1`` (Prop. 3);
Prop. 4's simple cap ``alpha_eff < 2 / (gamma lambda_crit)``. Simulation: sampled output-space SGD on the digits
NTK; a configuration is called divergent when its mean loss (over seeds) has blown up (any run exceeded
``1e12 L_0`` or went non-finite) or when it grows: mean over the last 10% of steps above the mean over the 10%
around the middle and above ``L_0``. The critical lr per momentum is found by a vectorised bracket search on
the simulation (several lrs x seeds per round) and compared with the predicted root of ``U~(1) = 1``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from optiscope.experiments.base import Claim, Result, experiment_device, register, require_device
from optiscope.experiments.sgd_generating_functions.common import ntk_problem
from optiscope.lab.store import RunStore
from optiscope.metrics.verdicts import fraction_claim, tolerance_claim
from optiscope.theory.sgd import (
    Spectrum,
    critical_learning_rate,
    effective_lr_bound,
    noise_amplitude,
    stability_map,
)
from optiscope.theory.sgd_sim import simulate_sampled_sgd
from optiscope.utils.config import Config, require
from optiscope.utils.plotting import plt
from optiscope.utils.progress import progress_task


@dataclass(frozen=True)
class StabilityMapConfig(Config):
    """Configuration of ``sgd_stability_map`` (Velikanov et al. 2023, Fig. 2, 12-14): the NTK problem of
    ``dataset`` (``n_points``, ``width``) at ``batch_size``; the critical lr per ``critical_momenta`` located from
    simulated runs (``critical_*``: steps, seeds, learning rates per round, rounds of refinement); a simulated
    (lr, momentum) map on ``map_points`` points (``map_*``) against the theory grid (``theory_*``);
    ``target_rel_error`` the claim tolerance."""
    seed: int = 0
    dataset: str = "digits"
    n_points: int = 0                      # 0 = whole training split
    width: int = 1000
    batch_size: int = 10
    critical_momenta: tuple[float, ...] = (0.0, 0.5, 0.9, 0.99)
    critical_steps: int = 3000
    critical_seeds: int = 8
    critical_lrs_per_round: int = 8
    critical_rounds: int = 3
    map_points: int = 300                  # subset of the problem for the simulated map (cost ~ runs x N)
    map_lrs: int = 20
    map_momenta: int = 10
    map_steps: int = 1000
    map_seeds: int = 2
    theory_lrs: int = 100
    theory_momenta: int = 50
    target_rel_error: float = 0.05
    # where the NTK is computed; the simulated runs and the theory grid (theory.sgd_sim, theory.sgd) run on the CPU
    device: str = "cpu"

    def validate(self) -> None:
        require_device(self.device)
        require(self.dataset in ("digits", "fashion_mnist"), "dataset", self.dataset, "digits or fashion_mnist")
        require(self.n_points >= 0, "n_points", self.n_points, ">= 0")
        require(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        require(all(-1 < m < 1 for m in self.critical_momenta), "critical_momenta", self.critical_momenta,
                "values in (-1, 1)")
        for f in ("critical_steps", "critical_seeds", "critical_rounds", "map_lrs", "map_momenta", "map_steps",
                  "map_seeds", "theory_lrs", "theory_momenta"):
            require(getattr(self, f) >= 1, f, getattr(self, f), ">= 1")
        require(self.critical_lrs_per_round >= 2, "critical_lrs_per_round", self.critical_lrs_per_round, ">= 2")
        require(self.map_points >= 0, "map_points", self.map_points, ">= 0 (0 = same as the problem)")


QUICK = StabilityMapConfig(critical_steps=1000, critical_seeds=4, critical_lrs_per_round=6, critical_rounds=2,
                           map_points=150, map_lrs=12, map_momenta=6, map_steps=400, map_seeds=2)
# medium: the critical-lr search long enough to resolve slow divergence near the boundary at beta = 0.9, 0.99
# (the quick search's 1000 steps x 4 seeds misses there by 6-8%)
MEDIUM = StabilityMapConfig(critical_steps=5000, critical_seeds=8, critical_lrs_per_round=8, critical_rounds=3,
                            map_points=150, map_lrs=12, map_momenta=6, map_steps=1000, map_seeds=2)
FULL = StabilityMapConfig(critical_steps=10_000, critical_seeds=16, critical_rounds=3, map_points=1000,
                          map_lrs=100, map_momenta=50, map_steps=10_000, map_seeds=4)


def diverged_mask(loss: np.ndarray, diverged_at: np.ndarray, n_cfg: int, n_seeds: int) -> np.ndarray:
    """Per configuration (runs are ordered config-major, seeds inner): blow-up of any seed, or growth of the seed
    mean (last 10% of steps above the 10% around the middle, and above the initial loss)."""
    blown = (diverged_at.reshape(n_cfg, n_seeds) >= 0).any(axis=1)
    L = np.where(np.isfinite(loss), loss, np.nan).reshape(n_cfg, n_seeds, -1)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return blown | _growing(L)


def _growing(L: np.ndarray) -> np.ndarray:
    mean = np.nanmean(L, axis=1)
    T = mean.shape[1]
    w = max(1, T // 10)
    late = np.nanmean(mean[:, -w:], axis=1)
    mid = np.nanmean(mean[:, T // 2 - w // 2: T // 2 - w // 2 + w], axis=1)
    return (late > mid) & (late > mean[:, 0])


def simulated_critical_lr(kernel, e0, momentum: float, batch_size: int, lo: float, hi: float, steps: int,
                          seeds: int, per_round: int, rounds: int, seed: int) -> tuple[float, float]:
    """Bracket search: each round simulates ``per_round`` lrs evenly spaced in [lo, hi] with ``seeds`` runs each
    and shrinks the bracket to the interval between the largest convergent and the smallest divergent lr.
    Returns (estimate = bracket midpoint, half-width)."""
    for r in range(rounds):
        lrs = np.linspace(lo, hi, per_round)
        runs = simulate_sampled_sgd(kernel, e0, np.repeat(lrs, seeds), momentum, batch_size, steps,
                                    n_runs=lrs.size * seeds, seed=seed + 17 * r,
                                    record_every=max(1, steps // 200))
        div = diverged_mask(runs.loss, runs.diverged_at, lrs.size, seeds)
        if div.all():
            hi, lo = lrs[0], max(lo - (hi - lo), lo / 4)
            continue
        if not div.any():
            lo, hi = lrs[-1], hi + (hi - lo)
            continue
        first_div = int(np.argmax(div))
        conv_below = np.nonzero(~div[:first_div])[0]
        lo_new = lrs[conv_below[-1]] if conv_below.size else lrs[0] - (lrs[1] - lrs[0])
        lo, hi = lo_new, lrs[first_div]
    return 0.5 * (lo + hi), 0.5 * (hi - lo)


@register("sgd_stability_map", paper="004", title="Stability of SGD+momentum over (lr, momentum): theory vs simulation",
          config=StabilityMapConfig, presets={"quick": QUICK, "medium": MEDIUM, "full": FULL})
def run(config: StabilityMapConfig, store: RunStore) -> Result:
    """Velikanov et al. 2023, Fig. 2, 12-14: U(1) = 1 boundary and Prop. 4 cap vs divergence of simulated runs."""
    prob = ntk_problem(config.dataset, n_points=config.n_points or None, width=config.width, seed=config.seed,
                       device=experiment_device(config))
    spec, n, b = prob.spectrum, prob.n, config.batch_size
    if b > n:
        raise ValueError(f"batch_size {b} is larger than the problem (N={n})")
    claims: list[Claim] = []
    metrics: dict = {"n": n, "batch_size": b, "gamma": noise_amplitude(b, n),
                     "prop4_alpha_eff_bound": effective_lr_bound(spec, b, n)}
    # -- critical lr: predicted vs simulated -------------------------------------------------------------
    rows = []
    with progress_task("critical lr", len(config.critical_momenta)) as task:
        for i, m in enumerate(config.critical_momenta):
            pred = critical_learning_rate(spec, m, b, n)
            est, half = simulated_critical_lr(prob.kernel, prob.initial_error, m, b, 0.8 * pred, 1.2 * pred,
                                              config.critical_steps, config.critical_seeds,
                                              config.critical_lrs_per_round, config.critical_rounds,
                                              config.seed + 101 * i)
            rel = abs(est - pred) / pred
            rows.append({"momentum": m, "predicted": pred, "simulated": est, "bracket_half_width": half,
                         "rel_error": rel, "noiseless_bound": 2 * (1 + m) / spec.lambda_max,
                         "prop4_bound": metrics["prop4_alpha_eff_bound"] * (1 - m)})
            # the simulated threshold's bracket is its interval; it must overlap the prediction +- tolerance
            v = tolerance_claim(est, pred, rel_tol=config.target_rel_error, ci=(est - half, est + half))
            claims.append(Claim(
                f"critical_lr_beta_{m:g}",
                f"predicted critical lr (U(1)=1 or noiseless bound) matches simulated divergence at momentum {m:g}, "
                f"b={b}, {config.dataset} NTK",
                paper=f"agreement (issue target within {config.target_rel_error:.0%})",
                measured=f"predicted {pred:.4g}, simulated {est:.4g} +- {half:.2g} ({rel:.1%})",
                holds=v.holds, reason=v.reason))
            task.advance()
    metrics["critical_lr"] = rows
    # -- theory map on the full problem ----------------------------------------------------------------------
    lr_max = 2 * (1 + 0.99) / spec.lambda_max * 1.05
    th_lrs = np.linspace(lr_max / config.theory_lrs, lr_max, config.theory_lrs)
    th_moms = np.linspace(-0.98, 0.99, config.theory_momenta)
    tm = stability_map(spec, th_lrs, th_moms, b, n)
    store.write_arrays("theory_map", lrs=th_lrs, momenta=th_moms, noise_at_one=tm["noise_at_one"],
                       converges=tm["converges"], critical_lr=tm["critical_lr"])
    # -- simulated map on a subset -----------------------------------------------------------------------------
    if config.map_points and config.map_points < n:
        pick = np.sort(np.random.default_rng(config.seed).choice(n, config.map_points, replace=False))
    else:
        pick = np.arange(n)
    sub_K = prob.kernel[np.ix_(pick, pick)]
    sub_e0 = prob.initial_error[pick]
    sub_spec = Spectrum.from_kernel(sub_K, -sub_e0)
    sub_n = pick.size
    bs = min(b, sub_n)
    sm_lrs = np.linspace(lr_max / config.map_lrs, lr_max, config.map_lrs)
    sm_moms = np.linspace(-0.9, 0.99, config.map_momenta)
    Lg, Bg = np.meshgrid(sm_lrs, sm_moms)
    S = config.map_seeds
    runs = simulate_sampled_sgd(sub_K, sub_e0, np.repeat(Lg.ravel(), S), np.repeat(Bg.ravel(), S), bs,
                                config.map_steps, n_runs=Lg.size * S, seed=config.seed + 5,
                                record_every=max(1, config.map_steps // 100))
    sim_div = diverged_mask(runs.loss, runs.diverged_at, Lg.size, S).reshape(Lg.shape)
    th_sub = stability_map(sub_spec, sm_lrs, sm_moms, bs, sub_n)
    agree = float(np.mean(sim_div == ~th_sub["converges"]))
    metrics["map"] = {"points": sub_n, "grid": [int(config.map_momenta), int(config.map_lrs)],
                      "steps": config.map_steps, "seeds": S, "agreement": agree}
    store.write_arrays("simulated_map", lrs=sm_lrs, momenta=sm_moms, diverged=sim_div,
                       theory_converges=th_sub["converges"])
    n_cells = int(sim_div.size)
    v = fraction_claim(int(round(agree * n_cells)), n_cells, threshold=0.9)
    claims.append(Claim("map_agreement",
                        f"theory (SE, tau=1) classifies convergence/divergence of simulated runs over a "
                        f"{config.map_momenta}x{config.map_lrs} (momentum, lr) grid (N={sub_n}, b={bs})",
                        paper="agree very well (Fig. 2; read as: more than 90% of cells)",
                        measured=f"{agree:.1%} of cells agree", holds=v.holds, reason=v.reason))
    # -- figure ----------------------------------------------------------------------------------------------
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    ax.contourf(th_lrs, th_moms, tm["converges"].astype(float), levels=[-0.5, 0.5, 1.5], colors=["#f4c7c3", "#c9e7c9"])
    ax.plot(tm["critical_lr"], th_moms, "k-", label="U(1)=1 / noiseless (theory)")
    ax.plot(2 * (1 + th_moms) / spec.lambda_max, th_moms, "b--", lw=1, label="noiseless 2(1+beta)/lambda_max")
    ax.plot(metrics["prop4_alpha_eff_bound"] * (1 - th_moms), th_moms, "m:", label="Prop. 4 cap")
    ax.plot([r["simulated"] for r in rows], [r["momentum"] for r in rows], "ro", label="simulated critical lr")
    ax.set_xlim(0, lr_max)
    ax.set_xlabel("lr (units of 1/lambda_max)")
    ax.set_ylabel("momentum")
    ax.set_title(f"{config.dataset} NTK N={n}, b={b}")
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[1]
    ax.imshow(sim_div, origin="lower", aspect="auto", cmap="Reds", alpha=0.6,
              extent=[sm_lrs[0], sm_lrs[-1], sm_moms[0], sm_moms[-1]])
    ax.plot(th_sub["critical_lr"], sm_moms, "k-", label="theory boundary")
    ax.set_xlabel("lr")
    ax.set_ylabel("momentum")
    ax.set_title(f"simulated divergence (red), N={sub_n}, {config.map_steps} steps")
    ax.legend(fontsize=7)
    store.save_figure(fig, "stability_map")
    return Result(claims=claims, metrics=metrics)

"""MLPs at initialization: gradient and Hessian-block norms vs depth, narrow vs wide, LeCun vs Xavier/He
(Orvieto et al. 2022, §4, Thm. 9-10, Fig. 1, 4, 12, 13, 15).

Three measurements with :func:`optiscope.lab.init_check.init_check` (bias-free MLPs, teacher data of Orvieto et al. 2022, App.
A.1: ``x ~ N(0, I_m)``, targets from a random one-hidden-layer ReLU net, square loss, float64):

1. **Vanishing depth at width 32** (gradient only, many seeds): for every init scheme (LeCun / Xavier / He x
   uniform / normal on ReLU MLPs, and Xavier-uniform / PyTorch-default on linear MLPs) the depth at which the median
   gradient norm falls below ``threshold`` (1e-3) times its depth-2 value, with the Thm. 10 expectation-level
   prediction ``2 + 2 ln(1/threshold) / ln(1/gain)`` (``gain = c m sigma^2``; infinite for critical inits) and the
   log-normal median heuristic for critical inits.
2. **Narrow nets, dense Hessians** (Fig. 1, 4, 13, 15, 12): gradient, diagonal- and off-diagonal-block Frobenius
   norms, extreme eigenvalues and trace vs depth at a small fixed width, for critical (He/ReLU, Xavier/linear) and
   sub-critical (LeCun/ReLU, PyTorch-default/linear) inits. Thm. 10: with a sub-critical gain the diagonal blocks
   vanish twice as fast (in log) as the off-diagonal ones; eigenvalues of both signs at init (Fig. 12).
3. **Width growing with depth** (Fig. 1 bottom): He/ReLU with ``width = width_per_depth * depth`` keeps the median
   gradient norm from vanishing, unlike the fixed narrow width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from optiscope.curvature import Hessian
from optiscope.experiments.base import Claim, Result, experiment_device, register, require_device
from optiscope.lab.init_check import (
    InitCheckConfig,
    InitCheckResult,
    half_mse,
    init_check,
    limit_threads,
    model_factory,
    teacher_batch,
)
from optiscope.lab.store import RunStore
from optiscope.metrics.verdicts import all_of, direction_claim, tolerance_claim
from optiscope.theory.init import layer_gain, lognormal_median, normalized_second_moment_growth
from optiscope.utils.config import Config, require
from optiscope.utils.plotting import plt
from optiscope.zoo.init import init_variance, parse_init

RELU_INITS = ("lecun_uniform", "lecun_normal", "xavier_uniform", "xavier_normal", "he_uniform", "he_normal")
LINEAR_INITS = ("xavier_uniform", "torch")
NARROW_CONFIGS = (("relu", "he_uniform"), ("linear", "xavier_uniform"), ("relu", "lecun_uniform"), ("linear", "torch"))


@dataclass(frozen=True)
class MLPInitConfig(Config):
    """Configuration of the MLP-at-init experiment (Orvieto et al. 2022, Thm. 9-10, Fig. 1, 4, 12, 13)."""

    seed: int = 0
    width: int = 32
    grad_depths: tuple[int, ...] = (2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
    grad_seeds: int = 20
    threshold: float = 1e-3
    narrow_width: int = 6
    narrow_depths: tuple[int, ...] = (2, 4, 6, 8, 12, 16)
    narrow_seeds: int = 6
    wide_depths: tuple[int, ...] = (2, 4, 8, 16)
    width_per_depth: int = 2
    wide_seeds: int = 6
    n_samples: int = 32
    n_probes: int = 4
    exact_max_dim: int = 1500
    device: str = "cpu"   # models (seeded on the CPU, then moved), teacher batches and Hessians

    def validate(self) -> None:
        require_device(self.device)
        require(self.width >= 2, "width", self.width, ">= 2")
        require(2 in self.grad_depths and len(self.grad_depths) >= 3, "grad_depths", self.grad_depths,
                "at least 3 depths including 2 (the reference depth)")
        require(0 < self.threshold < 1, "threshold", self.threshold, "in (0, 1)")
        require(self.narrow_width >= 1, "narrow_width", self.narrow_width, ">= 1")
        require(len(self.narrow_depths) >= 3 and min(self.narrow_depths) >= 2, "narrow_depths", self.narrow_depths,
                ">= 3 depths, each >= 2")
        require(len(self.wide_depths) >= 2 and min(self.wide_depths) >= 2, "wide_depths", self.wide_depths,
                ">= 2 depths, each >= 2")
        for f in ("grad_seeds", "narrow_seeds", "wide_seeds", "width_per_depth", "n_samples"):
            require(getattr(self, f) >= 1, f, getattr(self, f), ">= 1")
        require(self.n_probes >= 2, "n_probes", self.n_probes, ">= 2")


def predicted_vanishing_depth(scheme: str, activation: str, width: int, threshold: float,
                              reference_depth: int = 2) -> dict[str, float | None]:
    """Orvieto et al. 2022, Thm. 10 / Eq. (6) predictions for the depth where the median gradient norm falls to ``threshold``.

    Expectation level: ``||grad||^2 ~ gain^{L-1}`` so ``L = L_ref + 2 ln(1/threshold) / ln(1/gain)`` (``None`` for
    ``gain >= 1``). Log-normal median heuristic for the forward norm at critical gain: the median of
    ``||x_L||^2`` shrinks like ``(1 + c/m)^{-L/2}`` (``c = 2`` linear, ``5`` ReLU), i.e. the norm like
    ``(1 + c/m)^{-L/4}``, giving ``L = L_ref + 4 ln(1/threshold) / ln(1 + c/m)`` (a heuristic for the gradient, which
    multiplies a forward and a backward product).
    """
    gain = layer_gain(init_variance(scheme, width, width), width, activation)
    expect = None if gain >= 1 else reference_depth + 2 * math.log(1 / threshold) / math.log(1 / gain)
    c = 2.0 if activation == "linear" else 5.0
    med_per_layer = lognormal_median(1.0, normalized_second_moment_growth(width, 1, activation))  # (1+c/m)^{-1/2}
    median = reference_depth + 4 * math.log(1 / threshold) / -math.log(med_per_layer) / 2
    return {"gain": gain, "expectation": expect,
            "lognormal_median_heuristic": median if gain >= 1 else expect, "c_over_m": c / width}


def _factory(activation: str, init: str, device: torch.device | str = "cpu"):
    """Bias-free MLP factory for :func:`init_check`, initialised on the CPU (seeded) and moved to ``device``."""
    return on_device(model_factory(f"mlp:activation={activation},bias=false", init=init), device)


def on_device(factory, device: torch.device | str):
    """``factory(depth, width, seed)`` whose model (built and seeded on the CPU) is moved to ``device``."""
    return lambda depth, width, seed: factory(depth, width, seed).to(device)


def teacher_on(device: torch.device, n_samples: int, dtype: torch.dtype = torch.float64):
    """The data argument of :func:`init_check` on ``device``: ``None`` on the CPU (its own teacher batch), elsewhere
    the same teacher batch (:func:`teacher_batch`, seed ``10_000 + seed``, built on the CPU) moved to ``device``."""
    if device.type == "cpu":
        return None
    return lambda width, seed: tuple(t.to(device) for t in teacher_batch(n_samples, width, seed=10_000 + seed,
                                                                          dtype=dtype))


def _slope(depths: np.ndarray, values: np.ndarray) -> float:
    """Least-squares slope of ``log10 |values|`` vs depth."""
    v = np.abs(values)
    keep = v > 0
    return float(np.polyfit(depths[keep], np.log10(v[keep]), 1)[0])


@register("init_mlp", paper="002", title="MLPs at init: vanishing gradients/curvature vs depth and width (Fig. 1, 4, 12, 13, 15)",
          config=MLPInitConfig,
          presets={"quick": MLPInitConfig(),
                   "full": MLPInitConfig(grad_depths=(2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256), grad_seeds=50,
                                         narrow_width=8, narrow_depths=(2, 4, 8, 12, 16, 24, 32), narrow_seeds=20,
                                         wide_depths=(2, 4, 8, 16, 32), wide_seeds=10, n_samples=128,
                                         exact_max_dim=4000)})
def run(config: MLPInitConfig, store: RunStore) -> Result:
    """Vanishing depth per init at width 32; dense-Hessian block norms and eigenvalues of narrow nets; wide nets."""
    with limit_threads(1):  # many small tensors: one thread avoids oversubscription
        return _run(config, store)


def _run(config: MLPInitConfig, store: RunStore) -> Result:
    dev = experiment_device(config)
    data = teacher_on(dev, config.n_samples)
    metrics: dict = {}
    claims: list[Claim] = []
    frames = []

    # 1. gradient-only sweep at width 32 ---------------------------------------------------------------------------
    grad_cfg = InitCheckConfig(seed=config.seed, depths=config.grad_depths, widths=(config.width,),
                               n_seeds=config.grad_seeds, n_samples=config.n_samples, hessian="none")
    vdepth: dict[str, dict] = {}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for activation, inits in (("relu", RELU_INITS), ("linear", LINEAR_INITS)):
        for init in inits:
            key = f"{activation}/{init}"
            res = init_check(_factory(activation, init, dev), grad_cfg, data=data, label=key,
                             description=f"grad sweep {key}")
            frames.append(res.to_metrics(f"grad/{key}"))
            med = res.medians("grad_norm", config.width)
            measured = res.vanishing_depth("grad_norm", config.width, config.threshold, reference_depth=2)
            van = res.vanishing("grad_norm").iloc[0]
            ref = float(med.loc[2])
            # log-linear extrapolation from the fit when the threshold is not reached within the measured depths
            extrap = None
            if measured is None and van["log10_slope_per_layer"] < 0:
                extrap = 2 + math.log10(config.threshold) / van["log10_slope_per_layer"]
            scheme, _ = parse_init(init)
            pred = predicted_vanishing_depth(scheme, activation, config.width, config.threshold)
            vdepth[key] = {"measured_depth": measured, "extrapolated_depth": extrap,
                           "predicted_expectation": pred["expectation"],
                           "predicted_median_heuristic": pred["lognormal_median_heuristic"], "gain": pred["gain"],
                           "log10_slope_per_layer": float(van["log10_slope_per_layer"]),
                           "p_value": float(van["p_value"]), "median_at_depth2": ref,
                           f"median_at_depth{max(config.grad_depths)}": float(med.iloc[-1]),
                           "vanishing_flag": bool(van["vanishing"])}
            ax = axes[0] if activation == "relu" else axes[1]
            ax.semilogy(med.index, med.values / ref, "-o", ms=3, label=init)
    for ax, act in zip(axes[:2], ("ReLU", "linear")):
        ax.axhline(config.threshold, color="k", lw=0.8, ls="--")
        ax.set_title(f"{act} MLP, width {config.width}: median ||grad|| / depth-2 value")
        ax.set_xlabel("depth")
        ax.legend(fontsize=7)
    metrics["vanishing_depth_width32"] = vdepth

    # 2. narrow nets: dense Hessians -------------------------------------------------------------------------------
    narrow_cfg = InitCheckConfig(seed=config.seed, depths=config.narrow_depths, widths=(config.narrow_width,),
                                 n_seeds=config.narrow_seeds, n_samples=config.n_samples, hessian="full",
                                 n_probes=config.n_probes, exact_max_dim=config.exact_max_dim)
    narrow: dict[str, InitCheckResult] = {}
    fig2, axes2 = plt.subplots(1, len(NARROW_CONFIGS), figsize=(4.5 * len(NARROW_CONFIGS), 4), squeeze=False)
    slopes = {}
    mixed = {}
    for j, (activation, init) in enumerate(NARROW_CONFIGS):
        key = f"{activation}/{init}"
        res = init_check(_factory(activation, init, dev), narrow_cfg, data=data, label=key,
                         description=f"narrow {key}")
        narrow[key] = res
        frames.append(res.to_metrics(f"narrow/{key}"))
        d = np.array(config.narrow_depths, dtype=float)
        meds = {q: res.medians(q, config.narrow_width).to_numpy() for q in
                ("grad_norm", "hess_diag_norm", "hess_offdiag_norm", "eig_max", "eig_min", "trace")}
        slopes[key] = {q: _slope(d, meds[q]) for q in ("grad_norm", "hess_diag_norm", "hess_offdiag_norm")}
        rec = res.records[res.records["layer"] == ""].pivot_table(index=["depth", "seed"], columns="quantity",
                                                                   values="value")
        both = (rec["eig_min"] < 0) & (rec["eig_max"] > 0)
        mixed[key] = float(both.mean())
        slopes[key]["trace_over_eig_max_at_max_depth"] = float(meds["trace"][-1] / meds["eig_max"][-1])
        slopes[key]["eig_min_over_eig_max_at_max_depth"] = float(meds["eig_min"][-1] / meds["eig_max"][-1])
        ax = axes2[0][j]
        for q in ("grad_norm", "hess_diag_norm", "hess_offdiag_norm", "eig_max"):
            ax.semilogy(d, np.abs(meds[q]), "-o", ms=3, label=q)
        ax.semilogy(d, np.abs(meds["eig_min"]), "--", label="|eig_min|")
        ax.set_title(f"{key}, width {config.narrow_width} (medians)")
        ax.set_xlabel("depth")
        ax.legend(fontsize=6)
    store.save_figure(fig2, "narrow_hessian_blocks")
    metrics["narrow_log10_slopes"] = slopes
    metrics["narrow_fraction_mixed_sign_eigenvalues"] = mixed

    # Fig. 12: one dense spectrum at the deepest narrow depth (He/ReLU and LeCun/ReLU)
    fig3, ax3 = plt.subplots(figsize=(6, 4))
    dmax = max(config.narrow_depths)
    for activation, init in (("relu", "he_uniform"), ("relu", "lecun_uniform")):
        model = _factory(activation, init, dev)(dmax, config.narrow_width, config.seed).double()
        batch = tuple(t.to(dev) for t in teacher_batch(config.n_samples, config.narrow_width,
                                                       seed=10_000 + config.seed))
        H = Hessian(model, half_mse, batch)
        if H.numel <= config.exact_max_dim:
            ev = torch.linalg.eigvalsh(H.dense(max_dim=config.exact_max_dim).double()).cpu().numpy()
            ax3.plot(np.sort(ev), ".", ms=2, label=f"{init} (depth {dmax})")
            metrics[f"spectrum_{activation}_{init}_depth{dmax}"] = {
                "min": float(ev[0]), "max": float(ev[-1]), "n_negative": int((ev < -1e-12 * abs(ev).max()).sum()),
                "n_positive": int((ev > 1e-12 * abs(ev).max()).sum()), "n": int(ev.size)}
    ax3.set_yscale("symlog", linthresh=1e-8)
    ax3.set_title("Hessian eigenvalues at init (sorted), narrow ReLU MLP")
    ax3.legend(fontsize=7)
    store.save_figure(fig3, "eigenvalues_at_init")

    # 3. width growing with depth ----------------------------------------------------------------------------------
    wide_rows = []
    for depth in config.wide_depths:
        w = config.width_per_depth * depth
        cfg = InitCheckConfig(seed=config.seed, depths=(depth,), widths=(w,), n_seeds=config.wide_seeds,
                              n_samples=config.n_samples, hessian="blocks", n_probes=config.n_probes,
                              exact_max_dim=config.exact_max_dim)
        res = init_check(_factory("relu", "he_uniform", dev), cfg, data=data, label="wide",
                         description=f"wide depth {depth}")
        frames.append(res.to_metrics("wide/relu/he_uniform"))
        s = res.summary(["grad_norm", "hess_diag_norm", "hess_offdiag_norm"])
        wide_rows += [{"depth": depth, "width": w, "quantity": r.quantity, "median": r.median} for r in s.itertuples()]
    wide = pd.DataFrame(wide_rows)
    he = narrow["relu/he_uniform"]
    for q, ls in (("grad_norm", "-o"), ("hess_offdiag_norm", "-s")):
        ww = wide[wide["quantity"] == q].sort_values("depth")
        axes[2].semilogy(ww["depth"], ww["median"], ls, ms=3, label=f"{q}, width = {config.width_per_depth} x depth")
        nn_ = he.medians(q, config.narrow_width)
        axes[2].semilogy(nn_.index, nn_.values, "--" + ls[-1], ms=3, label=f"{q}, width {config.narrow_width}")
    axes[2].set_title("He-uniform ReLU: narrow vs width growing with depth")
    axes[2].set_xlabel("depth")
    axes[2].legend(fontsize=6)
    store.save_figure(fig, "gradient_vs_depth")
    store.write_metrics(pd.concat(frames, ignore_index=True))
    metrics["wide_medians"] = wide.to_dict(orient="records")

    # claims -------------------------------------------------------------------------------------------------------
    he_key = "relu/he_uniform"
    he_v = vdepth[he_key]
    claims.append(Claim("he_narrow_vanishes", f"He init at width {config.width} (narrow vs depth up to "
                        f"{max(config.grad_depths)}): the median gradient norm still falls exponentially in depth",
                        paper="Thm. 9 / Fig. 1: Xavier/He do not prevent vanishing when width grows slower than depth",
                        measured=f"log10 slope {he_v['log10_slope_per_layer']:.4f}/layer (p={he_v['p_value']:.2g}); "
                                 f"median x{he_v[f'median_at_depth{max(config.grad_depths)}'] / he_v['median_at_depth2']:.3g}"
                                 f" from depth 2 to {max(config.grad_depths)}",
                        **_v(all_of([direction_claim((he_v["log10_slope_per_layer"],) * 2, null=0.0, direction="less"),
                                     direction_claim((he_v["p_value"],) * 2, null=0.05, direction="less")],
                                    ["log10 slope per layer", "p-value of the slope"]))))
    lec = vdepth["relu/lecun_uniform"]
    claims.append(Claim("lecun_vanishing_depth", "LeCun init (ReLU) loses 3 orders of gradient magnitude by the depth "
                        "Thm. 10 predicts (gain 1/2 per layer)",
                        paper="gradients vanish as (c m sigma^2)^{L/2} for LeCun init",
                        measured=f"measured depth {lec['measured_depth']}, predicted {lec['predicted_expectation']:.1f}",
                        **_v(tolerance_claim(lec["measured_depth"] if lec["measured_depth"] is not None
                                             else float("nan"), lec["predicted_expectation"], rel_tol=0.25,
                                             premises=[(lec["measured_depth"] is not None,
                                                        ("the gradient never lost 3 orders of magnitude within "
                                                         "the depths sampled"))]))))
    sub = slopes["linear/torch"]
    ratio = sub["hess_diag_norm"] / sub["hess_offdiag_norm"] if sub["hess_offdiag_norm"] < 0 else math.nan
    claims.append(Claim("diag_twice_as_fast", "with a sub-critical init the Hessian diagonal blocks vanish twice as fast "
                        "(log-slope) as the off-diagonal blocks",
                        paper="Fig. 4 / 13: off-diagonal ~ (c m sigma^2)^{L/2}, diagonal ~ (c m sigma^2)^L",
                        measured=f"linear/torch-default: log10 slopes diag {sub['hess_diag_norm']:.3f}, off-diag "
                                 f"{sub['hess_offdiag_norm']:.3f}, ratio {ratio:.2f}",
                        **_v(tolerance_claim(ratio, 2.0, abs_tol=0.5, premises=[(
                            not math.isnan(ratio), "the off-diagonal blocks do not vanish (slope >= 0)")]))))
    min_mixed = min(mixed.values())
    claims.append(Claim("mixed_sign", "the Hessian at init has eigenvalues of both signs",
                        paper="Fig. 12: positive and negative eigenvalues at init",
                        measured={k: round(v, 3) for k, v in mixed.items()},
                        **_v(direction_claim((min_mixed,) * 2, null=0.9 - 1e-12, direction="greater"))))
    ww = wide[wide["quantity"] == "grad_norm"].sort_values("depth")
    wide_drop = float(ww["median"].iloc[-1] / ww["median"].iloc[0])
    nn_ = he.medians("grad_norm", config.narrow_width)
    narrow_drop = float(nn_.loc[nn_.index[nn_.index <= max(config.wide_depths)].max()] / nn_.iloc[0])
    claims.append(Claim("width_restores", f"He/ReLU with width = {config.width_per_depth} x depth keeps the median gradient "
                        f"norm; at width {config.narrow_width} it falls",
                        paper="Fig. 1: vanish in narrow, stable in wide nets",
                        measured=f"median grad norm ratio depth {max(config.wide_depths)}/2: wide {wide_drop:.3g}, "
                                 f"narrow {narrow_drop:.3g}",
                        **_v(all_of([direction_claim((wide_drop - narrow_drop,) * 2, null=0.0, direction="greater"),
                                     direction_claim((wide_drop,) * 2, null=0.1, direction="greater")],
                                    ["wide drop - narrow drop", "wide drop vs 0.1"]))))
    return Result(claims=claims, metrics=metrics)


def _v(verdict) -> dict:
    """A verdict as the ``holds``/``reason`` keyword arguments of :class:`Claim`."""
    return {"holds": verdict.holds, "reason": verdict.reason}

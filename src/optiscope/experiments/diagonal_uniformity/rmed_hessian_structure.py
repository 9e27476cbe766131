"""Hessian structure during training and right singular vectors (Jiang, Malik, Li 2023, App. E Fig. 14, §6 and
App. A.5).

* App. E: "the trend of loss Hessian in practice is to become more and more diagonal during training ... we chose 4
  layers ... and computed the Hessians across these 4 layers ... by random sampling. ... for both [Adam and SGD+M]
  the trend of their mean or median is to decrease over time, although there might be some oscillation." Here: the
  exact block ``H[I, I]`` over ``block_per_layer`` sampled coordinates of each of four weight matrices spread over
  the transformer (``block_layers``; default: the first, last and two evenly spaced weight matrices after the
  embeddings), one HVP column per coordinate, at step 0 and at ``n_checkpoints`` checkpoints, and its diagonal
  dominance ``r_i = sum_{j != i} |H_ij| / |H_ii|`` (``metrics.diagonal_dominance``; the paper's Eq. (40) is not
  recoverable, this orientation decreases as the block becomes diagonal). Claim per optimizer and statistic (mean,
  median over i): the per-repeat ``log(late / initial)`` has a Student-t 95% CI below 0 (``late``: the mean over
  checkpoints in the second half of training, ``at = "late_mean"``, or the last one).
* App. A.5: R_u of the leading *left* singular vectors of approximately low-rank layers is smaller for Adam (10 of
  12 layers), "however, we did not observe significant uniformity for Adam in terms of leading right singular
  vectors". Here: R_u of both vectors of every weight matrix (``_extra.SingularVectorProbe``) at the end of
  training, over the matrices with Adam's effective rank at most ``low_rank_fraction`` x min dim (default 1: all of
  them, since the small models trained here have no approximately low-rank layer; 0.5 is ``rmed_lowrank``'s
  criterion). "No significant uniformity" is an equivalence claim: the bootstrap CI (repeats resampled) of the median
  over matrices of ``R_v(SGD+M) / R_v(Adam)`` lies within ``[1/ru_band, ru_band]`` (default 1.4, the lower end of
  the paper's R_med effect). Left vectors: the same ratio has a CI above 1. Negative control: the "no uniformity"
  prediction (ratio 1) must fit the right vectors better than the left ones (``|log ratio|`` larger for left).

Protocol as ``rmed_lm``'s first steps: SGD+M's lr tuned over the whole horizon (grid widened until the best is
strictly inside), Adam's lr one under which it is faster; ``repeats`` data orders from one initialisation. The
Hessian-structure claims need only that training ran (no divergence, SGD+M tuned); the singular-vector claims
compare the paper's trajectories and also need Adam faster and SGD+M below the unigram plateau.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from optiscope.experiments.base import Claim, Result, register
from optiscope.experiments.diagonal_uniformity import _extra as x
from optiscope.experiments.diagonal_uniformity import common as rc
from optiscope.lab.probes import weight_matrix_params
from optiscope.metrics.verdicts import direction_claim, mean_ci, negative_control_claim, tolerance_claim
from optiscope.utils.config import require

OPTS = ("adam", "sgdm")
STATS = ("mean", "median")


@dataclass(frozen=True)
class HessianStructureConfig(rc.LMConfig):
    """:class:`LMConfig` plus the Hessian block (layers, coordinates per layer) and the singular-vector judging."""

    block_layers: tuple[str, ...] = ()
    block_per_layer: int = 50
    low_rank_fraction: float = 1.0
    ru_band: float = 1.4

    def validate(self) -> None:
        super().validate()
        require(self.block_per_layer >= 1, "block_per_layer", self.block_per_layer, ">= 1")
        require(0 < self.low_rank_fraction <= 1, "low_rank_fraction", self.low_rank_fraction, "in (0, 1]")
        require(self.ru_band > 1, "ru_band", self.ru_band, "> 1")


QUICK = HessianStructureConfig(seq_len=32, n_train=2048, probe_size=16, d_model=32, n_layers=1, n_heads=4, steps=200,
                               batch_size=256, sgdm_lrs=(0.03, 0.1, 0.3), adam_lrs=(3e-3,), repeats=2,
                               n_checkpoints=2, max_widen=1, block_per_layer=40)
MEDIUM = dataclasses.replace(QUICK, d_model=48, n_layers=2, steps=600, adam_lrs=(3e-3, 1e-2), repeats=4,
                             n_checkpoints=4, max_widen=2, block_per_layer=50)
FULL = HessianStructureConfig(seq_len=64, n_train=20000, probe_size=512, d_model=128, n_layers=4, n_heads=4,
                              steps=1800, batch_size=512, sgdm_lrs=(0.01, 0.03, 0.1, 0.3, 1.0),
                              adam_lrs=(1e-4, 3e-4, 1e-3, 3e-3), repeats=8, n_checkpoints=10, block_per_layer=100,
                              device="auto")


def default_block_layers(model) -> list[str]:
    """Four weight matrices spread over the network after the embeddings (:func:`_extra.spread_layers`)."""
    names = [n for n in weight_matrix_params(model) if n not in ("pos", "embed.weight")]
    return x.spread_layers(names, 4)


def late_over_initial(metrics: pd.DataFrame, opt: str, metric: str, at: str) -> np.ndarray:
    """Per repeat: ``log(late / initial)`` of a global metric (``late``: mean over checkpoints with step >= half the
    last (``at="late_mean"``) or the last one (``"final"``); ``initial``: step 0). NaN where missing."""
    out = []
    for r in sorted(metrics["repeat"].unique()):
        d = metrics[(metrics["optimizer"] == opt) & (metrics["metric"] == metric) & (metrics["repeat"] == r)
                    & (metrics["layer"] == "")].groupby("step")["value"].mean()
        if d.empty or 0 not in d.index or d.index.max() == 0:
            out.append(np.nan)
            continue
        late = d[d.index >= d.index.max() / 2] if at == "late_mean" else d[d.index == d.index.max()]
        late = late[late.index > 0]
        v0, v1 = float(d[0]), float(late.mean())
        out.append(math.log(v1 / v0) if v0 > 0 and v1 > 0 else np.nan)
    return np.asarray(out, float)


def final_values(metrics: pd.DataFrame, opt: str, metric: str, layers: list[str]) -> np.ndarray:
    """``[repeats, layers]`` array of a per-layer metric at each repeat's last recorded step."""
    reps = sorted(metrics["repeat"].unique())
    out = np.full((len(reps), len(layers)), np.nan)
    for i, r in enumerate(reps):
        d = metrics[(metrics["optimizer"] == opt) & (metrics["metric"] == metric) & (metrics["repeat"] == r)]
        if d.empty:
            continue
        d = d[d["step"] == d["step"].max()].groupby("layer")["value"].mean()
        out[i] = [float(d.get(n, np.nan)) for n in layers]
    return out


def dominance_claims(metrics: pd.DataFrame, at: str, premises, block: list[str], n_coords: int) -> list[Claim]:
    """App. E: per optimizer and statistic, the per-repeat log(late / initial) diagonal dominance has a CI < 0."""
    claims = []
    for opt in OPTS:
        for stat in STATS:
            v = late_over_initial(metrics, opt, f"block_dominance_{stat}", at)
            m, lo, hi = mean_ci(v)
            claims.append(Claim.judged(
                f"dominance_{stat}_decreases_{opt}", f"{opt}: the {stat} over sampled coordinates of the off-diagonal"
                f" to diagonal row ratio of the exact Hessian block across {len(block)} layers ({n_coords} "
                f"coordinates) is lower late in training than at initialisation (per-repeat log ratio, "
                "Student-t 95% CI < 0)", "the mean and median decrease over time (App. E, Fig. 14)",
                {"log_ratio_mean": x.jsonable(m), "ci95": [x.jsonable(lo), x.jsonable(hi)],
                 "ratio_late_over_initial": x.jsonable(math.exp(m)) if np.isfinite(m) else None,
                 "repeats": int(np.isfinite(v).sum()), "block_layers": block},
                direction_claim((lo, hi), null=0.0, direction="less", estimate=m, premises=premises)))
    return claims


def singular_vector_claims(metrics: pd.DataFrame, layers: list[str], shapes: dict, cfg, premises) -> tuple[list, dict]:
    """App. A.5: right singular vectors without uniformity (equivalence within ``[1/ru_band, ru_band]``), left ones
    more uniform for Adam (CI > 1), and the control (the null ratio 1 fits right better than left)."""
    er = np.nanmean(final_values(metrics, "adam", "erank", layers), axis=0)
    chosen = [n for n, e in zip(layers, er) if np.isfinite(e) and e <= cfg.low_rank_fraction * min(shapes[n])]
    summ = {}
    for side in ("left", "right"):
        va = final_values(metrics, "adam", f"r_u_{side}", chosen) if chosen else np.zeros((0, 0))
        vb = final_values(metrics, "sgdm", f"r_u_{side}", chosen) if chosen else np.zeros((0, 0))
        summ[side] = (rc.gap_summary(va, vb, chosen, 0, cfg.n_bootstrap, cfg.seed) if chosen else None)
    premises = list(premises) + [(len(chosen) >= 2, (f"only {len(chosen)} weight matrices with Adam's effective rank "
                                                    f"<= {cfg.low_rank_fraction:g} x min dim (need 2)"))]

    def logs(s):
        if s is None:
            return float("nan"), (float("nan"), float("nan"))
        lg = lambda v: math.log(v) if v is not None and v > 0 and math.isfinite(v) else float("nan")
        return lg(s["median_ratio"]), (lg(s["ci95"][0]), lg(s["ci95"][1]))

    lr_r, ci_r = logs(summ["right"])
    lr_l, ci_l = logs(summ["left"])
    band = math.log(cfg.ru_band)

    def meas(s, side):
        if s is None:
            return {"matrices": chosen}
        return {"median_ratio_sgdm_over_adam": x.jsonable(s["median_ratio"]),
                "ci95": [x.jsonable(c) for c in s["ci95"]], "adam_more_uniform": f"{s['n_layers_a_smaller']} of "
                f"{s['n_layers_compared']}", "repeats": s["repeats"], "side": side, "matrices": chosen}

    claims = [
        Claim.judged("right_vectors_no_uniformity", "R_u of the leading right singular vectors: no uniformity for "
                     "Adam: the bootstrap 95% CI of the median over weight matrices of R_v(SGD+M) / R_v(Adam) lies "
                     f"within [1/{cfg.ru_band:g}, {cfg.ru_band:g}]",
                     "no significant uniformity for Adam in terms of leading right singular vectors (App. A.5)",
                     meas(summ["right"], "right"),
                     tolerance_claim(lr_r, 0.0, abs_tol=band, ci=ci_r, premises=premises)),
        Claim.judged("left_vectors_uniform", "R_u of the leading left singular vectors is smaller for Adam: the "
                     "bootstrap 95% CI of the median over weight matrices of R_u(SGD+M) / R_u(Adam) is above 1",
                     "R_u(Adam) < R_u(SGD) for 10 of 12 low-rank layers (§6, App. A.5)", meas(summ["left"], "left"),
                     direction_claim(ci_l, null=0.0, estimate=lr_l, premises=premises)),
        Claim.judged("control_null_fits_right_better", "negative control: the 'no uniformity' prediction (ratio 1) "
                     "fits the right vectors better than the left ones: |log median ratio| larger for left",
                     "left vectors uniform, right vectors not (App. A.5)",
                     {"abs_log_ratio_right": x.jsonable(abs(lr_r)), "abs_log_ratio_left": x.jsonable(abs(lr_l))},
                     negative_control_claim(abs(lr_r), abs(lr_l), premises=premises)),
    ]
    return claims, {"matrices": chosen, "adam_final_erank": dict(zip(layers, map(x.jsonable, er))),
                    "summary_left": summ["left"], "summary_right": summ["right"]}


@register("rmed_hessian_structure", paper="000", title="The Hessian becomes more diagonal during training (App. E, "
          "Fig. 14); right singular vectors show no uniformity (§6, App. A.5)", config=HessianStructureConfig,
          presets={"quick": QUICK, "medium": MEDIUM, "full": FULL})
def run(config: HessianStructureConfig, store) -> Result:
    """Jiang et al. 2023, Fig. 14 (block diagonal dominance over training) and App. A.5 (R_u of right vectors)."""
    cfg = config
    t0 = time.perf_counter()
    problem = rc.lm_problem(cfg)
    kw = {"batch_size": cfg.batch_size, "checkpoint": False}
    tune = rc.tune_lr(problem, lambda lr: rc.sgdm_spec(cfg, lr), cfg.sgdm_lrs, cfg.horizon, cfg.seed,
                      max_widen=cfg.max_widen, **kw)
    pick = rc.pick_adaptive_lr(problem, lambda lr: rc.adam_spec(cfg, lr), cfg.adam_grid, cfg.horizon, cfg.seed,
                               tune.losses[tune.best], **kw)
    block = list(cfg.block_layers) or default_block_layers(problem.model)
    unknown = [n for n in block if n not in problem.param_names]
    if unknown:
        raise ValueError(f"block_layers {unknown} are not parameters; valid: {problem.param_names}")
    layers = weight_matrix_params(problem.model)
    shapes = {n: tuple(p.shape) for n, p in problem.model.named_parameters() if n in layers}
    ck = rc.checkpoint_steps(cfg.steps, cfg.n_checkpoints)
    probes = ["loss:on=train", rc.ScheduledProbe(x.BlockDominanceProbe(block, cfg.block_per_layer), (0, *ck)),
              rc.ScheduledProbe(x.SingularVectorProbe(), (0, *ck))]
    out = rc.compare_repeats(problem, {"adam": rc.adam_spec(cfg, pick.lr), "sgdm": rc.sgdm_spec(cfg, tune.best)},
                             cfg.steps, cfg.repeats, cfg.seed, probes, probe_every=cfg.loss_every, probe_steps=ck, **kw)
    m = out.metrics
    H = rc.unigram_entropy(problem.train[1].cpu())
    finals = {o: [rc.final_loss(m[m["repeat"] == r], o) for r in range(cfg.repeats)] for o in OPTS}
    diverged = [k for k, v in out.status.items() if v != "finished"]
    trained = [(not diverged, f"runs diverged: {', '.join(diverged)}"),
               (tune.inside or not tune.losses, (f"SGD+M's best lr {tune.best:g} is at the edge of its grid "
                                                f"{sorted(tune.losses)} after widening (not tuned)"))]
    sizes = {n: p.numel() for n, p in problem.model.named_parameters()}
    n_coords = sum(min(cfg.block_per_layer, sizes[n]) for n in block)
    claims = dominance_claims(m, cfg.at, trained, block, n_coords)
    protocol = rc.premises_for(tune, pick, finals["adam"], finals["sgdm"], float(np.nanmean(finals["sgdm"])), H,
                               cfg.plateau_fraction)
    sv_claims, sv = singular_vector_claims(m, layers, shapes, cfg, trained + protocol)
    claims += sv_claims
    rc.store_metrics(store, m)
    rc.plot_loss(store, m, title="training loss (repeat 0)")
    _figure(store, m)
    dd = {o: {s: m[(m["optimizer"] == o) & (m["metric"] == f"block_dominance_{s}")].groupby("step")["value"]
              .mean().to_dict() for s in STATS} for o in OPTS}
    return Result(claims=claims, metrics={
        "sgdm_lr": tune.best, "lr_tuning": tune.to_dict(), "adaptive_lr": pick.to_dict(), "block_layers": block,
        "block_dominance_by_step": dd, "singular_vectors": sv, "final_losses": finals, "unigram_entropy": H,
        "status": out.status, "seconds": time.perf_counter() - t0})


def _figure(store, m: pd.DataFrame) -> None:
    from optiscope.utils.plotting import plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, stat in zip(axes, STATS):
        for opt in OPTS:
            d = m[(m["optimizer"] == opt) & (m["metric"] == f"block_dominance_{stat}")]
            g = d.groupby("step")["value"].mean()
            ax.plot(g.index, g.values, marker="o", ms=3, label=opt)
        ax.set_xlabel("step")
        ax.set_title(f"{stat} of sum_j!=i |H_ij| / |H_ii| (block)", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    store.save_figure(fig, "block_dominance")

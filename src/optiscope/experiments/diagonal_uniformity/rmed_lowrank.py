"""Low-rank structure and singular-vector uniformity (Jiang, Malik, Li 2023, §6, App. A.5, Figs. 5, 9, 10), and how
the (adaptive) gradient aligns with the Hessian diagonal (§4.3, App. A.6, Figs. 4, 11, 12).

On the fortunes transformer, SGD+M (lr tuned over the whole horizon, best strictly inside its widened grid) and Adam
(an lr under which it is faster) from the same initialisation. At the checkpoints:

* ``weight_spectrum`` (lab probe): per weight matrix the singular values, the effective rank ``erank`` and
  ``r_u`` = R_u of the leading left singular vector (``metrics.singular_vector_uniformity``). A layer counts as
  "approximately low rank" when Adam's final ``erank`` is below ``low_rank_fraction * min(shape)`` (the paper's
  criterion is visual, Fig. 9; the threshold is an option). The paper: for 10 of 12 such layers R_u(Adam) <
  R_u(SGD+M) (left vectors); no such effect for right vectors.
* ``adam_alignment`` (lab probe): Spearman rank correlation on the sampled coordinates between the Hessian
  diagonal and |gradient| (``align_grad``) and between it and |update| (``align_update``). The paper: the gradient
  aligns with the Hessian diagonal, Adam's adaptive gradient does not (its entries are "quite uniform").

"Most" is judged by the one-sided binomial rule of ``metrics.verdicts`` (untestable with too few layers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from optiscope.experiments.base import Claim, Result, register
from optiscope.experiments.diagonal_uniformity import common as rc
from optiscope.metrics.verdicts import fraction_claim
from optiscope.utils.config import require


@dataclass(frozen=True)
class LowRankConfig(rc.LMConfig):
    """:class:`LMConfig` plus the low-rank threshold and the coordinates per layer for the alignment probe."""

    low_rank_fraction: float = 0.5
    align_per_layer: int = 50
    n_checkpoints: int = 1

    def validate(self) -> None:
        super().validate()
        require(0 < self.low_rank_fraction <= 1, "low_rank_fraction", self.low_rank_fraction, "in (0, 1]")
        require(self.align_per_layer >= 3, "align_per_layer", self.align_per_layer, ">= 3")


QUICK = LowRankConfig(seq_len=32, n_train=2048, probe_size=16, d_model=32, n_layers=1, n_heads=4, steps=200,
                      batch_size=256, sgdm_lrs=(0.03, 0.1, 0.3), repeats=1, n_checkpoints=1, per_layer=200,
                      align_per_layer=50, max_widen=1)
MEDIUM = LowRankConfig(seq_len=32, n_train=2048, probe_size=16, d_model=48, n_layers=2, n_heads=4, steps=600,
                       batch_size=256, sgdm_lrs=(0.03, 0.1, 0.3), adam_lrs=(3e-3, 1e-2), repeats=2, n_checkpoints=2,
                       per_layer=200, align_per_layer=50, max_widen=2)
FULL = LowRankConfig(seq_len=64, n_train=20000, probe_size=512, d_model=128, n_layers=4, n_heads=4, steps=1800,
                     batch_size=512, sgdm_lrs=(0.03, 0.1, 0.3, 1.0), adam_lrs=(3e-4, 1e-3, 3e-3), repeats=4,
                     n_checkpoints=6, align_per_layer=200)


def _final(metrics: pd.DataFrame, opt: str, metric: str) -> pd.Series:
    d = metrics[(metrics["optimizer"] == opt) & (metrics["metric"] == metric)]
    d = d[d["step"] == d["step"].max()]
    return d.groupby("layer")["value"].mean()


@register("rmed_lowrank", paper="000", title="Low rank, singular-vector uniformity R_u and gradient/Hessian-diagonal "
          "alignment, §4.3, §6, App. A.5-A.6", config=LowRankConfig, presets={"quick": QUICK, "medium": MEDIUM, "full": FULL})
def run(config: LowRankConfig, store) -> Result:
    """Jiang et al. 2023, §6 / App. A.5 (R_u of low-rank layers) and §4.3 / App. A.6 (alignment), SGD+M vs Adam."""
    from optiscope.lab import make_probe

    cfg = config
    problem = rc.lm_problem(cfg)
    shapes = {n: tuple(p.shape) for n, p in problem.model.named_parameters() if p.ndim >= 2}
    kw = dict(batch_size=cfg.batch_size, checkpoint=False)
    tuning = rc.tune_lr(problem, lambda lr: rc.sgdm_spec(cfg, lr), cfg.sgdm_lrs, cfg.horizon, cfg.seed,
                        max_widen=cfg.max_widen, **kw)
    best = tuning.best
    pick = rc.pick_adaptive_lr(problem, lambda lr: rc.adam_spec(cfg, lr), cfg.adam_grid, cfg.horizon, cfg.seed,
                               tuning.losses[best], **kw)
    probes = ["loss:on=train", make_probe("weight_spectrum", save_singular_values=True),
              make_probe("adam_alignment", per_layer=cfg.align_per_layer)]
    out = rc.compare_repeats(problem, {"sgdm": rc.sgdm_spec(cfg, best), "adam": rc.adam_spec(cfg, pick.lr)}, cfg.steps,
                             cfg.repeats, cfg.seed, probes, batch_size=cfg.batch_size, checkpoint=False,
                             probe_steps=rc.checkpoint_steps(cfg.steps, cfg.n_checkpoints))
    m = out.metrics
    rc.store_metrics(store, m)
    er_a, ru_a, ru_b = _final(m, "adam", "erank"), _final(m, "adam", "r_u"), _final(m, "sgdm", "r_u")
    low = [n for n in shapes if n in er_a.index and er_a[n] < cfg.low_rank_fraction * min(shapes[n])]
    ru_rows = [{"layer": n, "erank_adam": float(er_a[n]), "erank_sgdm": float(_final(m, "sgdm", "erank").get(n, np.nan)),
                "min_dim": int(min(shapes[n])), "low_rank": n in low, "r_u_adam": float(ru_a.get(n, np.nan)),
                "r_u_sgdm": float(ru_b.get(n, np.nan))} for n in shapes if n in er_a.index]
    n_smaller = sum(1 for r in ru_rows if r["low_rank"] and r["r_u_adam"] < r["r_u_sgdm"])
    all_smaller = sum(1 for r in ru_rows if r["r_u_adam"] < r["r_u_sgdm"])
    align = {}
    for opt in ("adam", "sgdm"):
        d = m[(m["optimizer"] == opt) & (m["step"] > 0)]
        g = d[d["metric"] == "align_grad"].groupby("layer")["value"].mean()
        u = d[d["metric"] == "align_update"].groupby("layer")["value"].mean()
        align[opt] = {"align_grad": g.to_dict(), "align_update": u.to_dict(),
                      "median_align_grad": float(np.nanmedian(g)) if len(g) else float("nan"),
                      "median_align_update": float(np.nanmedian(u)) if len(u) else float("nan")}
    adam_less = [l for l in align["adam"]["align_update"]
                 if align["adam"]["align_update"][l] < align["adam"]["align_grad"].get(l, np.nan)]
    n_align = len(align["adam"]["align_update"])
    H = rc.unigram_entropy(problem.train[1])
    finals = {o: [rc.final_loss(m[m["repeat"] == r], o) for r in range(cfg.repeats)] for o in ("adam", "sgdm")}
    premises = rc.premises_for(tuning, pick, finals["adam"], finals["sgdm"], float(np.nanmean(finals["sgdm"])), H,
                               cfg.plateau_fraction)
    claims = [
        Claim.judged("low_rank_r_u", "among approximately low-rank layers (Adam's erank < "
                     f"{cfg.low_rank_fraction} x min dim), R_u(Adam) < R_u(SGD+M) in most (one-sided binomial bound "
                     "> 1/2)", "10 of 12 low-rank layers (App. A.5)",
                     {"low_rank_layers": len(low), "adam_smaller": n_smaller,
                      "all_matrices_adam_smaller": f"{all_smaller} of {len(ru_rows)}"},
                     fraction_claim(n_smaller, len(low), premises=premises)),
        Claim.judged("adaptive_gradient_not_aligned", "Adam's update is less rank-correlated with the Hessian "
                     "diagonal than the gradient is (align_update < align_grad) in most parameter tensors (one-sided "
                     "binomial bound > 1/2)",
                     "|g_i| aligns with H_ii; Adam's adaptive gradient is quite uniform and does not (§4.3)",
                     {"layers_update_less_aligned": f"{len(adam_less)} of {n_align}",
                      "median_align_grad_adam": align["adam"]["median_align_grad"],
                      "median_align_update_adam": align["adam"]["median_align_update"],
                      "median_align_update_sgdm": align["sgdm"]["median_align_update"]},
                     fraction_claim(len(adam_less), n_align, premises=premises)),
    ]
    _figure(store, m, ru_rows)
    return Result(claims=claims, metrics={"r_u": ru_rows, "alignment": align, "sgdm_lr": best,
                                          "lr_tuning": tuning.to_dict(), "adaptive_lr": pick.to_dict(),
                                          "final_losses": finals, "unigram_entropy": H, "status": out.status})


def _figure(store, m, ru_rows) -> None:
    from optiscope.utils.plotting import plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    x = np.arange(len(ru_rows))
    axes[0].bar(x - 0.2, [r["r_u_sgdm"] for r in ru_rows], 0.4, label="SGD+M")
    axes[0].bar(x + 0.2, [r["r_u_adam"] for r in ru_rows], 0.4, label="Adam")
    axes[0].set_xticks(x, [r["layer"].replace("encoder.layers.", "L").replace(".weight", "")
                           + ("*" if r["low_rank"] else "") for r in ru_rows], rotation=60, fontsize=6)
    axes[0].set_yscale("log")
    axes[0].set_title("R_u of leading left singular vector (* = low rank)", fontsize=8)
    axes[0].legend(fontsize=7)
    for opt, mk in (("sgdm", "o"), ("adam", "s")):
        d = m[(m["optimizer"] == opt) & (m["step"] > 0)]
        g = d[d["metric"] == "align_grad"].groupby("layer")["value"].mean()
        u = d[d["metric"] == "align_update"].groupby("layer")["value"].mean()
        common = g.index.intersection(u.index)
        axes[1].plot(g[common], u[common], mk, label=opt)
    axes[1].plot([-1, 1], [-1, 1], "k--", lw=1)
    axes[1].set_xlabel("Spearman(H_ii, |g_i|)")
    axes[1].set_ylabel("Spearman(H_ii, |update_i|)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    store.save_figure(fig, "lowrank_alignment")

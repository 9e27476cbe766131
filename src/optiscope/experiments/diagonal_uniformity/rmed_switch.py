"""Switching from SGD to Adam in the middle of training (Jiang, Malik, Li 2023, App. A.4, Fig. 8, Table 8).

Plain SGD (no momentum, "to get a larger gap", its best lr tuned over the whole horizon on a grid widened until the
best lies strictly inside) for ``[0, switch_step)``, then a fresh Adam, vs Adam from the start, both from the same
initialisation and batch order (``lab.switch``), ``repeats`` data orders. At every checkpoint after the switch we
record the loss gap ``L_switch - L_adam`` and the R_med gap, the median over layers (first ``exclude_first``
excluded) of ``R_med^switch / R_med^adam``. The paper reports that both gaps close gradually. Verdicts
(``metrics.verdicts``) use per-repeat differences with t-intervals; "the R_med gap closes" is untestable here when
there was no R_med gap at the switch (SGD's R_med not above Adam's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from optiscope.experiments.base import Claim, Result, register
from optiscope.experiments.diagonal_uniformity import common as rc
from optiscope.lab.probes import weight_matrix_params
from optiscope.metrics.verdicts import direction_claim, mean_ci
from optiscope.utils.config import require


@dataclass(frozen=True)
class SwitchConfig(rc.LMConfig):
    """:class:`LMConfig` plus plain SGD's lr grid and the switch point as a fraction of ``steps``."""

    sgd_lrs: tuple[float, ...] = (0.3, 1.0, 3.0)
    switch_fraction: float = 0.5
    n_checkpoints: int = 4

    def validate(self) -> None:
        super().validate()
        require(0 < self.switch_fraction < 1, "switch_fraction", self.switch_fraction, "in (0, 1)")
        require(len(self.sgd_lrs) >= 1 and all(x > 0 for x in self.sgd_lrs), "sgd_lrs", self.sgd_lrs,
                "a non-empty list of positive learning rates")


QUICK = SwitchConfig(seq_len=32, n_train=2048, probe_size=16, d_model=32, n_layers=1, n_heads=4, steps=300,
                     batch_size=256, repeats=2, n_checkpoints=2, per_layer=200, max_widen=1)
MEDIUM = SwitchConfig(seq_len=32, n_train=2048, probe_size=16, d_model=32, n_layers=1, n_heads=4, steps=600,
                      batch_size=256, repeats=3, n_checkpoints=4, per_layer=200, max_widen=2)
FULL = SwitchConfig(seq_len=64, n_train=20000, probe_size=512, d_model=128, n_layers=4, n_heads=4, steps=1800,
                    batch_size=512, sgd_lrs=(0.1, 0.3, 1.0, 3.0), adam_lr=1e-3, repeats=4, n_checkpoints=12)


@register("rmed_switch", paper="000", title="Switching from SGD to Adam: loss and R_med gaps close, App. A.4",
          config=SwitchConfig, presets={"quick": QUICK, "medium": MEDIUM, "full": FULL})
def run(config: SwitchConfig, store) -> Result:
    """Jiang et al. 2023, Table 8 analogue: SGD then Adam from the middle vs Adam throughout."""
    from optiscope.lab import compare, switch

    cfg = config
    problem = rc.lm_problem(cfg)
    layers = weight_matrix_params(problem.model)
    sgd_spec = lambda lr: ("sgd", {"lr": float(lr), "weight_decay": cfg.weight_decay})  # noqa: E731
    tuning = rc.tuned_lr(problem, sgd_spec, cfg.sgd_lrs, cfg.horizon, cfg.seed, max_widen=cfg.max_widen,
                         batch_size=cfg.batch_size, checkpoint=False)
    best = tuning.best
    s = int(round(cfg.switch_fraction * cfg.steps))
    steps = sorted(set(rc.checkpoint_steps(cfg.steps, cfg.n_checkpoints)) | {s})
    rmed = rc.rmed_probe(layers, cfg.per_layer, cfg.delta)
    frames, status = [], {}
    for r in range(cfg.repeats):
        kw = dict(batch_size=cfg.batch_size, seed=cfg.seed, data_seed=cfg.seed + r, checkpoint=False,
                  probes=["loss:on=train", rmed], probe_steps=steps)
        adam = compare(problem, {"adam": rc.adam_spec(cfg)}, cfg.steps, **kw)
        sw = switch(problem, sgd_spec(best), rc.adam_spec(cfg), s, cfg.steps, name="sgd->adam", **kw)
        for df, name, st in ((adam.metrics, "adam", adam.runs["adam"].status), (sw.metrics, "sgd->adam", sw.status)):
            d = df.copy()
            d["optimizer"] = name
            d["repeat"] = r
            frames.append(d)
            status[f"{name}/r{r}"] = st
    m = pd.concat(frames, ignore_index=True)
    rc.store_metrics(store, m)
    keep = layers[cfg.exclude_first:]
    rows = []
    for r in range(cfg.repeats):
        mr = m[m["repeat"] == r]
        for t in steps:
            if t < s:
                continue
            la = mr[(mr["optimizer"] == "adam") & (mr["metric"] == "loss") & (mr["layer"] == "") & (mr["step"] == t)]
            lb = mr[(mr["optimizer"] == "sgd->adam") & (mr["metric"] == "loss") & (mr["layer"] == "")
                    & (mr["step"] == t)]
            rows.append({"repeat": r, "step": t, "loss_adam": float(la["value"].mean()),
                         "loss_switch": float(lb["value"].mean()),
                         "loss_gap": float(lb["value"].mean() - la["value"].mean()),
                         "r_med_gap": rc.median_ratio(rc.rmed_values(mr, "adam", keep, step=t),
                                                      rc.rmed_values(mr, "sgd->adam", keep, step=t))})
    per = pd.DataFrame(rows)
    gaps = per.groupby("step")[["loss_adam", "loss_switch", "loss_gap", "r_med_gap"]].mean().reset_index()
    first = per[per["step"] == s].set_index("repeat")
    last = per[per["step"] == per["step"].max()].set_index("repeat")
    d_loss = (first["loss_gap"] - last["loss_gap"]).to_numpy()
    log_first, log_last = np.log(first["r_med_gap"].to_numpy()), np.log(last["r_med_gap"].to_numpy())
    m_lf, lo_lf, hi_lf = mean_ci(log_first)
    m_lg, lo_lg, hi_lg = mean_ci(first["loss_gap"].to_numpy())
    v_gap = direction_claim((lo_lf, hi_lf), null=0.0, estimate=m_lf)
    premise_gap = [(v_gap.holds is True, f"no R_med gap at the switch to close (log R_switch/R_adam: {v_gap.reason})")]
    m_dl, lo_dl, hi_dl = mean_ci(d_loss)
    m_dr, lo_dr, hi_dr = mean_ci(np.abs(log_first) - np.abs(log_last))
    claims = [
        Claim.judged("loss_gap_closes", "after the switch, the loss gap to Adam-from-the-start shrinks (per-repeat "
                     "decrease from the switch to the end has a CI above 0)",
                     "the loss gap is closed after a period of training (Fig. 8)",
                     {"at_switch": float(first["loss_gap"].mean()), "at_end": float(last["loss_gap"].mean()),
                      "decrease_ci95": [lo_dl, hi_dl], "repeats": len(d_loss)},
                     direction_claim((lo_dl, hi_dl), null=0.0, estimate=m_dl)),
        Claim.judged("r_med_gap_closes", "after the switch, the R_med gap (median over layers of R_switch/R_adam) "
                     "moves towards 1 (per-repeat decrease of |log gap| has a CI above 0)",
                     "the R_med gap is closed (Table 8)",
                     {"at_switch": float(np.exp(log_first).mean()), "at_end": float(np.exp(log_last).mean()),
                      "decrease_ci95": [lo_dr, hi_dr]},
                     direction_claim((lo_dr, hi_dr), null=0.0, estimate=m_dr, premises=premise_gap)),
        Claim.judged("sgd_slower_before_switch", "at the switch step SGD's R_med is above Adam's (log R_med gap CI "
                     "above 0) and its loss higher", "a large gap before switching",
                     {"r_med_gap": float(np.exp(log_first).mean()), "log_gap_ci95": [lo_lf, hi_lf],
                      "loss_gap": float(first["loss_gap"].mean()), "loss_gap_ci95": [lo_lg, hi_lg]},
                     v_gap if v_gap.holds is not True else
                     direction_claim((lo_lg, hi_lg), null=0.0, estimate=m_lg)),
    ]
    _figure(store, m, gaps, s)
    store.write_text("gaps.txt", gaps.to_string(index=False))
    return Result(claims=claims, metrics={"gaps": gaps.to_dict("records"), "gaps_per_repeat": per.to_dict("records"),
                                          "switch_step": s, "sgd_lr": best, "lr_tuning": tuning.to_dict(),
                                          "status": status,
                                          "hvp_cost": rc.hvp_cost(m)})


def _figure(store, m, gaps, s) -> None:
    from optiscope.utils.plotting import plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    d = m[(m["metric"] == "loss") & (m["layer"] == "")]
    for name, g in d.groupby("optimizer"):
        g = g.groupby("step")["value"].mean()
        axes[0].plot(g.index, g.values, marker="o", ms=3, label=name)
    axes[0].axvline(s, color="k", ls=":", lw=1)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss")
    axes[0].legend()
    axes[1].plot(gaps["step"], gaps["r_med_gap"], marker="o")
    axes[1].axhline(1, color="k", ls=":", lw=1)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("median R_med(sgd->adam) / R_med(adam)")
    fig.tight_layout()
    store.save_figure(fig, "switch_gaps")

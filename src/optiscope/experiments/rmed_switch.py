"""Experiment 4 of issue 8: switching from SGD to Adam in the middle of training (seed 000 App. A.4, Fig. 8,
Table 8).

Plain SGD (no momentum, "to get a larger gap", best lr of a grid) for ``[0, switch_step)``, then a fresh Adam, vs
Adam from the start, both from the same initialisation and batch order (``lab.switch``). At every checkpoint after
the switch we record the loss gap ``L_switch - L_adam`` and the R_med gap, the median over layers (first
``exclude_first`` excluded) of ``R_med^switch / R_med^adam``. The seed reports that both gaps close gradually.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from optiscope.experiments import _rmed_common as rc
from optiscope.lab.probes import weight_matrix_params
from optiscope.experiments.base import Claim, Result, register
from optiscope.utils.config import require


@dataclass(frozen=True)
class SwitchConfig(rc.LMConfig):
    sgd_lrs: tuple[float, ...] = (0.3, 1.0, 3.0)
    switch_fraction: float = 0.5
    n_checkpoints: int = 4

    def validate(self) -> None:
        super().validate()
        require(0 < self.switch_fraction < 1, "switch_fraction", self.switch_fraction, "in (0, 1)")
        require(len(self.sgd_lrs) >= 1 and all(x > 0 for x in self.sgd_lrs), "sgd_lrs", self.sgd_lrs,
                "a non-empty list of positive learning rates")


QUICK = SwitchConfig(seq_len=32, n_train=2048, probe_size=16, d_model=32, n_layers=1, n_heads=4, steps=300,
                     batch_size=256, tune_steps=40, repeats=1, n_checkpoints=4, per_layer=200)
FULL = SwitchConfig(seq_len=64, n_train=20000, probe_size=512, d_model=128, n_layers=4, n_heads=4, steps=1800,
                    batch_size=512, sgd_lrs=(0.1, 0.3, 1.0, 3.0), tune_steps=300, adam_lr=1e-3, repeats=4,
                    n_checkpoints=12)


@register("rmed_switch", paper="000", title="Switching from SGD to Adam: loss and R_med gaps close, App. A.4",
          config=SwitchConfig, presets={"quick": QUICK, "full": FULL})
def run(config: SwitchConfig, store) -> Result:
    """Seed 000 Table 8 analogue: SGD then Adam from the middle vs Adam throughout."""
    from optiscope.lab import compare, switch

    cfg = config
    problem = rc.lm_problem(cfg)
    layers = weight_matrix_params(problem.model)
    sgd_spec = lambda lr: ("sgd", {"lr": float(lr), "weight_decay": cfg.weight_decay})  # noqa: E731
    best, tuning = rc.tuned_lr(problem, sgd_spec, cfg.sgd_lrs, cfg.tune_steps, cfg.seed, batch_size=cfg.batch_size,
                               checkpoint=False)
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
    for t in steps:
        if t < s:
            continue
        la = m[(m["optimizer"] == "adam") & (m["metric"] == "loss") & (m["layer"] == "") & (m["step"] == t)]
        lb = m[(m["optimizer"] == "sgd->adam") & (m["metric"] == "loss") & (m["layer"] == "") & (m["step"] == t)]
        rows.append({"step": t, "loss_adam": float(la["value"].mean()), "loss_switch": float(lb["value"].mean()),
                     "loss_gap": float(lb["value"].mean() - la["value"].mean()),
                     "r_med_gap": rc.median_ratio(rc.rmed_values(m, "adam", keep, step=t),
                                                   rc.rmed_values(m, "sgd->adam", keep, step=t))})
    gaps = pd.DataFrame(rows)
    first, last = gaps.iloc[0], gaps.iloc[-1]
    claims = [
        Claim("loss_gap_closes", "after the switch, the loss gap to Adam-from-the-start shrinks (end < at switch)",
              paper="the loss gap is closed after a period of training (Fig. 8)",
              measured={"at_switch": float(first["loss_gap"]), "at_end": float(last["loss_gap"])},
              holds=bool(last["loss_gap"] < first["loss_gap"])),
        Claim("r_med_gap_closes", "after the switch, the R_med gap (median over layers of R_switch/R_adam) moves "
              "towards 1 (|log gap| at the end < at the switch)", paper="the R_med gap is closed (Table 8)",
              measured={"at_switch": float(first["r_med_gap"]), "at_end": float(last["r_med_gap"])},
              holds=bool(abs(np.log(last["r_med_gap"])) < abs(np.log(first["r_med_gap"])))
              if np.isfinite([first["r_med_gap"], last["r_med_gap"]]).all() else None),
        Claim("sgd_slower_before_switch", "at the switch step SGD's R_med is above Adam's (gap > 1) and its loss "
              "higher", paper="a large gap before switching", measured={"r_med_gap": float(first["r_med_gap"]),
                                                                         "loss_gap": float(first["loss_gap"])},
              holds=bool(first["r_med_gap"] > 1 and first["loss_gap"] > 0)),
    ]
    _figure(store, m, gaps, s)
    store.write_text("gaps.txt", gaps.to_string(index=False))
    return Result(claims=claims, metrics={"gaps": gaps.to_dict("records"), "switch_step": s, "sgd_lr": best,
                                          "lr_tuning": {str(k): v for k, v in tuning.items()}, "status": status,
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

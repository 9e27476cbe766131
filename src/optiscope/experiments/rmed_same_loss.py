"""Experiment 3 of issue 8: R_med of Adam and SGD+M at iterates with the same training loss (seed 000 App. A.3,
Table 7).

Adam converges faster, so comparing at equal steps could merely reflect "Adam is closer to a minimum with a
uniform Hessian". Here each SGD+M checkpoint ``t2`` (R_med measured) is matched with the first Adam step ``t1`` at
which Adam's training loss (probe batch, recorded every ``loss_every`` steps in a first pass) has dropped to
SGD+M's loss at ``t2``; a second, identical Adam pass measures R_med at exactly those steps (training is
deterministic given the seed, so the second pass retraces the first). Per layer we compare
``R_med^Adam(t1)`` with ``R_med^SGD(t2)``, averaged over the matched pairs, over ``repeats`` data orders.
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
class SameLossConfig(rc.LMConfig):
    loss_every: int = 5
    n_checkpoints: int = 3

    def validate(self) -> None:
        super().validate()
        require(self.loss_every >= 1, "loss_every", self.loss_every, ">= 1")


QUICK = SameLossConfig(seq_len=32, n_train=2048, probe_size=16, d_model=32, n_layers=1, n_heads=4, steps=200,
                       batch_size=256, tune_steps=40, repeats=2, n_checkpoints=2, per_layer=200)
FULL = SameLossConfig(seq_len=64, n_train=20000, probe_size=512, d_model=128, n_layers=4, n_heads=4, steps=1800,
                      batch_size=512, sgdm_lrs=(0.03, 0.1, 0.3, 1.0), tune_steps=300, adam_lr=1e-3, repeats=8,
                      n_checkpoints=10)


def first_step_reaching(loss_curve: pd.Series, target: float) -> int | None:
    """First recorded step at which ``loss_curve`` (step -> loss) is at or below ``target`` (None if never)."""
    hit = loss_curve[loss_curve <= target]
    return int(hit.index.min()) if len(hit) else None


@register("rmed_same_loss", paper="000", title="R_med of Adam vs SGD+M at equal training loss, App. A.3",
          config=SameLossConfig, presets={"quick": QUICK, "full": FULL})
def run(config: SameLossConfig, store) -> Result:
    """Seed 000 Table 7 analogue: R_med^Adam(t1) vs R_med^SGD(t2) where L_Adam(t1) = L_SGD(t2)."""
    from optiscope.lab import compare

    cfg = config
    problem = rc.lm_problem(cfg)
    layers = weight_matrix_params(problem.model)
    best, tuning = rc.tuned_lr(problem, lambda lr: rc.sgdm_spec(cfg, lr), cfg.sgdm_lrs, cfg.tune_steps, cfg.seed,
                               batch_size=cfg.batch_size, checkpoint=False)
    rmed = rc.rmed_probe(layers, cfg.per_layer, cfg.delta)
    sgd_steps = rc.checkpoint_steps(cfg.steps, cfg.n_checkpoints)
    frames, pairs_all, status = [], [], {}
    va, vb = np.full((cfg.repeats, len(layers)), np.nan), np.full((cfg.repeats, len(layers)), np.nan)
    for r in range(cfg.repeats):
        kw = dict(batch_size=cfg.batch_size, seed=cfg.seed, data_seed=cfg.seed + r, checkpoint=False)
        sgd = compare(problem, {"sgdm": rc.sgdm_spec(cfg, best)}, cfg.steps, probes=["loss:on=probe", rmed],
                      probe_steps=sgd_steps, **kw)
        scan = compare(problem, {"adam": rc.adam_spec(cfg)}, cfg.steps, probes=["loss:on=probe"],
                       probe_every=cfg.loss_every, **kw)
        sm = sgd.metrics
        sgd_loss = sm[(sm["metric"] == "loss") & (sm["layer"] == "")].set_index("step")["value"]
        am = scan.metrics
        adam_curve = am[(am["metric"] == "loss") & (am["layer"] == "")].set_index("step")["value"].sort_index()
        pairs = []
        for t2 in sgd_steps:
            if t2 == 0 or t2 not in sgd_loss.index:
                continue
            t1 = first_step_reaching(adam_curve, float(sgd_loss[t2]))
            if t1 is not None and t1 > 0:
                pairs.append((t1, t2))
        status.update({f"sgdm/r{r}": sgd.runs["sgdm"].status, f"adam/r{r}": scan.runs["adam"].status})
        if not pairs:
            continue
        adam = compare(problem, {"adam": rc.adam_spec(cfg)}, max(t for t, _ in pairs), probes=["loss:on=probe", rmed],
                       probe_steps=sorted({t for t, _ in pairs}), **kw)
        adm = adam.metrics
        for t1, t2 in pairs:
            xa = adm[(adm["metric"] == "r_med") & (adm["step"] == t1)].set_index("layer")["value"]
            xb = sm[(sm["metric"] == "r_med") & (sm["step"] == t2)].set_index("layer")["value"]
            la = float(adm[(adm["metric"] == "loss") & (adm["layer"] == "") & (adm["step"] == t1)]["value"].iloc[0])
            pairs_all.append({"repeat": r, "step_adam": t1, "step_sgdm": t2, "loss_adam": la,
                              "loss_sgdm": float(sgd_loss[t2])})
            frames.append(pd.DataFrame({"repeat": r, "step_adam": t1, "step_sgdm": t2, "layer": layers,
                                        "r_med_adam": [float(xa.get(l, np.nan)) for l in layers],
                                        "r_med_sgdm": [float(xb.get(l, np.nan)) for l in layers]}))
        cur = pd.concat([f for f in frames if int(f["repeat"].iloc[0]) == r])
        g = cur.groupby("layer")[["r_med_adam", "r_med_sgdm"]].mean()
        va[r] = [g["r_med_adam"].get(l, np.nan) for l in layers]
        vb[r] = [g["r_med_sgdm"].get(l, np.nan) for l in layers]
        store.append_metrics(_tidy(sm, "sgdm", r))
        store.append_metrics(_tidy(adm, "adam", r))
    matched = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if not matched.empty:
        store.write_arrays("matched_r_med", step_adam=matched["step_adam"].to_numpy(),
                           step_sgdm=matched["step_sgdm"].to_numpy(), r_med_adam=matched["r_med_adam"].to_numpy(),
                           r_med_sgdm=matched["r_med_sgdm"].to_numpy())
    ok = np.isfinite(va).any(axis=1)
    if not ok.any():
        return Result(claims=[Claim("same_loss_pairs", "Adam reaches SGD+M's checkpoint losses", paper="yes",
                                    measured={"pairs": 0}, holds=False)],
                      metrics={"status": status, "sgdm_lr": best, "lr_tuning": {str(k): v for k, v in tuning.items()}})
    summary = rc.gap_summary(va[ok], vb[ok], layers, cfg.exclude_first, cfg.n_bootstrap, cfg.seed)
    claims = rc.gap_claims(summary, "same_loss", "adam", "sgdm",
                           paper_frac="R_med^Adam(t1) < R_med^SGD(t2) for most layers (Table 7)",
                           paper_ratio="ratio > 1 in most layers (Table 7)")
    store.write_text("layer_table.md", rc.layer_table_markdown(summary))
    _figure(store, matched, layers)
    return Result(claims=claims, metrics={"pairs": pairs_all, "summary": summary, "sgdm_lr": best,
                                          "lr_tuning": {str(k): v for k, v in tuning.items()}, "status": status})


def _tidy(df: pd.DataFrame, name: str, r: int) -> list[dict]:
    d = df.copy()
    d["optimizer"] = name
    d["run"] = f"{name}/r{r}"
    return d[["run", "optimizer", "step", "metric", "layer", "value"]].to_dict("records")


def _figure(store, matched: pd.DataFrame, layers) -> None:
    from optiscope.utils.plotting import plt

    if matched.empty:
        return
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.loglog(matched["r_med_sgdm"], matched["r_med_adam"], "o", ms=4)
    lim = [np.nanmin(matched[["r_med_sgdm", "r_med_adam"]].replace(np.inf, np.nan).to_numpy()),
           np.nanmax(matched[["r_med_sgdm", "r_med_adam"]].replace(np.inf, np.nan).to_numpy())]
    ax.plot(lim, lim, "k--", lw=1, label="equal")
    ax.set_xlabel("R_med SGD+M at t2")
    ax.set_ylabel("R_med Adam at t1 (same loss)")
    ax.set_title("every layer, every matched pair")
    ax.legend()
    store.save_figure(fig, "same_loss_r_med")

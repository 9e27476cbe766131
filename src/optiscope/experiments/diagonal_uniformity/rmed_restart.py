"""Restarting SGD+M from an Adam iterate and from an SGD+M iterate of the same training loss (Jiang, Malik, Li 2023,
§1, Fig. 1(a)).

"We select an iterate w_Adam from the Adam trajectory and an iterate w_SGD from the SGD trajectory, such that
L(w_Adam) = L(w_SGD). We then run SGD+M twice, once from w_Adam and once from w_SGD ... running SGD+M from w_Adam
achieves lower loss than running SGD+M from w_SGD." If the geometry were fixed by the loss alone, both restarts would
train alike.

Protocol, on the fortunes transformer of ``rmed_lm``: SGD+M's lr is tuned over the whole horizon (grid widened until
the best is strictly inside) and Adam's lr is one under which Adam is faster (§4; reported when there is none). Per
repeat r (data order ``seed + r``, same initialisation): Adam and SGD+M are trained for ``steps`` steps; the SGD+M
iterate is the one at ``t2 = pair_fraction * steps``; the Adam iterate is the step t1 whose whole-training-set loss is
nearest to ``L_SGD(t2)``, found step by step (App. A.3's pairing, to one step). SGD+M with the tuned lr (or
``restart_lr``) and a fresh momentum buffer then runs ``restart_steps`` steps from each, on the same new batch order.
The statistic is the per-repeat gap ``D = L(restart from w_SGD) - L(restart from w_Adam)`` after ``restart_steps``
steps; the claim holds when its Student-t 95% CI lies above 0.

Control (no systematic gap between two SGD+M iterates of the same loss): the SGD+M iterate of repeat r is paired with
the iterate of the SGD+M trajectory of repeat r+1 (another data order) of the same loss, and both are restarted
alike. Its gap must lie within +-``control_fraction`` x the Adam gap (equivalence test of
``metrics.verdicts.tolerance_claim``). If it did not, the equal-loss pairing itself would produce gaps.

Premises (otherwise untestable): SGD+M tuned and Adam faster (§4), SGD+M's paired iterate well below the unigram
plateau, every repeat paired, and the paired losses equal up to ``match_tolerance`` x the loss decrease of the
restart from w_SGD.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from optiscope.experiments.base import Claim, Result, register
from optiscope.experiments.diagonal_uniformity import _extra as x
from optiscope.experiments.diagonal_uniformity import common as rc
from optiscope.metrics.verdicts import direction_claim, mean_ci, tolerance_claim
from optiscope.utils.config import require
from optiscope.utils.progress import progress_task


@dataclass(frozen=True)
class RestartConfig(rc.LMConfig):
    """:class:`LMConfig` plus the pairing step, the restart length and lr, and the judging tolerances."""

    pair_fraction: float = 0.75      # SGD+M's iterate at t2 = pair_fraction * steps
    restart_steps: int = 150
    restart_lr: float = 0.0          # 0: the tuned SGD+M lr
    match_tolerance: float = 0.1     # |L_SGD(t2) - L_Adam(t1)| <= this x the restart's loss decrease
    control_fraction: float = 0.5    # control gap within +- this x |Adam gap|

    def validate(self) -> None:
        super().validate()
        require(0 < self.pair_fraction < 1, "pair_fraction", self.pair_fraction, "in (0, 1)")
        require(self.restart_steps >= 1, "restart_steps", self.restart_steps, ">= 1")
        require(self.restart_lr >= 0, "restart_lr", self.restart_lr, ">= 0 (0: the tuned SGD+M lr)")
        require(self.match_tolerance > 0, "match_tolerance", self.match_tolerance, "> 0")
        require(self.control_fraction > 0, "control_fraction", self.control_fraction, "> 0")
        require(self.repeats >= 2, "repeats", self.repeats, ">= 2 (a CI, and the control pairs two data orders)")
        require(round(self.pair_fraction * self.steps) >= 1, "pair_fraction", self.pair_fraction,
                f"a value with pair_fraction * steps >= 1 (steps = {self.steps})")

    @property
    def pair_step(self) -> int:
        """SGD+M's paired step ``t2``."""
        return round(self.pair_fraction * self.steps)


QUICK = RestartConfig(seq_len=32, n_train=2048, probe_size=16, d_model=32, n_layers=1, n_heads=4, steps=160,
                      batch_size=256, sgdm_lrs=(0.03, 0.1, 0.3), adam_lrs=(3e-3,), repeats=3, max_widen=1,
                      restart_steps=50, loss_every=10)
MEDIUM = dataclasses.replace(QUICK, steps=600, adam_lrs=(3e-3, 1e-2), repeats=5, max_widen=2, restart_steps=200)
FULL = RestartConfig(seq_len=64, n_train=20000, probe_size=512, d_model=128, n_layers=4, n_heads=4, steps=1800,
                     batch_size=512, sgdm_lrs=(0.01, 0.03, 0.1, 0.3, 1.0), adam_lrs=(1e-4, 3e-4, 1e-3, 3e-3),
                     repeats=8, restart_steps=600, loss_every=20, device="auto")


@register("rmed_restart", paper="000", title="SGD+M restarted from an Adam iterate vs from an SGD+M iterate of the "
          "same training loss, Fig. 1(a)", config=RestartConfig, presets={"quick": QUICK, "medium": MEDIUM,
                                                                         "full": FULL})
def run(config: RestartConfig, store) -> Result:
    """Jiang et al. 2023, Fig. 1(a) analogue: SGD+M from equal-loss Adam and SGD+M iterates, with an SGD+M-vs-SGD+M
    control."""
    cfg = config
    t0 = time.perf_counter()
    problem = rc.lm_problem(cfg)
    init = problem.model
    kw = {"batch_size": cfg.batch_size, "checkpoint": False}
    H = rc.unigram_entropy(problem.train[1].cpu())
    tune = rc.tune_lr(problem, lambda lr: rc.sgdm_spec(cfg, lr), cfg.sgdm_lrs, cfg.horizon, cfg.seed,
                      max_widen=cfg.max_widen, **kw)
    pick = rc.pick_adaptive_lr(problem, lambda lr: rc.adam_spec(cfg, lr), cfg.adam_grid, cfg.horizon, cfg.seed,
                               tune.losses[tune.best], **kw)
    specs = {"adam": rc.adam_spec(cfg, pick.lr), "sgdm": rc.sgdm_spec(cfg, tune.best)}
    restart_spec = rc.sgdm_spec(cfg, cfg.restart_lr or tune.best)
    t2, R = cfg.pair_step, cfg.repeats
    common = {"seed": cfg.seed, "batch_size": cfg.batch_size}
    frames, curves, snaps, status = [], {}, {}, {}
    restarts: dict[str, list[pd.Series | None]] = {"from_adam": [None] * R, "from_sgdm": [None] * R,
                                                   "control_from_sgdm_other_order": [None] * R}
    pairs: list[dict] = []
    with progress_task("rmed_restart", total=3 * R) as bar:
        for r in range(R):          # the two trajectories of each data order
            for name, spec in specs.items():
                res, snap = x.train(problem, spec, init, cfg.steps, data_seed=cfg.seed + r, loss_every=cfg.loss_every,
                                    snapshot_steps=[t2] if name == "sgdm" else [], probe_steps=[t2], **common)
                df = res.metrics.copy()
                df["optimizer"], df["repeat"], df["run"] = name, r, name
                frames.append(df)
                curves[name, r] = x.loss_series(res.metrics)
                status[f"{name}/r{r}"] = res.status
                if name == "sgdm":
                    snaps[r] = snap.snapshots.get(t2)
            bar.advance()
        for r in range(R):          # pairs and restarts
            rs = dict(data_seed=cfg.seed + 10_000 + r, loss_every=cfg.loss_every, **common)
            row: dict = {"repeat": r, "step_sgdm": t2}
            target = float(curves["sgdm", r].get(t2, np.nan))
            row["loss_sgdm"] = x.jsonable(target)
            if snaps.get(r) is None or not np.isfinite(target):
                pairs.append(row)
                bar.advance(2)
                continue
            curve_s, st = x.restart(problem, restart_spec, init, snaps[r], cfg.restart_steps, **rs)
            restarts["from_sgdm"][r] = curve_s
            status[f"restart_from_sgdm/r{r}"] = st
            it = x.match_loss(problem, specs["adam"], init, curves["adam", r], target, data_seed=cfg.seed + r,
                              **common)
            if it is not None:
                curve_a, st = x.restart(problem, restart_spec, init, it.state, cfg.restart_steps, **rs)
                restarts["from_adam"][r] = curve_a
                status[f"restart_from_adam/r{r}"] = st
                row.update(step_adam=it.step, loss_adam=it.loss)
            bar.advance()
            o = (r + 1) % R         # control: SGD+M of another data order, same loss
            it = x.match_loss(problem, specs["sgdm"], init, curves["sgdm", o], target, data_seed=cfg.seed + o,
                              **common)
            if it is not None:
                curve_c, st = x.restart(problem, restart_spec, init, it.state, cfg.restart_steps, **rs)
                restarts["control_from_sgdm_other_order"][r] = curve_c
                status[f"restart_control/r{r}"] = st
                row.update(control_repeat=o, step_control=it.step, loss_control=it.loss)
            pairs.append(row)
            bar.advance()
    metrics = pd.concat(frames, ignore_index=True)
    finals = {o: [rc.final_loss(metrics[metrics["repeat"] == r], o) for r in range(R)] for o in specs}
    out = gaps(pairs, restarts, cfg.restart_steps)
    premises = rc.premises_for(tune, pick, finals["adam"], finals["sgdm"], out["mean_loss_sgdm_at_t2"], H,
                               cfg.plateau_fraction, plateau_label=f"SGD+M at its paired step t2 = {t2}")
    claims = restart_claims(out, premises, cfg.match_tolerance, cfg.control_fraction, R,
                            diverged=[k for k, v in status.items() if v != "finished"])
    _store(store, metrics, restarts)
    return Result(claims=claims, metrics={
        "sgdm_lr": tune.best, "restart_lr": restart_spec[1]["lr"], "lr_tuning": tune.to_dict(),
        "adaptive_lr": pick.to_dict(), "unigram_entropy": H, "pair_step_sgdm": t2, "final_losses": finals,
        "pairs": pairs, "gaps": out, "status": status, "seconds": time.perf_counter() - t0})


def _final(curve: pd.Series | None) -> float:
    return float(curve.iloc[-1]) if curve is not None and len(curve) else float("nan")


def gaps(pairs: list[dict], restarts: dict[str, list], restart_steps: int) -> dict:
    """Per-repeat losses after the restarts and the two gaps: ``D = L(from w_SGD) - L(from w_Adam)`` and the control
    ``D_ctrl = L(from w_SGD) - L(from w_SGD of another data order)``, with the starting mismatches ``L_SGD(t2) -
    L(paired iterate)`` and the loss decrease of the restart from w_SGD."""
    R = len(pairs)
    fa = np.array([_final(c) for c in restarts["from_adam"]])
    fs = np.array([_final(c) for c in restarts["from_sgdm"]])
    fc = np.array([_final(c) for c in restarts["control_from_sgdm_other_order"]])
    ls = np.array([p.get("loss_sgdm") if p.get("loss_sgdm") is not None else np.nan for p in pairs], float)
    la = np.array([p.get("loss_adam", np.nan) for p in pairs], float)
    lc = np.array([p.get("loss_control", np.nan) for p in pairs], float)
    d, dc = fs - fa, fs - fc
    lst = lambda a: [x.jsonable(v) for v in a]
    return {"restart_steps": restart_steps, "repeats": R, "loss_after_restart_from_adam": lst(fa),
            "loss_after_restart_from_sgdm": lst(fs), "loss_after_control_restart": lst(fc),
            "gap": lst(d), "control_gap": lst(dc), "start_mismatch": lst(ls - la),
            "control_start_mismatch": lst(ls - lc), "decrease_from_sgdm": lst(ls - fs),
            "decrease_difference": lst((la - fa) - (ls - fs)),
            "n_pairs": int(np.isfinite(d).sum()), "n_control_pairs": int(np.isfinite(dc).sum()),
            "mean_loss_sgdm_at_t2": float(np.nanmean(ls)) if np.isfinite(ls).any() else float("nan")}


def restart_claims(out: dict, premises, match_tolerance: float, control_fraction: float, repeats: int,
                   diverged: list[str] = ()) -> list[Claim]:
    """The claim (the gap D has a CI above 0) and its control (the SGD+M-vs-SGD+M gap within
    +-``control_fraction`` x |mean D|, equivalence test), from :func:`gaps`' output; both untestable when a premise
    fails: ``premises`` (the protocol), every repeat paired, no restart diverged, and the starting mismatch at most
    ``match_tolerance`` x the restart's loss decrease."""
    d = np.array([np.nan if v is None else v for v in out["gap"]], float)
    dc = np.array([np.nan if v is None else v for v in out["control_gap"]], float)
    mis = np.array([np.nan if v is None else v for v in out["start_mismatch"]], float)
    mis_c = np.array([np.nan if v is None else v for v in out["control_start_mismatch"]], float)
    dec = np.array([np.nan if v is None else v for v in out["decrease_from_sgdm"]], float)
    mean_dec = float(np.nanmean(dec)) if np.isfinite(dec).any() else float("nan")

    def matched(m: np.ndarray, what: str):
        mm = float(np.nanmean(np.abs(m))) if np.isfinite(m).any() else float("nan")
        return (np.isfinite(mm) and mean_dec > 0 and mm <= match_tolerance * mean_dec,
                (f"{what}: mean |loss mismatch| {mm:.3g} of the paired iterates exceeds {match_tolerance:g} x the "
                f"loss decrease {mean_dec:.3g} of SGD+M restarted from its own iterate"))

    base = list(premises) + [(not diverged, f"runs diverged: {', '.join(diverged)}")]
    p_main = base + [(out["n_pairs"] == repeats, (f"Adam reached SGD+M's paired loss in only {out['n_pairs']} of "
                                                 f"{repeats} repeats")), matched(mis, "Adam-SGD+M pairs")]
    m, lo, hi = mean_ci(d)
    v = direction_claim((lo, hi), null=0.0, estimate=m, premises=p_main)
    mc, lc, hc = mean_ci(dc)
    tau = control_fraction * abs(m) if np.isfinite(m) else float("nan")
    p_ctrl = base + [(out["n_control_pairs"] >= 2, f"only {out['n_control_pairs']} SGD+M-SGD+M pairs (need 2)"),
                     matched(mis_c, "SGD+M-SGD+M pairs"),
                     (v.holds is True, "no Adam-vs-SGD+M restart gap is established to compare the control with")]
    vc = tolerance_claim(mc, 0.0, abs_tol=tau, ci=(lc, hc), premises=p_ctrl)
    return [
        Claim.judged("restart_from_adam_faster", f"SGD+M restarted from an Adam iterate reaches a lower training "
                     f"loss after {out['restart_steps']} steps than SGD+M restarted from an SGD+M iterate of the "
                     "same loss (per-repeat gap, Student-t 95% CI > 0)",
                     "running SGD+M from w_Adam achieves lower loss than from w_SGD (Fig. 1(a))",
                     {"gap_mean": x.jsonable(m), "gap_ci95": [x.jsonable(lo), x.jsonable(hi)],
                      "repeats": int(np.isfinite(d).sum()),
                      "mean_start_mismatch": x.jsonable(np.nanmean(mis)) if np.isfinite(mis).any() else None,
                      "mean_decrease_from_sgdm": x.jsonable(mean_dec)}, v),
        Claim.judged("control_sgdm_pairs_no_gap", "negative control: two SGD+M iterates of different data orders "
                     "at the same loss, restarted alike, show no systematic gap: the control gap's 95% CI lies "
                     f"within +-{control_fraction:g} x |mean Adam gap|",
                     "the gap comes from where Adam leads, not from the equal-loss pairing",
                     {"control_gap_mean": x.jsonable(mc), "control_gap_ci95": [x.jsonable(lc), x.jsonable(hc)],
                      "tolerance": x.jsonable(tau), "repeats": int(np.isfinite(dc).sum())}, vc),
    ]


def _store(store, metrics: pd.DataFrame, restarts: dict) -> None:
    from optiscope.utils.plotting import plt

    rows = []
    for name, cs in restarts.items():
        for r, c in enumerate(cs):
            if c is not None:
                rows += [{"run": f"restart_{name}", "optimizer": f"restart_{name}", "step": int(s), "metric": "loss",
                          "layer": "", "value": float(v), "repeat": r} for s, v in c.items()]
    rc.store_metrics(store, pd.concat([metrics, pd.DataFrame(rows)], ignore_index=True))
    rc.plot_loss(store, metrics, title="training loss (repeat 0)")
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, cs in restarts.items():
        ok = [c for c in cs if c is not None and len(c)]
        if ok:
            m = pd.concat(ok, axis=1).mean(axis=1)
            ax.plot(m.index, m.values, marker="o", ms=3, label=name.replace("_", " "))
    ax.set_xlabel("SGD+M steps after the restart")
    ax.set_ylabel("training loss (mean over repeats)")
    ax.set_title("SGD+M restarted from equal-loss iterates")
    ax.legend(fontsize=7)
    fig.tight_layout()
    store.save_figure(fig, "restart_loss")

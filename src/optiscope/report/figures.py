"""Figures of a lab run directory (tidy ``metrics.parquet``): loss curves, R_med per layer over time, sharpness
(with the 2/lr and preconditioned thresholds when known), perturbed one-norm. Each function takes the tidy metrics
frame and returns a matplotlib figure or ``None`` when the metric is absent; :func:`plot_run` writes all of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from optiscope.lab.store import RunStore
from optiscope.utils.plotting import plt


def _runs(df: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(df["run"].tolist()))


def _series(df: pd.DataFrame, run: str, metric: str, layer: str = "") -> pd.Series:
    d = df[(df["run"] == run) & (df["metric"] == metric) & (df["layer"] == layer)]
    return d.groupby("step")["value"].mean().sort_index()


def _diverged(df: pd.DataFrame, run: str) -> int | None:
    d = df[(df["run"] == run) & (df["metric"] == "diverged")]
    return None if d.empty else int(d["step"].min())


def plot_loss(df: pd.DataFrame):
    """Training loss at checkpoints (solid), minibatch loss (faint) and eval loss (dashed), one colour per run."""
    if not df["metric"].isin(["loss", "batch_loss"]).any():
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, run in enumerate(_runs(df)):
        c = f"C{i % 10}"
        b = _series(df, run, "batch_loss")
        if len(b):
            w = max(1, len(b) // 50)
            ax.plot(b.index, b.rolling(w, min_periods=1).mean(), color=c, alpha=0.3, lw=1)
        s = _series(df, run, "loss")
        if len(s):
            ax.plot(s.index, s.values, color=c, marker="o", ms=3, label=f"{run} train")
        e = _series(df, run, "eval_loss")
        if len(e):
            ax.plot(e.index, e.values, color=c, ls="--", label=f"{run} eval")
        t = _diverged(df, run)
        if t is not None:
            ax.axvline(t, color=c, ls=":", lw=1)
            ax.annotate(f"{run} diverged at step {t}", (t, 0.9), xycoords=("data", "axes fraction"), color=c,
                        fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title("loss (faint: minibatch, smoothed)")
    ax.legend(fontsize=8)
    return fig


def plot_r_med(df: pd.DataFrame):
    """R_med per layer over time: one panel per layer, one line per run (Jiang et al. 2023, Tables 1-2 as curves)."""
    d = df[df["metric"] == "r_med"]
    if d.empty:
        return None
    layers = list(dict.fromkeys(d["layer"].tolist()))
    n = len(layers)
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharex=True)
    for k, layer in enumerate(layers):
        ax = axes[k // cols][k % cols]
        for i, run in enumerate(_runs(df)):
            s = _series(df, run, "r_med", layer)
            if len(s):
                ax.plot(s.index, s.values, color=f"C{i % 10}", marker="o", ms=2, label=run)
        ax.set_title(layer, fontsize=9)
        ax.set_yscale("log")
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("R_med = max h_ii / median h_ii per layer (200 sampled coordinates)")
    fig.supxlabel("step")
    fig.tight_layout()
    return fig


def plot_sharpness(df: pd.DataFrame, lrs: dict[str, float] | None = None):
    """Top Hessian eigenvalue (solid) and preconditioned sharpness (dashed) per run; 2/lr lines when ``lrs`` given
    for non-adaptive runs, and the adaptive threshold recorded by the ``precond_sharpness`` probe."""
    if not df["metric"].isin(["sharpness", "precond_sharpness"]).any():
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, run in enumerate(_runs(df)):
        c = f"C{i % 10}"
        s = _series(df, run, "sharpness")
        if len(s):
            ax.plot(s.index, s.values, color=c, marker="o", ms=3, label=f"{run} lambda_max(H)")
        p = _series(df, run, "precond_sharpness")
        if len(p):
            ax.plot(p.index, p.values, color=c, ls="--", label=f"{run} lambda_max(P^-1/2 H P^-1/2)")
            th = _series(df, run, "precond_sharpness_threshold")
            if len(th):
                ax.axhline(float(th.iloc[-1]), color=c, ls=":", lw=1)
        if lrs and run in lrs and not len(p) and lrs[run]:
            ax.axhline(2.0 / lrs[run], color=c, ls=":", lw=1, label=f"{run} 2/lr")
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.set_title("sharpness")
    ax.legend(fontsize=7)
    return fig


def plot_one_norm(df: pd.DataFrame):
    """Perturbed one-norm of the probe-batch gradient, sum_i sqrt(g_i^2 + eps), per run (Cattaneo et al. 2024)."""
    if not (df["metric"] == "one_norm").any():
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, run in enumerate(_runs(df)):
        s = _series(df, run, "one_norm")
        if len(s):
            ax.plot(s.index, s.values, color=f"C{i % 10}", marker="o", ms=3, label=run)
    ax.set_xlabel("step")
    ax.set_ylabel("||g||_{1,eps}")
    ax.set_yscale("log")
    ax.set_title("perturbed one-norm of the gradient")
    ax.legend(fontsize=8)
    return fig


def _lrs_from_config(store: RunStore) -> dict[str, float]:
    """Learning rate per run of a lab comparison directory, keyed by the run names the lab used
    (:meth:`CompareConfig.run_names`); empty for other run directories or specs without an ``lr``."""
    from optiscope.lab.config import load_compare_config
    from optiscope.utils.spec import parse_spec

    try:
        cfg = load_compare_config(store)
    except Exception:
        return {}
    out = {}
    for name, spec in zip(cfg.run_names(), cfg.optimizers):
        _, kw = parse_spec(str(spec))
        if isinstance(kw.get("lr"), (int, float)):
            out[name] = float(kw["lr"])
    return out


def plot_run(store: RunStore | str | Path) -> list[Path]:
    """Write ``figures/{loss,r_med,sharpness,one_norm}.png`` for every metric present; return the paths."""
    if not isinstance(store, RunStore):
        store = RunStore.open(store)
    df = store.read_metrics()
    if df.empty:
        return []
    out = []
    for name, fig in (("loss", plot_loss(df)), ("r_med", plot_r_med(df)),
                      ("sharpness", plot_sharpness(df, _lrs_from_config(store))), ("one_norm", plot_one_norm(df))):
        if fig is not None:
            out.append(store.save_figure(fig, name))
    return out

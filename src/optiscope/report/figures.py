r"""Figures of a lab run directory (tidy ``metrics.parquet``): loss curves, R_med per layer over time, sharpness
with the stability threshold that applies to each optimizer, and the perturbed one-norm. Each function takes the
tidy metrics frame and returns a matplotlib figure or ``None`` when the metric is absent; :func:`plot_run` writes
all of them.

Stability lines (:func:`plot_sharpness`):

* SGD, SGD+M and heavy ball: the top Hessian eigenvalue against ``2 (1 + beta) / lr``
  (:func:`optiscope.theory.sgd.momentum_sharpness_threshold`; Velikanov et al. 2023, App. H) -- with momentum 0.9
  and lr 0.05 that is 76, not ``2 / lr`` = 40.
* Adam and other adaptive methods: the plain sharpness has no threshold of its own; the preconditioned sharpness
  ``lambda_max(P^{-1/2} H P^{-1/2})`` (probe ``precond_sharpness``) is drawn in its own panel against
  ``2 (1 + beta1) / ((1 - beta1) lr)`` (:func:`optiscope.theory.adam.adaptive_edge_of_stability`, recorded by the
  probe as ``precond_sharpness_threshold``).

Every figure uses matplotlib's constrained layout (no overlapping labels) and mathtext for formulas; every axis
names its quantity and unit (``step`` counts optimizer updates; Hessian eigenvalues are in loss per squared
parameter unit, gradients in loss per parameter unit).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from optiscope.lab.store import RunStore
from optiscope.utils.plotting import plt

__all__ = ["OptimizerInfo", "optimizer_info", "plot_loss", "plot_one_norm", "plot_r_med", "plot_run",
           "plot_sharpness", "sharpness_threshold"]

STEP_LABEL = "step (optimizer updates)"
SHARPNESS_UNIT = "loss / parameter$^2$"


def _runs(df: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(df["run"].tolist()))


def _series(df: pd.DataFrame, run: str, metric: str, layer: str = "") -> pd.Series:
    d = df[(df["run"] == run) & (df["metric"] == metric) & (df["layer"] == layer)]
    return d.groupby("step")["value"].mean().sort_index()


def _diverged(df: pd.DataFrame, run: str) -> int | None:
    d = df[(df["run"] == run) & (df["metric"] == "diverged")]
    return None if d.empty else int(d["step"].min())


def _figure(width: float = 6.4, height: float = 4.2, **kw):
    return plt.subplots(figsize=(width, height), layout="constrained", **kw)


@dataclass(frozen=True)
class OptimizerInfo:
    """What the stability line of one run needs: its optimizer ``name``, ``lr``, ``momentum`` (heavy-ball or
    PyTorch momentum; 0 without), ``beta1`` (adaptive methods) and whether it is ``adaptive``
    (a diagonal preconditioner: Adam, AMSGrad, RMSProp, Adagrad) or ``sign`` (signGD: no sharpness threshold)."""

    name: str
    lr: float | None
    momentum: float = 0.0
    beta1: float | None = None
    adaptive: bool = False
    sign: bool = False


def optimizer_info(spec: str) -> OptimizerInfo:
    """Hyperparameters of an optimizer spec (``"sgdm:lr=0.05"``) with the factory's defaults filled in (builds the
    optimizer on a one-element dummy parameter; ``sgdm`` defaults to momentum 0.9)."""
    import torch

    from optiscope.optim.adaptive import Adagrad, Adam, AMSGrad, RMSProp
    from optiscope.optim.factory import make_optimizer
    from optiscope.optim.momentum import SignGD

    name = str(spec).split(":", 1)[0].strip()
    opt = make_optimizer(str(spec), [torch.zeros(1, requires_grad=True)])
    g = opt.param_groups[0]
    lr = float(g["lr"]) if g.get("lr") is not None else None
    adaptive = isinstance(opt, (Adam, AMSGrad, RMSProp, Adagrad))
    betas = g.get("betas")
    beta1 = float(betas[0]) if betas is not None else None
    momentum = 0.0 if adaptive else float(g.get("momentum", 0.0) or 0.0)
    return OptimizerInfo(name=name, lr=lr, momentum=momentum, beta1=beta1, adaptive=adaptive,
                         sign=isinstance(opt, SignGD))


def sharpness_threshold(info: OptimizerInfo) -> float | None:
    """The threshold on the plain sharpness ``lambda_max(H)`` for a non-adaptive run: ``2 (1 + beta) / lr``
    (:func:`optiscope.theory.sgd.momentum_sharpness_threshold`); ``None`` for adaptive and sign methods (their
    threshold concerns the preconditioned sharpness) or when the lr is unknown."""
    from optiscope.theory.sgd import momentum_sharpness_threshold

    if info.adaptive or info.sign or not info.lr:
        return None
    return momentum_sharpness_threshold(info.lr, info.momentum)


def _threshold_label(info: OptimizerInfo) -> str:
    if info.momentum:
        return rf"$2(1+\beta)/\eta$ = {sharpness_threshold(info):.4g} ($\beta$={info.momentum:g}, $\eta$={info.lr:g})"
    return rf"$2/\eta$ = {sharpness_threshold(info):.4g} ($\eta$={info.lr:g})"


def plot_loss(df: pd.DataFrame):
    """Training loss at checkpoints (solid, markers), minibatch loss (faint, smoothed) and eval loss (dashed), one
    colour per run; a dotted vertical line marks a divergence."""
    if not df["metric"].isin(["loss", "batch_loss"]).any():
        return None
    fig, ax = _figure()
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
            ax.axvline(t, color=c, ls=":", lw=1, label=f"{run} diverged at step {t}")
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel("loss (mean per sample, log scale)")
    ax.set_yscale("log")
    ax.set_title("loss (faint: minibatch loss, smoothed)")
    ax.legend(fontsize=8)
    return fig


def plot_r_med(df: pd.DataFrame):
    r"""R_med per layer over time: one panel per layer, one line per run (Jiang et al. 2023, Tables 1-2 as
    curves); ``R_med = max_i h_ii / median_i h_ii`` over the sampled diagonal entries, a dimensionless ratio."""
    d = df[df["metric"] == "r_med"]
    if d.empty:
        return None
    layers = list(dict.fromkeys(d["layer"].tolist()))
    n = len(layers)
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.8 * rows + 0.6), squeeze=False, sharex=True,
                             layout="constrained")
    for k, layer in enumerate(layers):
        ax = axes[k // cols][k % cols]
        for i, run in enumerate(_runs(df)):
            s = _series(df, run, "r_med", layer)
            if len(s):
                ax.plot(s.index, s.values, color=f"C{i % 10}", marker="o", ms=2, label=run)
        ax.set_title(layer, fontsize=9)
        ax.set_yscale("log")
        ax.set_ylabel(r"$R_{med}$ (ratio, log scale)", fontsize=8)
        if k // cols == rows - 1 or k + cols >= n:
            ax.set_xlabel(STEP_LABEL)
            ax.xaxis.set_tick_params(labelbottom=True)
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", fontsize=8, ncols=max(1, len(labels)))
    fig.suptitle(r"$R_{med} = \max_i h_{ii} / \mathrm{median}_i\, h_{ii}$ per layer (sampled Hessian diagonal)",
                 fontsize=10)
    return fig


def plot_sharpness(df: pd.DataFrame, optimizers: dict[str, OptimizerInfo] | dict[str, float] | None = None):
    r"""Sharpness per run and the stability threshold that applies to it (see the module docstring).

    Left panel: ``lambda_max(H)`` per run, with a dotted ``2 (1 + beta) / lr`` line for each non-adaptive run.
    Right panel (when the ``precond_sharpness`` probe ran): ``lambda_max(P^{-1/2} H P^{-1/2})`` of the adaptive runs
    with their dotted ``2 (1 + beta1) / ((1 - beta1) lr)`` line. ``optimizers`` maps a run name to its
    :class:`OptimizerInfo` (a bare float is read as the lr of momentum-free SGD)."""
    if not df["metric"].isin(["sharpness", "precond_sharpness"]).any():
        return None
    infos: dict[str, OptimizerInfo] = {}
    for run, v in (optimizers or {}).items():
        infos[run] = v if isinstance(v, OptimizerInfo) else OptimizerInfo(name="sgd", lr=float(v))
    has_pre = (df["metric"] == "precond_sharpness").any()
    has_raw = (df["metric"] == "sharpness").any()
    ncols = int(has_raw) + int(has_pre)
    fig, axes = _figure(5.6 * ncols, 4.4, ncols=ncols, squeeze=False)
    axes = list(axes[0])
    ax_raw = axes.pop(0) if has_raw else None
    ax_pre = axes.pop(0) if has_pre else None
    for i, run in enumerate(_runs(df)):
        c = f"C{i % 10}"
        info = infos.get(run)
        s = _series(df, run, "sharpness")
        if ax_raw is not None and len(s):
            ax_raw.plot(s.index, s.values, color=c, marker="o", ms=3, label=rf"{run}: $\lambda_{{max}}(H)$")
            th = sharpness_threshold(info) if info is not None else None
            if th is not None:
                ax_raw.axhline(th, color=c, ls=":", lw=1.2, label=f"{run}: {_threshold_label(info)}")
        p = _series(df, run, "precond_sharpness")
        if ax_pre is not None and len(p):
            ax_pre.plot(p.index, p.values, color=c, marker="s", ms=3, ls="--",
                        label=rf"{run}: $\lambda_{{max}}(P^{{-1/2}} H P^{{-1/2}})$")
            th = _series(df, run, "precond_sharpness_threshold")
            if len(th):
                beta = f", $\\beta_1$={info.beta1:g}, $\\eta$={info.lr:g}" if info and info.beta1 is not None else ""
                ax_pre.axhline(float(th.iloc[-1]), color=c, ls=":", lw=1.2,
                               label=rf"{run}: $2(1+\beta_1)/((1-\beta_1)\eta)$ = {float(th.iloc[-1]):.4g}{beta}")
    if ax_raw is not None:
        ax_raw.set_xlabel(STEP_LABEL)
        ax_raw.set_ylabel(rf"$\lambda_{{max}}(H)$ ({SHARPNESS_UNIT}, log scale)")
        ax_raw.set_yscale("log")
        ax_raw.set_title("sharpness; dotted: heavy-ball stability threshold", fontsize=10)
        ax_raw.legend(fontsize=7)
    if ax_pre is not None:
        ax_pre.set_xlabel(STEP_LABEL)
        ax_pre.set_ylabel(r"$\lambda_{max}(P^{-1/2} H P^{-1/2})$ (1 / parameter, log scale)")
        ax_pre.set_yscale("log")
        ax_pre.set_title("preconditioned sharpness (adaptive runs); dotted: adaptive edge", fontsize=10)
        ax_pre.legend(fontsize=7)
    return fig


def plot_one_norm(df: pd.DataFrame):
    r"""Perturbed one-norm of the probe-batch gradient, ``sum_i sqrt(g_i^2 + eps)``, per run (Cattaneo et al. 2024,
    §1)."""
    if not (df["metric"] == "one_norm").any():
        return None
    fig, ax = _figure()
    for i, run in enumerate(_runs(df)):
        s = _series(df, run, "one_norm")
        if len(s):
            ax.plot(s.index, s.values, color=f"C{i % 10}", marker="o", ms=3, label=run)
    eps = df[df["metric"] == "one_norm_eps"]["value"]
    eps_txt = rf", $\epsilon$ = {float(eps.iloc[-1]):.3g}" if len(eps) else ""
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel(r"$\|g\|_{1,\epsilon}$ (loss / parameter, log scale)")
    ax.set_yscale("log")
    ax.set_title(r"perturbed one-norm $\|g\|_{1,\epsilon} = \sum_i \sqrt{g_i^2 + \epsilon}$" + eps_txt)
    ax.legend(fontsize=8)
    return fig


def _optimizers_from_config(store: RunStore) -> dict[str, OptimizerInfo]:
    """:class:`OptimizerInfo` per run of a lab comparison directory, keyed by the run names the lab used
    (:meth:`CompareConfig.run_names`); empty for other run directories."""
    from optiscope.lab.config import load_compare_config
    from optiscope.lab.store import StoreError

    try:
        cfg = load_compare_config(store)
    except (StoreError, OSError, ValueError, KeyError, TypeError):  # not a lab comparison: no stability lines
        return {}
    out = {}
    for name, spec in zip(cfg.run_names(), cfg.optimizers):
        try:
            out[name] = optimizer_info(str(spec))
        except ValueError:
            continue
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
                      ("sharpness", plot_sharpness(df, _optimizers_from_config(store))),
                      ("one_norm", plot_one_norm(df))):
        if fig is not None:
            out.append(store.save_figure(fig, name))
    return out

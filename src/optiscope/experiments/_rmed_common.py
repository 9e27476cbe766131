"""Shared machinery of the R_med experiments (seed 000; issue 8): ``rmed_*`` modules compose these.

* :func:`rmed_probe`: the lab's R_med probe (seed 000 §3.2, Eq. 1) on selected parameter tensors only (default:
  the weight matrices), so that biases and LayerNorm gains cost no Hessian-vector products.
* :func:`compare_repeats`: SGD+M vs Adam (or any optimizers) from the same initial model, R repeats that differ
  only in the data order (seed 000 §4.1: "repeated ... starting from the same initialization").
* :func:`tune_lr`: the best learning rate of a grid by final training loss (seed 000 §4: "we tuned and chose the
  best (initial) learning rate of SGD+M").
* :func:`gap_summary`: the issue's headline numbers: fraction of layers (the first ``exclude_first`` excluded) where
  optimizer A's R_med is below B's, and the median over layers of the ratio ``mean_r R_B / mean_r R_A`` with a
  bootstrap 95% interval over repeats (``scipy.stats.bootstrap``, percentile method, repeats resampled).
* Figures: loss curves and per-layer R_med over training.

Which R_med value summarises a run is an open choice (the seed's tables do not say at which iterate they are
taken): ``at="late_mean"`` (default) averages the checkpoints in the second half of training; ``"final"`` uses
the last checkpoint.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from optiscope.lab.probes import weight_matrix_params
from optiscope.utils.config import Config, require
from optiscope.utils.plotting import plt

AT_CHOICES = ("late_mean", "final")


# ----------------------------------------------------------------------------------------------------------------
# probe
# ----------------------------------------------------------------------------------------------------------------
def rmed_probe(params: Sequence[str] | str = "weights", per_layer: int = 200, delta: float = 0.0,
               save_diagonal: bool = False):
    """The lab's ``r_med`` probe restricted to ``params`` (default: the weight matrices; the seed counts "layers"
    without normalisation layers, App. A.1), so that biases and LayerNorm gains cost no Hessian-vector products."""
    from optiscope.lab.probes import RMedProbe

    return RMedProbe(per_layer=per_layer, delta=delta, save_diagonal=save_diagonal, params=params,
                     record_seconds=True)


# ----------------------------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------------------------
def checkpoint_steps(steps: int, n_checkpoints: int) -> tuple[int, ...]:
    """``n_checkpoints`` probe steps spread evenly over ``(0, steps]`` (step 0 and the last step are always probed)."""
    if n_checkpoints < 1:
        raise ValueError(f"n_checkpoints = {n_checkpoints} must be >= 1")
    return tuple(sorted({int(round(steps * (k + 1) / n_checkpoints)) for k in range(n_checkpoints)}))


@dataclass
class RepeatsOutcome:
    """Metrics of all repeats (tidy frame with an added ``repeat`` column) and each run's status."""

    metrics: pd.DataFrame
    status: dict[str, str]          # "<optimizer>/r<k>" -> "finished" | "diverged at step t"
    seconds: float


def compare_repeats(problem, optimizers: Mapping[str, Any], steps: int, repeats: int, seed: int,
                    probes: Sequence[Any], progress: Callable[[], None] | None = None,
                    **run_kwargs: Any) -> RepeatsOutcome:
    """``lab.compare`` repeated ``repeats`` times from the same initial model, repeat r with ``data_seed = seed + r``.

    Every optimizer of one repeat starts from a deep copy of ``problem.model`` and sees the same batch order.
    """
    from optiscope.lab import compare

    if repeats < 1:
        raise ValueError(f"repeats = {repeats} must be >= 1")
    frames, status = [], {}
    t0 = time.perf_counter()
    for r in range(repeats):
        res = compare(problem, dict(optimizers), steps, probes=list(probes), seed=seed, data_seed=seed + r,
                      **run_kwargs)
        df = res.metrics.copy()
        df["optimizer"] = df["run"]            # the comparison's names (the lab stores the spec label here)
        df["repeat"] = r
        frames.append(df)
        for name, run in res.runs.items():
            status[f"{name}/r{r}"] = run.status
        if progress is not None:
            progress()
    return RepeatsOutcome(pd.concat(frames, ignore_index=True), status, time.perf_counter() - t0)


def final_loss(metrics: pd.DataFrame, optimizer: str, metric: str = "loss") -> float:
    """Last recorded value of a global ``metric`` for ``optimizer`` (mean over repeats); NaN if missing."""
    df = metrics[(metrics["optimizer"] == optimizer) & (metrics["metric"] == metric) & (metrics["layer"] == "")]
    if df.empty:
        return float("nan")
    last = df[df["step"] == df["step"].max()]
    return float(last["value"].mean())


def tune_lr(problem, make_spec: Callable[[float], Any], grid: Sequence[float], steps: int, seed: int,
            **run_kwargs: Any) -> tuple[float, dict[float, float]]:
    """Best learning rate of ``grid`` by final training loss after ``steps`` (diverged runs count as +inf).

    Returns ``(best_lr, {lr: final_loss})``. All candidates start from the same initial model and data order.
    """
    from optiscope.lab import compare

    if not grid:
        raise ValueError("learning-rate grid is empty")
    specs = {f"lr={lr:g}": make_spec(lr) for lr in grid}
    res = compare(problem, specs, steps, probes=["loss:on=probe"], seed=seed, data_seed=seed, **run_kwargs)
    res.metrics["optimizer"] = res.metrics["run"]
    losses = {}
    for lr, name in zip(grid, specs):
        run = res.runs[name]
        v = final_loss(res.metrics, name)
        losses[float(lr)] = v if run.status == "finished" and math.isfinite(v) else float("inf")
    best = min(losses, key=lambda k: losses[k])
    if not math.isfinite(losses[best]):
        raise RuntimeError(f"every learning rate of the grid {list(grid)} diverged")
    return best, losses


def tuned_lr(problem, make_spec: Callable[[float], Any], grid: Sequence[float], steps: int, seed: int,
             **run_kwargs: Any) -> tuple[float, dict[float, float]]:
    """:func:`tune_lr` over ``grid``, or its only value (no tuning run) when the grid has one entry."""
    if len(grid) > 1:
        return tune_lr(problem, make_spec, grid, steps, seed, **run_kwargs)
    return float(grid[0]), {}


# ----------------------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------------------
def rmed_values(metrics: pd.DataFrame, optimizer: str, layers: Sequence[str], at: str = "late_mean",
                metric: str = "r_med", step: int | None = None) -> np.ndarray:
    """Array ``[repeats, layers]`` of one R_med summary per run and layer.

    ``at="late_mean"``: mean over checkpoints with step >= half the last step; ``"final"``: the last checkpoint;
    ``step=t`` overrides both (the checkpoint at step t). Missing values (e.g. a diverged run) are NaN.
    """
    if at not in AT_CHOICES:
        raise ValueError(f"at = {at!r}; allowed: {AT_CHOICES}")
    df = metrics[(metrics["optimizer"] == optimizer) & (metrics["metric"] == metric)]
    reps = sorted(metrics["repeat"].unique()) if "repeat" in metrics else [0]
    out = np.full((len(reps), len(layers)), np.nan)
    for i, r in enumerate(reps):
        d = df[df["repeat"] == r] if "repeat" in df else df
        if d.empty:
            continue
        if step is not None:
            d = d[d["step"] == step]
        elif at == "final":
            d = d[d["step"] == d["step"].max()]
        else:
            d = d[d["step"] >= d["step"].max() / 2]
        means = d.groupby("layer")["value"].mean()
        for j, l in enumerate(layers):
            if l in means.index:
                out[i, j] = means[l]
    return out


def median_ratio(values_a: np.ndarray, values_b: np.ndarray) -> float:
    """Median over layers of ``mean_r R_B / mean_r R_A`` (> 1: A's R_med is smaller). NaN columns are skipped."""
    ratio = np.nanmean(values_b, axis=0) / np.nanmean(values_a, axis=0)
    ratio = ratio[np.isfinite(ratio)]
    return float(np.median(ratio)) if ratio.size else float("nan")


def gap_summary(values_a: np.ndarray, values_b: np.ndarray, layers: Sequence[str], exclude_first: int = 2,
                n_resamples: int = 2000, seed: int = 0, name_a: str = "adam", name_b: str = "sgdm") -> dict[str, Any]:
    """Headline statistics of the issue for A (adaptive) vs B (SGD+M), on ``[repeats, layers]`` arrays.

    - ``frac_layers_a_smaller``: fraction of layers (the first ``exclude_first`` excluded, as the seed does in
      §2 "except for first several layers") where ``mean_r R_A < mean_r R_B``;
    - ``median_ratio``: median over those layers of ``mean_r R_B / mean_r R_A`` (the seed reports 1.4-2);
    - ``ci95``: bootstrap 95% percentile interval of ``median_ratio`` resampling repeats (paired: A and B of the
      same repeat stay together); ``[nan, nan]`` with a single repeat.
    """
    values_a = np.asarray(values_a, float)
    values_b = np.asarray(values_b, float)
    if values_a.shape != values_b.shape or values_a.shape[1] != len(layers):
        raise ValueError(f"R_med arrays have shapes {values_a.shape} and {values_b.shape}; "
                         f"expected [repeats, {len(layers)}]")
    keep = list(range(min(exclude_first, len(layers)), len(layers)))
    if not keep:
        raise ValueError(f"no layers left after excluding the first {exclude_first} of {len(layers)}")
    a, b = values_a[:, keep], values_b[:, keep]
    mean_a, mean_b = np.nanmean(a, axis=0), np.nanmean(b, axis=0)
    ok = np.isfinite(mean_a) & np.isfinite(mean_b)
    frac = float(np.mean(mean_a[ok] < mean_b[ok])) if ok.any() else float("nan")
    med = median_ratio(a, b)
    R = a.shape[0]
    ci = [float("nan"), float("nan")]
    if R >= 2 and math.isfinite(med):
        def stat(idx):
            idx = np.asarray(idx, dtype=int)
            return median_ratio(a[idx], b[idx])

        with np.errstate(all="ignore"):
            bs = stats.bootstrap((np.arange(R),), stat, vectorized=False, paired=False, n_resamples=n_resamples,
                                 confidence_level=0.95, method="percentile", rng=np.random.default_rng(seed))
        ci = [float(bs.confidence_interval.low), float(bs.confidence_interval.high)]
    per_layer = []
    for j, l in enumerate(layers):
        per_layer.append({
            "layer": l, "excluded": j not in keep,
            f"{name_a}_mean": _f(np.nanmean(values_a[:, j])), f"{name_a}_std": _f(np.nanstd(values_a[:, j])),
            f"{name_b}_mean": _f(np.nanmean(values_b[:, j])), f"{name_b}_std": _f(np.nanstd(values_b[:, j])),
            "ratio": _f(np.nanmean(values_b[:, j]) / np.nanmean(values_a[:, j])),
        })
    return {"frac_layers_a_smaller": frac, "n_layers_compared": int(ok.sum()), "median_ratio": med,
            "ci95": ci, "repeats": int(R), "exclude_first": int(exclude_first), "per_layer": per_layer}


def pair_gap_summary(metrics: pd.DataFrame, a: str, b: str, layers: Sequence[str], cfg) -> dict[str, Any]:
    """:func:`gap_summary` of optimizer ``a`` vs ``b`` from a repeats frame, with the config's ``at``,
    ``exclude_first``, ``n_bootstrap`` and ``seed``."""
    return gap_summary(rmed_values(metrics, a, layers, at=cfg.at), rmed_values(metrics, b, layers, at=cfg.at), layers,
                       cfg.exclude_first, cfg.n_bootstrap, cfg.seed, name_a=a, name_b=b)


def _f(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def layer_table_markdown(summary: Mapping[str, Any], name_a: str = "adam", name_b: str = "sgdm") -> str:
    """Per-layer table (seed Table 1/2 analogue): mean R_med (std) of both and their ratio B/A."""
    lines = [f"| layer | R_med {name_b} | R_med {name_a} | ratio {name_b}/{name_a} |", "|---|---|---|---|"]
    for row in summary["per_layer"]:
        def fmt(m, s):
            return "n/a" if m is None else f"{m:.3g} ({s:.2g})"
        mark = " (excluded)" if row["excluded"] else ""
        ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.3g}"
        lines.append(f"| {row['layer']}{mark} | {fmt(row[f'{name_b}_mean'], row[f'{name_b}_std'])} | "
                     f"{fmt(row[f'{name_a}_mean'], row[f'{name_a}_std'])} | {ratio} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------------------------
def plot_loss(store, metrics: pd.DataFrame, name: str = "training_loss", metric: str = "loss",
              title: str = "training loss", repeat: int | None = 0, logy: bool = True) -> None:
    """Training loss of every optimizer over steps (one repeat, as the seed's figures show one of the repeats)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    df = metrics[(metrics["metric"] == metric) & (metrics["layer"] == "")]
    if repeat is not None and "repeat" in df:
        df = df[df["repeat"] == repeat]
    for opt, d in df.groupby("optimizer", sort=False):
        d = d.sort_values("step")
        ax.plot(d["step"], d["value"], marker="o", ms=3, label=str(opt))
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    if logy and (df["value"] > 0).all():
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    store.save_figure(fig, name)


def plot_rmed_over_time(store, metrics: pd.DataFrame, layers: Sequence[str], name: str = "r_med_over_time",
                        metric: str = "r_med", max_panels: int = 12) -> None:
    """R_med per layer over training (mean over repeats), one panel per layer, one line per optimizer."""
    layers = list(layers)[:max_panels]
    if not layers:
        return
    ncol = min(4, len(layers))
    nrow = math.ceil(len(layers) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.5 * nrow), squeeze=False)
    df = metrics[metrics["metric"] == metric]
    for ax, layer in zip(axes.ravel(), layers):
        d = df[df["layer"] == layer]
        for opt, g in d.groupby("optimizer", sort=False):
            m = g.groupby("step")["value"].mean()
            ax.plot(m.index, m.values, marker="o", ms=3, label=str(opt))
        ax.set_title(layer, fontsize=7)
        ax.set_yscale("log")
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[len(layers):]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=6)
    fig.suptitle(metric)
    fig.tight_layout()
    store.save_figure(fig, name)


def store_metrics(store, metrics: pd.DataFrame) -> None:
    """Write the tidy metrics (``run`` gets the repeat suffix so rows stay unique) into ``metrics.parquet``."""
    df = metrics.copy()
    if "repeat" in df:
        df["run"] = df["run"].astype(str) + "/r" + df["repeat"].astype(str)
    store.write_metrics(df)


def hvp_cost(metrics: pd.DataFrame) -> dict[str, float]:
    """Mean HVPs and seconds per R_med checkpoint (from the probe's own records)."""
    out = {}
    for m in ("r_med_n_hvp", "r_med_seconds"):
        d = metrics[metrics["metric"] == m]["value"]
        out[m] = float(d.mean()) if len(d) else float("nan")
    return out


# ----------------------------------------------------------------------------------------------------------------
# the language-modelling setting shared by experiments 1-6 and 8 (seed 000 §4, App. A)
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LMConfig(Config):
    """A small causal transformer on the byte-level ``fortunes`` corpus, SGD+M vs Adam from the same init.

    ``sgdm_lrs``: the grid from which SGD+M's best lr is chosen by training loss after ``tune_steps`` (seed 000
    §4: "we tuned and chose the best learning rate of SGD+M"); ``adam_lr``: an lr at which Adam converges faster
    (checked and reported, not assumed). ``batch_size`` is large relative to the data ("we used large batch sizes");
    the Hessian is taken on a fixed ``probe_size``-sequence batch. ``exclude_first``: the first layers left out
    of the headline fraction (seed §2: "except for first several layers").
    """

    seed: int = 0
    seq_len: int = 32
    n_train: int = 2048
    probe_size: int = 128
    d_model: int = 48
    n_layers: int = 2
    n_heads: int = 4
    steps: int = 300
    batch_size: int = 256
    momentum: float = 0.9
    sgdm_lrs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)  # lr/(1-momentum) spans plain SGD's 0.1..10
    tune_steps: int = 60
    adam_lr: float = 3e-3
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    weight_decay: float = 0.0
    repeats: int = 2
    n_checkpoints: int = 3
    per_layer: int = 200
    delta: float = 0.0
    at: str = "late_mean"
    exclude_first: int = 2
    n_bootstrap: int = 2000

    def validate(self) -> None:
        for f in ("seq_len", "n_train", "probe_size", "d_model", "n_layers", "n_heads", "steps", "batch_size",
                  "repeats", "n_checkpoints", "per_layer"):
            require(getattr(self, f) >= 1, f, getattr(self, f), ">= 1")
        require(self.d_model % self.n_heads == 0, "d_model", self.d_model, f"a multiple of n_heads={self.n_heads}")
        require(self.probe_size <= self.n_train, "probe_size", self.probe_size, f"<= n_train={self.n_train}")
        require(0 <= self.momentum < 1, "momentum", self.momentum, "in [0, 1)")
        require(len(self.sgdm_lrs) >= 1 and all(x > 0 for x in self.sgdm_lrs), "sgdm_lrs", self.sgdm_lrs,
                "a non-empty list of positive learning rates")
        require(self.tune_steps >= 1, "tune_steps", self.tune_steps, ">= 1")
        require(self.adam_lr > 0, "adam_lr", self.adam_lr, "> 0")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1/beta2", (self.beta1, self.beta2), "in [0, 1)")
        require(self.eps >= 0, "eps", self.eps, ">= 0")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        require(self.delta >= 0, "delta", self.delta, ">= 0")
        require(self.at in AT_CHOICES, "at", self.at, f"one of {AT_CHOICES}")
        require(self.exclude_first >= 0, "exclude_first", self.exclude_first, ">= 0")
        require(self.n_bootstrap >= 100, "n_bootstrap", self.n_bootstrap, ">= 100")


def lm_problem(cfg: LMConfig, random_targets: bool = False):
    """Problem: ``TinyTransformer`` (causal LM, seeded init) on ``fortunes`` (or its random-target version,
    seed 000 §4.2); the Hessian batch is the first ``probe_size`` training sequences."""
    from optiscope.lab import Problem
    from optiscope.zoo.data import default_loss, fortunes, random_labels
    from optiscope.zoo.models import TinyTransformer

    ds = fortunes(seq_len=cfg.seq_len, n_train=cfg.n_train, n_test=256, seed=cfg.seed)
    if random_targets:
        ds = random_labels(ds, seed=cfg.seed)
    model = TinyTransformer(n_outputs=ds.n_classes, seq_len=cfg.seq_len, vocab_size=256, d_model=cfg.d_model,
                            n_heads=cfg.n_heads, n_layers=cfg.n_layers, causal=True, seed=cfg.seed)
    X, y = ds.train
    return Problem(model, default_loss(ds), train=ds.train, eval=ds.test,
                   probe_batch=(X[:cfg.probe_size], y[:cfg.probe_size]), task="lm", name=ds.name)


def sgdm_spec(cfg: LMConfig, lr: float) -> tuple[str, dict]:
    return ("sgdm", {"lr": float(lr), "momentum": cfg.momentum, "weight_decay": cfg.weight_decay})


def adam_spec(cfg: LMConfig, lr: float | None = None) -> tuple[str, dict]:
    return ("adam", {"lr": float(cfg.adam_lr if lr is None else lr), "betas": (cfg.beta1, cfg.beta2),
                     "eps": cfg.eps, "weight_decay": cfg.weight_decay})


@dataclass
class PairOutcome:
    """What :func:`run_pair` measured: metrics of all repeats, layers, tuning, statuses and the gap summary."""

    metrics: pd.DataFrame
    layers: list[str]
    sgdm_lr: float
    tuning: dict[float, float]
    status: dict[str, str]
    summary: dict[str, Any]
    seconds: float


def run_pair(cfg: LMConfig, problem, optimizers: Mapping[str, Any] | None = None, a: str = "adam",
             b: str = "sgdm", extra_probes: Sequence[Any] = (), tune: bool = True,
             make_b: Callable[[float], Any] | None = None) -> PairOutcome:
    """Tune B's lr on ``cfg.sgdm_lrs`` (if ``tune``), then compare all ``optimizers`` (default: A = Adam, B = SGD+M)
    over ``cfg.repeats`` data orders with R_med checkpoints, and summarise A vs B with :func:`gap_summary`."""
    make_b = make_b or (lambda lr: sgdm_spec(cfg, lr))
    best, tuning = tuned_lr(problem, make_b, cfg.sgdm_lrs if tune else cfg.sgdm_lrs[:1], cfg.tune_steps, cfg.seed,
                            batch_size=cfg.batch_size, checkpoint=False)
    opts = dict(optimizers) if optimizers is not None else {}
    opts.setdefault(b, make_b(best))
    opts.setdefault(a, adam_spec(cfg))
    layers = weight_matrix_params(problem.model)
    probes = ["loss:on=train", rmed_probe(layers, cfg.per_layer, cfg.delta), *extra_probes]
    out = compare_repeats(problem, opts, cfg.steps, cfg.repeats, cfg.seed, probes,
                          batch_size=cfg.batch_size, probe_steps=checkpoint_steps(cfg.steps, cfg.n_checkpoints),
                          checkpoint=False)
    summary = pair_gap_summary(out.metrics, a, b, layers, cfg)
    return PairOutcome(out.metrics, layers, best, tuning, out.status, summary, out.seconds)


def faster(metrics: pd.DataFrame, a: str, b: str) -> dict[str, Any]:
    """Whether A reaches a lower final training loss than B (mean over repeats), with both values."""
    la, lb = final_loss(metrics, a), final_loss(metrics, b)
    return {f"final_loss_{a}": la, f"final_loss_{b}": lb, "a_faster": bool(la < lb)}


def gap_claims(summary: Mapping[str, Any], prefix: str, a: str, b: str, paper_frac: Any = "most layers",
               paper_ratio: Any = "1.4-2x") -> list:
    """The two standard verdicts: (1) A's R_med below B's in most layers; (2) the median ratio B/A >= 1.4."""
    from optiscope.experiments.base import Claim

    frac, med, ci = summary["frac_layers_a_smaller"], summary["median_ratio"], summary["ci95"]
    return [
        Claim(f"{prefix}_most_layers", f"R_med of {a} is below R_med of {b} in most layers (first "
              f"{summary['exclude_first']} excluded)", paper=paper_frac,
              measured={"fraction": frac, "n_layers": summary["n_layers_compared"]},
              holds=None if not math.isfinite(frac) else bool(frac > 0.5)),
        Claim(f"{prefix}_ratio", f"median over layers of R_med({b}) / R_med({a}) is at least 1.4", paper=paper_ratio,
              measured={"median_ratio": med, "ci95": ci, "repeats": summary["repeats"]},
              holds=None if not math.isfinite(med) else bool(med >= 1.4)),
    ]


def pair_metrics(out: PairOutcome, a: str = "adam", b: str = "sgdm") -> dict[str, Any]:
    """The ``metrics`` block of results.json for a pairwise comparison."""
    return {"layers": out.layers, "sgdm_lr": out.sgdm_lr, "lr_tuning": {str(k): v for k, v in out.tuning.items()},
            "status": out.status, "summary": out.summary, "speed": faster(out.metrics, a, b),
            "hvp_cost": hvp_cost(out.metrics), "seconds": out.seconds}

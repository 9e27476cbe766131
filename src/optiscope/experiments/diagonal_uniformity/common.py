"""Shared machinery of the R_med experiments (Jiang, Malik, Li 2023): ``rmed_*`` modules compose these.

* :func:`rmed_probe`: the lab's R_med probe (Jiang et al. 2023, §3.2, Eq. 1) on selected parameter tensors only
  (default: the weight matrices), so that biases and LayerNorm gains cost no Hessian-vector products.
* :func:`compare_repeats`: SGD+M vs Adam (or any optimizers) from the same initial model, R repeats that differ
  only in the data order (§4.1: "repeated ... starting from the same initialization").
* The paper's tuning protocol (§4): :func:`tune_lr` (the baseline's best lr by final training loss over the whole
  horizon, on a grid widened until the best lies strictly inside), :func:`pick_adaptive_lr` (an lr under which the
  adaptive method converges faster than the tuned baseline, or the report that there is none),
  :func:`unigram_entropy` (the plateau the baseline must be well below) and :func:`equal_loss_pairs` (App. A.3:
  iterates of equal training loss); :func:`run_pair` runs all of it.
* :func:`gap_summary`: fraction of layers (the first ``exclude_first`` excluded) where optimizer A's R_med is below
  B's, and the median over layers of the ratio ``mean_r R_B / mean_r R_A`` with a bootstrap 95% interval over
  repeats (``scipy.stats.bootstrap``, percentile method, repeats resampled).
* Verdicts (:func:`gap_claims`, :func:`faster_claim`, :func:`protocol_premises`) through the one rule in
  :mod:`optiscope.metrics.verdicts`: untestable (None) when the premise of the comparison did not occur.
* Figures: loss curves and per-layer R_med over training.

Which R_med value summarises a run is an open choice (the paper's tables do not say at which iterate they are
taken): ``at="late_mean"`` (default) averages the checkpoints in the second half of training; ``"final"`` uses
the last checkpoint.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from optiscope.experiments.base import require_device
from optiscope.lab.probes import weight_matrix_params
from optiscope.utils.config import Config, require
from optiscope.utils.plotting import plt

AT_CHOICES = ("late_mean", "final")


# ----------------------------------------------------------------------------------------------------------------
# probe
# ----------------------------------------------------------------------------------------------------------------
def rmed_probe(params: Sequence[str] | str = "weights", per_layer: int = 200, delta: float = 0.0,
               save_diagonal: bool = False):
    """The lab's ``r_med`` probe restricted to ``params`` (default: the weight matrices; the paper counts "layers"
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


@dataclass
class TuneOutcome:
    """Result of :func:`tune_lr`: the best lr, the final training loss of every lr tried (diverged: +inf), the lrs
    added by widening, and whether the best lr lies strictly inside the final grid."""

    best: float
    losses: dict[float, float]
    widened: list[float]
    inside: bool

    def __iter__(self):          # ``best, losses = tune_lr(...)`` keeps working
        return iter((self.best, self.losses))

    def to_dict(self) -> dict[str, Any]:
        """JSON form for results.json."""
        return {"best": self.best, "losses": {f"{k:g}": _f(v) for k, v in sorted(self.losses.items())},
                "widened": self.widened, "best_inside_grid": self.inside}


def _grid_losses(problem, make_spec, grid, steps, seed, **run_kwargs) -> dict[float, float]:
    from optiscope.lab import compare

    specs = {f"lr={lr:g}": make_spec(lr) for lr in grid}
    res = compare(problem, specs, steps, probes=["loss:on=train"], seed=seed, data_seed=seed, **run_kwargs)
    res.metrics["optimizer"] = res.metrics["run"]
    out = {}
    for lr, name in zip(grid, specs):
        v = final_loss(res.metrics, name)
        ok = res.runs[name].status == "finished" and math.isfinite(v)
        out[float(lr)] = v if ok else float("inf")
    return out


def tune_lr(problem, make_spec: Callable[[float], Any], grid: Sequence[float], steps: int, seed: int,
            widen: bool = True, max_widen: int = 3, **run_kwargs: Any) -> TuneOutcome:
    r"""Best learning rate by final training loss over the whole horizon ``steps`` (Jiang et al. 2023, §4: "we tuned
    and chose the best (initial) learning rate of SGD+M"), on a grid whose best point lies strictly inside.

    All candidates start from the same initial model and data order (``lab.compare``); the loss is the mean over
    the whole training set after ``steps`` updates; a diverged run counts as :math:`+\infty`. With ``widen``, while
    the best lr is the smallest or largest of the grid, one more lr beyond that edge is run (the grid's ratio at
    that edge, x3 for a one-point grid), at most ``max_widen`` times; ``inside`` says whether the final best lies
    strictly inside (a diverged neighbour counts as inside).
    """
    if not grid:
        raise ValueError("learning-rate grid is empty")
    grid = sorted(float(x) for x in grid)
    losses = _grid_losses(problem, make_spec, grid, steps, seed, **run_kwargs)
    widened: list[float] = []

    def best_of():
        return min(losses, key=lambda k: (losses[k], k))

    for _ in range(max_widen if widen else 0):
        lrs = sorted(losses)
        b = best_of()
        if not math.isfinite(losses[b]):
            break
        if b == lrs[0]:
            ratio = lrs[1] / lrs[0] if len(lrs) > 1 else 3.0
            new = float(f"{b / ratio:.6g}")
        elif b == lrs[-1]:
            ratio = lrs[-1] / lrs[-2] if len(lrs) > 1 else 3.0
            new = float(f"{b * ratio:.6g}")
        else:
            break
        losses.update(_grid_losses(problem, make_spec, [new], steps, seed, **run_kwargs))
        widened.append(float(new))
    b = best_of()
    if not math.isfinite(losses[b]):
        raise RuntimeError(f"every learning rate of the grid {sorted(losses)} diverged")
    lrs = sorted(losses)
    return TuneOutcome(b, losses, widened, lrs[0] < b < lrs[-1])


def tuned_lr(problem, make_spec: Callable[[float], Any], grid: Sequence[float], steps: int, seed: int,
             **run_kwargs: Any) -> TuneOutcome:
    """:func:`tune_lr` over ``grid``, or its only value (no tuning run, not widened) when the grid has one entry."""
    if len(grid) > 1:
        return tune_lr(problem, make_spec, grid, steps, seed, **run_kwargs)
    return TuneOutcome(float(grid[0]), {}, [], False)


@dataclass
class AdaptivePick:
    """The adaptive method's lr by the paper's rule, the grid's final losses, and whether it is faster."""

    lr: float
    losses: dict[float, float]
    faster: bool
    baseline_loss: float

    def to_dict(self) -> dict[str, Any]:
        """JSON form for results.json."""
        return {"lr": self.lr, "losses": {f"{k:g}": _f(v) for k, v in sorted(self.losses.items())},
                "faster_than_tuned_baseline": self.faster, "baseline_final_loss": _f(self.baseline_loss)}


def pick_adaptive_lr(problem, make_spec: Callable[[float], Any], grid: Sequence[float], steps: int, seed: int,
                     baseline_loss: float, **run_kwargs: Any) -> AdaptivePick:
    """The paper's rule for the adaptive method (Jiang et al. 2023, §4: "the learning rate of Adam was set as a
    value under which Adam converged faster than SGD+M with its best learning rate").

    Every lr of ``grid`` is trained over the same horizon, data order and initialisation as the tuned baseline;
    the lr with the lowest final training loss is chosen, and ``faster`` says whether that loss is below the tuned
    baseline's ``baseline_loss`` (if no lr is faster, the best one is still returned and ``faster=False``).
    """
    if not grid:
        raise ValueError("adaptive learning-rate grid is empty")
    losses = _grid_losses(problem, make_spec, sorted(float(x) for x in grid), steps, seed, **run_kwargs)
    best = min(losses, key=lambda k: (losses[k], k))
    return AdaptivePick(best, losses, bool(math.isfinite(losses[best]) and losses[best] < baseline_loss),
                        float(baseline_loss))


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

    - ``frac_layers_a_smaller``: fraction of layers (the first ``exclude_first`` excluded, as the paper does in
      §2 "except for first several layers") where ``mean_r R_A < mean_r R_B``;
    - ``median_ratio``: median over those layers of ``mean_r R_B / mean_r R_A`` (the paper reports 1.4-2);
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
    n_smaller = int(np.sum(mean_a[ok] < mean_b[ok]))
    frac = float(n_smaller / ok.sum()) if ok.any() else float("nan")
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
    return {"frac_layers_a_smaller": frac, "n_layers_a_smaller": n_smaller, "n_layers_compared": int(ok.sum()),
            "median_ratio": med,
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
    """Per-layer table (the paper's Table 1/2 analogue): mean R_med (std) of both and their ratio B/A."""
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
    """Training loss of every optimizer over steps (one repeat, as the paper's figures show one of the repeats)."""
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
# the protocol: plateau, schedules, equal-loss matching (Jiang et al. 2023, §4, App. A.3)
# ----------------------------------------------------------------------------------------------------------------
class ScheduledProbe:
    """Runs ``probe`` only at ``steps`` (a Run probes every ``probe_every`` steps; the expensive R_med probe need
    not run at every loss checkpoint). Elsewhere it returns ``{}``; it never changes what ``probe`` measures."""

    def __init__(self, probe: Any, steps: Sequence[int]):
        self.probe = probe
        self.steps = frozenset(int(s) for s in steps)
        self.name = getattr(probe, "name", "scheduled")

    def __call__(self, problem, state):
        return self.probe(problem, state) if state.step in self.steps else {}


def unigram_entropy(targets: Any) -> float:
    r"""Entropy of the empirical target distribution in nats, :math:`H = -\sum_c p_c \ln p_c` with :math:`p_c` the
    frequency of token (class) c among all training targets.

    This is the loss of the best context-free predictor, the *unigram plateau* of a language model: a model whose
    training loss is close to H has learnt only token frequencies (Jiang et al. 2023, §4, Fig. 3: SGD+M "plateaus").
    """
    import torch

    t = torch.as_tensor(targets).reshape(-1)
    if t.numel() == 0:
        raise ValueError("unigram_entropy: no targets")
    if t.dtype.is_floating_point or t.min() < 0:
        raise ValueError("unigram_entropy: targets must be non-negative integer class indices")
    p = torch.bincount(t.long()).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def loss_curve(metrics: pd.DataFrame, optimizer: str, repeat: int | None = None, metric: str = "loss") -> pd.Series:
    """Step -> training loss of one optimizer (one repeat, or the mean over repeats), sorted by step."""
    df = metrics[(metrics["optimizer"] == optimizer) & (metrics["metric"] == metric) & (metrics["layer"] == "")]
    if repeat is not None and "repeat" in df:
        df = df[df["repeat"] == repeat]
    s = df.groupby("step")["value"].mean().sort_index()
    return s[np.isfinite(s.to_numpy())]


def equal_loss_pairs(curve_b: pd.Series, curve_a: pd.Series, checkpoints_b: Sequence[int],
                     max_loss: float) -> list[tuple[int, int]]:
    """Jiang et al. 2023, App. A.3: for each checkpoint ``t2`` of B (SGD+M) with loss ``<= max_loss`` (well below
    the plateau), the recorded step ``t1`` of A (Adam) whose training loss is nearest to ``L_B(t2)``, taken around
    the first step at which A's curve reaches it. Returns ``[(t1, t2)]``; a ``t2`` whose loss A never reaches is
    skipped. The loss mismatch is bounded by A's loss change over one recording interval."""
    pairs = []
    steps_a = curve_a.index.to_numpy()
    vals_a = curve_a.to_numpy()
    for t2 in checkpoints_b:
        if t2 == 0 or t2 not in curve_b.index:
            continue
        target = float(curve_b[t2])
        if not target <= max_loss:
            continue
        hit = np.nonzero(vals_a <= target)[0]
        if hit.size == 0:
            continue
        j = int(hit[0])
        if j > 0 and abs(vals_a[j - 1] - target) < abs(vals_a[j] - target):
            j -= 1
        if steps_a[j] > 0:
            pairs.append((int(steps_a[j]), int(t2)))
    return pairs


# ----------------------------------------------------------------------------------------------------------------
# the language-modelling setting shared by the transformer experiments (Jiang et al. 2023, §4, App. A)
# ----------------------------------------------------------------------------------------------------------------
PAPER_BAND = (1.4, 2.0)
"""Jiang et al. 2023, §3.2: R_med of SGD+M is "roughly 1.4 to 2 times" that of Adam in most layers."""
WIDENED_BAND = (1.2, 3.0)
"""The paper's band widened for differences of scale between its models and ours (judging rule, not a result)."""


@dataclass(frozen=True)
class LMConfig(Config):
    """A small causal transformer on the byte-level ``fortunes`` corpus, SGD+M vs Adam from the same init, under the
    tuning protocol of Jiang et al. 2023, §4.

    * ``sgdm_lrs``: SGD+M's lr grid, tuned by final training loss over the whole horizon (``tune_steps = 0``:
      ``steps``), widened (at most ``max_widen`` points) until the best lr lies strictly inside.
    * ``adam_lrs``: Adam's grid (empty: ``(adam_lr,)``); the lr is chosen by the paper's rule (a value under which
      Adam converges faster than tuned SGD+M), and when none is faster that is reported.
    * The comparison is judged only where tuned SGD+M is well below the unigram plateau: final training loss
      ``<= plateau_fraction * H_unigram``; the training loss is recorded every ``loss_every`` steps, R_med at
      ``n_checkpoints`` checkpoints; the primary number is the equal-loss comparison (App. A.3).
    * ``batch_size`` is large relative to the data ("we used large batch sizes"); the Hessian is taken on a fixed
      ``probe_size``-sequence batch; ``exclude_first`` layers are left out of the headline numbers (§2).
    * ``band`` / ``band_widened``: the paper's size of the effect and the widened band the CI is judged against.
    * ``device``: where the model, the data and the Hessian live (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``);
      the model is initialised on the CPU and moved, batch orders are drawn on the CPU, so they do not depend on it.
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
    tune_steps: int = 0
    max_widen: int = 3
    adam_lr: float = 3e-3
    adam_lrs: tuple[float, ...] = ()
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    weight_decay: float = 0.0
    repeats: int = 3
    n_checkpoints: int = 4
    loss_every: int = 10
    plateau_fraction: float = 0.8
    per_layer: int = 200
    delta: float = 0.0
    at: str = "late_mean"
    exclude_first: int = 2
    n_bootstrap: int = 2000
    band: tuple[float, float] = PAPER_BAND
    band_widened: tuple[float, float] = WIDENED_BAND
    device: str = "cpu"

    def validate(self) -> None:
        require_device(self.device)
        for f in ("seq_len", "n_train", "probe_size", "d_model", "n_layers", "n_heads", "steps", "batch_size",
                  "repeats", "n_checkpoints", "per_layer", "loss_every"):
            require(getattr(self, f) >= 1, f, getattr(self, f), ">= 1")
        require(self.d_model % self.n_heads == 0, "d_model", self.d_model, f"a multiple of n_heads={self.n_heads}")
        require(self.probe_size <= self.n_train, "probe_size", self.probe_size, f"<= n_train={self.n_train}")
        require(0 <= self.momentum < 1, "momentum", self.momentum, "in [0, 1)")
        require(len(self.sgdm_lrs) >= 1 and all(x > 0 for x in self.sgdm_lrs), "sgdm_lrs", self.sgdm_lrs,
                "a non-empty list of positive learning rates")
        require(self.tune_steps >= 0, "tune_steps", self.tune_steps, ">= 0 (0: the whole horizon)")
        require(self.max_widen >= 0, "max_widen", self.max_widen, ">= 0")
        require(self.adam_lr > 0, "adam_lr", self.adam_lr, "> 0")
        require(all(x > 0 for x in self.adam_lrs), "adam_lrs", self.adam_lrs, "positive learning rates")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1/beta2", (self.beta1, self.beta2), "in [0, 1)")
        require(self.eps >= 0, "eps", self.eps, ">= 0")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        require(0 < self.plateau_fraction <= 1, "plateau_fraction", self.plateau_fraction, "in (0, 1]")
        require(self.delta >= 0, "delta", self.delta, ">= 0")
        require(self.at in AT_CHOICES, "at", self.at, f"one of {AT_CHOICES}")
        require(self.exclude_first >= 0, "exclude_first", self.exclude_first, ">= 0")
        require(self.n_bootstrap >= 100, "n_bootstrap", self.n_bootstrap, ">= 100")
        for f in ("band", "band_widened"):
            v = getattr(self, f)
            require(len(v) == 2 and 0 < v[0] <= v[1], f, v, "(low, high) with 0 < low <= high")
        require(self.band_widened[0] <= self.band[0] and self.band_widened[1] >= self.band[1], "band_widened",
                self.band_widened, f"an interval containing band={self.band}")

    @property
    def horizon(self) -> int:
        """Steps over which learning rates are tuned: ``tune_steps``, or the whole training run when 0."""
        return self.tune_steps or self.steps

    @property
    def adam_grid(self) -> tuple[float, ...]:
        """Adam's lr grid: ``adam_lrs``, or ``(adam_lr,)`` when empty."""
        return tuple(self.adam_lrs) or (self.adam_lr,)


def lm_problem(cfg: LMConfig, random_targets: bool = False, device: Any = None):
    """Problem: ``TinyTransformer`` (causal LM, seeded init) on ``fortunes`` (or its random-target version,
    Jiang et al. 2023, §4.2); the Hessian batch is the first ``probe_size`` training sequences. Model and data are
    built on the CPU and moved to ``device`` (default: ``cfg.device``)."""
    from optiscope.experiments.base import experiment_device

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
                   probe_batch=(X[:cfg.probe_size], y[:cfg.probe_size]), task="lm", name=ds.name,
                   device=experiment_device(cfg) if device is None else device)


def sgdm_spec(cfg: LMConfig, lr: float) -> tuple[str, dict]:
    """SGD with heavy-ball momentum ``cfg.momentum`` (PyTorch convention) at ``lr``."""
    return ("sgdm", {"lr": float(lr), "momentum": cfg.momentum, "weight_decay": cfg.weight_decay})


def adam_spec(cfg: LMConfig, lr: float | None = None) -> tuple[str, dict]:
    """Adam with ``cfg``'s betas, eps and weight decay at ``lr`` (default ``cfg.adam_lr``)."""
    return ("adam", {"lr": float(cfg.adam_lr if lr is None else lr), "betas": (cfg.beta1, cfg.beta2),
                     "eps": cfg.eps, "weight_decay": cfg.weight_decay})


@dataclass
class PairOutcome:
    """What :func:`run_pair` measured: metrics of all repeats, layers, tuning, statuses, the equal-step and
    equal-loss gap summaries, the plateau check and the matched pairs."""

    metrics: pd.DataFrame
    layers: list[str]
    sgdm_lr: float
    tuning: TuneOutcome
    adaptive: AdaptivePick
    status: dict[str, str]
    summary: dict[str, Any]
    equal_loss: dict[str, Any] | None
    pairs: list[dict[str, Any]]
    plateau: dict[str, Any]
    final_losses: dict[str, list[float]]
    seconds: float


def _rmed_at(metrics: pd.DataFrame, step: int, layers: Sequence[str]) -> list[float]:
    d = metrics[(metrics["metric"] == "r_med") & (metrics["step"] == step)].groupby("layer")["value"].mean()
    return [float(d.get(l, np.nan)) for l in layers]


def equal_loss_comparison(problem, cfg, metrics: pd.DataFrame, a: str, b: str, spec_a: Any, layers: Sequence[str],
                          checkpoints_b: Sequence[int], rmed: Any, max_loss: float
                          ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Jiang et al. 2023, App. A.3 on a repeats frame: per repeat, :func:`equal_loss_pairs` of B's checkpoints below
    ``max_loss`` with A's loss curve, then a second, identical run of A (same seed and data order, ``spec_a``)
    measuring R_med at the matched steps; per layer the mean over pairs of ``R_A(t1)`` and ``R_B(t2)``.

    Returns ``(gap_summary or None when no repeat has a pair, list of pairs)``; each pair records both losses (the
    second run's loss at t1 checks that it retraced the first).
    """
    from optiscope.lab import compare

    kw = dict(batch_size=cfg.batch_size, checkpoint=False)
    R = int(metrics["repeat"].max()) + 1 if len(metrics) else 0
    va = np.full((R, len(layers)), np.nan)
    vb = np.full((R, len(layers)), np.nan)
    pairs_all: list[dict[str, Any]] = []
    for r in range(R):
        mr = metrics[metrics["repeat"] == r]
        cb, ca = loss_curve(mr, b), loss_curve(mr, a)
        pairs = equal_loss_pairs(cb, ca, checkpoints_b, max_loss)
        if not pairs:
            continue
        t1s = sorted({t1 for t1, _ in pairs})
        second = compare(problem, {a: spec_a}, max(t1s), probes=["loss:on=train", rmed], probe_steps=t1s,
                         seed=cfg.seed, data_seed=cfg.seed + r, **kw)
        sm = second.metrics
        rows_a, rows_b = [], []
        for t1, t2 in pairs:
            la2 = sm[(sm["metric"] == "loss") & (sm["layer"] == "") & (sm["step"] == t1)]["value"]
            xa = _rmed_at(sm, t1, layers)
            xb = _rmed_at(mr[mr["optimizer"] == b], t2, layers)
            rows_a.append(xa)
            rows_b.append(xb)
            pairs_all.append({"repeat": r, f"step_{a}": t1, f"step_{b}": t2, f"loss_{a}": float(ca[t1]),
                              f"loss_{a}_second_pass": float(la2.iloc[0]) if len(la2) else None,
                              f"loss_{b}": float(cb[t2]), f"r_med_{a}": xa, f"r_med_{b}": xb})
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            va[r] = np.nanmean(np.array(rows_a), axis=0)
            vb[r] = np.nanmean(np.array(rows_b), axis=0)
    ok = np.isfinite(va).any(axis=1)
    if not ok.any():
        return None, pairs_all
    return gap_summary(va[ok], vb[ok], layers, cfg.exclude_first, cfg.n_bootstrap, cfg.seed, name_a=a,
                       name_b=b), pairs_all


def run_pair(cfg: LMConfig, problem, a: str = "adam", b: str = "sgdm",
             make_a: Callable[[float], Any] | None = None, make_b: Callable[[float], Any] | None = None,
             extra_probes: Sequence[Any] = ()) -> PairOutcome:
    """The paper's protocol for adaptive method A (default Adam) vs baseline B (default SGD+M):

    1. B's lr: :func:`tune_lr` on ``cfg.sgdm_lrs`` over the whole horizon, widened until the best is inside;
    2. A's lr: :func:`pick_adaptive_lr` on ``cfg.adam_grid`` against tuned B's final loss;
    3. ``cfg.repeats`` data orders from the same initialisation (``lab.compare``), training loss every
       ``loss_every`` steps, R_med at ``n_checkpoints`` checkpoints (the equal-step comparison);
    4. the equal-loss comparison (App. A.3): for each B checkpoint below ``plateau_fraction * H_unigram``, A's
       step with the same training loss (:func:`equal_loss_pairs`), and R_med of A measured there in a second,
       identical A run (training is deterministic given seed and data order).
    """
    make_b = make_b or (lambda lr: sgdm_spec(cfg, lr))
    make_a = make_a or (lambda lr: adam_spec(cfg, lr))
    kw = dict(batch_size=cfg.batch_size, checkpoint=False)
    t0 = time.perf_counter()
    H = unigram_entropy(problem.train[1])
    tune = tune_lr(problem, make_b, cfg.sgdm_lrs, cfg.horizon, cfg.seed, max_widen=cfg.max_widen, **kw)
    pick = pick_adaptive_lr(problem, make_a, cfg.adam_grid, cfg.horizon, cfg.seed, tune.losses[tune.best], **kw)
    opts = {b: make_b(tune.best), a: make_a(pick.lr)}
    layers = weight_matrix_params(problem.model)
    ck = checkpoint_steps(cfg.steps, cfg.n_checkpoints)
    rmed = rmed_probe(layers, cfg.per_layer, cfg.delta)
    probes = ["loss:on=train", ScheduledProbe(rmed, (0, *ck)), *extra_probes]
    out = compare_repeats(problem, opts, cfg.steps, cfg.repeats, cfg.seed, probes, probe_every=cfg.loss_every,
                          probe_steps=ck, **kw)
    summary = pair_gap_summary(out.metrics, a, b, layers, cfg)
    equal, pairs_all = equal_loss_comparison(problem, cfg, out.metrics, a, b, opts[a], layers, ck, rmed,
                                             cfg.plateau_fraction * H)
    finals = {o: [final_loss(out.metrics[out.metrics["repeat"] == r], o) for r in range(cfg.repeats)]
              for o in (a, b)}
    plateau = {"unigram_entropy": H, "plateau_fraction": cfg.plateau_fraction, "max_loss": cfg.plateau_fraction * H,
               **{f"final_loss_{o}": float(np.mean(v)) for o, v in finals.items()},
               **{f"relative_{o}": float(np.mean(v) / H) for o, v in finals.items()}}
    return PairOutcome(out.metrics, layers, tune.best, tune, pick, out.status, summary, equal, pairs_all, plateau,
                       finals, time.perf_counter() - t0)


def faster(metrics: pd.DataFrame, a: str, b: str) -> dict[str, Any]:
    """Whether A reaches a lower final training loss than B (mean over repeats), with both values."""
    la, lb = final_loss(metrics, a), final_loss(metrics, b)
    return {f"final_loss_{a}": la, f"final_loss_{b}": lb, "a_faster": bool(la < lb)}


def faster_claim(finals_a: Sequence[float], finals_b: Sequence[float], a: str, b: str, paper: Any,
                 extra: Mapping[str, Any] | None = None, premises=()):
    """Claim "A converges faster than B": the per-repeat final-loss gap ``L_B - L_A`` (same data order) has a
    Student-t 95% CI above 0 (:func:`optiscope.metrics.verdicts.direction_claim`)."""
    from optiscope.experiments.base import Claim
    from optiscope.metrics.verdicts import direction_claim, mean_ci

    diff = [lb - la for la, lb in zip(finals_a, finals_b)]
    m, lo, hi = mean_ci(diff)
    v = direction_claim((lo, hi), null=0.0, estimate=m, premises=premises)
    measured = {f"final_loss_{a}": _f(np.nanmean(finals_a)), f"final_loss_{b}": _f(np.nanmean(finals_b)),
                "gap_mean": _f(m), "gap_ci95": [_f(lo), _f(hi)], "repeats": len(diff), **dict(extra or {})}
    return Claim.judged(f"{a}_faster", f"{a} reaches a lower training loss than {b} (per-repeat gap CI > 0)",
                        paper, measured, v)


def gap_claims(summary: Mapping[str, Any] | None, prefix: str, a: str, b: str, paper_frac: Any = "most layers",
               paper_ratio: Any = "1.4-2x", band: tuple[float, float] | None = PAPER_BAND,
               band_widened: tuple[float, float] | None = WIDENED_BAND, premises=(), what: str = "") -> list:
    """The two standard verdicts of an A-vs-B R_med comparison (:mod:`optiscope.metrics.verdicts`):

    1. ``{prefix}_most_layers``: A's R_med below B's in most layers: one-sided Clopper-Pearson bound on the count
       of compared layers > 1/2 (``None`` when there are too few layers to decide);
    2. ``{prefix}_ratio``: the median over layers of ``R_B / R_A`` with its bootstrap CI, against ``band``
       widened to ``band_widened`` with lower bound > 1; with ``band=None`` a direction claim (CI > 1).

    Both are ``None`` (untestable here) when a premise fails or ``summary`` is None (nothing to compare).
    """
    from optiscope.experiments.base import Claim
    from optiscope.metrics.verdicts import band_claim, direction_claim, fraction_claim

    premises = list(premises)
    tag = f" {what}" if what else ""
    if summary is None:
        premises.append((False, f"no comparison{tag} could be made"))
        summary = {"frac_layers_a_smaller": float("nan"), "n_layers_a_smaller": 0, "n_layers_compared": 0,
                   "median_ratio": float("nan"), "ci95": [float("nan"), float("nan")], "repeats": 0,
                   "exclude_first": 0}
    k, n = summary["n_layers_a_smaller"], summary["n_layers_compared"]
    med, ci = summary["median_ratio"], summary["ci95"]
    v_frac = fraction_claim(k, n, premises=premises)
    if band is not None:
        v_ratio = band_claim(ci, band, widen_to=band_widened, estimate=med, premises=premises)
        text = (f"median over layers of R_med({b}) / R_med({a}){tag}: CI overlaps [{band_widened[0]:g}, "
                f"{band_widened[1]:g}] (the paper's {band[0]:g}-{band[1]:g}x widened) and its lower bound > 1")
    else:
        v_ratio = direction_claim(ci, null=1.0, estimate=med, premises=premises)
        text = f"median over layers of R_med({b}) / R_med({a}){tag} has a CI above 1"
    return [
        Claim.judged(f"{prefix}_most_layers", f"R_med of {a} is below R_med of {b} in most layers{tag} (first "
                     f"{summary['exclude_first']} excluded; one-sided 95% binomial bound > 1/2)", paper_frac,
                     {"fraction": _f(summary["frac_layers_a_smaller"]), "layers_a_smaller": k, "n_layers": n}, v_frac),
        Claim.judged(f"{prefix}_ratio", text, paper_ratio,
                     {"median_ratio": _f(med), "ci95": [_f(x) for x in ci], "repeats": summary["repeats"]}, v_ratio),
    ]


def premises_for(tuning: TuneOutcome, adaptive: AdaptivePick, finals_a: Sequence[float], finals_b: Sequence[float],
                 plateau_loss: float, unigram: float, plateau_fraction: float, a_label: str = "Adam",
                 b_label: str = "SGD+M", plateau_label: str | None = None) -> list[tuple[bool, str]]:
    """The premises under which the paper's R_med comparison is made (Jiang et al. 2023, §4):

    * B's best lr lies strictly inside its (widened) grid (B is tuned; a one-point grid counts as given);
    * A converges faster than tuned B (the paper's lr rule) on the tuning run and on average over the repeats;
    * the optimizer named ``plateau_label`` (default B) is well below the unigram plateau: its mean final loss
      ``plateau_loss <= plateau_fraction * unigram``.
    """
    label = plateau_label or b_label
    rel = plateau_loss / unigram
    la, lb = float(np.nanmean(finals_a)), float(np.nanmean(finals_b))
    return [
        (tuning.inside or not tuning.losses,
         f"{b_label}'s best lr {tuning.best:g} is at the edge of its grid {sorted(tuning.losses)} after widening "
         f"(not tuned)"),
        (adaptive.faster and la < lb,
         f"{a_label} is not faster than tuned {b_label} at any lr of its grid {sorted(adaptive.losses)} "
         f"(best {a_label} final loss {adaptive.losses.get(adaptive.lr, float('nan')):.4g} vs "
         f"{adaptive.baseline_loss:.4g}; repeats {la:.4g} vs {lb:.4g})"),
        (rel <= plateau_fraction,
         f"{label} is still on the unigram plateau: final loss {plateau_loss:.4g} = {rel:.3f} x the unigram entropy "
         f"{unigram:.4g} (judged only at <= {plateau_fraction:g} x)"),
    ]


def protocol_premises(out: PairOutcome, a: str = "adam", b: str = "sgdm", on: str | None = None,
                      a_label: str = "Adam", b_label: str = "SGD+M") -> list[tuple[bool, str]]:
    """:func:`premises_for` of a :class:`PairOutcome`; ``on`` names the optimizer that must leave the plateau
    (default B; random targets: A)."""
    on = b if on is None else on
    p = out.plateau
    return premises_for(out.tuning, out.adaptive, out.final_losses[a], out.final_losses[b], p[f"final_loss_{on}"],
                        p["unigram_entropy"], p["plateau_fraction"], a_label, b_label,
                        plateau_label=b_label if on == b else a_label)


def pair_metrics(out: PairOutcome, a: str = "adam", b: str = "sgdm") -> dict[str, Any]:
    """The ``metrics`` block of results.json for a pairwise comparison."""
    return {"layers": out.layers, "sgdm_lr": out.sgdm_lr, "lr_tuning": out.tuning.to_dict(),
            "adaptive_lr": out.adaptive.to_dict(), "plateau": out.plateau, "status": out.status,
            "summary_equal_step": out.summary, "summary_equal_loss": out.equal_loss, "equal_loss_pairs": out.pairs,
            "final_losses": out.final_losses, "speed": faster(out.metrics, a, b), "hvp_cost": hvp_cost(out.metrics),
            "seconds": out.seconds}

"""Init health check: gradients and curvature at random initialization vs depth and width (Orvieto et al. 2022, §4, Thm. 9-10).

For a model factory ``factory(depth, width, seed) -> nn.Module`` (already initialized; e.g. an MLP with He-uniform
init), a data function and ``n_seeds`` seeds, :func:`init_check` measures at initialization, per (depth, width,
seed), with :class:`optiscope.curvature.Hessian`:

* ``output_norm``: ``sqrt(mean_i ||f(x_i)||^2)`` (forward pass, Orvieto et al. 2022, §4 Prop. 8),
* ``grad_norm``: ``||grad l||`` (total and per layer),
* ``hess_diag_norm`` / ``hess_offdiag_norm``: ``sqrt(sum_a ||H_aa||_F^2)`` and ``sqrt(sum_{a != b} ||H_ab||_F^2)``
  (Thm. 10; per layer: ``hess_block_norm`` = ``||H_aa||_F``), and ``hess_gershgorin`` (block Gershgorin bound on
  ``|lambda|``),
* ``eig_max`` / ``eig_min``: the largest and the most negative eigenvalue (dense ``eigvalsh`` when the Hessian is
  small enough, Lanczos otherwise), ``trace`` (exact or Hutch++),

and summarizes them by median, mean and quantiles vs depth and width. Medians, not means, are the honest statistic
here: the distributions are fat-tailed (Orvieto et al. 2022, §3). :meth:`InitCheckResult.vanishing` flags a median that falls
exponentially in depth (a log-linear fit with a significantly negative slope and a large total drop), and
:meth:`InitCheckResult.vanishing_depth` gives the depth at which a median falls below a fraction of its value at a
reference depth (log-linear interpolation between measured depths; ``None`` if not reached).

The default data (Orvieto et al. 2022, App. A.1, Fig. 1/4/13): ``n`` inputs ``x ~ N(0, I_d)`` with ``d`` = the width, targets from
a random one-hidden-layer ReLU teacher of that width, square loss.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn

from optiscope.curvature import Hessian
from optiscope.lab.probes import pure_forward
from optiscope.zoo.data import HalfMSELoss
from optiscope.utils.config import Config, require
from optiscope.utils.progress import progress_task
from optiscope.utils.threads import limit_threads as _limit_threads

Batch = tuple[torch.Tensor, torch.Tensor]
QUANTITIES = ("loss", "output_norm", "grad_norm", "hess_diag_norm", "hess_offdiag_norm", "hess_gershgorin",
              "eig_max", "eig_min", "trace")
HESSIAN_MODES = ("none", "blocks", "full")


@dataclass(frozen=True)
class InitCheckConfig(Config):
    """What :func:`init_check` measures. ``hessian``: ``none`` (forward and gradient only), ``blocks`` (block norms
    and trace) or ``full`` (also extreme eigenvalues). Hessians with at most ``exact_max_dim`` parameters are formed
    densely (exact numbers); larger ones use ``n_probes`` Rademacher probes per layer and Lanczos."""

    seed: int = 0
    depths: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    widths: tuple[int, ...] = (32,)
    n_seeds: int = 20
    n_samples: int = 64
    hessian: str = "full"
    n_probes: int = 4
    eig_tol: float = 1e-3
    eig_max_iter: int = 60
    exact_max_dim: int = 1500
    dtype: str = "float64"
    weights_only: bool = False
    vanish_ratio: float = 1e-2
    quantiles: tuple[float, ...] = (0.1, 0.25, 0.75, 0.9)
    threads: int = 1

    def validate(self) -> None:
        require(len(self.depths) > 0 and all(d >= 1 for d in self.depths), "depths", self.depths,
                "a non-empty list of integers >= 1")
        require(len(self.widths) > 0 and all(w >= 1 for w in self.widths), "widths", self.widths,
                "a non-empty list of integers >= 1")
        require(self.n_seeds >= 1, "n_seeds", self.n_seeds, ">= 1")
        require(self.n_samples >= 1, "n_samples", self.n_samples, ">= 1")
        require(self.hessian in HESSIAN_MODES, "hessian", self.hessian, f"one of {HESSIAN_MODES}")
        require(self.n_probes >= 2, "n_probes", self.n_probes, ">= 2")
        require(self.eig_tol > 0, "eig_tol", self.eig_tol, "> 0")
        require(self.eig_max_iter >= 2, "eig_max_iter", self.eig_max_iter, ">= 2")
        require(self.exact_max_dim >= 0, "exact_max_dim", self.exact_max_dim, ">= 0")
        require(self.dtype in ("float32", "float64"), "dtype", self.dtype, "float32 or float64")
        require(0 < self.vanish_ratio < 1, "vanish_ratio", self.vanish_ratio, "in (0, 1)")
        require(all(0 < q < 1 for q in self.quantiles), "quantiles", self.quantiles, "values in (0, 1)")
        require(self.threads >= 1, "threads", self.threads, ">= 1")


def limit_threads(n: int = 1):
    """Run with ``n`` torch and BLAS threads, then restore (:func:`optiscope.utils.threads.limit_threads`). Init
    checks evaluate many small models and matrices, for which extra threads only add synchronisation; on a shared
    machine oversubscription made a 400 x 400 ``eigvalsh`` 100x slower with 2 threads than with 1
    (see docs/results/init.md)."""
    return _limit_threads(n, blas=True)


def teacher_batch(n: int, width: int, seed: int, out_dim: int = 1, dtype: torch.dtype = torch.float64) -> Batch:
    """Orvieto et al. 2022, App. A.1 data: ``x ~ N(0, I_d)`` with ``d = width``; ``y = V relu(U x)`` from a random
    one-hidden-layer teacher of width ``width`` (``U, V`` with i.i.d. ``N(0, 1/fan_in)`` entries)."""
    if n < 1 or width < 1 or out_dim < 1:
        raise ValueError(f"teacher_batch needs n, width, out_dim >= 1, got {n}, {width}, {out_dim}")
    g = torch.Generator().manual_seed(int(seed))
    X = torch.randn(n, width, generator=g, dtype=torch.float64)
    U = torch.randn(width, width, generator=g, dtype=torch.float64) / math.sqrt(width)
    V = torch.randn(out_dim, width, generator=g, dtype=torch.float64) / math.sqrt(width)
    Y = torch.relu(X @ U.T) @ V.T
    return X.to(dtype), Y.to(dtype)


#: ``(1/2) mean_i ||f(x_i) - y_i||^2``, the square loss of Orvieto et al. 2022, Eq. (1) averaged over samples (the zoo's loss).
half_mse = HalfMSELoss()


WIDTH_KEYS = {"mlp": "width", "deep_linear": "width", "fcn": "channels"}


def model_factory(spec: str, init: str | None = None, input_dim: int | None = None,
                  output_dim: int | None = None, **overrides: Any) -> Callable[[int, int, int], nn.Module]:
    """A ``factory(depth, width, seed)`` building zoo models from a spec such as ``"mlp:activation=relu,bias=false"``.

    ``depth`` and the width argument (``width`` for ``mlp``/``deep_linear``, ``channels`` for ``fcn``; the
    ``neural_chain`` has none) are set per call, ``init`` (e.g. ``"he_uniform"``) and ``seed`` too. For ``mlp`` and
    ``deep_linear`` ``input_dim`` defaults to the width (Orvieto et al. 2022, App. A.1: ``d = m``) and ``output_dim`` to 1.
    """
    from optiscope.utils.spec import parse_spec
    from optiscope.zoo.models import MODELS, build_model

    name, kw = parse_spec(spec, MODELS, "model")
    kw.update(overrides)
    width_key = WIDTH_KEYS.get(name)
    if name not in WIDTH_KEYS and name != "neural_chain":
        raise ValueError(f"init-check supports models {sorted([*WIDTH_KEYS, 'neural_chain'])}, got {name!r}")

    def factory(depth: int, width: int, seed: int) -> nn.Module:
        args = dict(kw)
        args["depth"] = depth
        if width_key is not None:
            args[width_key] = width
        if init is not None:
            args["init"] = init
        if name in ("mlp", "deep_linear"):
            args.setdefault("input_dim", input_dim or width)
            args.setdefault("output_dim", output_dim or 1)
        return build_model((name, args), seed=seed)

    return factory


@dataclass
class InitMeasurement:
    """Measurements of one model at init: global ``values`` (keys of ``QUANTITIES`` that were measured), per-layer
    ``grad_norm`` and ``hess_block_norm`` (``||H_aa||_F``), the block matrix ``block_frobenius`` (or None),
    whether the Hessian numbers are exact, and how many HVPs they cost."""

    values: dict[str, float]
    grad_norm_per_layer: dict[str, float]
    hess_block_norm_per_layer: dict[str, float] = field(default_factory=dict)
    block_frobenius: np.ndarray | None = None
    exact: bool = False
    n_hvp: int = 0
    eig_converged: bool | None = None


def measure_at_init(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batch: Batch,
                    hessian: str = "full", n_probes: int = 4, eig_tol: float = 1e-3, eig_max_iter: int = 60,
                    exact_max_dim: int = 1500, params: Iterable[str] | None = None, seed: int = 0) -> InitMeasurement:
    """Forward output norm, gradient and Hessian statistics of ``model`` on ``batch`` (pure: nothing is changed).

    ``hessian``: ``"none"``, ``"blocks"`` (block Frobenius norms + trace) or ``"full"`` (+ extreme eigenvalues).
    With ``numel <= exact_max_dim`` the Hessian is dense (exact block norms, ``eigvalsh``, exact trace); otherwise
    block norms use ``n_probes`` probes per layer, eigenvalues Lanczos (``eig_tol``, ``eig_max_iter`` HVPs), the
    trace Hutch++ with ``3 n_probes`` HVPs. ``params``: the parameter names to differentiate (default all).
    """
    if hessian not in HESSIAN_MODES:
        raise ValueError(f"hessian = {hessian!r}; use one of {HESSIAN_MODES}")
    X, y = batch
    with torch.no_grad():
        out = pure_forward(model, X)  # BatchNorm running statistics and the RNG stay untouched
    values = {"output_norm": float(out.pow(2).reshape(len(out), -1).sum(1).mean().sqrt())}
    H = Hessian(model, loss_fn, (X, y), params=list(params) if params is not None else None)
    values["loss"] = float(H.loss())
    grad = H.gradient()
    per_layer = {n: float(g.norm()) for n, g in grad.items()}
    values["grad_norm"] = float(math.sqrt(sum(v * v for v in per_layer.values())))
    meas = InitMeasurement(values, per_layer)
    if hessian == "none":
        return meas
    exact = H.numel <= exact_max_dim
    before = H.n_hvp
    meas.exact = exact
    if exact:
        # one dense Hessian (built once, cached by the Hessian) serves blocks, spectrum and trace
        dense = H.dense(max_dim=max(exact_max_dim, 1)).double()
        dense = 0.5 * (dense + dense.T)
        bn = H.block_norms(exact=True, max_dim=max(exact_max_dim, 1))
        meas.block_frobenius = bn.frobenius
        meas.hess_block_norm_per_layer = {a: float(bn.frobenius[i, i]) for i, a in enumerate(bn.layers)}
        values["hess_diag_norm"] = bn.diagonal_total
        values["hess_offdiag_norm"] = bn.offdiagonal_total
        values["hess_gershgorin"] = bn.gershgorin
        values["trace"] = float(torch.trace(dense))
        if hessian == "full":
            ev = torch.linalg.eigvalsh(dense)
            values["eig_max"], values["eig_min"] = float(ev[-1]), float(ev[0])
            meas.eig_converged = True
    else:
        bn = H.block_norms(exact=False, n_probes=n_probes, seed=seed)
        meas.block_frobenius = bn.frobenius
        meas.hess_block_norm_per_layer = {a: float(bn.frobenius[i, i]) for i, a in enumerate(bn.layers)}
        values["hess_diag_norm"] = bn.diagonal_total
        values["hess_offdiag_norm"] = bn.offdiagonal_total
        values["hess_gershgorin"] = bn.gershgorin
        values["trace"] = H.trace(n_probes=max(3, 3 * n_probes), method="hutch++", seed=seed).value
        if hessian == "full":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                k = H.numel
                hi = H.eigenvalues(k=1, which="LA", tol=eig_tol, max_iter=min(eig_max_iter, k), seed=seed)
                lo = H.eigenvalues(k=1, which="SA", tol=eig_tol, max_iter=min(eig_max_iter, k), seed=seed + 1)
            values["eig_max"], values["eig_min"] = float(hi.values[0]), float(lo.values[0])
            meas.eig_converged = not any("did not converge" in str(w.message) for w in caught)
    meas.n_hvp = H.n_hvp - before
    return meas


@dataclass
class InitCheckResult:
    """Records of :func:`init_check`: a tidy frame with columns ``depth, width, seed, quantity, layer, value``
    (``layer`` is ``""`` for global quantities)."""

    records: pd.DataFrame
    config: InitCheckConfig
    label: str = ""

    def summary(self, quantities: Iterable[str] | None = None) -> pd.DataFrame:
        """Median, mean and the configured quantiles per (width, depth, quantity) over seeds (global quantities)."""
        df = self.records[self.records["layer"] == ""]
        if quantities is not None:
            df = df[df["quantity"].isin(list(quantities))]
        grouped = df.groupby(["width", "depth", "quantity"])["value"]
        out = grouped.agg(median="median", mean="mean", n="count")
        for q in self.config.quantiles:
            out[f"q{int(round(q * 100)):02d}"] = grouped.quantile(q)
        return out.reset_index()

    def medians(self, quantity: str, width: int) -> pd.Series:
        """Median of ``quantity`` over seeds vs depth at ``width`` (index: depth)."""
        s = self.summary([quantity])
        s = s[s["width"] == width].set_index("depth")["median"].sort_index()
        if s.empty:
            raise ValueError(f"no records for quantity {quantity!r} at width {width}")
        return s

    def vanishing(self, quantity: str = "grad_norm") -> pd.DataFrame:
        """Per width: log10-linear fit of the median vs depth (slope per layer, p-value), the drop ratio
        ``median(deepest) / median(shallowest)`` and ``vanishing`` = slope < 0 with p < 0.05 and ratio below
        ``config.vanish_ratio`` (Orvieto et al. 2022: medians that fall exponentially in depth)."""
        rows = []
        for w in sorted(self.records["width"].unique()):
            med = self.medians(quantity, int(w)).abs()
            med = med[med > 0]
            depths, vals = med.index.to_numpy(float), np.log10(med.to_numpy(float))
            if len(depths) >= 3:
                fit = stats.linregress(depths, vals)
                slope, p = float(fit.slope), float(fit.pvalue)
            elif len(depths) == 2:
                slope, p = float((vals[1] - vals[0]) / (depths[1] - depths[0])), float("nan")
            else:
                slope, p = float("nan"), float("nan")
            ratio = float(10 ** (vals[-1] - vals[0])) if len(vals) >= 2 else float("nan")
            flag = bool(slope < 0 and (p < 0.05 or math.isnan(p)) and ratio < self.config.vanish_ratio)
            rows.append({"width": int(w), "quantity": quantity, "log10_slope_per_layer": slope, "p_value": p,
                         "ratio_deepest_to_shallowest": ratio, "vanishing": flag})
        return pd.DataFrame(rows)

    def vanishing_depth(self, quantity: str = "grad_norm", width: int | None = None, threshold: float = 1e-3,
                        reference_depth: int | None = None) -> float | None:
        """Depth at which the median of ``quantity`` first falls below ``threshold`` times its value at
        ``reference_depth`` (default: the smallest depth), log-linearly interpolated between measured depths;
        ``None`` if it never does within the measured depths."""
        if not 0 < threshold < 1:
            raise ValueError(f"threshold = {threshold!r} must be in (0, 1)")
        width = int(self.records["width"].iloc[0]) if width is None else width
        med = self.medians(quantity, width).abs()
        ref_depth = int(med.index[0]) if reference_depth is None else reference_depth
        if ref_depth not in med.index:
            raise ValueError(f"reference depth {ref_depth} was not measured; depths: {list(med.index)}")
        level = threshold * float(med.loc[ref_depth])
        after = med[med.index >= ref_depth]
        prev_d, prev_v = None, None
        for d, v in after.items():
            if v <= level:
                if prev_d is None or prev_v <= 0 or v <= 0:
                    return float(d)
                # log-linear interpolation between the last depth above and the first below the level
                t = (math.log(prev_v) - math.log(level)) / (math.log(prev_v) - math.log(v))
                return float(prev_d + t * (d - prev_d))
            prev_d, prev_v = d, v
        return None

    def to_metrics(self, run: str | None = None) -> pd.DataFrame:
        """RunStore tidy form: ``run`` = ``label/w<width>/s<seed>``, ``optimizer`` = ``"init"``, ``step`` = depth."""
        df = self.records
        name = run or self.label or "init_check"
        return pd.DataFrame({
            "run": [f"{name}/w{w}/s{s}" for w, s in zip(df["width"], df["seed"])],
            "optimizer": "init", "step": df["depth"].astype("int64"), "metric": df["quantity"],
            "layer": df["layer"], "value": df["value"].astype(float)})

    def plot(self, quantities: Iterable[str] = ("output_norm", "grad_norm", "hess_diag_norm", "hess_offdiag_norm"),
             title: str | None = None):
        """Median (line) and inter-quantile band (first and last configured quantile) vs depth, one panel per
        quantity, one line per width; log scale. Returns the matplotlib figure."""
        from optiscope.utils.plotting import plt

        qs = [q for q in quantities if q in set(self.records["quantity"])]
        fig, axes = plt.subplots(1, max(len(qs), 1), figsize=(4 * max(len(qs), 1), 3.5), squeeze=False)
        summ = self.summary(qs)
        lo_col = f"q{int(round(min(self.config.quantiles) * 100)):02d}"
        hi_col = f"q{int(round(max(self.config.quantiles) * 100)):02d}"
        for ax, q in zip(axes[0], qs):
            for w in sorted(summ["width"].unique()):
                s = summ[(summ["quantity"] == q) & (summ["width"] == w)].sort_values("depth")
                ax.plot(s["depth"], s["median"].abs(), "-o", ms=3, label=f"width {w} (median)")
                ax.fill_between(s["depth"], s[lo_col].abs(), s[hi_col].abs(), alpha=0.2)
            ax.set_yscale("log")
            ax.set_xlabel("depth")
            ax.set_title(q)
            ax.legend(fontsize=6)
        if title:
            fig.suptitle(title)
        return fig


def init_check(factory: Callable[[int, int, int], nn.Module], config: InitCheckConfig,
               data: Callable[[int, int], Batch] | Batch | None = None,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
               label: str = "", description: str = "init check") -> InitCheckResult:
    """Measure ``factory(depth, width, seed)`` at init for every depth, width and seed of ``config``.

    ``data``: a fixed ``(X, y)`` batch, a callable ``(width, seed) -> (X, y)``, or ``None`` for
    :func:`teacher_batch` with ``config.n_samples`` samples (input dimension = width). ``loss_fn`` defaults to
    :func:`half_mse`. Seeds are ``config.seed + s`` for ``s < n_seeds``; the factory must draw its init from them.
    """
    dtype = torch.float64 if config.dtype == "float64" else torch.float32
    loss_fn = loss_fn or half_mse
    rows: list[dict[str, Any]] = []
    total = len(config.depths) * len(config.widths) * config.n_seeds
    with progress_task(description, total=total) as task, limit_threads(config.threads):
        for width in config.widths:
            for s in range(config.n_seeds):
                seed = config.seed + s
                if data is None:
                    batch = teacher_batch(config.n_samples, width, seed=10_000 + seed, dtype=dtype)
                elif callable(data):
                    batch = data(width, seed)
                else:
                    batch = data
                batch = (batch[0].to(dtype) if batch[0].is_floating_point() else batch[0], batch[1].to(dtype)
                         if batch[1].is_floating_point() else batch[1])
                for depth in config.depths:
                    model = factory(int(depth), int(width), int(seed)).to(dtype)
                    names = None
                    if config.weights_only:
                        names = [n for n, p in model.named_parameters() if p.ndim >= 2]
                    m = measure_at_init(model, loss_fn, batch, hessian=config.hessian, n_probes=config.n_probes,
                                        eig_tol=config.eig_tol, eig_max_iter=config.eig_max_iter,
                                        exact_max_dim=config.exact_max_dim, params=names, seed=seed)
                    base = {"depth": int(depth), "width": int(width), "seed": int(seed)}
                    rows += [base | {"quantity": q, "layer": "", "value": v} for q, v in m.values.items()]
                    rows += [base | {"quantity": "grad_norm", "layer": n, "value": v}
                             for n, v in m.grad_norm_per_layer.items()]
                    rows += [base | {"quantity": "hess_block_norm", "layer": n, "value": v}
                             for n, v in m.hess_block_norm_per_layer.items()]
                    if m.eig_converged is not None:
                        rows.append(base | {"quantity": "eig_converged", "layer": "", "value": float(m.eig_converged)})
                    task.advance()
    df = pd.DataFrame(rows, columns=["depth", "width", "seed", "quantity", "layer", "value"])
    return InitCheckResult(df, config, label)


__all__ = [
    "QUANTITIES",
    "InitCheckConfig",
    "InitCheckResult",
    "InitMeasurement",
    "half_mse",
    "init_check",
    "limit_threads",
    "measure_at_init",
    "model_factory",
    "teacher_batch",
]

"""Experiment 9 of issue 8: Theorem 1 on a two-layer linear network (seed 000 §5, §6, App. B, E, F).

Setting (Assumptions 1-3): ``f(x) = W2 W1 x`` with hidden width m = input dimension d (the seed's "d-dimensional
input and hidden layer"; ``input_dim`` overrides d), one output, whitened Gaussian inputs and a linear teacher
(``zoo.teacher_regression``), i.i.d. ``N(0, init_scale^2)`` initialisation, full-batch (large-batch) SGD+M and Adam
from the same initial weights, square loss ``1/2 (f - y)^2``. For each width we measure, along training, R_med of
both layers (200 exact diagonal entries per layer), R_u of the hidden-side leading singular vectors (§6 (B)), the
rank-one energy fraction, and the diagonal-dominance ratio of a sampled Hessian block (App. E). ``repeats``
independent initialisations per width (Theorem 1 holds with high probability over the init).

Theory (``theory.two_layer``): SGD+M's hidden-side singular vector stays Gaussian-like, so R_med^SGD ~ max/median
of m squared Gaussians = Theta(log m) (``gaussian_uniformity``); Adam's sign-like updates make it nearly uniform,
R_med^Adam = O(1); R_med ~ R_u when the layers are rank one (App. F); the Hessian becomes more diagonal (App. E).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import stats

from optiscope.experiments import _rmed_common as rc
from optiscope.lab.probes import weight_matrix_params
from optiscope.experiments.base import Claim, Result, register
from optiscope.utils.config import Config, require
from optiscope.utils.plotting import plt
from optiscope.utils.progress import progress_task


@dataclass(frozen=True)
class TwoLayerRMedConfig(Config):
    seed: int = 0
    widths: tuple[int, ...] = (50, 100, 200, 400)
    input_dim: int = 0              # 0: d = width (the seed's setting); > 0: fixed input dimension
    n_train: int = 2048
    steps: int = 400
    init_scale: float = 1e-3
    sgdm_lr: float = 0.02
    momentum: float = 0.9
    adam_lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    repeats: int = 3                # independent initialisations per width
    n_checkpoints: int = 4
    per_layer: int = 200
    dominance_per_layer: int = 40
    exact_max_params: int = 6000    # exact full-Hessian dominance (closed form) when m d + m <= this
    at: str = "late_mean"
    n_bootstrap: int = 2000

    def validate(self) -> None:
        require(len(self.widths) >= 2 and all(w >= 2 for w in self.widths), "widths", self.widths,
                "at least two widths, each >= 2")
        require(self.input_dim >= 0, "input_dim", self.input_dim, ">= 0 (0: equal to the width)")
        require(self.n_train >= 2, "n_train", self.n_train, ">= 2")
        require(self.steps >= 1, "steps", self.steps, ">= 1")
        require(self.init_scale > 0, "init_scale", self.init_scale, "> 0")
        require(self.sgdm_lr > 0, "sgdm_lr", self.sgdm_lr, "> 0")
        require(self.adam_lr > 0, "adam_lr", self.adam_lr, "> 0")
        require(0 <= self.momentum < 1, "momentum", self.momentum, "in [0, 1)")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1/beta2", (self.beta1, self.beta2), "in [0, 1)")
        require(self.eps >= 0, "eps", self.eps, ">= 0")
        require(self.repeats >= 1, "repeats", self.repeats, ">= 1")
        require(self.n_checkpoints >= 1, "n_checkpoints", self.n_checkpoints, ">= 1")
        require(self.per_layer >= 2, "per_layer", self.per_layer, ">= 2")
        require(self.dominance_per_layer >= 2, "dominance_per_layer", self.dominance_per_layer, ">= 2")
        require(self.exact_max_params >= 0, "exact_max_params", self.exact_max_params, ">= 0")
        require(self.at in rc.AT_CHOICES, "at", self.at, f"one of {rc.AT_CHOICES}")
        require(self.n_bootstrap >= 100, "n_bootstrap", self.n_bootstrap, ">= 100")


QUICK = TwoLayerRMedConfig(widths=(50, 100, 200, 400), input_dim=50, n_train=1024, steps=200, adam_lr=3e-3,
                           repeats=2, n_checkpoints=3)
FULL = TwoLayerRMedConfig(widths=(50, 100, 200, 400, 800), input_dim=0, n_train=8192, steps=3000, repeats=10,
                          n_checkpoints=10)


def two_layer_problem(width: int, input_dim: int, n_train: int, init_scale: float, seed: int, data_seed: int):
    """Problem: ``TwoLayerLinear`` (no biases) with i.i.d. N(0, init_scale^2) weights on ``teacher_regression``."""
    from optiscope.lab import Problem
    from optiscope.zoo.data import default_loss, teacher_regression
    from optiscope.zoo.models import TwoLayerLinear

    ds = teacher_regression(d=input_dim, n=n_train, n_test=256, k=1, noise=0.0, seed=data_seed)
    model = TwoLayerLinear(input_dim, width, 1, init_std=init_scale, seed=seed)
    return Problem(model, default_loss(ds), train=ds.train, eval=ds.test, probe_batch=ds.train,
                   task="regression", name=f"two_layer_m{width}"), ds


def hidden_side_names(model: torch.nn.Module) -> tuple[str, str]:
    """Names of W1 (m x d; hidden units on rows) and W2 (k x m; hidden units on columns), in forward order."""
    names = weight_matrix_params(model)
    if len(names) != 2:
        raise ValueError(f"expected a two-layer network with two weight matrices, found {names}")
    return names[0], names[1]


class HiddenUniformityProbe:
    """R_u (seed 000 §6 (B)) of the hidden-side leading singular vector of W1 (left) and W2 (right), and the
    rank-one energy fraction ``s_1^2 / sum s^2`` of each (App. B: both become approximately rank one)."""

    name = "hidden_uniformity"

    def __call__(self, problem, state):
        from optiscope.metrics import singular_vector_uniformity
        from optiscope.theory.two_layer import hidden_singular_vector

        w1, w2 = hidden_side_names(state.model)
        P = state.params()
        W1 = P[w1].double().cpu().numpy()
        W2 = P[w2].double().cpu().numpy()
        return {"r_u": {w1: singular_vector_uniformity(W1, side="left"),
                        w2: singular_vector_uniformity(W2, side="right")},
                "rank_one_fraction": {w1: hidden_singular_vector(W1, 0)[1], w2: hidden_singular_vector(W2, 1)[1]}}


class ExactDominanceProbe:
    """Diagonal dominance of the *full* Hessian (App. E, Eq. (40) reading of ``metrics.diagonal_dominance``: mean
    over coordinates of off-diagonal row mass / diagonal entry), from the closed form ``theory.two_layer.hessian``
    with the empirical input covariance ``X^T X / n`` and the teacher: for ``y = A x`` exactly and the half-MSE
    loss this *is* the Hessian of the training loss. Only for ``m d + k m <= max_params`` (dense matrix)."""

    name = "exact_dominance"

    def __init__(self, teacher: torch.Tensor, X: torch.Tensor, max_params: int = 6000):
        from optiscope.theory.two_layer import TwoLayerProblem

        Xd = X.double().cpu().numpy()
        self.problem = TwoLayerProblem(teacher.double().cpu().numpy(), cov=Xd.T @ Xd / len(Xd))
        self.max_params = int(max_params)

    def __call__(self, problem, state):
        from optiscope.metrics import diagonal_dominance
        from optiscope.theory.two_layer import hessian

        w1, w2 = hidden_side_names(state.model)
        P = state.params()
        W1, W2 = P[w1].double().cpu().numpy(), P[w2].double().cpu().numpy()
        if W1.size + W2.size > self.max_params:
            return {}
        return {"diag_dominance_exact": diagonal_dominance(hessian(W1, W2, self.problem)).mean}


def _slope(widths, values) -> float:
    x, y = np.log(np.asarray(widths, float)), np.asarray(values, float)
    ok = np.isfinite(y)
    if ok.sum() < 2:
        return float("nan")
    return float(stats.linregress(x[ok], y[ok]).slope)


@register("rmed_two_layer", paper="000", title="R_med of SGD+M vs Adam on a two-layer linear network vs width "
          "(Theorem 1, App. E, F)", config=TwoLayerRMedConfig, presets={"quick": QUICK, "full": FULL})
def run(config: TwoLayerRMedConfig, store) -> Result:
    """Theorem 1 check: R_med of both layers for SGD+M and Adam as the width grows, with R_u and dominance."""
    from optiscope.lab import make_probe
    from optiscope.theory.two_layer import theorem1_prediction

    cfg = config
    optimizers = {"sgdm": ("sgdm", {"lr": cfg.sgdm_lr, "momentum": cfg.momentum}),
                  "adam": ("adam", {"lr": cfg.adam_lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps})}
    probe_steps = rc.checkpoint_steps(cfg.steps, cfg.n_checkpoints)
    frames, statuses, per_width = [], {}, {}
    with progress_task("rmed_two_layer", total=len(cfg.widths) * cfg.repeats) as task:
        for m in cfg.widths:
            d = cfg.input_dim or m
            wf = []
            for r in range(cfg.repeats):
                problem, ds = two_layer_problem(m, d, cfg.n_train, cfg.init_scale, seed=cfg.seed * 1000 + r,
                                                data_seed=cfg.seed)
                w1, w2 = hidden_side_names(problem.model)
                probes = [make_probe("loss"), rc.rmed_probe([w1, w2], cfg.per_layer),
                          make_probe("diag_dominance", per_layer=cfg.dominance_per_layer), HiddenUniformityProbe(),
                          ExactDominanceProbe(ds.meta["teacher"], ds.train[0], cfg.exact_max_params)]
                out = rc.compare_repeats(problem, optimizers, cfg.steps, 1, seed=cfg.seed * 1000 + r,
                                         probes=probes, full_batch=True, probe_steps=probe_steps, checkpoint=False)
                df = out.metrics
                df["repeat"] = r
                df["width"] = m
                wf.append(df)
                statuses.update({f"m={m}/{k.split('/')[0]}/r{r}": v for k, v in out.status.items()})
                task.advance()
            wdf = pd.concat(wf, ignore_index=True)
            frames.append(wdf)
            layers = [w1, w2]
            a = rc.rmed_values(wdf, "adam", layers, at=cfg.at)
            b = rc.rmed_values(wdf, "sgdm", layers, at=cfg.at)
            ru_a = rc.rmed_values(wdf, "adam", layers, at=cfg.at, metric="r_u")
            ru_b = rc.rmed_values(wdf, "sgdm", layers, at=cfg.at, metric="r_u")
            dom = {}
            for opt in optimizers:
                dom[opt] = {}
                for metric, label in (("diag_dominance", "sampled"), ("diag_dominance_exact", "exact")):
                    dd = wdf[(wdf["optimizer"] == opt) & (wdf["metric"] == metric) & (wdf["layer"] == "")]
                    if dd.empty:
                        continue
                    by_step = dd.groupby("step")["value"].mean().sort_index()
                    dom[opt][label] = {"initial": float(by_step.iloc[0]), "final": float(by_step.iloc[-1]),
                                       "by_step": {int(k): float(v) for k, v in by_step.items()}}
            losses = {opt: rc.final_loss(wdf, opt) for opt in optimizers}
            per_width[m] = {
                "input_dim": d, "layers": layers,
                "gap": rc.gap_summary(a, b, layers, exclude_first=0, n_resamples=cfg.n_bootstrap, seed=cfg.seed),
                "r_med_adam": np.nanmean(a, 0).tolist(), "r_med_sgdm": np.nanmean(b, 0).tolist(),
                "r_u_adam": np.nanmean(ru_a, 0).tolist(), "r_u_sgdm": np.nanmean(ru_b, 0).tolist(),
                "prediction": theorem1_prediction(m), "diag_dominance": dom, "final_loss": losses,
                "initial_loss": float(wdf[(wdf["metric"] == "loss") & (wdf["step"] == 0)]["value"].mean()),
            }
    metrics = pd.concat(frames, ignore_index=True)
    store_df = metrics.copy()
    store_df["run"] = ("m" + store_df["width"].astype(str) + "/" + store_df["optimizer"].astype(str) + "/r"
                       + store_df["repeat"].astype(str))
    store.write_metrics(store_df)
    return _verdicts(cfg, per_width, statuses, metrics, store)


def _verdicts(cfg, per_width, statuses, metrics, store) -> Result:
    widths = list(per_width)
    mean_layers = {opt: [float(np.mean(per_width[m][f"r_med_{opt}"])) for m in widths] for opt in ("sgdm", "adam")}
    slopes = {opt: _slope(widths, mean_layers[opt]) for opt in mean_layers}
    pred = [per_width[m]["prediction"]["sgdm"] for m in widths]
    ordering = all(all(s > a for s, a in zip(per_width[m]["r_med_sgdm"], per_width[m]["r_med_adam"]))
                   for m in widths)
    fracs = [per_width[m]["gap"]["frac_layers_a_smaller"] for m in widths]
    ratios = {m: per_width[m]["gap"]["median_ratio"] for m in widths}
    sgd_vs_pred = [s / p for s, p in zip(mean_layers["sgdm"], pred)]
    ru_link = {opt: [float(np.mean(np.array(per_width[m][f"r_med_{opt}"]) / np.array(per_width[m][f"r_u_{opt}"])))
                     for m in widths] for opt in ("sgdm", "adam")}
    def _dom(m, o):      # the exact full-Hessian ratio where the width allows it, else the sampled block
        d = per_width[m]["diag_dominance"][o]
        return d.get("exact", d["sampled"])

    dom_ok = all(_dom(m, o)["final"] < _dom(m, o)["initial"] for m in widths for o in ("sgdm", "adam"))
    trained = all(per_width[m]["final_loss"][o] < 0.1 * per_width[m]["initial_loss"] for m in widths
                  for o in ("sgdm", "adam"))
    claims = [
        Claim("thm1_ordering", "R_med of Adam is below R_med of SGD+M in both layers at every width (Theorem 1)",
              paper="R^Adam_med = O(1) while R^SGD_med = Omega(log d)",
              measured={"r_med_sgdm": {m: per_width[m]["r_med_sgdm"] for m in widths},
                        "r_med_adam": {m: per_width[m]["r_med_adam"] for m in widths},
                        "frac_layers_adam_smaller": dict(zip(widths, fracs)),
                        "median_ratio_sgdm_over_adam": ratios,
                        "ci95": {m: per_width[m]["gap"]["ci95"] for m in widths}},
              holds=ordering),
        Claim("sgd_log_growth", "SGD+M's R_med grows with the width like max/median of m squared Gaussians "
              "(positive slope in log m, within a factor 2 of the Gaussian prediction at every width)",
              paper="Omega(log d); Gaussian-vector value E[max g^2]/median(chi2_1)",
              measured={"slope_per_log_width": slopes["sgdm"], "measured_over_predicted": dict(zip(widths, sgd_vs_pred)),
                        "predicted": dict(zip(widths, pred))},
              holds=bool(slopes["sgdm"] > 0 and all(0.5 <= x <= 2 for x in sgd_vs_pred))),
        Claim("adam_bounded", "Adam's R_med stays O(1): its growth with log width is less than half of SGD+M's",
              paper="O(1)", measured={"slope_per_log_width": slopes["adam"], "r_med_mean_layers":
                                      dict(zip(widths, mean_layers["adam"]))},
              holds=bool(slopes["adam"] < 0.5 * slopes["sgdm"])),
        Claim("r_med_equals_r_u", "In the rank-one phase R_med is close to R_u of the hidden-side singular vector "
              "(App. F; SGD+M ratio R_med/R_u within [0.67, 1.5])", paper="R_med ~ R_u",
              measured={"r_med_over_r_u": {o: dict(zip(widths, v)) for o, v in ru_link.items()}},
              holds=all(0.67 <= x <= 1.5 for x in ru_link["sgdm"])),
        Claim("dominance_decreases", "The Hessian becomes more diagonal during training (mean off-diagonal/"
              "diagonal row ratio lower at the end than at initialisation), both optimizers, every width (App. E); "
              "exact full Hessian where m d <= exact_max_params, else the sampled block",
              paper="decreasing ratio (Theorem 2)",
              measured={m: {o: {kind: {k: v[k] for k in ("initial", "final")}
                                for kind, v in per_width[m]["diag_dominance"][o].items()}
                            for o in ("sgdm", "adam")} for m in widths},
              holds=dom_ok),
        Claim("both_train", "Both optimizers reduce the loss below 10% of its initial value at every width "
              "(precondition of the comparison)", paper="both converge",
              measured={m: {"initial": per_width[m]["initial_loss"], **per_width[m]["final_loss"]} for m in widths},
              holds=trained),
    ]
    _figures(store, widths, per_width, metrics)
    diverged = {k: v for k, v in statuses.items() if v != "finished"}
    return Result(claims=claims, metrics={
        "per_width": {str(m): v for m, v in per_width.items()},
        "slope_per_log_width": slopes,
        "frac_layers_adam_smaller_all": float(np.mean(fracs)),
        "median_ratio_sgdm_over_adam": {str(m): r for m, r in ratios.items()},
        "diverged_runs": diverged,
        "hvp_cost": rc.hvp_cost(metrics),
    })


def _figures(store, widths, per_width, metrics) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for j, title in enumerate(("W1 (diagonal = ||W2[:, i]||^2)", "W2 (diagonal = ||W1[i, :]||^2)")):
        ax = axes[j]
        for opt, mk in (("sgdm", "o"), ("adam", "s")):
            ax.plot(widths, [per_width[m][f"r_med_{opt}"][j] for m in widths], marker=mk, label=f"R_med {opt}")
            ax.plot(widths, [per_width[m][f"r_u_{opt}"][j] for m in widths], ls=":", marker=mk,
                    label=f"R_u {opt}")
        ax.plot(widths, [per_width[m]["prediction"]["sgdm"] for m in widths], "k--", label="Gaussian prediction")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("width m")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    store.save_figure(fig, "r_med_vs_width")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m in widths:
        for opt, ls in (("sgdm", "-"), ("adam", "--")):
            s = per_width[m]["diag_dominance"][opt]["sampled"]["by_step"]
            ax.plot(list(s), list(s.values()), ls=ls, marker="o", ms=3, label=f"{opt} m={m}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("mean off-diag / diag (sampled block)")
    ax.legend(fontsize=6, ncol=2)
    store.save_figure(fig, "diag_dominance")
    m0 = widths[-1]
    rc.plot_loss(store, metrics[metrics["width"] == m0], name="training_loss",
                 title=f"training loss, width {m0}, repeat 0")

"""Cattaneo et al. 2024, §5, Fig. 4-6 (App. H at CPU scale): beta sweeps of full-batch Adam, perturbed one-norm and test accuracy.

Theory (Cattaneo et al. 2024, §2, Table 1; :func:`optiscope.theory.adam.one_norm_coefficient`): the modified loss carries
lambda_1 ||grad E||_{1,eps} with lambda_1 = (h/2)((1+b1)/(1-b1) - (1+b2)/(1-b2)), which grows with beta1 and falls
with beta2. Predicted orderings: the perturbed one-norm of the full-batch gradient is *lower* for larger lambda_1
(raising beta1 lowers it, raising beta2 raises it) and, as the paper reports, test accuracy is *higher*.
We train full-batch Adam (eps inside the square root, Cattaneo et al. 2024, Def. 1.1) through ``lab.compare`` from one
initialisation, with the ``one_norm``, ``accuracy`` and ``adam_correction`` probes, and compare the measured
orderings with the predicted ones. The "peak" one-norm is the maximum after the initial fall (Cattaneo et al. 2024, App. H.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import spearmanr

from optiscope.experiments.base import Claim, Result, experiment_device, register, require_device
from optiscope.lab import Problem, compare
from optiscope.lab.store import RunStore
from optiscope.metrics.verdicts import tolerance_claim
from optiscope.theory.adam import one_norm_coefficient
from optiscope.utils.config import Config, require
from optiscope.utils.plotting import plt


@dataclass(frozen=True)
class AdamSweepConfig(Config):
    """Configuration of ``adam_one_norm_sweeps`` (Cattaneo et al. 2024, §5, Fig. 4-6): a zoo ``model`` on
    ``dataset`` (``n_train`` / ``n_test`` samples), full-batch Adam with step ``h`` for ``steps`` steps, a beta2
    sweep at ``beta1_fixed`` and a beta1 sweep at ``beta2_fixed``; probes every ``probe_every`` steps
    (``correction_probe``: also the modified-flow correction term)."""
    seed: int = 0
    model: str = "mlp:depth=3,width=64,activation=gelu"
    dataset: str = "fashion_mnist"
    n_train: int = 1000
    n_test: int = 1000
    steps: int = 200
    h: float = 1e-3
    eps: float = 1e-8
    beta1_fixed: float = 0.9
    beta2_sweep: tuple[float, ...] = (0.92, 0.95, 0.99)
    beta2_fixed: float = 0.99
    beta1_sweep: tuple[float, ...] = (0.8, 0.9, 0.95)
    probe_every: int = 20
    correction_probe: bool = True
    device: str = "cpu"             # model, data, training and probes (CPU init and batch orders, then moved)

    def validate(self):
        require_device(self.device)
        require(self.n_train >= 10, "n_train", self.n_train, ">= 10")
        require(self.n_test >= 10, "n_test", self.n_test, ">= 10")
        require(self.steps >= 2, "steps", self.steps, ">= 2")
        require(self.h > 0, "h", self.h, "> 0")
        require(self.eps > 0, "eps", self.eps, "> 0 (inside the square root)")
        for name in ("beta1_sweep", "beta2_sweep"):
            v = getattr(self, name)
            require(len(v) >= 2 and all(0 <= b < 1 for b in v), name, v, ">= 2 values in [0, 1)")
        for name in ("beta1_fixed", "beta2_fixed"):
            require(0 <= getattr(self, name) < 1, name, getattr(self, name), "in [0, 1)")
        require(1 <= self.probe_every <= self.steps, "probe_every", self.probe_every, f"in [1, steps={self.steps}]")


def _series(metrics, run: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    d = metrics[(metrics["run"] == run) & (metrics["metric"] == metric) & (metrics["layer"].fillna("") == "")]
    d = d.sort_values("step")
    return d["step"].to_numpy(), d["value"].to_numpy(dtype=float)


def _peak_after_fall(values: np.ndarray) -> float:
    """Max of the curve after its first-half minimum (the end of the initial fall, Cattaneo et al. 2024, App. H.3)."""
    if len(values) == 0:
        return float("nan")
    i0 = int(np.argmin(values[: max(1, len(values) // 2)]))
    return float(np.max(values[i0:]))


def _ordering_claim(cid, text, xs, lam, ys, predicted_sign, paper):
    rho = float(spearmanr(lam, ys)[0]) if len(set(ys)) > 1 else float("nan")
    # a perfect ordering: the rank correlation equals the predicted sign (+1 or -1)
    v = tolerance_claim(rho, float(predicted_sign), abs_tol=1e-9, premises=[(
        len(set(ys)) > 1, "all values equal: no ordering to compare")])
    return Claim(cid, text, paper=paper, measured={"values": [[x, round(float(y), 6)] for x, y in zip(xs, ys)],
                                                   "spearman_vs_lambda1": rho}, holds=v.holds, reason=v.reason)


@register("adam_one_norm_sweeps", paper="001", title="beta sweeps: perturbed one-norm and test accuracy vs the "
          "predicted (anti-)penalisation (Fig. 4-6)", config=AdamSweepConfig,
          presets={"quick": AdamSweepConfig(),
                   "full": AdamSweepConfig(model="small_cnn", n_train=60000, n_test=10000, steps=3000,
                                           h=7.5e-5, eps=1e-7, beta2_sweep=(0.9, 0.92, 0.95, 0.97, 0.99),
                                           beta1_sweep=(0.8, 0.85, 0.9, 0.95, 0.97), probe_every=25)})
def run(cfg: AdamSweepConfig, store: RunStore) -> Result:
    """Peak perturbed one-norm and best test accuracy along each beta sweep, against the (anti-)penalisation
    that Cattaneo et al. 2024 (Table 1) predict from the sign of beta1 - beta2."""
    flatten = not cfg.model.startswith(("small_cnn", "stripped_resnet"))
    problem = Problem.from_specs(cfg.model, cfg.dataset, seed=cfg.seed, probe_size=cfg.n_train,
                                 n_train=cfg.n_train, n_test=cfg.n_test, flatten=flatten,
                                 device=experiment_device(cfg))
    cases = {}
    for b2 in cfg.beta2_sweep:
        cases[f"b1={cfg.beta1_fixed},b2={b2}"] = (cfg.beta1_fixed, b2)
    for b1 in cfg.beta1_sweep:
        cases[f"b1={b1},b2={cfg.beta2_fixed}"] = (b1, cfg.beta2_fixed)
    optimizers = {name: f"adam:lr={cfg.h},betas=[{b1},{b2}],eps={cfg.eps}" for name, (b1, b2) in cases.items()}
    probes = ["loss", "one_norm", "accuracy"] + (["adam_correction"] if cfg.correction_probe else [])
    res = compare(problem, optimizers, cfg.steps, store=store, full_batch=True, probes=probes,
                  probe_every=cfg.probe_every, seed=cfg.seed)
    m = res.metrics
    summary = {}
    for name, (b1, b2) in cases.items():
        _, norm = _series(m, name, "one_norm")
        _, acc = _series(m, name, "eval_accuracy")
        _, cos = _series(m, name, "adam_correction_cosine")
        summary[name] = {"beta1": b1, "beta2": b2, "lambda1": one_norm_coefficient(cfg.h, b1, b2),
                         "status": res.runs[name].status, "peak_one_norm": _peak_after_fall(norm),
                         "mean_one_norm": float(np.mean(norm)) if len(norm) else float("nan"),
                         "best_test_accuracy": float(np.max(acc)) if len(acc) else float("nan"),
                         "mean_correction_cosine": float(np.nanmean(cos)) if len(cos) else float("nan")}
    claims = []
    for sweep, names, key in (("beta2", [f"b1={cfg.beta1_fixed},b2={b}" for b in cfg.beta2_sweep], "beta2"),
                              ("beta1", [f"b1={b},b2={cfg.beta2_fixed}" for b in cfg.beta1_sweep], "beta1")):
        xs = [summary[n][key] for n in names]
        lam = [summary[n]["lambda1"] for n in names]
        direction = "raises" if sweep == "beta2" else "lowers"
        claims.append(_ordering_claim(
            f"{sweep}_one_norm", f"increasing {sweep} {direction} the peak perturbed one-norm", xs, lam,
            [summary[n]["peak_one_norm"] for n in names], -1, f"Fig. {4 if sweep == 'beta2' else 5}: norm "
            f"{'rises' if sweep == 'beta2' else 'falls'} with {sweep}"))
        claims.append(_ordering_claim(
            f"{sweep}_test_accuracy", f"increasing {sweep} {'lowers' if sweep == 'beta2' else 'raises'} the best "
            "test accuracy", xs, lam, [summary[n]["best_test_accuracy"] for n in names], 1,
            f"Fig. {4 if sweep == 'beta2' else 5}: accuracy {'falls' if sweep == 'beta2' else 'rises'} with {sweep}"))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), layout="constrained")
    for name in cases:
        st, norm = _series(m, name, "one_norm")
        axes[0].plot(st, norm, label=name)
    axes[0].set_xlabel("step (full-batch, = epoch)")
    axes[0].set_ylabel(r"$\|\nabla E\|_{1,\epsilon} = \sum_i \sqrt{(\partial_i E)^2 + \epsilon}$ (loss / parameter)")
    axes[0].set_yscale("log")  # the initial fall spans two decades; the beta pairs differ after it
    axes[0].set_title("perturbed one-norm along training (log scale)", fontsize=10)
    axes[0].legend(fontsize=7)
    for ax, (sweep, key, vals) in zip(axes[1:], (("beta2", "beta2", cfg.beta2_sweep),
                                                  ("beta1", "beta1", cfg.beta1_sweep))):
        names = [n for n in cases if (summary[n]["beta1"] == cfg.beta1_fixed if sweep == "beta2"
                                      else summary[n]["beta2"] == cfg.beta2_fixed)]
        names = sorted((n for n in names if summary[n][key] in vals), key=lambda n: summary[n][key])
        xs = [summary[n][key] for n in names]
        ax.plot(xs, [summary[n]["peak_one_norm"] for n in names], "o-", color="C0")
        ax.set_xlabel(rf"$\{sweep[:-1]}_{sweep[-1]}$ (the other beta fixed)")
        ax.set_ylabel(r"peak $\|\nabla E\|_{1,\epsilon}$ (loss / parameter)", color="C0")
        ax.set_title(rf"sweep over $\{sweep[:-1]}_{sweep[-1]}$", fontsize=10)
        ax2 = ax.twinx()
        ax2.plot(xs, [summary[n]["best_test_accuracy"] for n in names], "s--", color="C1")
        ax2.set_ylabel("best test accuracy (fraction correct)", color="C1")
    store.save_figure(fig, "one_norm_sweeps")
    return Result(claims=claims, metrics={"runs": summary})

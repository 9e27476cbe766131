"""The scale-invariance lemma, measured on a BatchNorm MLP along training (Li & Arora 2020, Lemma 1).

The research notes after Li & Arora 2020, "Exponential Learning Rates": for a loss with ``L(c theta) = L(theta)``,
``<grad L, theta> = 0`` and ``grad L(theta_0) = c grad L(c theta_0)``; geometrically the first makes ``||theta||``
increase under gradient descent. Spec "Paper 3" §3i. On the model of ``explr_equivalence`` (zoo MLP with BatchNorm,
Fashion-MNIST) this experiment

* classifies every parameter tensor as scale-invariant or not, numerically
  (:func:`optiscope.lab.scale_invariance.scale_invariance_report`, with random perturbation points), and compares
  with what the architecture implies (the hidden linear weights are, the final layer and BN affine parameters are
  not);
* measures ``cos(grad_g, theta_g)`` and ``||c grad_g L(c theta_g) - grad_g L(theta)|| / ||grad_g L||`` per
  invariant group at checkpoints of plain SGD training (no momentum, no weight decay);
* checks the norm identity that follows from orthogonality for plain GD without decay,
  ``||theta_{t+1}||^2 = ||theta_t||^2 + eta^2 ||g_t||^2`` (so the norm never decreases), step by step;
* repeats the lemma measurement with BatchNorm's usual ``eps = 1e-5`` to show how far that is from exact.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from optiscope.experiments.base import Claim, Result, experiment_device, register, require_device
from optiscope.experiments.explr_deep_linear.explr_equivalence import ExpLRConfig, build_bn_mlp, load_data
from optiscope.lab.scale_invariance import scale_invariance_report
from optiscope.lab.store import RunStore
from optiscope.metrics.verdicts import all_of, check_premises, direction_claim, tolerance_claim
from optiscope.optim import SGD
from optiscope.utils.config import Config, require
from optiscope.utils.plotting import plt
from optiscope.utils.progress import progress_task
from optiscope.zoo import batch_iterator


@dataclass(frozen=True)
class ScaleInvarianceConfig(Config):
    """Configuration of the scale-invariance experiment (Li & Arora 2020, Lemma 1): model, data, scales, tolerance."""

    seed: int = 0
    n_train: int = 2048
    batch_size: int = 256
    depth: int = 3
    width: int = 64
    lr: float = 0.1
    steps: int = 100
    checkpoints: tuple[int, ...] = (0, 50, 100)
    scales: tuple[float, ...] = (0.5, 2.0, 10.0)
    perturbations: int = 2
    bn_eps: float = 1e-30
    usual_bn_eps: float = 1e-5
    dtype: str = "float64"
    tol: float = 1e-8
    # where the SGD training runs; the lemma measurements (lab.scale_invariance, whose perturbation points are drawn
    # on the CPU) run on a CPU copy of the model at each checkpoint
    device: str = "cpu"

    def validate(self) -> None:
        require_device(self.device)
        for name in ("n_train", "batch_size", "width", "steps"):
            require(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        require(self.depth >= 2, "depth", self.depth, ">= 2 (needs a hidden BatchNorm layer)")
        require(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "a finite number > 0")
        require(len(self.checkpoints) > 0 and all(0 <= c <= self.steps for c in self.checkpoints), "checkpoints",
                self.checkpoints, f"non-empty, each in [0, steps={self.steps}]")
        require(len(self.scales) > 0 and all(c > 0 and c != 1 for c in self.scales), "scales", self.scales,
                "non-empty, each > 0 and != 1")
        require(self.perturbations >= 0, "perturbations", self.perturbations, ">= 0")
        require(self.bn_eps > 0 and self.usual_bn_eps > 0, "bn_eps", self.bn_eps, "> 0")
        require(self.dtype in ("float32", "float64"), "dtype", self.dtype, "float32 or float64")
        require(self.tol > 0, "tol", self.tol, "> 0")


def _model_config(config: ScaleInvarianceConfig, bn_eps: float) -> ExpLRConfig:
    return ExpLRConfig(seed=config.seed, n_train=config.n_train, n_test=1, batch_size=config.batch_size,
                       depth=config.depth, width=config.width, bn_eps=bn_eps, dtype=config.dtype)


def expected_invariant(depth: int) -> set[str]:
    """What the zoo MLP's architecture implies: hidden linear weights feed a BatchNorm (Li & Arora 2020, Lemma 1 setting)."""
    return {f"layers.{i}.weight" for i in range(depth - 1)}


@register("explr_scale_invariance", paper="003", title="Scale-invariance lemma on a BatchNorm MLP: <grad, theta> = 0,"
          " grad(c theta) = grad(theta)/c, norm growth", config=ScaleInvarianceConfig,
          presets={"quick": ScaleInvarianceConfig(),
                   "full": ScaleInvarianceConfig(n_train=60000, width=256, depth=4, steps=5000,
                                                 checkpoints=(0, 100, 1000, 5000))})
def run(config: ScaleInvarianceConfig, store: RunStore) -> Result:
    """Li & Arora 2020, Lemma 1 measured per parameter group along plain SGD training."""
    data = load_data(_model_config(config, config.bn_eps))
    dev = experiment_device(config)
    X_cpu, y_cpu = data.train
    X, y = X_cpu.to(dev), y_cpu.to(dev)
    loss_fn = nn.CrossEntropyLoss()
    model = build_bn_mlp(_model_config(config, config.bn_eps), X[0].numel(), data.n_classes).to(dev)
    usual = build_bn_mlp(_model_config(config, config.usual_bn_eps), X[0].numel(), data.n_classes)
    opt = SGD(model.parameters(), lr=config.lr)
    probe = (X_cpu[: config.batch_size], y_cpu[: config.batch_size])
    reports, usual_reports = {}, {}
    norm_identity_err, norm_decreases = 0.0, 0
    invariant_names: list[str] | None = None
    diverged_at = None
    rows = []
    batches = batch_iterator(X, y, config.batch_size, seed=config.seed, steps=config.steps)
    with progress_task("scale invariance", total=config.steps) as task:
        for t in range(config.steps + 1):
            if t in config.checkpoints:
                measured_model = model if dev.type == "cpu" else copy.deepcopy(model).cpu()
                rep = scale_invariance_report(measured_model, loss_fn, probe, scales=config.scales, tol=config.tol,
                                              perturbations=config.perturbations, seed=config.seed, train_mode=True)
                reports[t] = rep
                rows += rep.to_rows(run="bn_eps_tiny", optimizer="sgd", step=t)
                usual.load_state_dict(model.state_dict())
                urep = scale_invariance_report(usual, loss_fn, probe, scales=config.scales, tol=config.tol,
                                               perturbations=0, train_mode=True)
                usual_reports[t] = urep
                rows += urep.to_rows(run="bn_eps_usual", optimizer="sgd", step=t)
                if invariant_names is None:
                    invariant_names = rep.invariant_params()
            if t == config.steps:
                break
            xb, yb = next(batches)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            if not torch.isfinite(loss):
                diverged_at = t
                store.update_manifest(note=f"diverged at step {t}")
                break
            loss.backward()
            params = dict(model.named_parameters())
            before = {n: (float(params[n].detach().double().pow(2).sum()),
                          float(params[n].grad.double().pow(2).sum())) for n in invariant_names or []}
            opt.step()
            for n, (sq, gsq) in before.items():
                after = float(params[n].detach().double().pow(2).sum())
                predicted = sq + config.lr**2 * gsq
                norm_identity_err = max(norm_identity_err, abs(after - predicted) / predicted)
                norm_decreases += int(after < sq)
            task.advance()
    store.append_metrics(rows)
    store.write_json("scale_invariance_reports.json", {str(t): r.to_dict() for t, r in reports.items()})

    expected = expected_invariant(config.depth)
    measured_sets = {t: set(r.invariant_params()) for t, r in reports.items()}
    cos = {t: max((abs(g.cosine) for g in r.groups if g.invariant and g.depends), default=float("nan"))
           for t, r in reports.items()}
    ratio = {t: max((g.grad_ratio_error for g in r.groups if g.invariant and g.depends), default=float("nan"))
             for t, r in reports.items()}
    non_inv_change = {t: min((g.loss_rel_change for g in r.groups if not g.invariant), default=float("nan"))
                      for t, r in reports.items()}
    usual_cos = {t: max(abs(r[n].cosine) for n in expected) for t, r in usual_reports.items()}
    usual_ratio = {t: max(r[n].grad_ratio_error for n in expected) for t, r in usual_reports.items()}
    _plot(config, reports, usual_reports, expected, store)
    claims = [
        Claim("invariant_groups",
              "Numerically scale-invariant parameter tensors are exactly the weights feeding a BatchNorm (final "
              "layer and BN affine parameters are not)",
              paper="L(c theta) = L(theta) for weights followed by normalisation",
              measured={str(t): sorted(s) for t, s in measured_sets.items()},
              **_v(direction_claim((sum(s != expected for s in measured_sets.values()),) * 2, null=0.5,
                                   direction="less"))),
        Claim("grad_orthogonal_to_weights",
              f"<grad_g L, theta_g> = 0 per invariant group: max |cos| over groups ({config.dtype}, BN eps "
              f"{config.bn_eps:g})",
              paper=0.0, measured={str(t): v for t, v in cos.items()},
              **_v(tolerance_claim(max(cos.values()), 0.0, abs_tol=config.tol))),
        Claim("grad_scales_inverse",
              "grad L(c theta_g) = grad L(theta_g) / c: max relative error over groups and c in "
              f"{list(config.scales)}",
              paper=0.0, measured={str(t): v for t, v in ratio.items()},
              **_v(tolerance_claim(max(ratio.values()), 0.0, abs_tol=config.tol))),
        Claim("norm_increases",
              "Plain GD, no decay: ||theta_{t+1}||^2 = ||theta_t||^2 + eta^2 ||g_t||^2 per invariant group, so the "
              "norm never decreases",
              paper="|theta| is increasing (orthogonality of gradient and weights)",
              measured={"max_rel_error_of_identity": norm_identity_err, "decreasing_steps": norm_decreases},
              **_v(all_of([tolerance_claim(norm_identity_err, 0.0, abs_tol=config.tol),
                           tolerance_claim(norm_decreases, 0.0, abs_tol=0.0)],
                          ["identity error", "steps where the norm decreased"]))),
        Claim("usual_bn_eps_is_approximate",
              f"With BatchNorm's usual eps = {config.usual_bn_eps:g} the lemma holds only approximately (max |cos| "
              "and gradient-ratio error on the BN-fed weights)",
              paper="exact only for exactly scale-invariant losses (a caveat of the equivalence)",
              measured={"max_abs_cos": usual_cos, "max_grad_ratio_error": usual_ratio},
              **_v(check_premises([(False, ("descriptive: the size of the deviation is reported, there is "
                                            "no threshold to judge it against"))]))),
    ]
    return Result(claims=claims, metrics={
        "diverged_at": diverged_at, "expected_invariant": sorted(expected), "smallest_loss_change_of_non_invariant": non_inv_change,
        "reports": {str(t): r.to_dict() for t, r in reports.items()}})


def _plot(config, reports, usual_reports, expected, store) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    ts = sorted(reports)
    names = [g.name for g in reports[ts[0]].groups]
    for label, reps, ls in (("tiny eps", reports, "-"), (f"eps {config.usual_bn_eps:g}", usual_reports, "--")):
        for n in sorted(expected):
            axes[0].semilogy(ts, [max(abs(reps[t][n].cosine), 1e-20) for t in ts], ls, marker="o",
                             label=f"{n} ({label})")
    axes[0].set_title("|cos(grad, theta)| of BN-fed weights")
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=6)
    last = reports[ts[-1]]
    vals = [max(last[n].loss_rel_change, 1e-20) for n in names]
    axes[1].barh(range(len(names)), vals, color=["C2" if last[n].invariant else "C3" for n in names])
    axes[1].set_yticks(range(len(names)))
    axes[1].set_yticklabels(names, fontsize=7)
    axes[1].set_xscale("log")
    axes[1].set_title(f"relative loss change under rescaling (step {ts[-1]}; green: invariant)")
    store.save_figure(fig, "scale_invariance")


def _v(verdict) -> dict:
    """A verdict as the ``holds``/``reason`` keyword arguments of :class:`Claim`."""
    return {"holds": verdict.holds, "reason": verdict.reason}

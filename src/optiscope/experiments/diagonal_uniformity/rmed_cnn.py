"""An image task where Adam is not faster (Jiang, Malik, Li 2023, App. A.8, Fig. 13(b), Table 10).

``SmallCNN`` on a Fashion-MNIST subset (grey 28x28, 10 classes), SGD+M (momentum 0.9) and Adam, both at their
best learning rate (the paper tuned both here) by final training loss over the whole horizon, on grids widened until
the best lies strictly inside; same initialisation and batch order, ``repeats`` data orders, R_med on ``per_layer``
exact Hessian-diagonal entries of every conv kernel and linear weight. The paper observes that Adam is not faster
and its R_med is no longer smaller; we report whatever is measured, judged by ``metrics.verdicts``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from optiscope.experiments.base import Claim, Result, experiment_device, register, require_device
from optiscope.experiments.diagonal_uniformity import common as rc
from optiscope.lab.probes import weight_matrix_params
from optiscope.metrics.verdicts import Verdict, direction_claim, fraction_claim, mean_ci
from optiscope.utils.config import Config, require


@dataclass(frozen=True)
class CNNConfig(Config):
    """SmallCNN on a Fashion-MNIST subset; both lrs tuned over the whole horizon (``tune_steps = 0``) on grids
    widened (at most ``max_widen`` points) until the best lies strictly inside; R_med at ``n_checkpoints``."""

    seed: int = 0
    n_train: int = 2048
    probe_size: int = 64
    channels: tuple[int, ...] = (8, 16)
    hidden: int = 64
    steps: int = 300
    batch_size: int = 256
    momentum: float = 0.9
    sgdm_lrs: tuple[float, ...] = (0.03, 0.1, 0.3)
    adam_lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    beta1: float = 0.9
    beta2: float = 0.98
    tune_steps: int = 0             # 0: tune over the whole horizon (the paper's protocol)
    max_widen: int = 2
    repeats: int = 3
    n_checkpoints: int = 4
    per_layer: int = 200
    at: str = "late_mean"
    exclude_first: int = 2
    n_bootstrap: int = 2000
    device: str = "cpu"             # model, data and Hessian (CPU init and batch orders, then moved)

    def validate(self) -> None:
        require_device(self.device)
        for f in ("n_train", "probe_size", "hidden", "steps", "batch_size", "repeats", "n_checkpoints",
                  "per_layer"):
            require(getattr(self, f) >= 1, f, getattr(self, f), ">= 1")
        require(self.tune_steps >= 0, "tune_steps", self.tune_steps, ">= 0 (0: the whole horizon)")
        require(self.max_widen >= 0, "max_widen", self.max_widen, ">= 0")
        require(self.probe_size <= self.n_train, "probe_size", self.probe_size, f"<= n_train={self.n_train}")
        require(len(self.channels) >= 1 and all(c >= 1 for c in self.channels), "channels", self.channels,
                "a non-empty list of positive channel counts")
        require(len(self.sgdm_lrs) >= 1 and all(x > 0 for x in self.sgdm_lrs), "sgdm_lrs", self.sgdm_lrs,
                "positive learning rates")
        require(len(self.adam_lrs) >= 1 and all(x > 0 for x in self.adam_lrs), "adam_lrs", self.adam_lrs,
                "positive learning rates")
        require(0 <= self.momentum < 1, "momentum", self.momentum, "in [0, 1)")
        require(self.at in rc.AT_CHOICES, "at", self.at, f"one of {rc.AT_CHOICES}")
        require(self.exclude_first >= 0, "exclude_first", self.exclude_first, ">= 0")
        require(self.n_bootstrap >= 100, "n_bootstrap", self.n_bootstrap, ">= 100")


QUICK = CNNConfig(steps=200, per_layer=200, repeats=2, n_checkpoints=2, max_widen=1)
MEDIUM = CNNConfig(steps=300, per_layer=200, repeats=3, n_checkpoints=4)
FULL = CNNConfig(n_train=60000, probe_size=1024, channels=(32, 64, 128), hidden=512, steps=2050, batch_size=1024,
                 sgdm_lrs=(0.05, 0.1, 0.5, 1.0), adam_lrs=(1e-3, 5e-3, 1e-2), repeats=8, n_checkpoints=10)


def cnn_problem(cfg: CNNConfig, device: Any = None):
    """``SmallCNN`` (seeded init) on a Fashion-MNIST subset; Hessian batch = the first ``probe_size`` images. Built on
    the CPU and moved to ``device`` (default: ``cfg.device``)."""
    from optiscope.lab import Problem
    from optiscope.zoo.data import default_loss, fashion_mnist
    from optiscope.zoo.models import SmallCNN

    ds = fashion_mnist(n_train=cfg.n_train, n_test=512, seed=cfg.seed, flatten=False)
    model = SmallCNN(image_shape=ds.input_shape, n_classes=ds.n_classes, channels=cfg.channels, hidden=cfg.hidden,
                     seed=cfg.seed)
    X, y = ds.train
    return Problem(model, default_loss(ds), train=ds.train, eval=ds.test,
                   probe_batch=(X[:cfg.probe_size], y[:cfg.probe_size]), task="classification", name=ds.name,
                   device=experiment_device(cfg) if device is None else device)


@register("rmed_cnn", paper="000", title="R_med of Adam vs SGD+M on a small CNN (Fashion-MNIST), App. A.8",
          config=CNNConfig, presets={"quick": QUICK, "medium": MEDIUM, "full": FULL})
def run(config: CNNConfig, store) -> Result:
    """Jiang et al. 2023, Table 10 analogue: does R_med still separate when Adam is not faster?"""
    cfg = config
    problem = cnn_problem(cfg)
    layers = weight_matrix_params(problem.model)
    kw = dict(batch_size=cfg.batch_size, checkpoint=False)
    sgdm = lambda lr: ("sgdm", {"lr": float(lr), "momentum": cfg.momentum})  # noqa: E731
    adam = lambda lr: ("adam", {"lr": float(lr), "betas": (cfg.beta1, cfg.beta2)})  # noqa: E731
    horizon = cfg.tune_steps or cfg.steps
    tune_sgdm = rc.tune_lr(problem, sgdm, cfg.sgdm_lrs, horizon, cfg.seed, max_widen=cfg.max_widen, **kw)
    tune_adam = rc.tune_lr(problem, adam, cfg.adam_lrs, horizon, cfg.seed, max_widen=cfg.max_widen, **kw)
    best_sgdm, best_adam = tune_sgdm.best, tune_adam.best
    probes = ["loss:on=train", "accuracy", rc.rmed_probe(layers, cfg.per_layer)]
    out = rc.compare_repeats(problem, {"sgdm": sgdm(best_sgdm), "adam": adam(best_adam)}, cfg.steps, cfg.repeats,
                             cfg.seed, probes, probe_steps=rc.checkpoint_steps(cfg.steps, cfg.n_checkpoints), **kw)
    rc.store_metrics(store, out.metrics)
    s = rc.pair_gap_summary(out.metrics, "adam", "sgdm", layers, cfg)
    speed = rc.faster(out.metrics, "adam", "sgdm")
    finals = {o: [rc.final_loss(out.metrics[out.metrics["repeat"] == r], o) for r in range(cfg.repeats)]
              for o in ("adam", "sgdm")}
    gm, glo, ghi = mean_ci([b - a for a, b in zip(finals["adam"], finals["sgdm"])])
    premises = [(tune_sgdm.inside, f"SGD+M's best lr {best_sgdm:g} is at the edge of {sorted(tune_sgdm.losses)}"),
                (tune_adam.inside, f"Adam's best lr {best_adam:g} is at the edge of {sorted(tune_adam.losses)}")]
    fast = direction_claim((glo, ghi), null=0.0, estimate=gm, premises=premises)
    not_fast = fast if fast.holds is None else Verdict(not fast.holds, f"per-repeat gap L_SGD+M - L_Adam: {fast.reason}"
                                                                        + ("" if fast.holds else " (Adam not faster)"))
    most = fraction_claim(s["n_layers_a_smaller"], s["n_layers_compared"], premises=premises)
    not_smaller = most if most.holds is None else Verdict(not most.holds, f"Adam's R_med smaller in {most.reason}")
    consistent = (Verdict(None, f"untestable here: {'speed' if fast.holds is None else 'geometry'} undecided "
                                f"({(fast if fast.holds is None else most).reason})")
                  if fast.holds is None or most.holds is None else
                  Verdict(fast.holds == most.holds, f"Adam faster: {fast.holds}; R_med smaller in most layers: "
                                                    f"{most.holds}"))
    claims = [
        Claim.judged("adam_not_faster", "with both lrs tuned over the whole horizon, Adam is not faster than SGD+M "
                     "(the per-repeat final-loss gap L_SGD+M - L_Adam does not have a CI above 0)",
                     "Adam did not converge faster (Fig. 13(b))", {**speed, "gap_ci95": [glo, ghi]}, not_fast),
        Claim.judged("r_med_not_smaller", "Adam's R_med is not below SGD+M's in most layers (the 'most layers' "
                     "binomial test fails)", "R_med^Adam no longer smaller (Table 10)",
                     {"layers_adam_smaller": s["n_layers_a_smaller"], "n_layers": s["n_layers_compared"],
                      "median_ratio_sgdm_over_adam": s["median_ratio"], "ci95": s["ci95"]}, not_smaller),
        Claim.judged("speed_geometry_consistent", "Adam is faster exactly when its R_med is smaller in most layers",
                     "positive correlation between speed and diagonal uniformity (§4.4)",
                     {"adam_faster": fast.holds, "adam_r_med_smaller_most": most.holds}, consistent),
    ]
    store.write_text("layer_table.md", rc.layer_table_markdown(s))
    rc.plot_loss(store, out.metrics, title="training loss (repeat 0)")
    rc.plot_rmed_over_time(store, out.metrics, layers)
    return Result(claims=claims, metrics={"layers": layers, "summary": s, "speed": speed,
                                          "lrs": {"sgdm": best_sgdm, "adam": best_adam},
                                          "lr_tuning": {"sgdm": tune_sgdm.to_dict(), "adam": tune_adam.to_dict()},
                                          "final_losses": finals,
                                          "status": out.status, "hvp_cost": rc.hvp_cost(out.metrics)})

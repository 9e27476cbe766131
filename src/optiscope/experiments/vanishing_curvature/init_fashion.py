"""Fashion-MNIST on a deep narrow ReLU MLP: SGD and momentum stall on the flat plateau at init, RMSprop and Adam
train (Orvieto et al. 2022, §3 "Curvature adaptation of RMSprop", §5, Fig. 5, 9).

Setting (Orvieto et al. 2022, App. A.1, Fig. 5): ReLU MLP with 32 hidden units per layer (128 hidden layers in the full preset,
fewer in quick), batch size 128, SGD, SGD + momentum 0.9, RMSprop and Adam, each with its learning rate grid-searched
individually on training accuracy; training accuracy vs steps. The learning-rate grids, the init and the step
budget are typeset-as-math details missing from the paper: our readings are the config defaults (He-uniform init,
the paper's "optimal" variance; PyTorch's eps conventions for RMSprop/Adam, ``eps = 1e-8`` outside the root). All
optimizers start from the same initial weights and see the same batch order (:func:`optiscope.lab.compare`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from optiscope.experiments.base import Claim, Result, experiment_device, register, require_device
from optiscope.lab import Problem, compare
from optiscope.lab.init_check import limit_threads
from optiscope.lab.store import RunStore
from optiscope.metrics.verdicts import direction_claim
from optiscope.utils.config import Config, require
from optiscope.utils.plotting import plt

OPTIMIZER_NAMES = ("sgd", "sgdm", "rmsprop", "adam")


@dataclass(frozen=True)
class FashionInitConfig(Config):
    """Configuration of the deep narrow MLP on Fashion-MNIST (Orvieto et al. 2022, Fig. 5): model, data, lr grids."""

    seed: int = 0
    depth: int = 32
    width: int = 32
    init: str = "he_uniform"
    n_train: int = 4096
    n_test: int = 2000
    steps: int = 400
    batch_size: int = 128
    n_evals: int = 8
    sgd_lrs: tuple[float, ...] = (0.01, 0.1, 0.5)
    sgdm_lrs: tuple[float, ...] = (0.001, 0.01, 0.05)
    rmsprop_lrs: tuple[float, ...] = (0.0001, 0.001, 0.01)
    adam_lrs: tuple[float, ...] = (0.0001, 0.001, 0.01)
    momentum: float = 0.9
    eps: float = 1e-8
    gap: float = 0.10
    device: str = "cpu"   # model, data and training (CPU init and batch orders, then moved)

    def validate(self) -> None:
        require_device(self.device)
        require(self.depth >= 2, "depth", self.depth, ">= 2")
        require(self.width >= 1, "width", self.width, ">= 1")
        require(self.n_train >= self.batch_size, "n_train", self.n_train, f">= batch_size ({self.batch_size})")
        require(self.n_test >= 1, "n_test", self.n_test, ">= 1")
        require(self.steps >= 1 and self.n_evals >= 1, "steps/n_evals", (self.steps, self.n_evals), ">= 1")
        for f in ("sgd_lrs", "sgdm_lrs", "rmsprop_lrs", "adam_lrs"):
            v = getattr(self, f)
            require(len(v) > 0 and all(x > 0 for x in v), f, v, "a non-empty list of positive learning rates")
        require(0 <= self.momentum < 1, "momentum", self.momentum, "in [0, 1)")
        require(self.eps >= 0, "eps", self.eps, ">= 0")


def _spec(name: str, lr: float, config: FashionInitConfig) -> tuple[str, dict]:
    if name == "sgd":
        return "sgd", {"lr": lr}
    if name == "sgdm":
        return "sgdm", {"lr": lr, "momentum": config.momentum}
    if name == "rmsprop":
        return "rmsprop", {"lr": lr, "eps": config.eps, "eps_inside_sqrt": False}
    return "adam", {"lr": lr, "eps": config.eps, "eps_inside_sqrt": False}


@register("init_fashion", paper="002", title="Fashion-MNIST, deep narrow ReLU MLP: SGD/momentum vs RMSprop/Adam (Fig. 5)",
          config=FashionInitConfig,
          presets={"quick": FashionInitConfig(),
                   "full": FashionInitConfig(depth=128, n_train=60000, n_test=10000, steps=9380, n_evals=20,
                                             sgd_lrs=(0.001, 0.01, 0.1, 1.0), sgdm_lrs=(0.0001, 0.001, 0.01, 0.1),
                                             rmsprop_lrs=(1e-5, 1e-4, 1e-3, 1e-2), adam_lrs=(1e-5, 1e-4, 1e-3, 1e-2))})
def run(config: FashionInitConfig, store: RunStore) -> Result:
    """Grid-searched SGD, momentum, RMSprop and Adam on a deep narrow MLP; training accuracy vs steps."""
    with limit_threads(1):  # many small tensors: one thread avoids oversubscription
        return _run(config, store)


def _run(config: FashionInitConfig, store: RunStore) -> Result:
    from optiscope.zoo.data import fashion_mnist
    from optiscope.zoo.models import build_model

    ds = fashion_mnist(n_train=config.n_train, n_test=config.n_test, seed=config.seed)
    model = build_model(("mlp", {"input_dim": ds.input_dim, "output_dim": 10, "depth": config.depth + 1,
                                 "width": config.width, "activation": "relu", "init": config.init}), seed=config.seed)
    problem = Problem(model, torch.nn.CrossEntropyLoss(), train=ds.train, eval=ds.test, task="classification",
                      probe_batch=(ds.train[0][:1024], ds.train[1][:1024]), name="fashion_mnist_deep_mlp",
                      device=experiment_device(config))
    grids = {"sgd": config.sgd_lrs, "sgdm": config.sgdm_lrs, "rmsprop": config.rmsprop_lrs, "adam": config.adam_lrs}
    optimizers = {f"{n}:lr={lr:g}": _spec(n, lr, config) for n, lrs in grids.items() for lr in lrs}
    probe_every = max(1, config.steps // config.n_evals)
    result = compare(problem, optimizers, config.steps, batch_size=config.batch_size, probe_every=probe_every,
                     probes=("loss", "accuracy"), seed=config.seed, checkpoint=False)
    store.write_metrics(result.metrics)

    final: dict[str, dict] = {}
    for key, r in result.runs.items():
        acc = r.series("accuracy")
        ev = r.series("eval_accuracy")
        final[key] = {"train_accuracy": float(acc.iloc[-1]) if len(acc) else math.nan,
                      "test_accuracy": float(ev.iloc[-1]) if len(ev) else math.nan,
                      "status": r.status, "diverged_at": r.diverged_at}
    best: dict[str, str] = {}
    for n in grids:
        keys = [k for k in final if k.split(":")[0] == n]
        scored = [(final[k]["train_accuracy"] if not math.isnan(final[k]["train_accuracy"]) else -1.0, k) for k in keys]
        best[n] = max(scored)[1]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n in grids:
        s = result.runs[best[n]].series("accuracy")
        ax.plot(s.index, s.values, "-o", ms=3, label=f"{best[n]} ({final[best[n]]['status']})")
    ax.axhline(0.1, color="gray", lw=0.8, ls="--", label="chance")
    ax.set_xlabel("step")
    ax.set_ylabel("training accuracy")
    ax.set_title(f"Fashion-MNIST, ReLU MLP {config.depth} hidden layers x {config.width}, init {config.init}")
    ax.legend(fontsize=7)
    store.save_figure(fig, "fashion_train_accuracy")

    acc = {n: final[best[n]]["train_accuracy"] for n in grids}
    adaptive, plain = max(acc["rmsprop"], acc["adam"]), max(acc["sgd"], acc["sgdm"])
    claims = [Claim("adaptive_trains", f"RMSprop/Adam train the deep narrow MLP; SGD/momentum stay behind by >= "
                    f"{config.gap:.0%} training accuracy after {config.steps} steps",
                    paper="Fig. 5: SGD and momentum barely move from chance; RMSprop and Adam train",
                    measured={n: round(a, 4) for n, a in acc.items()},
                    **_v(direction_claim((adaptive - plain,) * 2, null=config.gap, direction="greater")))]
    metrics = {"final": final, "best": best,
               "best_accuracy": {n: {"lr_run": best[n], **final[best[n]]} for n in grids},
               "depth": config.depth, "width": config.width, "steps": config.steps}
    return Result(claims=claims, metrics=metrics)


def _v(verdict) -> dict:
    """A verdict as the ``holds``/``reason`` keyword arguments of :class:`Claim`."""
    return {"holds": verdict.holds, "reason": verdict.reason}

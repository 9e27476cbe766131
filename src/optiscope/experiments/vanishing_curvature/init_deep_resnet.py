"""A very deep stripped ResNet (no BatchNorm, no residual connections): RMSprop trains it, SGD does not
(Orvieto et al. 2022, §5 "Adaptive methods", Fig. 8).

Setting (Orvieto et al. 2022, App. A.1, Fig. 8): a 500-layer ``stripped_ResNet`` on CIFAR-10, batch size 64, each
optimizer with its learning rate grid-searched individually on training accuracy. The paper's explanation
(§3-§5): at an i.i.d. random init a deep net whose width does not grow with depth sits on a plateau with vanishing
gradients and curvature; plain SGD cannot leave it in any reasonable time, while RMSprop's per-coordinate
normalisation adapts to the curvature (Orvieto et al. 2022, App. C) and escapes.

Here: :class:`optiscope.zoo.models.StrippedResNet` with ``stages`` convolutions per stage (depth ``1 + sum(stages) +
1`` weight layers), on scikit-learn's digits upsampled to 16x16 in the quick and medium presets (stages at 16, 8, 4
and 2 pixels) and on Fashion-MNIST resized to 32x32 at the paper's depth in the full preset (CIFAR-10 is not
available offline; GPU). At the native 8x8 (stages down to 1 pixel, where zero padding leaves only the centre tap
of every 3x3 kernel, Orvieto et al. 2022, §5) a 50-layer net is beyond both optimizers: RMSprop at learning rates
1e-5 to 1e-2 stayed at chance for 300-600 steps, as SGD did, so the quick preset does not use it. SGD (no
momentum) and RMSprop (PyTorch's convention: ``beta = 0.99``, ``eps = 1e-8`` outside the root) each run every
learning rate of their grid from the same initial weights and batch order; the best final training accuracy per
optimizer is compared. The init (``he_uniform`` by default, the paper's "optimal" variance) and the learning-rate
grids are our readings: the paper's grids are typeset as math that the text does not keep.

Claims: RMSprop's best training accuracy exceeds SGD's by ``gap`` on the deep net (with the premise that the deep
net's gradient norm at init has vanished by ``vanish_ratio`` against the shallow one, i.e. the regime of the paper's
explanation occurs); SGD stays near chance on the deep net; and the negative control: on a shallow net of the same
width SGD trains to within ``gap`` of RMSprop, so that SGD's failure is the depth's and not that of its grid or budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from optiscope.experiments.base import Claim, Result, experiment_device, register, require_device
from optiscope.lab.init_check import limit_threads
from optiscope.lab.store import RunStore
from optiscope.metrics.verdicts import direction_claim, mean_ci
from optiscope.utils.config import Config, require
from optiscope.utils.plotting import plt
from optiscope.utils.progress import progress_task


@dataclass(frozen=True)
class DeepResNetConfig(Config):
    """Configuration of ``init_deep_resnet`` (Orvieto et al. 2022, Fig. 8): a stripped ResNet with ``stages``
    convolutions per stage at ``channels`` (and the shallow control ``shallow_stages``) on ``dataset`` at
    ``resolution``, ``n_train`` training images, ``steps`` steps of batch ``batch_size``; learning-rate grids
    ``sgd_lrs`` and ``rmsprop_lrs``; ``n_seeds`` initialisations; training accuracy on ``n_eval`` training images
    every ``eval_every`` steps."""

    seed: int = 0
    dataset: str = "digits"
    resolution: int = 16
    n_train: int = 1437
    stages: tuple[int, ...] = (8, 8, 8, 8)
    shallow_stages: tuple[int, ...] = (1, 1, 1, 1)
    channels: tuple[int, ...] = (8, 8, 16, 16)
    init: str = "he_uniform"
    steps: int = 400
    batch_size: int = 64
    sgd_lrs: tuple[float, ...] = (0.01, 0.1, 0.5)
    rmsprop_lrs: tuple[float, ...] = (3e-5, 1e-4, 1e-3)
    n_seeds: int = 1
    n_eval: int = 512
    eval_every: int = 50
    gap: float = 0.2
    chance_margin: float = 0.15
    vanish_ratio: float = 0.1
    device: str = "cpu"

    def validate(self) -> None:
        require(self.dataset in ("digits", "fashion_mnist"), "dataset", self.dataset, "digits or fashion_mnist")
        require(self.resolution >= 2 ** (len(self.stages) - 1), "resolution", self.resolution,
                f">= 2^(stages - 1) = {2 ** (len(self.stages) - 1)}")
        require(self.n_train >= self.batch_size, "n_train", self.n_train, f">= batch_size ({self.batch_size})")
        for name in ("stages", "shallow_stages"):
            v = getattr(self, name)
            require(len(v) == len(self.channels) and all(s >= 1 for s in v), name, v,
                    f"{len(self.channels)} positive stage lengths (one per channel entry)")
        require(sum(self.shallow_stages) < sum(self.stages), "shallow_stages", self.shallow_stages,
                "fewer layers than stages")
        require(all(c >= 1 for c in self.channels), "channels", self.channels, "positive channel counts")
        require(self.init in ("he_uniform", "he_normal", "lecun_uniform", "lecun_normal", "xavier_uniform",
                              "xavier_normal", "torch"), "init", self.init, "a zoo init name")
        require(self.steps >= 1 and self.batch_size >= 1, "steps/batch_size", (self.steps, self.batch_size), ">= 1")
        for name in ("sgd_lrs", "rmsprop_lrs"):
            v = getattr(self, name)
            require(len(v) >= 1 and all(x > 0 for x in v), name, v, "a non-empty list of positive learning rates")
        require(self.n_seeds >= 1, "n_seeds", self.n_seeds, ">= 1")
        require(self.n_eval >= 10, "n_eval", self.n_eval, ">= 10")
        require(1 <= self.eval_every <= self.steps, "eval_every", self.eval_every, f"in [1, steps={self.steps}]")
        require(0 < self.gap < 1 and 0 < self.chance_margin < 1, "gap/chance_margin", (self.gap, self.chance_margin),
                "in (0, 1)")
        require(0 < self.vanish_ratio < 1, "vanish_ratio", self.vanish_ratio, "in (0, 1)")
        require_device(self.device)


def _data(cfg: DeepResNetConfig):
    from optiscope.zoo.data import digits, fashion_mnist

    if cfg.dataset == "digits":
        ds = digits(n_train=cfg.n_train, seed=cfg.seed, flatten=False)
        X, y = ds.train[0].float(), ds.train[1]
    else:
        ds = fashion_mnist(n_train=cfg.n_train, n_test=1, seed=cfg.seed, flatten=False)
        X, y = ds.train[0].reshape(cfg.n_train, 1, 28, 28).float(), ds.train[1]
    if X.shape[-1] != cfg.resolution:
        X = torch.nn.functional.interpolate(X, size=(cfg.resolution, cfg.resolution), mode="bilinear",
                                            align_corners=False)
    return X, y, 10


def _model(cfg: DeepResNetConfig, stages, seed: int):
    from optiscope.zoo.models import StrippedResNet

    return StrippedResNet(image_shape=(1, cfg.resolution, cfg.resolution), n_classes=10, stages=tuple(stages),
                          channels=tuple(cfg.channels), init=cfg.init, seed=seed)


def _accuracy(model, X, y, device) -> float:
    with torch.no_grad():
        out = model(X.to(device))
        return float((out.argmax(1).cpu() == y).float().mean())


def grad_norm_at_init(model, X, y, device) -> float:
    """``||grad L||`` of the cross-entropy on ``(X, y)`` at the model's current (initial) weights."""
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(X.to(device)), y.to(device))
    loss.backward()
    g = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None))
    model.zero_grad(set_to_none=True)
    return g


def train_one(cfg: DeepResNetConfig, stages, seed: int, optimizer: str, lr: float, X, y, task=None) -> dict:
    """Train one (depth, seed, optimizer, lr) from the seed's initial weights with the seed's batch order; training
    accuracy on the first ``n_eval`` images every ``eval_every`` steps. Divergence is an outcome (accuracy at
    chance from then on)."""
    from optiscope.optim import make_optimizer
    from optiscope.zoo.data import batch_iterator

    dev = experiment_device(cfg)
    model = _model(cfg, stages, seed).to(dev)
    spec = ("sgd", {"lr": lr}) if optimizer == "sgd" else \
        ("rmsprop", {"lr": lr, "beta": 0.99, "eps": 1e-8, "eps_inside_sqrt": False})
    opt = make_optimizer(spec, model.parameters())
    Xe, ye = X[: cfg.n_eval], y[: cfg.n_eval]
    curve = [(0, _accuracy(model, Xe, ye, dev))]
    diverged_at = None
    for step, (xb, yb) in enumerate(batch_iterator(X, y, cfg.batch_size, seed=seed, steps=cfg.steps), start=1):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(xb.to(dev)), yb.to(dev))
        if not torch.isfinite(loss):
            diverged_at = step
            break
        loss.backward()
        opt.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            curve.append((step, _accuracy(model, Xe, ye, dev)))
        if task is not None:
            task.advance()
    if diverged_at is not None:
        curve.append((cfg.steps, 0.1))
        if task is not None:
            task.advance(cfg.steps - diverged_at + 1)
    return {"optimizer": optimizer, "lr": lr, "seed": seed, "depth": 2 + sum(stages), "curve": curve,
            "final_train_accuracy": curve[-1][1], "diverged_at": diverged_at}


def _ci(values):
    v = [float(x) for x in values]
    if len(v) == 1:
        return v[0], (v[0], v[0])
    m, lo, hi = mean_ci(v)
    return m, (lo, hi)


@register("init_deep_resnet", paper="002", title="A deep stripped ResNet: RMSprop trains it, SGD does not (Fig. 8; "
          "full preset: 500 layers, GPU)", config=DeepResNetConfig,
          presets={"quick": DeepResNetConfig(),
                   "medium": DeepResNetConfig(stages=(16, 16, 16, 16), steps=500, n_seeds=3,
                                              sgd_lrs=(0.01, 0.03, 0.1, 0.3), rmsprop_lrs=(1e-5, 3e-5, 1e-4, 3e-4)),
                   "full": DeepResNetConfig(dataset="fashion_mnist", resolution=32, n_train=60000,
                                            stages=(125, 125, 124, 124), channels=(16, 32, 64, 128), steps=5000,
                                            n_seeds=3, n_eval=2048, eval_every=250,
                                            sgd_lrs=(1e-4, 1e-3, 1e-2, 1e-1, 1.0),
                                            rmsprop_lrs=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2))})
def run(config: DeepResNetConfig, store: RunStore) -> Result:
    """Best-of-grid SGD and RMSprop on a deep and a shallow stripped ResNet; training accuracy vs steps."""
    with limit_threads(1):  # many small convolutions: one thread avoids oversubscription
        return _run(config, store)


def _run(cfg: DeepResNetConfig, store: RunStore) -> Result:
    X, y, n_classes = _data(cfg)
    chance = 1.0 / n_classes
    seeds = [cfg.seed + s for s in range(cfg.n_seeds)]
    depths = {"deep": cfg.stages, "shallow": cfg.shallow_stages}
    runs: dict[str, list[dict]] = {k: [] for k in depths}
    init_grad: dict[str, list[float]] = {k: [] for k in depths}
    n_runs = len(depths) * len(seeds) * (len(cfg.sgd_lrs) + len(cfg.rmsprop_lrs))
    Xg, yg = X[: cfg.n_eval], y[: cfg.n_eval]
    dev = experiment_device(cfg)
    with progress_task("init_deep_resnet", n_runs * cfg.steps) as task:
        for key, stages in depths.items():
            for seed in seeds:
                init_grad[key].append(grad_norm_at_init(_model(cfg, stages, seed).to(dev), Xg, yg, dev))
                for opt, lrs in (("sgd", cfg.sgd_lrs), ("rmsprop", cfg.rmsprop_lrs)):
                    for lr in lrs:
                        runs[key].append(train_one(cfg, stages, seed, opt, lr, X, y, task))
    best: dict[str, dict[str, list[dict]]] = {}
    for key in depths:
        best[key] = {}
        for opt in ("sgd", "rmsprop"):
            per_seed = []
            for seed in seeds:
                rs = [r for r in runs[key] if r["optimizer"] == opt and r["seed"] == seed]
                per_seed.append(max(rs, key=lambda r: r["final_train_accuracy"]))
            best[key][opt] = per_seed
    acc = {k: {o: [r["final_train_accuracy"] for r in best[k][o]] for o in ("sgd", "rmsprop")} for k in depths}
    gaps = {k: [a - b for a, b in zip(acc[k]["rmsprop"], acc[k]["sgd"])] for k in depths}
    ratio = float(np.median(init_grad["deep"]) / np.median(init_grad["shallow"]))
    depth_deep, depth_shallow = 2 + sum(cfg.stages), 2 + sum(cfg.shallow_stages)
    vanished = (ratio < cfg.vanish_ratio, (f"the deep net's gradient norm at init is {ratio:.3g} x the shallow "
                                          f"net's (>= {cfg.vanish_ratio:g}): no vanishing at this depth and width"))
    claims = []
    m, ci = _ci(gaps["deep"])
    claims.append(Claim.judged(
        "rmsprop_trains_deep",
        f"on a {depth_deep}-layer stripped ResNet RMSprop's best training accuracy exceeds SGD's by >= {cfg.gap:.0%} "
        f"after {cfg.steps} steps (best learning rate of each grid)",
        paper="Fig. 8: RMSprop trains a 500-layer stripped ResNet; SGD does not",
        measured={"rmsprop": [round(a, 4) for a in acc["deep"]["rmsprop"]],
                  "sgd": [round(a, 4) for a in acc["deep"]["sgd"]], "gap_mean": round(m, 4),
                  "gap_ci": [round(x, 4) for x in ci], "init_grad_ratio_deep_over_shallow": ratio},
        verdict=direction_claim(ci, null=cfg.gap, direction="greater", estimate=m, premises=[vanished])))
    m_sgd, ci_sgd = _ci(acc["deep"]["sgd"])
    claims.append(Claim.judged(
        "sgd_stalls_deep",
        f"SGD's best training accuracy on the {depth_deep}-layer net stays within {cfg.chance_margin:.0%} of chance",
        paper="Fig. 8: SGD does not leave the initial plateau",
        measured={"sgd_mean": round(m_sgd, 4), "sgd_ci": [round(x, 4) for x in ci_sgd], "chance": chance},
        verdict=direction_claim(ci_sgd, null=chance + cfg.chance_margin, direction="less", estimate=m_sgd,
                                premises=[vanished])))
    m_sh, ci_sh = _ci(gaps["shallow"])
    claims.append(Claim.judged(
        "control_shallow_sgd_trains",
        f"negative control: on a {depth_shallow}-layer net of the same width SGD trains to within {cfg.gap:.0%} of "
        "RMSprop (the grid and the budget suffice for SGD; its failure on the deep net is the depth's)",
        paper="§3-5: the gap is caused by vanishing gradients / curvature, which grow with depth",
        measured={"rmsprop": [round(a, 4) for a in acc["shallow"]["rmsprop"]],
                  "sgd": [round(a, 4) for a in acc["shallow"]["sgd"]], "gap_mean": round(m_sh, 4),
                  "gap_ci": [round(x, 4) for x in ci_sh]},
        verdict=direction_claim(ci_sh, null=cfg.gap, direction="less", estimate=m_sh)))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    for ax, key in zip(axes, depths):
        for j, opt in enumerate(("sgd", "rmsprop")):
            for r in best[key][opt]:
                st, a = zip(*r["curve"])
                ax.plot(st, a, "-o", ms=3, color=f"C{j}", label=f"{opt} lr={r['lr']:g} (seed {r['seed']})")
        ax.axhline(chance, color="gray", ls="--", lw=0.8, label="chance")
        ax.set_xlabel("step")
        ax.set_ylabel("training accuracy")
        ax.set_title(f"{key}: {2 + sum(depths[key])} weight layers, channels {list(cfg.channels)}", fontsize=10)
        ax.legend(fontsize=6)
    store.save_figure(fig, "deep_resnet_training")
    return Result(claims=claims, metrics={"runs": runs, "best_final_train_accuracy": acc, "gaps": gaps,
                                          "init_grad_norm": init_grad, "init_grad_ratio": ratio,
                                          "depths": {"deep": depth_deep, "shallow": depth_shallow}})

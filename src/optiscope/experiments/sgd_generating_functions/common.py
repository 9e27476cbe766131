"""Shared by the Velikanov et al. 2023 experiments and the ``sgd-theory`` CLI: the NTK regression problem on a real dataset
(Velikanov et al. 2023, App. F pipeline) and the real one-hidden-layer network trained with SGD + momentum.

Pipeline (authors' ``train_4_regimes_serial.py``, spec f): inputs standardised (``zoo.data`` does it), targets =
the class label standardised to zero mean / unit variance (scalar regression), one-hidden-layer ReLU network of
width m in NTK parameterisation at init, empirical NTK ``K`` on the N training points, initial error
``e_0 = f_0(x) - y`` (outputs not zeroed), kernel normalised so that ``lambda_max(K/N) = 1`` (lr in units of
``1/lambda_max``; the real network uses ``lr / scale``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from optiscope.curvature.ntk import NTKOneHiddenLayer
from optiscope.theory.sgd import Spectrum, torch_threads

__all__ = ["NTKProblem", "log_steps", "median_relative_error", "ntk_problem", "train_network"]


@dataclass
class NTKProblem:
    """A linearised-network regression problem for the SGD theory (Velikanov et al. 2023, App. F): inputs ``X``,
    standardised targets ``y``, outputs at init ``f0``, the empirical NTK normalised to ``lambda_max(K/N) = 1``, its
    :class:`~optiscope.theory.sgd.Spectrum`, and the network it came from."""
    name: str
    X: torch.Tensor          # (N, d) float64
    y: np.ndarray            # (N,) standardised targets
    f0: np.ndarray           # (N,) network outputs at init
    kernel: np.ndarray       # (N, N) normalised: lambda_max(K/N) = 1
    spectrum: Spectrum       # of the normalised kernel (scale = lambda_max of the raw K/N)
    model: NTKOneHiddenLayer

    @property
    def n(self) -> int:
        """Number of data points ``N``."""
        return int(self.y.shape[0])

    @property
    def initial_error(self) -> np.ndarray:
        """``f0 - y``: the output-space error at initialization, the starting point of the linear dynamics."""
        return self.f0 - self.y


def ntk_problem(dataset: str = "digits", n_points: int | None = None, width: int = 1000, seed: int = 0,
                device: Any = None) -> NTKProblem:
    """Build the NTK problem on ``dataset`` ("digits" or "fashion_mnist"; ``n_points`` a seeded training subset).

    The network is initialised on the CPU; ``device`` (default: the CPU) is where its outputs and the kernel are
    computed, on a copy. The returned inputs, model and arrays are on the CPU."""
    with torch_threads():
        return _ntk_problem(dataset, n_points, width, seed, device)


def _ntk_problem(dataset: str, n_points: int | None, width: int, seed: int, device: Any = None) -> NTKProblem:
    from optiscope.zoo.data import load_dataset

    kw: dict[str, Any] = {"seed": seed}
    if n_points is not None:
        kw["n_train"] = int(n_points)
    ds = load_dataset(dataset, **kw)
    X, labels = ds.train
    X = X.reshape(X.shape[0], -1).to(torch.float64)
    lab = labels.to(torch.float64).numpy()
    y = (lab - lab.mean()) / lab.std()
    model = NTKOneHiddenLayer(X.shape[1], width=width, seed=seed, dtype=torch.float64)
    on, Xd = model, X
    if device is not None and torch.device(device).type != "cpu":
        on, Xd = copy.deepcopy(model).to(device), X.to(device)
    with torch.no_grad():
        f0 = on(Xd).cpu().numpy().copy()
    K = on.ntk(Xd).cpu().numpy()
    K = 0.5 * (K + K.T)
    spec = Spectrum.from_kernel(K, y, initial_outputs=f0, normalize=True, name=f"{dataset} NTK (N={len(y)})")
    Kn = K / spec.scale
    return NTKProblem(dataset, X, y, f0, Kn, spec, model)


def log_steps(steps: int, count: int = 60) -> np.ndarray:
    """About ``count`` log-spaced integer steps in [0, steps] (0 and steps included)."""
    s = np.unique(np.concatenate([[0], np.geomspace(1, max(steps, 1), count).round().astype(int), [steps]]))
    return s[s <= steps]


def train_network(problem: NTKProblem, lr: float, momentum: float, batch_size: int, steps: int, n_runs: int,
                  seed: int = 0, eval_steps: np.ndarray | None = None, divergence_threshold: float = 1e12,
                  device: Any = None) -> tuple[np.ndarray, np.ndarray, list[int | None]]:
    """Train copies of the problem's real network (same init) with ``torch.optim.SGD(lr / scale, momentum)`` on
    ``(1/2) mean (f - y)^2`` over batches drawn without replacement (fresh each step); full-data loss at
    ``eval_steps``. Returns ``(eval_steps, loss (n_runs, len(eval_steps)), diverged_at per run)``; a run whose
    loss becomes non-finite or exceeds ``threshold * L_0`` stops and is recorded as diverged (loss ``inf``).
    ``device`` (default: the CPU): where the networks train; the data are moved there once, the batches are drawn
    on the CPU (the same batches on every device)."""
    with torch_threads():
        return _train(problem, lr, momentum, batch_size, steps, n_runs, seed, eval_steps, divergence_threshold,
                      device)


def _train(problem, lr, momentum, batch_size, steps, n_runs, seed, eval_steps, divergence_threshold, device=None):
    eval_steps = log_steps(steps) if eval_steps is None else np.asarray(eval_steps)
    dev = torch.device("cpu" if device is None else device)
    X = problem.X.to(dev)
    y = torch.as_tensor(problem.y).to(dev)
    n = X.shape[0]
    out = np.full((n_runs, eval_steps.size), np.inf)
    div: list[int | None] = []
    ev = {int(s) for s in eval_steps}
    col = {int(s): i for i, s in enumerate(eval_steps)}
    for r in range(n_runs):
        net = NTKOneHiddenLayer(X.shape[1], width=problem.model.width, seed=0, dtype=torch.float64)
        net.load_state_dict(problem.model.state_dict())
        net.to(dev)
        opt = torch.optim.SGD(net.parameters(), lr=lr / problem.spectrum.scale, momentum=momentum)
        g = torch.Generator().manual_seed(seed * 100_003 + r)
        L0 = None
        d = None
        for t in range(steps + 1):
            if t in ev:
                with torch.no_grad():
                    L = 0.5 * float(((net(X) - y) ** 2).mean())
                if L0 is None:
                    L0 = L
                if not np.isfinite(L) or L > divergence_threshold * L0:
                    d = t
                    break
                out[r, col[t]] = L
            if t == steps:
                break
            idx = torch.randperm(n, generator=g)[:batch_size].to(dev)
            opt.zero_grad(set_to_none=True)
            loss = 0.5 * ((net(X[idx]) - y[idx]) ** 2).mean()
            loss.backward()
            opt.step()
        div.append(d)
    return eval_steps, out, div


def median_relative_error(pred: np.ndarray, ref: np.ndarray) -> float:
    """``median_t |pred_t - ref_t| / ref_t`` over entries where both are finite (inf if none)."""
    pred, ref = np.asarray(pred, float), np.asarray(ref, float)
    ok = np.isfinite(pred) & np.isfinite(ref) & (ref > 0)
    if not ok.any():
        return float("inf")
    return float(np.median(np.abs(pred[ok] - ref[ok]) / ref[ok]))

"""Shared helpers for the lab tests (tiny problems; no tests here)."""

from __future__ import annotations

import torch
from torch import nn

from optiscope.lab import Problem

# Tiny tensors: intra-op threads only add contention on the shared 2-core machine.
torch.set_num_threads(1)


def tiny_mlp(d: int = 5, hidden: int = 6, classes: int = 3, seed: int = 0, dtype=torch.float64, bn: bool = False,
             dropout: float = 0.0) -> nn.Sequential:
    """Linear -> [BatchNorm] -> tanh -> [Dropout] -> Linear, initialised from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(d, hidden)]
    if bn:
        layers.append(nn.BatchNorm1d(hidden))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, classes))
    return nn.Sequential(*layers).to(dtype)


def tiny_problem(n: int = 96, d: int = 5, hidden: int = 6, classes: int = 3, seed: int = 0,
                 dtype=torch.float64, bn: bool = False, dropout: float = 0.0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    W = torch.randn(d, classes, generator=g, dtype=dtype)
    y = (X @ W).argmax(1)
    model = tiny_mlp(d, hidden, classes, seed=seed, dtype=dtype, bn=bn, dropout=dropout)
    return Problem(model, nn.functional.cross_entropy, train=(X, y), eval=(X[:32], y[:32]), probe_batch=(X, y))


def regression_problem(n: int = 64, d: int = 4, seed: int = 0, dtype=torch.float64) -> Problem:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    y = X @ torch.randn(d, 1, generator=g, dtype=dtype)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)
    return Problem(model, nn.functional.mse_loss, train=(X, y), task="regression")


def dense_hessian(problem: Problem, model: nn.Module | None = None) -> torch.Tensor:
    """Dense Hessian of the probe-batch loss w.r.t. all parameters (named_parameters order), by torch.func."""
    model = model or problem.model
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    X, y = problem.probe_batch
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def f(flat):
        parts = torch.split(flat, sizes)
        p = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return problem.loss_fn(torch.func.functional_call(model, {**p, **buffers}, (X,)), y)

    flat = torch.cat([params[n].reshape(-1) for n in names])
    return torch.func.hessian(f)(flat)


def offsets(model: nn.Module) -> dict[str, int]:
    out, pos = {}, 0
    for n, p in model.named_parameters():
        out[n] = pos
        pos += p.numel()
    return out

"""Simulators that check the SE theory of :mod:`optiscope.theory.sgd` (Velikanov et al. 2023, §2, Prop. 1, Prop. 6).

* :func:`simulate_sampled_sgd`: mini-batch SGD with heavy-ball momentum on a linear model in output space
  (kernel matrix + initial error), many independent runs at once (each run its own lr/momentum if asked),
  batches drawn uniformly without replacement and fresh every step, exactly the paper's sampled "linearized"
  regime::

      g = (1/b) K[:, B] e[B],   p <- beta p + g,   e <- e - alpha p,   L = (1/2N) ||e||^2

* :func:`exact_second_moments`: the exact noise-averaged dynamics of the same process (Velikanov et al. 2023, Prop. 1,
  Eqs. 4-5, output-space Prop. 6) with the true (non-spectral) noise term, O(N^3) per step, for small N.

Both are torch on CPU; randomness only through an explicit ``torch.Generator`` seeded by the caller.
Non-finite or exploding runs are recorded as diverged at a step, never NaN.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from optiscope.theory.sgd import SpectrumError, noise_amplitude, torch_threads

__all__ = ["SampledRuns", "exact_critical_learning_rate", "exact_growth_rate", "exact_second_moments",
           "simulate_sampled_sgd"]


def _as_kernel_and_error(kernel: Any, initial_error: Any, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    K = torch.as_tensor(np.asarray(kernel, dtype=np.float64)).to(dtype)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise SpectrumError(f"kernel must be square, got shape {tuple(K.shape)}")
    e0 = torch.as_tensor(np.asarray(initial_error, dtype=np.float64)).to(dtype).reshape(-1)
    if e0.numel() != K.shape[0]:
        raise SpectrumError(f"initial error has {e0.numel()} entries but the kernel is {K.shape[0]} x {K.shape[0]}")
    if not (torch.isfinite(K).all() and torch.isfinite(e0).all()):
        raise SpectrumError("kernel or initial error contains non-finite values")
    return K, e0


def _per_run(value: Any, n_runs: int, name: str) -> torch.Tensor:
    v = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if v.size == 1:
        v = np.full(n_runs, float(v[0]))
    if v.shape != (n_runs,):
        raise SpectrumError(f"{name} must be a scalar or have one value per run ({n_runs}), got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise SpectrumError(f"{name} contains non-finite values")
    return torch.as_tensor(v)


@dataclass
class SampledRuns:
    """``loss[r, i]`` is run r's loss at ``steps[i]`` (``inf`` once diverged); ``diverged_at[r]`` the first step
    whose loss exceeded the threshold or was non-finite (-1: never)."""

    steps: np.ndarray
    loss: np.ndarray
    diverged_at: np.ndarray
    lr: np.ndarray
    momentum: np.ndarray

    @property
    def n_runs(self) -> int:
        """Number of sampled runs (rows of ``loss``)."""
        return int(self.loss.shape[0])

    def mean_loss(self) -> np.ndarray:
        """Mean over runs (``inf`` at steps where some run had diverged)."""
        return self.loss.mean(axis=0)

    def diverged(self) -> np.ndarray:
        """Boolean per run: whether it diverged (``diverged_at >= 0``)."""
        return self.diverged_at >= 0


def simulate_sampled_sgd(kernel: Any, initial_error: Any, lr: Any, momentum: Any, batch_size: int, steps: int,
                         n_runs: int = 100, seed: int = 0, record_every: int = 1,
                         dtype: torch.dtype = torch.float64, divergence_threshold: float = 1e12,
                         chunk_runs: int | None = None) -> SampledRuns:
    """Average-able sampled runs of output-space mini-batch SGD with momentum (Velikanov et al. 2023, Eq. 1-2, App. F setup).

    ``kernel`` K (N x N) and ``initial_error`` e_0 = f_0 - y (N,); ``lr``/``momentum`` scalars or one value per
    run. Each step every run draws its own batch of ``batch_size`` distinct indices uniformly (top-b of uniform
    keys), computes ``g = K[:, B] e[B] / b`` as a sparse-dense product and applies the torch-SGD momentum update.
    The loss ``(1/2N)||e||^2`` is recorded at steps 0, record_every, ..., and at the last step.
    """
    with torch_threads():
        return _simulate(kernel, initial_error, lr, momentum, batch_size, steps, n_runs, seed, record_every, dtype,
                         divergence_threshold, chunk_runs)


def _simulate(kernel, initial_error, lr, momentum, batch_size, steps, n_runs, seed, record_every, dtype,
              divergence_threshold, chunk_runs) -> SampledRuns:
    Kt, e0 = _as_kernel_and_error(kernel, initial_error, dtype)
    n = Kt.shape[0]
    if int(batch_size) != batch_size or not 1 <= batch_size <= n:
        raise SpectrumError(f"batch size {batch_size} must be an integer in [1, {n}] (the dataset size)")
    if int(steps) != steps or steps < 0 or n_runs < 1 or record_every < 1:
        raise SpectrumError("steps must be >= 0, n_runs >= 1 and record_every >= 1")
    lr_t = _per_run(lr, n_runs, "lr")
    mom_t = _per_run(momentum, n_runs, "momentum")
    gen = torch.Generator().manual_seed(int(seed))
    rec = sorted(set(range(0, steps + 1, record_every)) | {steps})
    rec_index = {s: i for i, s in enumerate(rec)}
    loss = np.empty((n_runs, len(rec)))
    div = np.full(n_runs, -1, dtype=np.int64)
    L0 = 0.5 * float((e0.double() ** 2).mean())
    limit = divergence_threshold * max(L0, 1e-300)
    chunk = chunk_runs or n_runs
    b = int(batch_size)
    for start in range(0, n_runs, chunk):
        stop = min(n_runs, start + chunk)
        R = stop - start
        alpha = lr_t[start:stop].to(dtype)[:, None]
        beta = mom_t[start:stop].to(dtype)[:, None]
        E = e0.expand(R, n).clone()
        Pm = torch.zeros(R, n, dtype=dtype)
        alive = torch.ones(R, dtype=torch.bool)
        crow = torch.arange(0, R * b + 1, b, dtype=torch.int64)
        loss[start:stop, 0] = L0
        for t in range(1, steps + 1):
            idx = torch.topk(torch.rand(R, n, generator=gen), b, dim=1).indices.sort(dim=1).values
            vals = E.gather(1, idx) / b
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "sparse CSR is beta" / invariant-check notices
                M = torch.sparse_csr_tensor(crow, idx.reshape(-1), vals.reshape(-1), size=(R, n),
                                            check_invariants=False)
                g = torch.sparse.mm(M, Kt)
            Pm.mul_(beta).add_(g)
            E.addcmul_(alpha, Pm, value=-1.0)
            cur = 0.5 * (E.double() ** 2).mean(dim=1)
            bad = alive & (~torch.isfinite(cur) | (cur > limit))
            if bad.any():
                for r in torch.nonzero(bad).flatten().tolist():
                    div[start + r] = t
                alive &= ~bad
                E[~alive] = 0.0
                Pm[~alive] = 0.0
            if t in rec_index:
                col = cur.numpy().copy()
                col[~alive.numpy()] = np.inf
                loss[start:stop, rec_index[t]] = col
    return SampledRuns(np.array(rec), loss, div, lr_t.numpy(), mom_t.numpy())


def exact_second_moments(kernel: Any, initial_error: Any, lr: float, momentum: float, batch_size: int, steps: int,
                         dataset_size: int | None = None, dtype: torch.dtype = torch.float64,
                         divergence_threshold: float = 1e12) -> tuple[np.ndarray, int | None]:
    """Exact mean loss of sampled SGD with momentum from the second-moment recursion (Velikanov et al. 2023, Prop. 1, Eqs. 4-5,
    output space as in Prop. 6), ``H = K/N``, ``C = E[e e^T]``, ``J = E[e v^T]``, ``P = E[v v^T]``,
    ``v = -alpha p``::

        P' = alpha^2 H C H - alpha beta (H J + J^T H) + beta^2 P + alpha^2 gamma Sigma(C)
        J' = beta J - alpha C H + P'
        C' = C - alpha (H C + C H) + beta (J + J^T) + P'
        Sigma(C) = N H diag(C) H - H C H        (diag in the sample basis: the non-spectral noise term)
        L = tr(C) / (2N),  gamma = (N - b)/(b (N - 1))

    Computed in the eigenbasis of H (2 N^3 matmuls per step). ``dataset_size`` overrides N in gamma only (None:
    the kernel's N, i.e. sampling without replacement from the kernel's points). Returns ``(loss (steps+1,),
    diverged_at)`` with ``inf`` after divergence.
    """
    with torch_threads():
        return _exact(kernel, initial_error, lr, momentum, batch_size, steps, dataset_size, dtype,
                      divergence_threshold)


def _moment_step(C, J, P, U, Lc, Lr, a, bta, gamma, n):
    """One step of the exact second-moment recursion of :func:`exact_second_moments` (eigenbasis of H)."""
    d = ((U @ C) * U).sum(dim=1)                        # diag of C in the sample basis
    HdH = Lc * ((U.T * d) @ U) * Lr                      # H diag(d) H in the eigenbasis
    HCH = Lc * C * Lr
    HJ = Lc * J
    Pn = a * a * HCH - a * bta * (HJ + HJ.T) + bta * bta * P + a * a * gamma * (n * HdH - HCH)
    Jn = bta * J - a * C * Lr + Pn
    Cn = C - a * (Lc * C + C * Lr) + bta * (J + J.T) + Pn
    return Cn, Jn, Pn


def _eigen(Kt: torch.Tensor, dtype: torch.dtype):
    n = Kt.shape[0]
    lam, U = torch.linalg.eigh(0.5 * (Kt + Kt.T) / n)
    return lam.to(dtype), U.to(dtype)


def _exact(kernel, initial_error, lr, momentum, batch_size, steps, dataset_size, dtype, divergence_threshold):
    Kt, e0 = _as_kernel_and_error(kernel, initial_error, torch.float64)
    n = Kt.shape[0]
    gamma = noise_amplitude(batch_size, dataset_size if dataset_size is not None else n)
    lam, U = _eigen(Kt, dtype)
    a = float(lr)
    bta = float(momentum)
    z = U.T @ e0.to(dtype)
    C = torch.outer(z, z)
    J = torch.zeros_like(C)
    P = torch.zeros_like(C)
    Lc, Lr = lam[:, None], lam[None, :]
    out = np.empty(steps + 1)
    out[0] = float(torch.trace(C)) / (2 * n)
    limit = divergence_threshold * max(out[0], 1e-300)
    for t in range(1, steps + 1):
        C, J, P = _moment_step(C, J, P, U, Lc, Lr, a, bta, gamma, n)
        val = float(torch.trace(C)) / (2 * n)
        if not np.isfinite(val) or val > limit:
            out[t:] = np.inf
            return out, t
        out[t] = val
    return out, None


def exact_growth_rate(kernel: Any, lr: float, momentum: float, batch_size: int, steps: int = 2000,
                      dataset_size: int | None = None) -> float:
    """Asymptotic log growth rate per step of the exact second moments (Velikanov et al. 2023, Prop. 1): ``log rho`` of the linear
    map ``(C, J, P) -> (C', J', P')`` of :func:`exact_second_moments`, by power iteration from ``C = I``,
    ``J = P = 0`` (every mode excited), renormalised each step; the mean log norm ratio over the last half of
    ``steps`` steps. Sampled SGD diverges in mean square iff the rate is > 0 (up to the power iteration's
    resolution, about ``1/steps``)."""
    with torch_threads():
        Kt = torch.as_tensor(np.asarray(kernel, dtype=np.float64))
        if Kt.ndim != 2 or Kt.shape[0] != Kt.shape[1] or not torch.isfinite(Kt).all():
            raise SpectrumError(f"kernel must be a finite square matrix, got shape {tuple(Kt.shape)}")
        if int(steps) != steps or steps < 2:
            raise SpectrumError(f"steps must be an integer >= 2, got {steps}")
        n = Kt.shape[0]
        gamma = noise_amplitude(batch_size, dataset_size if dataset_size is not None else n)
        lam, U = _eigen(Kt, torch.float64)
        Lc, Lr = lam[:, None], lam[None, :]
        C = torch.eye(n, dtype=torch.float64)
        J = torch.zeros_like(C)
        P = torch.zeros_like(C)
        logs = []
        for t in range(int(steps)):
            C, J, P = _moment_step(C, J, P, U, Lc, Lr, float(lr), float(momentum), gamma, n)
            norm = float(torch.sqrt((C ** 2).sum() + (J ** 2).sum() + (P ** 2).sum()))
            if not np.isfinite(norm) or norm == 0:
                return float("inf") if not np.isfinite(norm) else float("-inf")
            C, J, P = C / norm, J / norm, P / norm
            if t >= steps // 2:
                logs.append(np.log(norm))
        return float(np.mean(logs))


def exact_critical_learning_rate(kernel: Any, momentum: float, batch_size: int, lr_hi: float,
                                 dataset_size: int | None = None, steps: int = 2000, rtol: float = 1e-3) -> float:
    """The largest lr at which the exact second moments of sampled SGD do not grow (:func:`exact_growth_rate`
    <= 0), by bisection on ``(0, lr_hi]``; ``lr_hi`` must be divergent (else ``lr_hi`` is returned). The exact
    counterpart of :func:`optiscope.theory.sgd.critical_learning_rate` (which uses the SE approximation of the
    noise term), for small N (O(N^3) per step)."""
    if not lr_hi > 0:
        raise SpectrumError(f"lr_hi must be > 0, got {lr_hi}")
    if exact_growth_rate(kernel, lr_hi, momentum, batch_size, steps, dataset_size) <= 0:
        return float(lr_hi)
    lo, hi = 0.0, float(lr_hi)
    while hi - lo > rtol * hi:
        mid = 0.5 * (lo + hi)
        if exact_growth_rate(kernel, mid, momentum, batch_size, steps, dataset_size) > 0:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)

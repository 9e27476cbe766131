"""The spectrally expressible (SE) second-moment recursion and its loss curves.

Velikanov et al. 2023, §3-4, Eq. 7, Eqs. 9-11, Eq. 65; Prop. 1, Eq. 5.

The noise amplitude ``gamma`` (:func:`noise_amplitude`), the effective learning rate ``alpha / (1 - beta)``
(:func:`effective_learning_rate`), and the SE recursion for the per-mode second moments of heavy-ball SGD, in which the
noise added to mode k is ``gamma alpha^2 lambda_k^2 (tau1 sum_l C_l - tau2 C_k)``. It runs in torch, vectorised over
eigenvalues and over a grid of (lr, momentum): :func:`se_loss_curve` gives one :class:`LossCurve`,
:func:`se_loss_grid` a grid of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from optiscope.theory.sgd.spectrum import Spectrum, SpectrumError, torch_threads

__all__ = ["LossCurve", "effective_learning_rate", "noise_amplitude", "se_loss_curve", "se_loss_grid"]


def noise_amplitude(batch_size: int, dataset_size: int | None = None) -> float:
    """Sampling-noise amplitude gamma (Velikanov et al. 2023, Prop. 1, Eq. 5; Prop. 6): ``gamma = (N - b) / (b (N - 1))`` for
    batches drawn without replacement from N points, ``gamma = 1 / b`` for an infinite dataset (``N = None``).
    """
    if int(batch_size) != batch_size or batch_size < 1:
        raise SpectrumError(f"batch size must be a positive integer, got {batch_size}")
    if dataset_size is None:
        return 1.0 / batch_size
    if int(dataset_size) != dataset_size or dataset_size < 1:
        raise SpectrumError(f"dataset size must be a positive integer, got {dataset_size}")
    if batch_size > dataset_size:
        raise SpectrumError(f"batch size {batch_size} is larger than the dataset ({dataset_size})")
    if dataset_size == 1:
        return 0.0
    return (dataset_size - batch_size) / (batch_size * (dataset_size - 1))


def effective_learning_rate(lr: float, momentum: float) -> float:
    """``alpha_eff = alpha / (1 - beta)`` (Velikanov et al. 2023, §5, before Prop. 4)."""
    if momentum >= 1:
        return math.inf
    return lr / (1.0 - momentum)


def _check_hyper(lr: Any, momentum: Any, tau1: float, tau2: float) -> None:
    lr_a, mom_a = np.asarray(lr, dtype=float), np.asarray(momentum, dtype=float)
    if not np.all(np.isfinite(lr_a)) or np.any(lr_a <= 0):
        raise SpectrumError(f"learning rate must be positive and finite, got {lr}")
    if not np.all(np.isfinite(mom_a)):
        raise SpectrumError(f"momentum must be finite, got {momentum}")
    if not (np.isfinite(tau1) and np.isfinite(tau2)):
        raise SpectrumError("tau1 and tau2 must be finite")


@dataclass
class LossCurve:
    """SE prediction. ``loss[t]`` for t = 0..steps (``inf`` from the step where it diverged on)."""

    loss: np.ndarray
    diverged_at: int | None
    lr: float
    momentum: float
    gamma: float
    tau1: float
    tau2: float

    @property
    def diverged(self) -> bool:
        """Whether the predicted loss diverged within the horizon (``diverged_at`` is set)."""
        return self.diverged_at is not None

    def loss_list(self) -> list[float | None]:
        """JSON-safe: ``None`` where the loss is not finite (after divergence)."""
        return [float(v) if np.isfinite(v) else None for v in self.loss]


def _se_core(lam: np.ndarray, c: np.ndarray, m: np.ndarray, lr: np.ndarray, mom: np.ndarray, gamma: float,
             tau1: float, tau2: float, steps: int, record: bool, dtype: Any, threshold: float,
             check_every: int = 16):
    """The SE recursion for G configurations at once (rows) over the modes (columns). Returns (losses (G, T+1)
    or final (G,), diverged_at (G,) with -1 for none)."""
    with torch_threads():
        return _se_core_impl(lam, c, m, lr, mom, gamma, tau1, tau2, steps, record, dtype, threshold, check_every)


def _se_core_impl(lam, c, m, lr, mom, gamma, tau1, tau2, steps, record, dtype, threshold, check_every):
    import torch

    dt = dtype if dtype is not None else torch.float64
    lam_t = torch.tensor(np.array(lam, dtype=np.float64))
    a = torch.tensor(np.array(lr, dtype=np.float64))[:, None] * lam_t[None, :]
    beta = torch.tensor(np.array(mom, dtype=np.float64))[:, None]
    q1 = (a * a * (1.0 - gamma * tau2)).to(dt)
    q2 = (-2.0 * beta * a).to(dt)
    q3 = (gamma * tau1 * a * a * torch.tensor(np.array(m, dtype=np.float64))[None, :]).to(dt)
    o2 = (1.0 - 2.0 * a).to(dt)
    a = a.to(dt)
    b1 = beta.to(dt)
    b2 = (beta * beta).to(dt)
    two_b = (2.0 * beta).to(dt)
    G, n = a.shape
    C = torch.tensor(np.array(c, dtype=np.float64)).to(dt).expand(G, n).clone()
    J = torch.zeros(G, n, dtype=dt)
    P = torch.zeros(G, n, dtype=dt)
    com = torch.empty(G, n, dtype=dt)
    Cn = torch.empty(G, n, dtype=dt)
    L0 = 0.5 * float(np.sum(c))
    limit = threshold * max(L0, 1e-300)
    S = C.sum(dim=1, keepdim=True)
    buf_len = check_every
    hist = torch.empty(G, steps + 1, dtype=torch.float64) if record else None
    window = torch.empty(G, buf_len, dtype=torch.float64)
    diverged_at = np.full(G, -1, dtype=np.int64)
    if record:
        hist[:, 0] = 0.5 * S[:, 0].double()
    t = 0
    while t < steps:
        block = min(buf_len, steps - t)
        for j in range(block):
            # common = a^2 C - 2 beta a J + beta^2 P + gamma a^2 (tau1 S - tau2 C)   (= P')
            torch.mul(q1, C, out=com)
            com.addcmul_(q2, J).addcmul_(b2, P).addcmul_(q3, S)
            # C' = (1 - 2a) C + 2 beta J + common ;  J' = beta J - a C + common
            torch.mul(o2, C, out=Cn)
            Cn.addcmul_(two_b, J).add_(com)
            J.mul_(b1).addcmul_(a, C, value=-1.0).add_(com)
            C, Cn = Cn, C
            P, com = com, P
            S = C.sum(dim=1, keepdim=True)
            window[:, j] = 0.5 * S[:, 0].double()
        w = window[:, :block]
        if record:
            hist[:, t + 1:t + 1 + block] = w
        bad = ~torch.isfinite(w) | (w > limit)
        rows = torch.nonzero(bad.any(dim=1)).flatten().tolist()
        for r in rows:
            if diverged_at[r] < 0:
                first = int(torch.nonzero(bad[r]).flatten()[0])
                diverged_at[r] = t + 1 + first
            C[r] = 0.0
            J[r] = 0.0
            P[r] = 0.0
            S[r] = 0.0
        t += block
    if record:
        out = hist.numpy().copy()
        for r in np.nonzero(diverged_at >= 0)[0]:
            out[r, diverged_at[r]:] = np.inf
        return out, diverged_at
    final = window[:, (steps - 1) % buf_len].numpy().copy() if steps > 0 else np.full(G, L0)
    final[diverged_at >= 0] = np.inf
    return final, diverged_at


def se_loss_curve(spectrum: Spectrum, lr: float, momentum: float, batch_size: int, steps: int,
                  dataset_size: int | None = None, tau1: float = 1.0, tau2: float = 1.0, dtype: Any = None,
                  divergence_threshold: float = 1e12) -> LossCurve:
    """Noise-averaged loss of SGD with momentum under the SE approximation (Velikanov et al. 2023, §3-4, Eq. 7, Eqs. 9-11).

    Per mode keep ``C_k`` (error second moment), ``J_k`` (error x velocity), ``P_k`` (velocity second moment);
    ``C_k(0) = c_k``, ``J_k(0) = P_k(0) = 0``; with ``a_k = alpha lambda_k``::

        noise_k  = gamma a_k^2 (tau1 sum_l m_l C_l - tau2 C_k)
        P_k'     = a_k^2 C_k - 2 beta a_k J_k + beta^2 P_k + noise_k
        C_k'     = C_k - 2 a_k C_k + 2 beta J_k + P_k'
        J_k'     = beta J_k - a_k C_k + P_k'
        L_t      = (1/2) sum_k C_k(t)

    (the rank-one term sums multiplicity-weighted). A loss that exceeds ``divergence_threshold * L_0`` or becomes
    non-finite marks the curve diverged at that step; later values are ``inf`` (never NaN).
    """
    _check_hyper(lr, momentum, tau1, tau2)
    if int(steps) != steps or steps < 0:
        raise SpectrumError(f"steps must be a non-negative integer, got {steps}")
    gamma = noise_amplitude(batch_size, dataset_size)
    loss, div = _se_core(spectrum.eigenvalues, spectrum.coefficients, spectrum.weights, np.array([lr], float),
                         np.array([momentum], float), gamma, tau1, tau2, int(steps), True, dtype,
                         divergence_threshold)
    d = int(div[0])
    return LossCurve(loss[0], None if d < 0 else d, float(lr), float(momentum), gamma, float(tau1), float(tau2))


def se_loss_grid(spectrum: Spectrum, lrs: Any, momenta: Any, batch_size: int, steps: int,
                 dataset_size: int | None = None, tau1: float = 1.0, tau2: float = 1.0, record: bool = False,
                 dtype: Any = None, divergence_threshold: float = 1e12, max_elements: int = 4_000_000):
    """The SE recursion of :func:`se_loss_curve` for every pair ``(lrs[i], momenta[i])`` (1-D arrays of equal
    length; use ``np.meshgrid`` for a product grid), chunked so that at most ``max_elements`` mode-config pairs
    are in memory. Returns ``(loss, diverged_at)``: loss ``(G, steps+1)`` if ``record`` else the final loss
    ``(G,)`` (``inf`` where diverged); ``diverged_at`` (G,) with -1 for runs that did not diverge.
    """
    lrs = np.atleast_1d(np.asarray(lrs, dtype=float))
    momenta = np.atleast_1d(np.asarray(momenta, dtype=float))
    if lrs.shape != momenta.shape or lrs.ndim != 1:
        raise SpectrumError(f"lrs and momenta must be 1-D of equal length, got {lrs.shape} and {momenta.shape}")
    _check_hyper(lrs, momenta, tau1, tau2)
    gamma = noise_amplitude(batch_size, dataset_size)
    chunk = max(1, max_elements // spectrum.size)
    outs, divs = [], []
    for i in range(0, lrs.size, chunk):
        o, d = _se_core(spectrum.eigenvalues, spectrum.coefficients, spectrum.weights, lrs[i:i + chunk],
                        momenta[i:i + chunk], gamma, tau1, tau2, int(steps), record, dtype, divergence_threshold)
        outs.append(o)
        divs.append(d)
    return np.concatenate(outs, axis=0), np.concatenate(divs)

r"""Exponential learning-rate equivalence for scale-invariant losses (Li & Arora 2020).

Setting (Li & Arora, ICLR 2020). Momentum SGD in PyTorch's convention with coupled L2 weight decay ``lambda``::

    (WD run)   v_{t+1} = gamma v_t + grad L(theta_t) + lambda theta_t,     theta_{t+1} = theta_t - eta_t v_{t+1}
    (exp run)  w_{t+1} = gamma w_t + grad L(phi_t),                        phi_{t+1}   = phi_t - lr_t w_{t+1}

If ``L(c theta) = L(theta)`` for all ``c > 0`` (weights feeding a normalisation), then with the learning rates and
scales returned here, ``theta_t = a_t * phi_t`` for every ``t`` and both runs compute the same network function.

* Constant ``eta``: ``a_t = alpha^t`` and ``lr_t = eta * alpha^(-2t-1)`` (:func:`explr_alpha`,
  :func:`exponential_lr`), provided the exp run starts with the buffer of :func:`initial_momentum_buffer`.
* Any per-step schedule ``eta_t`` (step decay, TEXP): the scalar recurrence of :func:`equivalent_schedule`.

Pure numpy; the scheduler :class:`optiscope.optim.ExpLR` applies these to a torch optimizer. Exactness needs every
parameter that receives weight decay to be scale-invariant; the identity is for coupled L2, not AdamW-style decay.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np


def _check(lr: float, weight_decay: float, momentum: float) -> None:
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"invalid lr={lr!r}: must be a finite number > 0")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"invalid weight_decay={weight_decay!r}: must be a finite number >= 0")
    if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
        raise ValueError(f"invalid momentum={momentum!r}: must lie in [0, 1)")


def explr_alpha(lr: float, weight_decay: float, momentum: float) -> float:
    r"""The per-step scale factor alpha of the exponential-LR equivalence (Li & Arora 2020).

    ``alpha`` is the larger root of ``x^2 - (1 + gamma - lambda eta) x + gamma = 0``::

        alpha = [ (1 + gamma - lambda eta) + sqrt( (1 + gamma - lambda eta)^2 - 4 gamma ) ] / 2

    with ``eta = lr``, ``lambda = weight_decay``, ``gamma = momentum``. For ``gamma = 0``: ``alpha = 1 - lambda eta``.
    Real iff ``lambda eta <= (1 - sqrt(gamma))^2``; otherwise ``ValueError``. For small ``lambda eta``,
    ``alpha ~ 1 - lambda eta / (1 - gamma)``. ``alpha`` must be positive (``lambda eta < 1`` when ``gamma = 0``).
    """
    _check(lr, weight_decay, momentum)
    x = weight_decay * lr
    b = 1.0 + momentum - x
    # b^2 - 4 gamma, written without the cancellation of b^2 against 4 gamma
    disc = (1.0 - momentum) ** 2 - x * (2.0 * (1.0 + momentum) - x)
    if disc < 0:
        raise ValueError(f"no real alpha for lr={lr}, weight_decay={weight_decay}, momentum={momentum}: needs "
                         f"lr*weight_decay <= (1 - sqrt(momentum))^2 = {(1 - math.sqrt(momentum)) ** 2:.6g}")
    alpha = (b + math.sqrt(disc)) / 2.0
    if alpha <= 0:
        raise ValueError(f"alpha = {alpha} <= 0 for lr={lr}, weight_decay={weight_decay}: lr*weight_decay must "
                         "be < 1 + momentum")
    return alpha


def exponential_lr(lr: float, weight_decay: float, momentum: float, t: Any) -> Any:
    r"""The equivalent exponential schedule ``lr_t = eta * alpha^(-2t-1)`` (Li & Arora 2020).

    ``t`` is the step index (int or array, ``t = 0`` is the first update). Valid with the initial buffer of
    :func:`initial_momentum_buffer`. Returns a float for scalar ``t``, else a numpy array.
    """
    alpha = explr_alpha(lr, weight_decay, momentum)
    t_arr = np.asarray(t, dtype=float)
    out = lr * np.exp(-(2.0 * t_arr + 1.0) * math.log(alpha))
    return float(out) if out.ndim == 0 else out


def initial_momentum_buffer(theta0: Any, lr: float, weight_decay: float, momentum: float) -> Any:
    r"""Momentum buffer ``w_0`` with which the exp run reproduces a WD run started from a zero buffer.

    Li & Arora 2020 ("initial condition for exactness"): ``phi_0 = theta_0`` and
    ``phi_{-1} = alpha theta_{-1}`` with ``theta_{-1} = theta_0``, i.e. ::

        w_0 = -(1 - alpha) theta_0 / (eta alpha)

    ``theta0`` may be a float, numpy array or torch tensor (plain arithmetic). Zero when ``momentum = 0``
    (the buffer is then unused) or ``weight_decay = 0``.
    """
    alpha = explr_alpha(lr, weight_decay, momentum)
    return theta0 * (-(1.0 - alpha) / (lr * alpha))


@dataclass(frozen=True)
class EquivalentSchedule:
    """Result of :func:`equivalent_schedule`.

    ``lrs[t]``: learning rate of the exp run for step ``t`` (``t = 0..T-1``); ``scales[t] = a_t`` with
    ``theta_t = a_t phi_t`` (``t = 0..T``, ``a_0 = 1``); ``buffer_factor``: the exp run's initial momentum buffer
    is ``buffer_factor * theta_0`` (0 for a zero buffer); ``start``: which start was used.
    """

    lrs: np.ndarray
    scales: np.ndarray
    buffer_factor: float
    start: str

    def initial_buffer(self, theta0: Any) -> Any:
        """``buffer_factor * theta0`` (works for floats, numpy arrays and torch tensors)."""
        return theta0 * self.buffer_factor


def equivalent_schedule(lrs: Sequence[float] | np.ndarray, weight_decay: float, momentum: float,
                        start: Literal["exponential", "zero_buffer"] = "exponential") -> EquivalentSchedule:
    r"""Learning rates of the no-WD run equivalent to a WD run with any per-step schedule ``eta_t``.

    Li & Arora 2020 (TEXP), the general-schedule recurrence. With ``r_t = eta_t / eta_{t-1}``
    (``r_0 = 1``)::

        a_0 = 1,   a_{t+1} = (1 + gamma r_t - eta_t lambda) a_t - gamma r_t a_{t-1},   lr_t = eta_t / (a_t a_{t+1})

    and then ``theta_t = a_t phi_t`` for all ``t`` (both runs share mini-batches and ``theta_0 = phi_0``).

    ``start="zero_buffer"``: ``a_{-1} = 1``, and both runs start from a zero momentum buffer.
    ``start="exponential"`` (default): ``a_{-1} = 1 / alpha_0`` with ``alpha_0 = explr_alpha(eta_0, lambda, gamma)``;
    then a constant schedule gives exactly ``a_t = alpha^t`` and ``lr_t = eta alpha^(-2t-1)``; the exp run must
    start from the buffer ``(1 - a_{-1}) theta_0 / eta_0 = -(1 - alpha) theta_0 / (eta alpha)``
    (``buffer_factor``), while the WD run starts from zero. With ``gamma = 0`` both starts coincide.
    Raises ``ValueError`` for invalid inputs or when some ``a_t <= 0`` (weight decay too strong for the schedule).
    """
    eta = np.asarray(lrs, dtype=float)
    if eta.ndim != 1 or eta.size == 0:
        raise ValueError(f"lrs must be a non-empty 1-D sequence of per-step learning rates, got shape {eta.shape}")
    for v in (float(eta.min()), float(eta.max())):
        _check(v, weight_decay, momentum)
    if start not in ("exponential", "zero_buffer"):
        raise ValueError(f"start={start!r}; allowed: 'exponential', 'zero_buffer'")
    gamma, lam = float(momentum), float(weight_decay)
    if start == "exponential" and gamma > 0:
        a_prev = 1.0 / explr_alpha(float(eta[0]), lam, gamma)
    else:
        a_prev = 1.0
    buffer_factor = (1.0 - a_prev) / float(eta[0]) if gamma > 0 else 0.0
    T = eta.size
    a = np.empty(T + 1)
    a[0] = 1.0
    prev, cur = a_prev, 1.0
    for t in range(T):
        r = 1.0 if t == 0 else eta[t] / eta[t - 1]
        nxt = (1.0 + gamma * r - eta[t] * lam) * cur - gamma * r * prev
        if not nxt > 0:
            raise ValueError(f"scale a_{t + 1} = {nxt} <= 0: weight_decay*lr too large for this schedule at step {t}")
        a[t + 1] = nxt
        prev, cur = cur, nxt
    return EquivalentSchedule(lrs=eta / (a[:-1] * a[1:]), scales=a, buffer_factor=buffer_factor, start=start)


def step_decay_lrs(lr: float, steps: int, milestones: Sequence[int] = (), factor: float = 0.1) -> np.ndarray:
    r"""Per-step learning rates of a step-decay schedule: ``eta_t = lr * factor^{#{m in milestones : m <= t}}``.

    The standard schedule that Li & Arora 2020's TEXP replaces (e.g. ``lr=0.1``, ``milestones=(150,)``, ``factor=0.1``).
    """
    if not (isinstance(steps, int) and steps > 0):
        raise ValueError(f"invalid steps={steps!r}: must be a positive integer")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"invalid lr={lr!r}: must be > 0")
    if not (isinstance(factor, (int, float)) and factor > 0):
        raise ValueError(f"invalid factor={factor!r}: must be > 0")
    ms = sorted(int(m) for m in milestones)
    if any(m <= 0 for m in ms):
        raise ValueError(f"milestones {list(milestones)} must be positive step indices")
    t = np.arange(steps)
    return lr * factor ** np.searchsorted(np.asarray(ms), t, side="right")

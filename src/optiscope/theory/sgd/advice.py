"""Negative momentum and hyper-parameter advice (Velikanov et al. 2023, §6, Prop. 5, Eq. 30; Prop. 12, Eq. 202).

The negative-momentum criterion (Prop. 5, output-space form), the learning rates that minimise the loss constants in
the noise- and signal-dominated phases, the derivative of the log constant in momentum, and :func:`advise`, which
searches a grid of (lr, momentum) with the SE recursion and returns an :class:`Advice`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import optimize

from optiscope.theory.sgd.critical import critical_learning_rate
from optiscope.theory.sgd.generating import noise_at_one, signal_at_one
from optiscope.theory.sgd.recursion import effective_learning_rate, noise_amplitude, se_loss_grid
from optiscope.theory.sgd.spectrum import Spectrum, SpectrumError

__all__ = [
    "Advice",
    "advise",
    "log_constant_momentum_derivative",
    "negative_momentum_criterion",
    "optimal_lr_noise_dominated",
    "optimal_lr_signal_dominated",
]


def negative_momentum_criterion(spectrum: Spectrum, nu: float) -> float:
    """Prop. 5 / Eq. 30 (Velikanov et al. 2023, §6, Prop. 12, Eq. 202), output-space form (the paper's two forms differ; this one is used)::

        S = (sum_k lambda_k)(sum_k c_k) - ((nu - 1)/nu) (sum_k lambda_k^2)(sum_k c_k / lambda_k)

    In the noise-dominated phase with gamma tau = 1 and alpha at its beta = 0 optimum, S > 0 means the loss
    decreases when beta goes below 0 (negative momentum is better).
    """
    lam, c, m = spectrum.eigenvalues, spectrum.coefficients, spectrum.weights
    pos = lam > 0
    return float(np.sum(m[pos] * lam[pos]) * np.sum(c[pos])
                 - (nu - 1) / nu * np.sum(m[pos] * lam[pos] ** 2) * np.sum(c[pos] / lam[pos]))


def _log_c_noise(spectrum: Spectrum, lr: float, momentum: float, gamma: float, nu: float, tau1: float,
                 tau2: float) -> float:
    """ln C_noise up to an (alpha, beta)-independent constant: (1/nu) ln alpha_eff + ln V~(1) - 2 ln(1 - U~(1))."""
    U1 = float(noise_at_one(spectrum, lr, momentum, gamma, tau1, tau2))
    if not U1 < 1:
        return math.inf
    V1 = signal_at_one(spectrum, lr, momentum, gamma, tau2)
    ae = effective_learning_rate(lr, momentum)
    return (1 / nu) * math.log(ae) + math.log(V1) - 2 * math.log(1 - U1)


def optimal_lr_noise_dominated(spectrum: Spectrum, nu: float, batch_size: int, momentum: float = 0.0,
                               dataset_size: int | None = None, tau1: float = 1.0, tau2: float = 1.0) -> float:
    """The alpha minimising the noise-dominated constant C_noise (Eq. 28b) at fixed beta (Velikanov et al. 2023, §6,
    "Hyperparameter optimization"), bounded by the critical lr."""
    gamma = noise_amplitude(batch_size, dataset_size)
    crit = critical_learning_rate(spectrum, momentum, batch_size, dataset_size, tau1, tau2)
    res = optimize.minimize_scalar(lambda la: _log_c_noise(spectrum, math.exp(la), momentum, gamma, nu, tau1, tau2),
                                   bounds=(math.log(crit) - 12, math.log(crit * (1 - 1e-9))), method="bounded",
                                   options={"xatol": 1e-10})
    return float(math.exp(res.x))


def _log_c_signal(spectrum: Spectrum, lr: float, momentum: float, gamma: float, zeta: float, tau1: float,
                  tau2: float) -> float:
    """ln C_signal up to an (alpha, beta)-independent constant: -zeta ln alpha_eff - ln(1 - U~(1)) (Eq. 28a)."""
    U1 = float(noise_at_one(spectrum, lr, momentum, gamma, tau1, tau2))
    if not U1 < 1:
        return math.inf
    return -zeta * math.log(effective_learning_rate(lr, momentum)) - math.log(1 - U1)


def log_constant_momentum_derivative(spectrum: Spectrum, nu: float, lr: float, batch_size: int,
                                     dataset_size: int | None = None, tau1: float = 1.0, tau2: float = 1.0,
                                     which: str = "noise", kappa: float | None = None, h: float = 1e-5) -> float:
    """``d ln C / d beta`` at beta = 0 and fixed alpha (Velikanov et al. 2023, §6, Prop. 5), central difference; ``which`` =
    "noise" (C_noise, Eq. 28b, part II) or "signal" (C_signal, Eq. 28a, part I, needs ``kappa``). Positive means
    lowering beta below 0 lowers the late-time loss; negative means positive momentum helps."""
    gamma = noise_amplitude(batch_size, dataset_size)
    if which == "noise":
        def f(b: float) -> float:
            return _log_c_noise(spectrum, lr, b, gamma, nu, tau1, tau2)
    elif which == "signal":
        if kappa is None:
            raise SpectrumError("which='signal' needs kappa")
        def f(b: float) -> float:
            return _log_c_signal(spectrum, lr, b, gamma, kappa / nu, tau1, tau2)
    else:
        raise SpectrumError(f"which must be 'noise' or 'signal', got {which!r}")
    return (f(h) - f(-h)) / (2 * h)


def optimal_lr_signal_dominated(spectrum: Spectrum, kappa: float, nu: float, batch_size: int, momentum: float = 0.0,
                                dataset_size: int | None = None, tau1: float = 1.0, tau2: float = 1.0) -> float:
    """The alpha minimising C_signal (Eq. 28a) at fixed beta (Velikanov et al. 2023, §6, "signal-dominated phase")."""
    gamma = noise_amplitude(batch_size, dataset_size)
    crit = critical_learning_rate(spectrum, momentum, batch_size, dataset_size, tau1, tau2)
    zeta = kappa / nu
    res = optimize.minimize_scalar(
        lambda la: _log_c_signal(spectrum, math.exp(la), momentum, gamma, zeta, tau1, tau2),
        bounds=(math.log(crit) - 12, math.log(crit * (1 - 1e-9))), method="bounded", options={"xatol": 1e-10})
    return float(math.exp(res.x))


@dataclass
class Advice:
    """Result of :func:`advise`: the best ``lr`` and ``momentum`` on the grid, the predicted ``loss`` there, the
    grid (``grid_lrs`` per momentum row, ``grid_momenta``) with its predicted losses, and whether the spectrum was
    coarsened (``approximated``) to fit the work budget."""
    lr: float
    momentum: float
    loss: float
    grid_lrs: np.ndarray
    grid_momenta: np.ndarray
    grid_loss: np.ndarray
    approximated: bool

    def to_dict(self) -> dict[str, Any]:
        """The advice as a JSON-ready dict (the loss grid with ``None`` where the prediction diverged)."""
        g = np.where(np.isfinite(self.grid_loss), self.grid_loss, np.nan)
        return {"lr": self.lr, "momentum": self.momentum, "loss": self.loss, "grid_lrs": self.grid_lrs.tolist(),
                "grid_momenta": self.grid_momenta.tolist(),
                "grid_loss": [[None if np.isnan(v) else float(v) for v in row] for row in g],
                "coarsened_spectrum": self.approximated}


def advise(spectrum: Spectrum, batch_size: int, steps: int, dataset_size: int | None = None, tau1: float = 1.0,
           tau2: float = 1.0, n_lr: int = 24, momenta: Sequence[float] | None = None, work_budget: float = 3e9,
           dtype: Any = None) -> Advice:
    """Grid search of (lr, momentum) for the lowest SE-predicted loss at step ``steps``. Learning rates span
    ``[1e-3, 1] x`` the critical lr of each momentum (log-spaced); when ``modes x configs x steps`` exceeds
    ``work_budget`` the spectrum is coarsened into log-spaced bins (``approximated=True``)."""
    if momenta is None:
        momenta = [-0.5, -0.25, 0.0, 0.25, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99]
    momenta = np.asarray(momenta, dtype=float)
    fr = np.geomspace(1e-3, 0.999, n_lr)
    crit = np.array([critical_learning_rate(spectrum, b, batch_size, dataset_size, tau1, tau2) for b in momenta])
    L = crit[:, None] * fr[None, :]
    B = np.broadcast_to(momenta[:, None], L.shape)
    spec = spectrum
    approx = False
    n_cfg = L.size
    if spectrum.size * n_cfg * max(steps, 1) > work_budget:
        nb = max(64, int(work_budget / (n_cfg * max(steps, 1))))
        if nb < spectrum.size:
            spec = spectrum.coarsened(nb)
            approx = True
    final, _ = se_loss_grid(spec, L.ravel(), B.ravel(), batch_size, steps, dataset_size, tau1, tau2, record=False,
                            dtype=dtype)
    grid = final.reshape(L.shape)
    i = int(np.argmin(np.where(np.isfinite(grid), grid, np.inf)))
    r, cidx = np.unravel_index(i, grid.shape)
    return Advice(float(L[r, cidx]), float(momenta[r]), float(grid[r, cidx]), L, momenta, grid, approx)

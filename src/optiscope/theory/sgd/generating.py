"""Generating functions of the SE dynamics (Velikanov et al. 2023, §4, Eqs. 16-20; §5, Eq. 21).

The characteristic polynomial of one mode's noiseless momentum recursion, the noise and signal generating functions
``U(z)``, ``V(z)`` and the loss generating function ``L(z)`` built from them, and their values at ``z = 1``
(:func:`noise_at_one`, :func:`signal_at_one`) that decide stability.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from optiscope.theory.sgd.spectrum import Spectrum

__all__ = [
    "characteristic_polynomial",
    "loss_generating_function",
    "noise_at_one",
    "noise_generating_function",
    "signal_at_one",
    "signal_generating_function",
]


def characteristic_polynomial(x: Any, z: Any, momentum: float, gamma_tau2: float) -> Any:
    """``S(x, z) = det(I - z A_lambda)`` of the per-eigenvalue 3x3 SE map, x = alpha lambda (Velikanov et al. 2023, §4,
    Eqs. 17-20, the notebook's denominator)::

        S(x, z) = (1 - beta z) ((1 + beta z)^2 - z (1 + beta - x)^2) + gamma tau2 x^2 z (1 + beta z)
    """
    b = momentum
    return (1 - b * z) * ((1 + b * z) ** 2 - z * (1 + b - x) ** 2) + gamma_tau2 * x ** 2 * z * (1 + b * z)


def _modes_z(spectrum: Spectrum, z: Any):
    z = np.asarray(z)
    zz = z[..., None]
    return z, zz


def noise_generating_function(spectrum: Spectrum, z: Any, lr: float, momentum: float, gamma: float,
                              tau1: float = 1.0, tau2: float = 1.0) -> Any:
    """Noise generating function ``U~(z) = sum_{t>=1} U_t z^t`` (Velikanov et al. 2023, §4, Eq. 18)::

        U~(z) = z gamma tau1 alpha^2 sum_k m_k lambda_k^2 (1 + beta z) / S(alpha lambda_k, z)

    ``z`` may be an array (real or complex, |z| below the convergence radius); vectorised over modes.
    """
    z, zz = _modes_z(spectrum, z)
    lam, m = spectrum.eigenvalues, spectrum.weights
    x = lr * lam
    S = characteristic_polynomial(x, zz, momentum, gamma * tau2)
    return z * gamma * tau1 * lr ** 2 * np.sum(m * lam ** 2 * (1 + momentum * zz) / S, axis=-1)


def signal_generating_function(spectrum: Spectrum, z: Any, lr: float, momentum: float, gamma: float,
                               tau2: float = 1.0) -> Any:
    """Signal generating function ``V~(z) = sum_{t>=0} V_t z^t`` (Velikanov et al. 2023, §4, Eq. 20)::

        V~(z) = sum_k c_k (1 - beta (1 + beta) z + 2 alpha beta lambda_k z + beta^3 z^2) / S(alpha lambda_k, z)
    """
    z, zz = _modes_z(spectrum, z)
    lam, c = spectrum.eigenvalues, spectrum.coefficients
    b = momentum
    x = lr * lam
    S = characteristic_polynomial(x, zz, b, gamma * tau2)
    num = 1 - b * (1 + b) * zz + 2 * b * x * zz + b ** 3 * zz ** 2
    return np.sum(c * num / S, axis=-1)


def loss_generating_function(spectrum: Spectrum, z: Any, lr: float, momentum: float, gamma: float,
                             tau1: float = 1.0, tau2: float = 1.0) -> Any:
    """``L~(z) = sum_t L_t z^t = V~(z) / (2 (1 - U~(z)))`` (Velikanov et al. 2023, §4, Eq. 16)."""
    U = noise_generating_function(spectrum, z, lr, momentum, gamma, tau1, tau2)
    V = signal_generating_function(spectrum, z, lr, momentum, gamma, tau2)
    return V / (2 * (1 - U))


def _denominators(spectrum: Spectrum, lr: Any, momentum: Any, gamma: float, tau2: float):
    lr = np.asarray(lr, dtype=float)[..., None]
    b = np.asarray(momentum, dtype=float)[..., None]
    x = lr * spectrum.eigenvalues
    D = 2 * (1 - b ** 2) - x * ((1 - b) - gamma * tau2 * (1 + b))
    return x, D, b


def noise_at_one(spectrum: Spectrum, lr: Any, momentum: Any, gamma: float, tau1: float = 1.0,
                 tau2: float = 1.0) -> Any:
    """``U~(1)`` (Velikanov et al. 2023, §5, Eq. 21), vectorised over arrays of lr/momentum (broadcast)::

        U~(1) = sum_k m_k gamma tau1 alpha lambda_k (1 + beta) / D_k,
        D_k = 2 (1 - beta^2) - alpha lambda_k ((1 - beta) - gamma tau2 (1 + beta))

    Returns ``inf`` where some ``D_k <= 0`` for a positive eigenvalue (no convergent series).
    """
    lam = spectrum.eigenvalues
    pos = lam > 0
    lam = lam[pos]
    w = None if spectrum.multiplicities is None else spectrum.multiplicities[pos]
    lr_a = np.asarray(lr, dtype=float)[..., None]
    b = np.asarray(momentum, dtype=float)[..., None]
    x = lr_a * lam
    D = 2 * (1 - b ** 2) - x * ((1 - b) - gamma * tau2 * (1 + b))
    bad = np.any(D <= 0, axis=-1)
    num = x if w is None else x * w
    with np.errstate(divide="ignore", invalid="ignore"):
        U = gamma * tau1 * (1 + b[..., 0]) * np.sum(num / D, axis=-1)
    return np.where(bad, np.inf, U)


def signal_at_one(spectrum: Spectrum, lr: float, momentum: float, gamma: float, tau2: float = 1.0) -> float:
    """``V~(1) = sum_k c_k (2 alpha beta lambda_k + (1 - beta)(1 - beta^2)) / (alpha lambda_k D_k)`` (Velikanov et al. 2023
    §6, after Eq. 28; ``inf`` when a zero-eigenvalue mode carries signal: that part of the loss never decays)."""
    x, D, b = _denominators(spectrum, lr, momentum, gamma, tau2)
    c = spectrum.coefficients
    if np.any((x == 0) & (c > 0)) or np.any(D <= 0):
        return math.inf
    pos = x > 0
    return float(np.sum(c[pos] * (2 * b * x[pos] + (1 - b) * (1 - b ** 2)) / (x[pos] * D[pos])))

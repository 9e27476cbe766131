"""Stability of SGD with momentum under the SE approximation.

Velikanov et al. 2023, §5, Prop. 3, Eq. 21, Eq. 24; App. H, Eq. 251.

The noiseless condition (:func:`noiseless_stable`, :func:`noiseless_critical_lr`, the sharpness threshold
:func:`momentum_sharpness_threshold`), the critical learning rate where ``U(1) = 1`` (:func:`critical_learning_rate`),
the critical regularization and the effective learning-rate bound, the convergence rate of the whole dynamics
(:func:`stability`, a :class:`Stability`), and maps of all of these over a grid of (lr, momentum)
(:func:`stability_map`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import optimize

from optiscope.theory.sgd.generating import (
    noise_at_one,
    noise_generating_function,
    signal_generating_function,
)
from optiscope.theory.sgd.recursion import _check_hyper, effective_learning_rate, noise_amplitude
from optiscope.theory.sgd.spectrum import Spectrum, SpectrumError

__all__ = [
    "Stability",
    "critical_learning_rate",
    "critical_regularization",
    "effective_lr_bound",
    "momentum_sharpness_threshold",
    "noiseless_critical_lr",
    "noiseless_stable",
    "stability",
    "stability_map",
]


def noiseless_stable(spectrum: Spectrum, lr: float, momentum: float) -> bool:
    """Convergence of GD with momentum (Velikanov et al. 2023, App. H, Eq. 251): ``|beta| < 1`` and
    ``0 < alpha lambda_max < 2 (1 + beta)``."""
    return bool(abs(momentum) < 1 and 0 < lr * spectrum.lambda_max < 2 * (1 + momentum))


def noiseless_critical_lr(spectrum: Spectrum, momentum: float) -> float:
    """``alpha = 2 (1 + beta) / lambda_max`` (Velikanov et al. 2023, App. H)."""
    return 2 * (1 + momentum) / spectrum.lambda_max


def momentum_sharpness_threshold(lr: float, momentum: float = 0.0) -> float:
    """The sharpness above which GD with heavy-ball momentum diverges: ``lambda_max > 2 (1 + beta) / alpha``
    (Velikanov et al. 2023, App. H, Eq. 251, solved for lambda_max; ``2 / lr`` without momentum). Heavy-ball
    ``theta' = theta - alpha g + beta (theta - theta_prev)`` and PyTorch's SGD momentum with a constant lr give the
    same threshold. Raises ``ValueError`` unless ``lr > 0`` and ``|momentum| < 1``."""
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not abs(momentum) < 1:
        raise ValueError(f"momentum must lie in (-1, 1), got {momentum!r}")
    return 2.0 * (1.0 + momentum) / lr


def critical_learning_rate(spectrum: Spectrum, momentum: float, batch_size: int, dataset_size: int | None = None,
                           tau1: float = 1.0, tau2: float = 1.0) -> float:
    """Largest stable lr at this momentum (Velikanov et al. 2023, §5, Prop. 3): the smaller of the noiseless bound
    ``2(1+beta)/lambda_max`` and the root of ``U~(1) = 1`` in alpha (``U~(1)`` increases with alpha on the stable
    side, so brentq on the bracket where all ``D_k > 0``). Returns 0 when ``|beta| >= 1``.
    """
    if not abs(momentum) < 1:
        return 0.0
    gamma = noise_amplitude(batch_size, dataset_size)
    hi = noiseless_critical_lr(spectrum, momentum)
    coef = (1 - momentum) - gamma * tau2 * (1 + momentum)
    if coef > 0:  # D_k hits 0 at alpha = 2(1-b^2)/(lambda coef): U~(1) -> inf before that
        hi = min(hi, 2 * (1 - momentum ** 2) / (spectrum.lambda_max * coef))
    if gamma == 0 or tau1 == 0:
        return hi

    def f(alpha: float) -> float:
        return float(noise_at_one(spectrum, alpha, momentum, gamma, tau1, tau2)) - 1.0

    hi_eval = hi * (1 - 1e-12)
    if f(hi_eval) < 0:
        return hi
    return float(optimize.brentq(f, hi * 1e-15, hi_eval, xtol=1e-14 * hi, rtol=1e-12, maxiter=500))


def critical_regularization(spectrum: Spectrum, tau: float = 1.0) -> float:
    """``lambda_crit``: the positive root of ``sum_k m_k lambda_k / (lambda_crit + tau lambda_k) = 1`` (Velikanov et al. 2023
    §5, Prop. 4, Eq. 22; tau = tau2/tau1). For tau = 0 it is ``sum_k m_k lambda_k``. Requires
    ``tau * sum m_k < 1`` is not needed: the left side decreases from ``sum m / tau`` to 0, so a root exists iff
    ``tau * 1 < sum m_k`` (more than 1/tau modes)."""
    lam, m = spectrum.eigenvalues, spectrum.weights
    pos = lam > 0
    lam, m = lam[pos], m[pos]

    def f(lc: float) -> float:
        return float(np.sum(m * lam / (lc + tau * lam))) - 1.0

    if tau > 0 and np.sum(m) * 1.0 <= tau:
        raise SpectrumError(f"no critical regularization: need more than tau = {tau} modes")
    hi = float(np.sum(m * lam)) + 1e-300
    return float(optimize.brentq(f, 0.0 if tau > 0 else 1e-300, hi * 2, xtol=1e-15 * hi, rtol=1e-13))


def effective_lr_bound(spectrum: Spectrum, batch_size: int, dataset_size: int | None = None, tau1: float = 1.0,
                       tau2: float = 1.0) -> float:
    """Prop. 4, Eq. 22 (Velikanov et al. 2023, §5): ``U~(1) < 1  =>  alpha_eff < 2 / (gamma tau1 lambda_crit)`` with
    ``lambda_crit`` from :func:`critical_regularization` at ``tau = tau2 / tau1`` (the beta -> 1 limit of U~(1))."""
    gamma = noise_amplitude(batch_size, dataset_size)
    if gamma == 0 or tau1 == 0:
        return math.inf
    return 2.0 / (gamma * tau1 * critical_regularization(spectrum, tau2 / tau1))


@dataclass
class Stability:
    """Verdict of :func:`stability`. ``kind``: "converges", "immediate divergence" (the noiseless condition fails:
    some mode grows on its own) or "eventual divergence" (noiseless stable but ``U~(1) >= 1``). For divergence,
    ``growth_rate`` is ``1/r`` (loss ~ const * growth_rate^t), ``divergence_time = 1/ln(growth_rate)``."""

    converges: bool
    kind: str
    lr: float
    momentum: float
    gamma: float
    effective_lr: float
    noise_at_one: float
    critical_lr: float
    noiseless_stable: bool
    radius: float | None = None
    growth_rate: float | None = None
    divergence_time: float | None = None
    divergence_constant: float | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The verdict as a JSON-ready dict (non-finite numbers become ``None``)."""
        def fin(v):
            return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v
        return {k: fin(getattr(self, k)) for k in self.__dataclass_fields__}


def _mode_growth(spectrum: Spectrum, lr: float, momentum: float, gamma: float, tau2: float) -> float:
    """Largest spectral radius over modes of the noiseless-plus-self-noise 3x3 map A_lambda (Velikanov et al. 2023, Eq. 11)."""
    x = lr * spectrum.eigenvalues
    b = momentum
    g = gamma * tau2
    A = np.empty((x.size, 3, 3))
    A[:, 0, 0] = (1 - x) ** 2 - g * x ** 2
    A[:, 0, 1] = 2 * b * (1 - x)
    A[:, 0, 2] = b ** 2
    A[:, 1, 0] = -x * (1 - x) - g * x ** 2
    A[:, 1, 1] = b * (1 - 2 * x)
    A[:, 1, 2] = b ** 2
    A[:, 2, 0] = x ** 2 - g * x ** 2
    A[:, 2, 1] = -2 * b * x
    A[:, 2, 2] = b ** 2
    return float(np.max(np.abs(np.linalg.eigvals(A))))


def stability(spectrum: Spectrum, lr: float, momentum: float, batch_size: int, dataset_size: int | None = None,
              tau1: float = 1.0, tau2: float = 1.0) -> Stability:
    """Convergence verdict (Velikanov et al. 2023, §5: Prop. 3, Eq. 21, Eq. 24 / Prop. 10).

    Converges iff the noiseless condition holds and ``U~(1) < 1``. Otherwise the divergence is exponential; for
    eventual divergence the radius ``r in (0, 1)`` solves ``U~(r) = 1`` and ``L_t ~ V~(r)/(2 r U~'(r)) r^-t``
    (Eq. 24); for immediate divergence the growth factor per step is at least the spectral radius of the worst
    mode's 3x3 map and the first singularity of ``L~`` is searched on (0, 1).
    """
    _check_hyper(lr, momentum, tau1, tau2)
    gamma = noise_amplitude(batch_size, dataset_size)
    crit = critical_learning_rate(spectrum, momentum, batch_size, dataset_size, tau1, tau2)
    ns = noiseless_stable(spectrum, lr, momentum)
    U1 = float(noise_at_one(spectrum, lr, momentum, gamma, tau1, tau2)) if abs(momentum) < 1 else math.inf
    base = {"lr": float(lr), "momentum": float(momentum), "gamma": gamma,
            "effective_lr": effective_learning_rate(lr, momentum), "noise_at_one": U1, "critical_lr": crit,
            "noiseless_stable": ns}
    if ns and U1 < 1:
        return Stability(True, "converges", **base, reason=f"noiseless condition holds and U(1) = {U1:.4g} < 1")
    if not ns:
        rho = _mode_growth(spectrum, lr, momentum, gamma, tau2) if abs(momentum) < 1 else math.inf
        r = 1.0 / rho if rho > 0 else None
        tdiv = 1.0 / math.log(rho) if rho > 1 else math.inf
        return Stability(False, "immediate divergence", **base, radius=r, growth_rate=rho, divergence_time=tdiv,
                         reason=(f"alpha*lambda_max = {lr * spectrum.lambda_max:.4g} violates the noiseless bound "
                                 f"2(1+beta) = {2 * (1 + momentum):.4g} (or |beta| >= 1)"))

    def f(z: float) -> float:
        return float(np.real(noise_generating_function(spectrum, z, lr, momentum, gamma, tau1, tau2))) - 1.0

    hi = 1.0 - 1e-15
    # S(x, z) > 0 on (0, 1) inside the noiseless region (Velikanov et al. 2023, Lemma 1), so U~ is finite and increasing there.
    if f(hi) < 0:  # U~(1) >= 1 only because some D_k <= 0: the pole sits at z = 1 exactly; treat as r -> 1
        r = hi
    else:
        r = float(optimize.brentq(f, 1e-12, hi, xtol=1e-15, rtol=1e-14))
    h = 1e-20 * max(r, 1e-3)
    dU = float(np.imag(noise_generating_function(spectrum, r + 1j * h, lr, momentum, gamma, tau1, tau2)) / h)
    Vr = float(np.real(signal_generating_function(spectrum, r, lr, momentum, gamma, tau2)))
    const = Vr / (2 * r * dU) if dU > 0 else None
    rate = 1.0 / r
    tdiv = 1.0 / math.log(rate) if rate > 1 else math.inf
    return Stability(False, "eventual divergence", **base, radius=r, growth_rate=rate, divergence_time=tdiv,
                     divergence_constant=const,
                     reason=f"noiseless condition holds but U(1) = {U1:.4g} >= 1 (sampling noise accumulates)")


def stability_map(spectrum: Spectrum, lrs: Any, momenta: Any, batch_size: int, dataset_size: int | None = None,
                  tau1: float = 1.0, tau2: float = 1.0, max_elements: int = 8_000_000) -> dict[str, np.ndarray]:
    """Theory stability over the product grid ``momenta x lrs`` (shape (len(momenta), len(lrs))): ``U~(1)``,
    ``noiseless`` (bool), ``converges`` (bool), and the critical lr per momentum (Velikanov et al. 2023, Fig. 2 overlays)."""
    lrs = np.asarray(lrs, dtype=float)
    momenta = np.asarray(momenta, dtype=float)
    gamma = noise_amplitude(batch_size, dataset_size)
    Lg, Bg = np.meshgrid(lrs, momenta)
    U = np.empty(Lg.size)
    flat_l, flat_b = Lg.ravel(), Bg.ravel()
    chunk = max(1, max_elements // spectrum.size)
    for i in range(0, U.size, chunk):
        U[i:i + chunk] = noise_at_one(spectrum, flat_l[i:i + chunk], flat_b[i:i + chunk], gamma, tau1, tau2)
    U = U.reshape(Lg.shape)
    noiseless = (np.abs(Bg) < 1) & (Lg * spectrum.lambda_max < 2 * (1 + Bg)) & (Lg > 0)
    crit = np.array([critical_learning_rate(spectrum, b, batch_size, dataset_size, tau1, tau2) for b in momenta])
    return {"lrs": lrs, "momenta": momenta, "noise_at_one": U, "noiseless": noiseless,
            "converges": noiseless & (U < 1), "critical_lr": crit}

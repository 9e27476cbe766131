"""Power-law spectra: fits, phases and loss asymptotics.

Velikanov et al. 2023, §6, Eq. 25, Thm. 2, Eqs. 28a-28b, Eq. 29.

Least-squares log-log fits of ``lambda_k ~ Lambda k^-nu`` and ``sum_{l>=k} c_l ~ K k^-kappa``
(:func:`fit_power_law`, a :class:`PowerLawFit`), the phase of a power law (signal- or noise-dominated,
:func:`power_law_phase`), the large-t loss ``C_signal t^-zeta + C_noise t^-xi`` (:func:`asymptotic_loss`, an
:class:`Asymptotics`) and the time where the two terms cross (:func:`transition_time`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import special

from optiscope.theory.sgd.critical import noiseless_stable
from optiscope.theory.sgd.generating import noise_at_one, signal_at_one
from optiscope.theory.sgd.recursion import effective_learning_rate, noise_amplitude
from optiscope.theory.sgd.spectrum import Spectrum, SpectrumError

__all__ = [
    "Asymptotics",
    "PowerLawFit",
    "asymptotic_loss",
    "fit_power_law",
    "power_law_phase",
    "transition_time",
]


@dataclass
class PowerLawFit:
    """``lambda_k ~ Lambda k^-nu`` and ``sum_{l>=k} c_l ~ K k^-kappa`` (Velikanov et al. 2023, Eq. 25) fitted by least squares in
    log-log coordinates on the stated index ranges (1-based k)."""

    nu: float
    Lambda: float
    kappa: float
    K: float
    eig_range: tuple[int, int]
    coef_range: tuple[int, int]
    eig_r2: float
    coef_r2: float

    @property
    def zeta(self) -> float:
        """``zeta = kappa / nu``: the exponent of the signal-dominated loss decay ``t^-zeta``
        (Velikanov et al. 2023, §6)."""
        return self.kappa / self.nu

    def to_dict(self) -> dict[str, Any]:
        """The fitted exponents, constants, index ranges and R^2 values as a JSON-ready dict."""
        return {"nu": self.nu, "Lambda": self.Lambda, "kappa": self.kappa, "K": self.K, "zeta": self.zeta,
                "eig_range": list(self.eig_range), "coef_range": list(self.coef_range),
                "eig_r2": self.eig_r2, "coef_r2": self.coef_r2}


def _loglog_fit(k: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    lx, ly = np.log(k), np.log(y)
    slope, intercept = np.polyfit(lx, ly, 1)
    pred = slope * lx + intercept
    ss = np.sum((ly - ly.mean()) ** 2)
    r2 = 1 - np.sum((ly - pred) ** 2) / ss if ss > 0 else 1.0
    return float(slope), float(intercept), float(r2)


def fit_power_law(spectrum: Spectrum, eig_range: tuple[int, int] | None = None,
                  coef_range: tuple[int, int] | None = None) -> PowerLawFit:
    """Fit nu, Lambda on ``lambda_k`` and kappa, K on the tail sums ``T_k = sum_{l>=k} c_l`` (Velikanov et al. 2023, Eq. 25;
    partial sums, not c_k, define kappa). Default ranges: ``[5, min(300, n/2)]`` for the eigenvalues and
    ``[10, min(310, n/2)]`` for the tail sums (the authors' notebook), clipped to the spectrum."""
    if spectrum.multiplicities is not None:
        raise SpectrumError("fit_power_law needs a spectrum without multiplicities (one entry per mode)")
    n = spectrum.size
    if n < 8:
        raise SpectrumError(f"need at least 8 modes to fit a power law, got {n}")

    def rng(r, default):
        lo, hi = r if r is not None else default
        lo, hi = max(1, int(lo)), min(n, int(hi))
        if hi - lo < 3:
            lo, hi = max(1, n // 10), max(4, n // 2)
        return lo, hi

    er = rng(eig_range, (5, min(300, n // 2)))
    cr = rng(coef_range, (10, min(310, n // 2)))
    k = np.arange(1, n + 1, dtype=float)
    lam = spectrum.eigenvalues
    tail = np.cumsum(spectrum.coefficients[::-1])[::-1]
    se = slice(er[0] - 1, er[1])
    sc = slice(cr[0] - 1, cr[1])
    if np.any(lam[se] <= 0) or np.any(tail[sc] <= 0):
        raise SpectrumError("cannot fit a power law: zero eigenvalues or zero tail sums in the fit range")
    s1, i1, r1 = _loglog_fit(k[se], lam[se])
    s2, i2, r2 = _loglog_fit(k[sc], tail[sc])
    return PowerLawFit(nu=-s1, Lambda=math.exp(i1), kappa=-s2, K=math.exp(i2), eig_range=er, coef_range=cr,
                       eig_r2=r1, coef_r2=r2)


def power_law_phase(nu: float, kappa: float) -> dict[str, Any]:
    """Phase diagram (Velikanov et al. 2023, §6, Fig. 3): nu <= 1/2 immediate divergence (``sum lambda^2 = inf``); 1/2 < nu <= 1
    eventual divergence (``sum lambda = inf`` so ``U~(1) = inf``); nu > 1 converges with ``L_t ~ t^-min(zeta, xi)``,
    ``zeta = kappa/nu``, ``xi = 2 - 1/nu``: signal-dominated if zeta < xi, noise-dominated if zeta > xi."""
    if not (nu > 0 and kappa > 0):
        raise SpectrumError(f"nu and kappa must be > 0, got nu={nu}, kappa={kappa}")
    zeta = kappa / nu
    xi = 2 - 1 / nu
    if nu <= 0.5:
        phase = "immediate divergence"
    elif nu <= 1:
        phase = "eventual divergence"
    elif abs(zeta - xi) < 1e-12:
        phase = "boundary"
    else:
        phase = "signal-dominated" if zeta < xi else "noise-dominated"
    exponent = min(zeta, xi) if nu > 1 else None
    return {"phase": phase, "zeta": zeta, "xi": xi, "exponent": exponent}


@dataclass
class Asymptotics:
    """Late-time loss ``L_t ~ C_signal t^-zeta + C_noise t^-xi`` (Velikanov et al. 2023, Thm. 2, Eqs. 28a-28b)."""

    phase: str
    zeta: float
    xi: float
    exponent: float
    C_signal: float
    C_noise: float
    transition_time: float | None

    def loss(self, t: Any) -> np.ndarray:
        """``C_signal t^-zeta + C_noise t^-xi`` at the step(s) ``t``."""
        t = np.asarray(t, dtype=float)
        return self.C_signal * t ** (-self.zeta) + self.C_noise * t ** (-self.xi)

    def to_dict(self) -> dict[str, Any]:
        """The phase, exponents, constants and transition time as a JSON-ready dict (non-finite -> ``None``)."""
        d = dict(self.__dict__)
        if d["transition_time"] is not None and not math.isfinite(d["transition_time"]):
            d["transition_time"] = None
        return d


def asymptotic_loss(spectrum: Spectrum, lr: float, momentum: float, batch_size: int, nu: float, kappa: float,
                    Lambda: float = 1.0, K: float = 1.0, dataset_size: int | None = None, tau1: float = 1.0,
                    tau2: float = 1.0) -> Asymptotics:
    """Constants of Eqs. 28a/28b (Velikanov et al. 2023, §6)::

        C_signal = K Gamma(zeta + 1) / (2 (1 - U~(1)) (2 Lambda alpha_eff)^zeta)
        C_noise  = gamma tau1 Lambda^(1/nu) Gamma(2 - 1/nu) V~(1) alpha_eff^2 / (2 nu (1 - U~(1))^2 (2 alpha_eff)^xi)

    U~(1), V~(1) from the given (finite) spectrum; (nu, kappa, Lambda, K) its power-law description. Raises when
    the configuration does not converge (ask :func:`stability`).
    """
    gamma = noise_amplitude(batch_size, dataset_size)
    ph = power_law_phase(nu, kappa)
    if ph["exponent"] is None:
        raise SpectrumError(f"no convergent asymptotics in phase {ph['phase']!r} (nu = {nu})")
    U1 = float(noise_at_one(spectrum, lr, momentum, gamma, tau1, tau2))
    if not (U1 < 1 and noiseless_stable(spectrum, lr, momentum)):
        raise SpectrumError(f"configuration diverges (U(1) = {U1:.4g}); asymptotics need a convergent one")
    V1 = signal_at_one(spectrum, lr, momentum, gamma, tau2)
    ae = effective_learning_rate(lr, momentum)
    zeta, xi = ph["zeta"], ph["xi"]
    Cs = K * special.gamma(zeta + 1) / (2 * (1 - U1) * (2 * Lambda * ae) ** zeta)
    Cn = (gamma * tau1 * Lambda ** (1 / nu) * special.gamma(2 - 1 / nu) * V1 * ae ** 2
          / (2 * nu * (1 - U1) ** 2 * (2 * ae) ** xi))
    tt = transition_time(Cs, Cn, zeta, xi)
    return Asymptotics(ph["phase"], zeta, xi, ph["exponent"], float(Cs), float(Cn), tt)


def transition_time(C_signal: float, C_noise: float, zeta: float, xi: float) -> float | None:
    """Signal-to-noise transition (Velikanov et al. 2023, §6, Eq. 29): the t at which ``C_signal t^-zeta = C_noise t^-xi``,
    ``t = (C_signal / C_noise)^(1/(zeta - xi))``; ``None`` when zeta = xi or a constant vanishes."""
    if not (0 < C_noise < math.inf and 0 < C_signal < math.inf) or abs(zeta - xi) < 1e-14:
        return None
    log_t = math.log(C_signal / C_noise) / (zeta - xi)
    return math.exp(log_t) if log_t < 700 else math.inf

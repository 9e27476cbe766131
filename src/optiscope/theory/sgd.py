"""Mini-batch SGD with momentum through generating functions (Velikanov et al. 2023).

Setting (Velikanov et al. 2023, §2, Prop. 6, output-space form). A linear model in output space: kernel ``K`` (N x N) on a
dataset of size N, error ``e_t = f_t - y`` and loss ``L_t = (1/2N) E||e_t||^2``. With ``H_f = K / N`` and its
eigenpairs ``(lambda_k, u_k)`` the initial error has output-space second moments ``c_k = (u_k . e_0)^2 / N`` so
that ``L_0 = (1/2) sum_k c_k``. SGD with heavy-ball momentum (seed Eq. 1), batch of size b drawn uniformly
without replacement, fresh each step::

    p_{t+1} = beta p_t + g_t,   e_{t+1} = e_t - alpha p_{t+1},   g_t = (1/b) K[:, B_t] e_t[B_t]

(identical to ``torch.optim.SGD(lr=alpha, momentum=beta)``). Effective learning rate ``alpha_eff = alpha/(1-beta)``.
Noise amplitude ``gamma = (N - b) / (b (N - 1))`` (finite dataset), ``gamma = 1/b`` (infinite dataset).

Spectrally expressible (SE) approximation (Velikanov et al. 2023, §3, Eq. 7 and Eq. 65): the noise added to mode k is
``gamma alpha^2 lambda_k^2 (tau1 sum_l C_l - tau2 C_k)``. Everything here is a function of a :class:`Spectrum`
(eigenvalues, coefficients, optional multiplicities) and the hyper-parameters; the recursion runs in torch
(vectorised over eigenvalues and over a grid of (lr, momentum)), the rest is numpy/scipy.

Conventions chosen where the paper leaves a detail open (documented per function): immediate divergence means the
noiseless condition fails (or ``sum lambda^2 = inf`` for a power law with nu <= 1/2); the synthetic power law
uses exact tail sums ``sum_{l>=k} c_l = K k^-kappa``; Prop. 5 uses output-space ``c_k`` (the paper's two forms differ; this one is used).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import optimize, special

__all__ = [
    "Advice",
    "Asymptotics",
    "LossCurve",
    "PowerLawFit",
    "Spectrum",
    "SpectrumError",
    "Stability",
    "advise",
    "asymptotic_loss",
    "characteristic_polynomial",
    "critical_learning_rate",
    "critical_regularization",
    "effective_learning_rate",
    "effective_lr_bound",
    "fit_power_law",
    "log_constant_momentum_derivative",
    "loss_generating_function",
    "negative_momentum_criterion",
    "noise_amplitude",
    "noise_at_one",
    "noise_generating_function",
    "noiseless_critical_lr", "momentum_sharpness_threshold",
    "noiseless_stable",
    "optimal_lr_noise_dominated",
    "optimal_lr_signal_dominated",
    "power_law_phase",
    "se_loss_curve",
    "se_loss_grid",
    "signal_at_one",
    "signal_generating_function",
    "stability",
    "stability_map",
    "transition_time",
]


#: torch intra-op threads used by the recursions and simulators (elementwise work on <= 1e6 entries gains little
#: from more threads, and on an oversubscribed machine spinning worker threads cost 10-50x); override with the
#: environment variable OPTISCOPE_THEORY_THREADS.
TORCH_THREADS = int(os.environ.get("OPTISCOPE_THEORY_THREADS", "1"))


def torch_threads(n: int | None = None):
    """Temporarily set torch's intra-op thread count (default :data:`TORCH_THREADS`; restored afterwards)."""
    from optiscope.utils.threads import limit_threads

    return limit_threads(TORCH_THREADS if n is None else int(n))


class SpectrumError(ValueError):
    """A spectrum or hyper-parameter is invalid; the message names the problem."""


# ------------------------------------------------------------------------------------------------ spectrum
@dataclass(frozen=True)
class Spectrum:
    """Eigenvalues ``lambda_k`` (sorted descending), output-space initial moments ``c_k`` (``L_0 = sum c_k / 2``)
    and optional multiplicities ``m_k`` (a mode standing for ``m_k`` modes with the same eigenvalue; their ``c``
    summed). ``scale`` records a normalisation factor applied to the eigenvalues (``lr_true = lr / scale``).
    """

    eigenvalues: np.ndarray
    coefficients: np.ndarray
    multiplicities: np.ndarray | None = None
    name: str = "spectrum"
    scale: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lam = np.asarray(self.eigenvalues, dtype=np.float64)
        c = np.asarray(self.coefficients, dtype=np.float64)
        if lam.ndim != 1 or c.ndim != 1:
            raise SpectrumError(f"eigenvalues and coefficients must be 1-D, got shapes {lam.shape} and {c.shape}")
        if lam.size == 0:
            raise SpectrumError("spectrum is empty")
        if lam.shape != c.shape:
            raise SpectrumError(f"length mismatch: {lam.size} eigenvalues but {c.size} coefficients")
        if not np.all(np.isfinite(lam)):
            raise SpectrumError("eigenvalues contain non-finite values")
        if not np.all(np.isfinite(c)):
            raise SpectrumError("coefficients contain non-finite values")
        if np.any(lam < 0):
            raise SpectrumError(f"eigenvalues must be >= 0; found {int(np.sum(lam < 0))} negative (min {lam.min():.3g})")
        if np.any(c < 0):
            raise SpectrumError(f"coefficients c_k are second moments and must be >= 0; min is {c.min():.3g}")
        if not np.any(lam > 0):
            raise SpectrumError("all eigenvalues are zero")
        m = None
        if self.multiplicities is not None:
            m = np.asarray(self.multiplicities, dtype=np.float64)
            if m.shape != lam.shape or not np.all(np.isfinite(m)) or np.any(m <= 0):
                raise SpectrumError("multiplicities must be positive, finite and as long as the eigenvalues")
        order = np.argsort(-lam, kind="stable")
        object.__setattr__(self, "eigenvalues", lam[order])
        object.__setattr__(self, "coefficients", c[order])
        object.__setattr__(self, "multiplicities", None if m is None else m[order])
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise SpectrumError(f"scale must be positive and finite, got {self.scale}")

    # -- constructors -----------------------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, eigenvalues: Sequence[float], coefficients: Sequence[float], name: str = "arrays",
                    multiplicities: Sequence[float] | None = None) -> Spectrum:
        """A spectrum from explicit eigenvalues ``lambda_k`` (sorted descending inside) and target coefficients
        ``c_k`` (optional ``multiplicities`` ``m_k``, default 1 each)."""
        return cls(np.asarray(eigenvalues), np.asarray(coefficients), multiplicities=multiplicities, name=name)

    @classmethod
    def from_kernel(cls, kernel: Any, targets: Any, initial_outputs: Any = None, normalize: bool = False,
                    name: str = "kernel") -> Spectrum:
        """Eigendecomposition of ``H_f = K / N`` (Velikanov et al. 2023, Prop. 6, Eqs. 47-56, output space): ``lambda_k`` its
        eigenvalues, ``c_k = sum_o (u_k . e_0[:, o])^2 / N`` with ``e_0 = f_0 - y`` (``f_0 = 0`` by default), so
        ``L_0 = (1/2N) ||e_0||^2 = sum_k c_k / 2``. ``normalize=True`` divides the eigenvalues by the largest (the
        authors' code convention, lr in units of ``1/lambda_max``) and records it in ``scale``.
        """
        K = np.asarray(kernel, dtype=np.float64)
        if K.ndim != 2 or K.shape[0] != K.shape[1]:
            raise SpectrumError(f"kernel must be a square matrix, got shape {K.shape}")
        n = K.shape[0]
        if not np.all(np.isfinite(K)):
            raise SpectrumError("kernel contains non-finite values")
        if not np.allclose(K, K.T, rtol=1e-6, atol=1e-8 * max(1.0, np.abs(K).max())):
            raise SpectrumError("kernel is not symmetric")
        e0 = _initial_error(targets, initial_outputs, n)
        lam, U = np.linalg.eigh(0.5 * (K + K.T) / n)
        tol = 1e-9 * max(abs(lam).max(), 1e-300)
        if lam.min() < -max(tol, 1e-12):
            raise SpectrumError(f"kernel is not positive semi-definite: eigenvalue {lam.min():.3g} of K/N")
        lam = np.clip(lam, 0.0, None)
        proj = U.T @ e0
        c = np.sum(proj ** 2, axis=1) / n
        scale = 1.0
        if normalize:
            scale = float(lam.max())
            lam = lam / scale
        return cls(lam, c, name=name, scale=scale, meta={"dataset_size": n})

    @classmethod
    def power_law(cls, nu: float, kappa: float, count: int, scale: float = 1.0, amplitude: float = 1.0
                  ) -> Spectrum:
        """Synthetic power law (Velikanov et al. 2023, §6, Eq. 25): ``lambda_k = Lambda k^-nu`` and exact tail sums
        ``sum_{l>=k} c_l = K k^-kappa`` for the infinite sequence, i.e. ``c_k = K (k^-kappa - (k+1)^-kappa)``,
        k = 1..count (``Lambda`` = ``scale`` in the eigenvalues, ``K`` = ``amplitude``).
        """
        if not (np.isfinite(nu) and nu > 0):
            raise SpectrumError(f"power law nu must be > 0, got {nu}")
        if not (np.isfinite(kappa) and kappa > 0):
            raise SpectrumError(f"power law kappa must be > 0 (finite initial loss), got {kappa}")
        if int(count) != count or count < 1:
            raise SpectrumError(f"power law count must be a positive integer, got {count}")
        if not (scale > 0 and amplitude > 0):
            raise SpectrumError("power law scale and amplitude must be > 0")
        k = np.arange(1, int(count) + 1, dtype=np.float64)
        lam = scale * k ** (-nu)
        c = amplitude * (k ** (-kappa) - (k + 1.0) ** (-kappa))
        return cls(lam, c, name=f"powerlaw(nu={nu:g},kappa={kappa:g},n={int(count)})",
                   meta={"nu": float(nu), "kappa": float(kappa), "Lambda": float(scale), "K": float(amplitude)})

    @classmethod
    def from_file(cls, path: str | Path) -> Spectrum:
        """An ``.npz`` holding arrays ``eigenvalues`` and ``coefficients`` (optionally ``multiplicities``)."""
        path = Path(path)
        if not path.exists():
            raise SpectrumError(f"spectrum file {path} does not exist")
        with np.load(path) as z:
            missing = [k for k in ("eigenvalues", "coefficients") if k not in z.files]
            if missing:
                raise SpectrumError(f"spectrum file {path} lacks array(s) {missing}; it has {z.files}")
            mult = z["multiplicities"] if "multiplicities" in z.files else None
            return cls(z["eigenvalues"], z["coefficients"], multiplicities=mult, name=path.name)

    # -- properties -------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Number of modes ``k`` in the spectrum."""
        return int(self.eigenvalues.size)

    @property
    def weights(self) -> np.ndarray:
        """Multiplicities (ones when not set)."""
        return np.ones_like(self.eigenvalues) if self.multiplicities is None else self.multiplicities

    @property
    def initial_loss(self) -> float:
        """``L_0 = (1/2) sum_k c_k``: the loss at the initial point (zero predictor)."""
        return 0.5 * float(self.coefficients.sum())

    @property
    def lambda_max(self) -> float:
        """The largest eigenvalue ``lambda_1`` (the noiseless stability limit is ``2 (1 + beta) / lambda_1``)."""
        return float(self.eigenvalues[0])

    def coarsened(self, n_bins: int) -> Spectrum:
        """Merge modes into ``n_bins`` log-spaced eigenvalue bins (c summed, multiplicities summed, eigenvalue =
        multiplicity-weighted mean). Exact for equal eigenvalues, an approximation otherwise (used by ``advise``)."""
        lam, c, m = self.eigenvalues, self.coefficients, self.weights
        pos = lam > 0
        if self.size <= n_bins:
            return self
        edges = np.geomspace(lam[pos].min(), lam.max(), n_bins + 1)
        idx = np.clip(np.searchsorted(edges, lam, side="right") - 1, 0, n_bins - 1)
        idx = np.where(pos, idx, -1)
        keep = []
        L, Cc, M = [], [], []
        for b in np.unique(idx):
            sel = idx == b
            mm = m[sel].sum()
            L.append(float((lam[sel] * m[sel]).sum() / mm))
            Cc.append(float(c[sel].sum()))
            M.append(float(mm))
            keep.append(b)
        return Spectrum(np.array(L), np.array(Cc), multiplicities=np.array(M), name=f"{self.name}[binned {n_bins}]",
                        scale=self.scale, meta=dict(self.meta))


def _initial_error(targets: Any, initial_outputs: Any, n: int) -> np.ndarray:
    y = np.asarray(targets, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[0] != n:
        raise SpectrumError(f"targets must have {n} rows (one per kernel row), got shape {np.shape(targets)}")
    if not np.all(np.isfinite(y)):
        raise SpectrumError("targets contain non-finite values")
    if initial_outputs is None:
        return -y
    f0 = np.asarray(initial_outputs, dtype=np.float64).reshape(y.shape[0], -1)
    if f0.shape != y.shape:
        raise SpectrumError(f"initial_outputs shape {f0.shape} does not match targets {y.shape}")
    if not np.all(np.isfinite(f0)):
        raise SpectrumError("initial_outputs contain non-finite values")
    return f0 - y


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


# ---------------------------------------------------------------------------------------- SE recursion
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


# ---------------------------------------------------------------------------------- generating functions
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


# -------------------------------------------------------------------------------------------- stability
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
    # S(x, z) > 0 on (0, 1) inside the noiseless region (seed Lemma 1), so U~ is finite and increasing there.
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


# ------------------------------------------------------------------------------------------- power laws
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


# ---------------------------------------------------------------------------------------------- advise
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

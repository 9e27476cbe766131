"""The spectrum of the problem (Velikanov et al. 2023, §2, Prop. 6, Eqs. 47-56, output-space form; §6, Eq. 25).

A :class:`Spectrum` holds the eigenvalues ``lambda_k`` of ``H_f = K / N``, the output-space second moments
``c_k = (u_k . e_0)^2 / N`` of the initial error (so ``L_0 = (1/2) sum_k c_k``) and optional multiplicities. It is
built from arrays, from a kernel and targets (eigendecomposition), from an exact synthetic power law
``lambda_k = Lambda k^-nu``, ``sum_{l>=k} c_l = K k^-kappa`` (Eq. 25), or from a saved file, and can be coarsened
into log-spaced bins. Also here: :class:`SpectrumError`, and the torch thread setting :data:`TORCH_THREADS` /
:func:`torch_threads` used by the recursions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TORCH_THREADS", "Spectrum", "SpectrumError", "torch_threads"]


TORCH_THREADS = int(os.environ.get("OPTISCOPE_THEORY_THREADS", "1"))


def torch_threads(n: int | None = None):
    """Temporarily set torch's intra-op thread count (default :data:`TORCH_THREADS`; restored afterwards)."""
    from optiscope.utils.threads import limit_threads

    return limit_threads(TORCH_THREADS if n is None else int(n))


class SpectrumError(ValueError):
    """A spectrum or hyper-parameter is invalid; the message names the problem."""


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

"""Stochastic trace estimators for any symmetric linear operator given as a batched product ``X -> (A X^T)^T``.

Each estimator takes ``matmat`` (rows in, rows out: ``[B, n] -> [B, n]``), the dimension ``n``, a budget of
``n_matvec`` products, a ``torch.Generator``, and the operator's dtype and device; it returns a
:class:`TraceResult` with the estimate, its standard error and the products spent. ``Hessian.trace`` is the front
door; the functions work on any operator (a preconditioned Hessian, a GGN, a dense matrix).

* Hutchinson (Hutchinson 1989): ``tr A ~ mean_k z_k^T A z_k`` with Rademacher ``z_k``; per-probe variance
  ``2 (||A||_F^2 - sum_i A_ii^2)``, best on flat spectra.
* Hutch++ (Meyer, Musco, Musco, Woodruff 2021): ``m/3`` products sketch ``Q = orth(A S)``, ``m/3`` give
  ``tr(Q^T A Q)`` exactly, the rest run Hutchinson on ``(I - QQ^T) A (I - QQ^T)``; best on low-rank spectra, about
  3x the variance of Hutchinson on flat ones.
* XTrace (Epperly, Tropp, Webber 2024, Alg. 2 with the improved normalisation of §2.3): ``m/2`` test vectors each
  used both in the sketch and as a Hutchinson probe, by leaving it out of the sketch (exchangeability).
* ``adaptive`` (this package): Hutchinson or XTrace chosen by a variance test on the first ``k = m/2``
  Rademacher probes, which serve both as Hutchinson samples and as XTrace's test vectors and sketch, so no product
  is wasted. The test compares the predicted variance of Hutchinson with all ``m`` probes, ``s_q^2 / m``
  (``s_q^2`` the sample variance of ``z_i^T A z_i``), with that of XTrace, ``2 tau / k``, where
  ``tau = mean_i ||(I - P_{-i}) A z_i||^2 = mean_i 1 / [G^{-1}]_ii`` (``G = Y^T Y``, ``Y = A Z``) is the
  leave-one-out estimate of the energy outside the sketch that XTrace's residual probes see, ``P_{-i}`` the
  projector on the span of the other sketch columns (the distance from ``y_i`` to that span is
  ``1 / sqrt([G^{-1}]_ii)``). The choice depends on second moments only, not on the estimate itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_TRACE_METHOD",
    "TRACE_METHODS",
    "TraceResult",
    "adaptive_trace",
    "hutchinson_trace",
    "hutchpp_trace",
    "trace_estimate",
    "xtrace",
]

MatMat = Callable[[Tensor], Tensor]

TRACE_METHODS = ("adaptive", "hutchinson", "hutch++", "xtrace")
#: Chosen from the measurements in ``docs/benchmarks.md`` (flat and low-rank spectra, four network Hessians).
DEFAULT_TRACE_METHOD = "adaptive"
MIN_MATVEC = {"hutchinson": 2, "hutch++": 4, "xtrace": 4, "adaptive": 2}


@dataclass
class TraceResult:
    """A trace estimate: ``value``, its standard error, products spent, method; ``choice`` for ``adaptive``."""
    value: float
    stderr: float
    n_hvp: int
    method: str
    choice: str | None = None


def _rademacher(rows: int, n: int, g: torch.Generator, dtype: torch.dtype, device) -> Tensor:
    return (torch.randint(0, 2, (rows, n), generator=g).to(dtype) * 2 - 1).to(device)


def _rows(matmat: MatMat, X: Tensor, dtype: torch.dtype) -> Tensor:
    """``matmat`` on float64 rows ``X`` (cast to the operator's dtype), returned in float64."""
    return matmat(X.to(dtype).contiguous()).double()


def _mean_se(q: Tensor) -> tuple[float, float]:
    q = q.double().cpu()
    se = float(q.std(unbiased=True) / math.sqrt(q.numel())) if q.numel() > 1 else math.inf
    return float(q.mean()), se


def hutchinson_trace(matmat: MatMat, n: int, n_matvec: int, g: torch.Generator, dtype: torch.dtype,
                     device) -> TraceResult:
    """Hutchinson: ``mean_k z_k^T A z_k`` over ``n_matvec`` Rademacher probes; stderr = sample std / sqrt(m)."""
    Z = _rademacher(n_matvec, n, g, torch.float64, device)
    q = (Z * _rows(matmat, Z, dtype)).sum(1)
    v, se = _mean_se(q)
    return TraceResult(v, se, n_matvec, "hutchinson")


def _hutchpp_from_sketch(matmat: MatMat, Y: Tensor, n_rest: int, n: int, g: torch.Generator, dtype, device):
    """Hutch++ given the sketch rows ``Y = (A S)^T``: exact part on ``Q = orth(Y^T)`` plus residual Hutchinson."""
    Q, _ = torch.linalg.qr(Y.T)  # [n, s]
    AQ = _rows(matmat, Q.T, dtype)  # [s, n]
    head = float((Q.T * AQ).sum())
    G = _rademacher(n_rest, n, g, torch.float64, device)
    G = G - (G @ Q) @ Q.T
    q = (G * _rows(matmat, G, dtype)).sum(1)
    tail, se = _mean_se(q)
    return head + tail, se


def hutchpp_trace(matmat: MatMat, n: int, n_matvec: int, g: torch.Generator, dtype: torch.dtype,
                  device) -> TraceResult:
    """Hutch++ with ``m/3`` sketch columns, ``m/3`` exact products and ``m - 2 m/3`` residual probes. Unbiased;
    stderr is that of the residual Hutchinson term (the deflated part is exact given ``Q``)."""
    s = max(1, n_matvec // 3)
    S = _rademacher(s, n, g, torch.float64, device)
    Y = _rows(matmat, S, dtype)
    v, se = _hutchpp_from_sketch(matmat, Y, n_matvec - 2 * s, n, g, dtype, device)
    return TraceResult(v, se, n_matvec, "hutch++")


def xtrace(matmat: MatMat, n: int, n_matvec: int, g: torch.Generator, dtype: torch.dtype, device) -> TraceResult:
    """XTrace (Epperly, Tropp, Webber 2024, Alg. 2, improved normalisation of §2.3): ``k = m/2`` test vectors
    ``omega_i = sqrt(n) u_i`` (``u_i`` uniform on the sphere), ``Y = A Omega = QR``; estimate ``i`` is
    ``tr(Q_i^T A Q_i) + omega_i^T (I - Q_i Q_i^T) A (I - Q_i Q_i^T) omega_i`` with ``Q_i`` the basis of the sketch
    without column ``i`` (computed by downdating ``Q``), rescaled so the residual probe is isotropic on the
    complement; the result is the mean of the ``k`` exchangeable estimates, stderr their std / sqrt(k)."""
    k = _xtrace_vectors(n, n_matvec)
    Om = torch.randn(n, k, generator=g, dtype=torch.float64).to(device)
    Om = math.sqrt(n) * Om / Om.norm(dim=0, keepdim=True)
    Y = _rows(matmat, Om.T, dtype).T  # [n, k]
    return _xtrace_from_sketch(matmat, Om, Y, dtype, improved=True, method="xtrace")


def _xtrace_vectors(n: int, n_matvec: int) -> int:
    return max(1, min(n_matvec // 2, n - 1))


def _xtrace_from_sketch(matmat: MatMat, Om: Tensor, Y: Tensor, dtype: torch.dtype, improved: bool,
                        method: str) -> TraceResult:
    """The XTrace estimates from test vectors ``Om`` [n, k] and ``Y = A Om`` (costs ``k`` more products)."""
    n, k = Om.shape
    Q, R = torch.linalg.qr(Y)
    W = Q.T @ Om
    eye = torch.eye(k, dtype=torch.float64, device=Om.device)
    M = eye - torch.linalg.solve(R.T, torch.triu(R, 1).T).T  # I - triu(R, 1) R^{-1}
    S = (M / M.norm(dim=1, keepdim=True)).T  # rows normalised, then transposed: unit columns
    diag = lambda A, B: (A * B).sum(0)
    if improved:
        scale = math.sqrt(n - k + 1) / torch.sqrt(n - W.norm(dim=0) ** 2 + (diag(S, W).abs() * S.norm(dim=0)) ** 2)
        Om, R, Y, W = Om * scale, R * scale, Y * scale, W * scale
    Z = _rows(matmat, Q.T, dtype).T  # [n, k]
    Hq = Q.T @ Z
    HW = Hq @ W
    T = Z.T @ Om
    dSW, dSHS = diag(W, S), diag(S, Hq @ S)
    dOmY, dWR = diag(Om, Y), diag(W, R)
    dTW, dWHW = diag(T, W), diag(W, HW)
    dSRmHW, dTmHRS = diag(S, R - HW), diag(T - Hq.T @ W, S)
    ests = (torch.trace(Hq) - dSHS + dOmY - dWR - dTW + dWHW + dSW * dSRmHW + dSW ** 2 * dSHS + dTmHRS * dSW)
    v, se = _mean_se(ests)
    return TraceResult(v, se, 2 * k, method)


def _loo_tail_energy(Y: Tensor) -> float:
    """``mean_k ||(I - P_{-k}) y_k||^2`` for the rows ``y_k`` of ``Y`` (``P_{-k}``: projector on the others)."""
    G = Y @ Y.T
    evals, evecs = torch.linalg.eigh(G)
    floor = 1e-12 * float(evals.abs().max().clamp_min(1e-300))
    inv_diag = (evecs ** 2 / evals.clamp_min(floor)).sum(1)  # [G^{-1}]_kk
    return float((1.0 / inv_diag).mean())


def adaptive_trace(matmat: MatMat, n: int, n_matvec: int, g: torch.Generator, dtype: torch.dtype,
                   device) -> TraceResult:
    """Hutchinson or XTrace, chosen by the variance test of the module docstring, at the same budget ``m``.

    The first ``k = m/2`` Rademacher probes ``Z`` give ``Y = A Z`` and Hutchinson samples ``q_i = z_i^T y_i``. If
    ``s_q^2 / m <= 2 tau / k`` Hutchinson continues with ``m - k`` new probes (all ``m`` samples averaged); else
    XTrace (Rademacher test vectors, plain normalisation) uses ``Z, Y`` as its test vectors and sketch and spends
    the other ``k`` products on ``A Q``. ``choice`` says which; below 6 products it is Hutchinson."""
    if n_matvec < 6 or n < 4:
        r = hutchinson_trace(matmat, n, n_matvec, g, dtype, device)
        return TraceResult(r.value, r.stderr, r.n_hvp, "adaptive", "hutchinson")
    k = _xtrace_vectors(n, n_matvec)
    Z = _rademacher(k, n, g, torch.float64, device)
    Y = _rows(matmat, Z, dtype)
    q = (Z * Y).sum(1)
    var_hutchinson = float(q.var(unbiased=True)) / n_matvec
    var_xtrace = 2.0 * _loo_tail_energy(Y) / k
    if var_hutchinson <= var_xtrace:
        Z2 = _rademacher(n_matvec - k, n, g, torch.float64, device)
        q = torch.cat([q, (Z2 * _rows(matmat, Z2, dtype)).sum(1)])
        v, se = _mean_se(q)
        return TraceResult(v, se, n_matvec, "adaptive", "hutchinson")
    r = _xtrace_from_sketch(matmat, Z.T, Y.T, dtype, improved=False, method="adaptive")
    r.choice = "xtrace"
    return r


_ESTIMATORS = {"hutchinson": hutchinson_trace, "hutch++": hutchpp_trace, "xtrace": xtrace,
               "adaptive": adaptive_trace}


def trace_estimate(matmat: MatMat, n: int, n_matvec: int, method: str, g: torch.Generator, dtype: torch.dtype,
                   device) -> TraceResult:
    """Dispatch to the estimator ``method`` (one of :data:`TRACE_METHODS`) with a budget of ``n_matvec``."""
    if method not in _ESTIMATORS:
        raise ValueError(f"method must be one of {TRACE_METHODS}, got {method!r}")
    if isinstance(n_matvec, bool) or not isinstance(n_matvec, int) or n_matvec < MIN_MATVEC[method]:
        raise ValueError(f"n_probes must be an integer >= {MIN_MATVEC[method]} for method={method!r}, "
                         f"got {n_matvec!r}")
    return _ESTIMATORS[method](matmat, n, n_matvec, g, dtype, device)

"""Geometry statistics: pure functions on tensors/arrays.

Definitions follow Jiang et al. 2023 (R_med, diagonal domination, R_u) and Cattaneo et al. 2024 (the perturbed
one-norm). Open choices are options whose default is stated in each docstring.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

__all__ = [
    "DiagonalDominance",
    "RMedResult",
    "diagonal_dominance",
    "effective_rank",
    "perturbed_one_norm",
    "r_med",
    "singular_vector_uniformity",
]


def _as_array(x: Any, what: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    elif isinstance(x, Mapping):
        x = np.concatenate([_as_array(v, what).reshape(-1) for v in x.values()]) if x else np.zeros(0)
    elif isinstance(x, (list, tuple)) and x and isinstance(x[0], Tensor):
        x = np.concatenate([_as_array(v, what).reshape(-1) for v in x])
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be numeric (Tensor, array, list or dict of Tensors), got {type(x).__name__}") \
            from e
    return arr


def _check_finite(arr: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains non-finite values ({int((~np.isfinite(arr)).sum())} of {arr.size})")


@dataclass(frozen=True)
class RMedResult:
    """``value = max / (median + delta)`` over the ``n`` entries used; ``n_nonpositive`` = entries <= 0 among them.

    ``n_zero`` counts the exact zeros that were left out (``zeros="exclude"``); ``defined`` is False (and ``value``
    NaN, ``reason`` saying why) when no ratio exists: every entry is zero, or the denominator is <= 0.
    """
    value: float
    n_nonpositive: int
    max: float
    median: float
    delta: float
    n: int
    n_zero: int = 0
    defined: bool = True
    reason: str = ""


def r_med(diag: Any, delta: float = 0.0, absolute: bool = False, zeros: str = "exclude") -> RMedResult:
    """R_med of one layer's sampled Hessian diagonal (Jiang et al. 2023, §3, Eq. (1)).

    ``R_med = max_{i in I} h_i / (median_{i in I} h_i + delta)`` with ``h_i = [nabla^2 L]_ii`` at the sampled
    coordinates ``I`` (200 per layer in the paper). ``delta`` is the "additional term in the denominator" the paper
    adds for random-label data (Jiang et al. 2023, §4.2; its value is not given, default 0). Defaults: the signed
    ``h_i`` are used and the number of entries ``<= 0`` is reported (``absolute=True`` uses ``|h_i|``).

    Exact zeros. Coordinates that the loss does not depend on at all (embedding rows of tokens absent from the
    data, weights into dead ReLU units) have ``h_i = 0`` exactly; they carry no curvature, and with many of them the
    median is 0 and the ratio infinite. ``zeros="exclude"`` (default) takes max and median over the nonzero entries
    and reports the number left out as ``n_zero``; ``zeros="keep"`` uses every entry.

    Undefined. If no entry is left, or the denominator ``median + delta`` is ``<= 0`` (a median of negative
    curvature is no condition-number analogue), the result is marked ``defined=False`` with ``value = NaN`` and a
    ``reason``; it is never an infinite ratio, so medians over layers or runs (``nanmedian``) stay meaningful.
    """
    h = _as_array(diag, "diag").reshape(-1)
    if h.size == 0:
        raise ValueError("diag is empty: r_med needs at least one diagonal entry")
    _check_finite(h, "diag")
    if not isinstance(delta, (int, float)) or not math.isfinite(delta) or delta < 0:
        raise ValueError(f"delta must be a finite number >= 0, got {delta!r}")
    if zeros not in ("exclude", "keep"):
        raise ValueError(f"zeros must be 'exclude' or 'keep', got {zeros!r}")
    n_zero = 0
    if zeros == "exclude":
        nz = h != 0
        n_zero = int((~nz).sum())
        h = h[nz]
        if h.size == 0:
            return RMedResult(math.nan, 0, 0.0, 0.0, float(delta), 0, n_zero, False,
                              f"all {n_zero} sampled diagonal entries are exactly 0")
    n_nonpos = int((h <= 0).sum())
    if absolute:
        h = np.abs(h)
    mx, med = float(h.max()), float(np.median(h))
    den = med + float(delta)
    if den > 0:
        return RMedResult(float(mx / den), n_nonpos, mx, med, float(delta), int(h.size), n_zero)
    return RMedResult(math.nan, n_nonpos, mx, med, float(delta), int(h.size), n_zero, False,
                      f"median + delta = {den:.3g} <= 0 ({n_nonpos} of {h.size} entries <= 0)")


@dataclass(frozen=True)
class DiagonalDominance:
    """Off-diagonal to diagonal mass of a sampled Hessian block (smaller = more diagonal).

    ``per_coordinate[i] = sum_{j != i} |H_ij| / |H_ii|``; ``mean``/``median`` over ``i``;
    ``mass = sum_{i != j} |H_ij| / sum_i |H_ii|``; ``frobenius = ||offdiag||_F / ||diag||_F``.
    """
    per_coordinate: np.ndarray
    mean: float
    median: float
    mass: float
    frobenius: float
    n: int


def diagonal_dominance(block: Any) -> DiagonalDominance:
    """Diagonal domination of a sampled principal sub-block ``H[I, I]`` (Jiang et al. 2023, App. E, Eq. (40)).

    Per coordinate ``r_i = sum_{j in I, j != i} |H_ij| / |H_ii|`` (the paper's statistic decreases during training as
    the Hessian "becomes more diagonal", which fixes this orientation; Eq. (40) itself is not recoverable).
    Reported: mean and median of ``r_i`` (the paper's Fig. 14), and the alternative readings, the mass ratio
    ``sum_{i!=j}|H_ij| / sum_i |H_ii|`` and ``||offdiag||_F / ||diag||_F``. A zero diagonal entry gives
    ``r_i = inf``. Accepts a square matrix or a result with ``.matrix`` (``Hessian.diagonal_block``).
    """
    if hasattr(block, "matrix"):
        block = block.matrix
    A = _as_array(block, "block")
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] < 2:
        raise ValueError(f"block must be a square matrix of size >= 2, got shape {A.shape}")
    _check_finite(A, "block")
    absA = np.abs(A)
    d = np.diag(absA).copy()
    off_rows = absA.sum(1) - d
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(d > 0, off_rows / np.where(d > 0, d, 1.0), np.inf)
    dsum = d.sum()
    mass = float(off_rows.sum() / dsum) if dsum > 0 else math.inf
    dF = float(np.sqrt((d ** 2).sum()))
    oF = float(np.sqrt(max((absA ** 2).sum() - (d ** 2).sum(), 0.0)))
    frob = oF / dF if dF > 0 else math.inf
    return DiagonalDominance(r, float(np.mean(r)), float(np.median(r)), mass, frob, int(A.shape[0]))


def singular_vector_uniformity(W: Any, side: str = "left") -> float:
    """R_u = ``max_i u_i^2 / median_i u_i^2`` of the top singular vector ``u`` of ``W`` (Jiang et al. 2023, §6 and App. F).

    For ``W1 in R^{m x d}`` (hidden units on rows) the hidden-unit side is the left singular vector (default);
    ``side="right"`` uses the right one (e.g. for ``W2 in R^{k x m}``). For an approximately rank-one layer R_u
    approximates R_med of that layer under whitened inputs.
    """
    A = _as_array(W, "W")
    if A.ndim != 2 or min(A.shape) == 0:
        raise ValueError(f"W must be a non-empty 2-D matrix, got shape {A.shape}")
    _check_finite(A, "W")
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    U, s, Vt = np.linalg.svd(A, full_matrices=False)
    if s[0] == 0:
        raise ValueError("W is zero: its top singular vector is undefined")
    u = U[:, 0] if side == "left" else Vt[0]
    u2 = u ** 2
    med = float(np.median(u2))
    return float(u2.max() / med) if med > 0 else math.inf


def perturbed_one_norm(g: Any, eps: float) -> float:
    """``||g||_{1,eps} = sum_i sqrt(g_i^2 + eps)`` (Cattaneo et al. 2024, §1, "perturbed one-norm").

    ``g``: a Tensor, array, or a dict/list of Tensors (concatenated, e.g. all ``param.grad``). ``eps`` is Adam's
    epsilon in the "eps inside the square root" convention.
    """
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    x = _as_array(g, "g").reshape(-1)
    if x.size == 0:
        raise ValueError("g is empty")
    _check_finite(x, "g")
    return float(np.sqrt(x * x + eps).sum())


def effective_rank(W: Any, log_eps: float = 0.0) -> float:
    """Effective rank (Roy & Vetterli 2007): ``exp(-sum_i p_i log p_i)``, ``p_i = sigma_i / sum_k sigma_k``.

    Zero singular values contribute 0 (``0 log 0 = 0``). ``log_eps`` adds a constant inside the log as the deep
    matrix completion notebook does (1e-10 there; default 0 = the exact definition).
    """
    A = _as_array(W, "W")
    if A.ndim != 2 or min(A.shape) == 0:
        raise ValueError(f"W must be a non-empty 2-D matrix, got shape {A.shape}")
    _check_finite(A, "W")
    if log_eps < 0:
        raise ValueError(f"log_eps must be >= 0, got {log_eps!r}")
    s = np.linalg.svd(A, compute_uv=False)
    total = s.sum()
    if total == 0:
        raise ValueError("W is zero: its effective rank is undefined")
    p = s / total
    nz = p > 0 if log_eps == 0 else np.ones_like(p, dtype=bool)
    return float(np.exp(-np.sum(p[nz] * np.log(p[nz] + log_eps))))

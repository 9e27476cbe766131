"""End-to-end dynamics of depth-N linear networks (Arora et al. 2018, "Linear Networks via GD Trajectory").

A depth-N linear network computes ``x -> W_e x`` with the end-to-end matrix ``W_e = W_N W_{N-1} ... W_1``,
``W_j in R^{d_j x d_{j-1}}``, ``W_e in R^{k x d}``. If the factors are *balanced*
(``W_{j+1}^T W_{j+1} = W_j W_j^T``), gradient flow on the factors moves ``W_e`` by a preconditioned gradient of the
single-layer loss ``l(W_e)`` (Arora, Cohen & Hazan 2018, Thm. 1 and Claim 1)::

    vec(dW_e/dt) = -P_{W_e} vec(grad l(W_e)),
    P_{W_e} = sum_{j=1}^N [W_e^T W_e]^{(N-j)/N} (x) [W_e W_e^T]^{(j-1)/N}.

Everything here is numpy on float64 arrays (torch tensors are accepted and converted). ``vec`` is column-major
(``vec(A X B) = (B^T (x) A) vec(X)``), the convention under which the Kronecker form above holds. Matrix powers of
PSD matrices use the convention ``[A]^0 = I`` even for singular ``A``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _as_matrix(x, name: str) -> np.ndarray:
    a = _to_numpy(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} has non-finite entries")
    return a


def _check_depth(depth: int) -> int:
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
    return int(depth)


def psd_power(A, p: float) -> np.ndarray:
    """``[A]^p`` for a symmetric PSD matrix ``A`` and ``p >= 0`` via its eigendecomposition.

    Eigenvalues below ``8 n eps max(lambda)`` (rounding noise, possibly negative) are treated as 0; ``[A]^0 = I`` ("p = 0 gives
    the identity even when the matrix is singular").
    """
    A = _as_matrix(A, "A")
    if A.shape[0] != A.shape[1]:
        raise ValueError(f"A must be square, got shape {A.shape}")
    if p < 0:
        raise ValueError(f"power p must be >= 0, got {p}")
    if p == 0:
        return np.eye(A.shape[0])
    lam, Q = np.linalg.eigh(0.5 * (A + A.T))
    # eigenvalues at rounding level are zeros of the exact matrix: a fractional power would blow them up
    tol = max(lam.max(initial=0.0), 0.0) * A.shape[0] * 8 * np.finfo(np.float64).eps
    lam = np.where(lam > tol, lam, 0.0)
    return (Q * lam**p) @ Q.T


def end_to_end_matrix(factors: Sequence) -> np.ndarray:
    """``W_e = W_N ... W_1`` for ``factors = [W_1, ..., W_N]`` (input layer first), ``W_j`` of shape d_j x d_{j-1}."""
    if len(factors) == 0:
        raise ValueError("factors must hold at least one matrix")
    W = _as_matrix(factors[0], "factors[0]")
    for j, F in enumerate(factors[1:], start=1):
        F = _as_matrix(F, f"factors[{j}]")
        if F.shape[1] != W.shape[0]:
            raise ValueError(f"factors[{j}] has shape {F.shape}; its columns must equal the rows of "
                             f"factors[{j - 1}] ({W.shape[0]})")
        W = F @ W
    return W


def balancedness(factors: Sequence) -> float:
    """``max_j ||W_{j+1}^T W_{j+1} - W_j W_j^T||_F`` (0 for balanced factors)."""
    mats = [_as_matrix(F, f"factors[{j}]") for j, F in enumerate(factors)]
    if len(mats) < 2:
        return 0.0
    return float(max(np.linalg.norm(mats[j + 1].T @ mats[j + 1] - mats[j] @ mats[j].T)
                     for j in range(len(mats) - 1)))


def balanced_factors(W_e, depth: int, hidden: int | None = None, rng: np.random.Generator | None = None
                     ) -> list[np.ndarray]:
    """A balanced factorization ``[W_1..W_N]`` of ``W_e`` (k x d) with hidden widths ``hidden``.

    With the SVD ``W_e = U S V^T`` (rank r) and orthonormal ``O_j in R^{hidden x r}``:
    ``W_1 = O_1 S^{1/N} V^T``, ``W_j = O_j S^{1/N} O_{j-1}^T``, ``W_N = U S^{1/N} O_{N-1}^T``; then
    ``W_{j+1}^T W_{j+1} = O_j S^{2/N} O_j^T = W_j W_j^T``. ``O_j`` are random (``rng``) or, without
    ``rng``, the first r coordinate vectors. ``hidden`` defaults to ``min(k, d)`` and must be >= rank(W_e).
    """
    N = _check_depth(depth)
    W = _as_matrix(W_e, "W_e")
    if N == 1:
        return [W.copy()]
    U, s, Vt = np.linalg.svd(W, full_matrices=False)
    tol = s.max(initial=0.0) * max(W.shape) * np.finfo(np.float64).eps
    r = int(np.sum(s > tol))
    h = min(W.shape) if hidden is None else int(hidden)
    if h < r:
        raise ValueError(f"hidden width {h} is smaller than rank(W_e) = {r}")
    U, s, Vt = U[:, :r], s[:r], Vt[:r]
    root = s ** (1.0 / N)
    Os = []
    for _ in range(N - 1):
        if rng is None:
            Os.append(np.eye(h)[:, :r])
        else:
            Q, _ = np.linalg.qr(rng.standard_normal((h, r)))
            Os.append(Q)
    factors = [Os[0] * root @ Vt]
    for j in range(1, N - 1):
        factors.append(Os[j] * root @ Os[j - 1].T)
    factors.append(U * root @ Os[-1].T)
    return factors


def preconditioner_kronecker(W_e, depth: int) -> np.ndarray:
    """Dense ``P_{W_e} = sum_{j=1}^N [W_e^T W_e]^{(N-j)/N} (x) [W_e W_e^T]^{(j-1)/N}`` (kd x kd).

    Arora, Cohen & Hazan 2018, Thm. 1 and Claim 1 (column-major vec). PSD; for N = 1 it is the identity.
    """
    N = _check_depth(depth)
    W = _as_matrix(W_e, "W_e")
    k, d = W.shape
    if k * d > 4096:
        raise ValueError(f"dense P_W would be {k * d} x {k * d}; use apply_preconditioner for k*d > 4096")
    WtW, WWt = W.T @ W, W @ W.T
    P = np.zeros((k * d, k * d))
    for j in range(1, N + 1):
        P += np.kron(psd_power(WtW, (N - j) / N), psd_power(WWt, (j - 1) / N))
    return P


def apply_preconditioner(W_e, G, depth: int) -> np.ndarray:
    """Matrix-free ``P_{W_e}`` applied to a k x d matrix: ``sum_j [W W^T]^{(j-1)/N} G [W^T W]^{(N-j)/N}``.

    Equals ``unvec(P_{W_e} vec(G))`` (Arora et al. 2018, Eq. (1)).
    """
    N = _check_depth(depth)
    W = _as_matrix(W_e, "W_e")
    G = _as_matrix(G, "G")
    if G.shape != W.shape:
        raise ValueError(f"G has shape {G.shape}, expected the shape of W_e {W.shape}")
    WtW, WWt = W.T @ W, W @ W.T
    out = np.zeros_like(G)
    for j in range(1, N + 1):
        out += psd_power(WWt, (j - 1) / N) @ G @ psd_power(WtW, (N - j) / N)
    return out


@dataclass
class PreconditionerSpectrum:
    """Eigen-structure of ``P_{W_e}``: ``eigenvalues[r, r']`` belongs to the eigenvector ``vec(U[:, r] V[:, r']^T)``."""

    eigenvalues: np.ndarray  # (k, d)
    U: np.ndarray  # (k, k) left singular vectors (full basis)
    V: np.ndarray  # (d, d) right singular vectors (full basis)
    singular_values: np.ndarray  # (min(k, d),)

    def sorted(self) -> np.ndarray:
        """All k*d eigenvalues in ascending order (comparable with ``numpy.linalg.eigvalsh`` of the dense P)."""
        return np.sort(self.eigenvalues.ravel())


def preconditioner_eigenvalues(W_e, depth: int) -> PreconditionerSpectrum:
    """Eigenvalues of ``P_{W_e}`` from the SVD ``W_e = sum_r sigma_r u_r v_r^T`` (Claim 1).

    ``lambda_{r, r'} = sum_{j=1}^N sigma_r^{2(N-j)/N} sigma_{r'}^{2(j-1)/N}`` with eigenvector ``vec(u_r v_{r'}^T)``;
    ``sigma_r := 0`` beyond the rank and ``0^0 := 1``. Indexing: ``r`` over the k left vectors, ``r'`` over the d
    right vectors. (With ``vec(u v^T) = v (x) u``, ``[W^T W]^a (x) [W W^T]^b`` scales it by
    ``sigma_{r'}^{2a} sigma_r^{2b}``; the sum is symmetric under j <-> N+1-j, so either order gives the same set.)
    """
    N = _check_depth(depth)
    W = _as_matrix(W_e, "W_e")
    k, d = W.shape
    U, s, Vt = np.linalg.svd(W, full_matrices=True)
    s = np.where(s > s.max(initial=0.0) * max(k, d) * 8 * np.finfo(np.float64).eps, s, 0.0)
    sig_left = np.zeros(k)
    sig_left[: len(s)] = s
    sig_right = np.zeros(d)
    sig_right[: len(s)] = s

    def pw(x, p):
        return np.ones_like(x) if p == 0 else x**p

    lam = np.zeros((k, d))
    for j in range(1, N + 1):
        lam += np.outer(pw(sig_left**2, (j - 1) / N), pw(sig_right**2, (N - j) / N))
    return PreconditionerSpectrum(eigenvalues=lam, U=U, V=Vt.T, singular_values=s)


def end_to_end_step(W_e, grad, depth: int, lr: float, weight_decay: float = 0.0) -> np.ndarray:
    """One discrete end-to-end step (Arora, Cohen, Hazan 2018, Eq. 10):

    ``W_e <- (1 - lr*weight_decay*N) W_e - lr * sum_j [W_e W_e^T]^{(j-1)/N} grad [W_e^T W_e]^{(N-j)/N}``.

    To first order in ``lr`` this is the change of ``W_e`` produced by one GD step on balanced factors with
    L2 decay ``(weight_decay/2) sum_j ||W_j||_F^2``.
    """
    if lr < 0 or weight_decay < 0:
        raise ValueError(f"lr and weight_decay must be >= 0, got lr={lr}, weight_decay={weight_decay}")
    N = _check_depth(depth)
    W = _as_matrix(W_e, "W_e")
    return (1.0 - lr * weight_decay * N) * W - lr * apply_preconditioner(W, grad, N)


def singular_value_velocity(W_e, grad, depth: int) -> np.ndarray:
    """``d sigma_r/dt = -N (sigma_r^2)^{1-1/N} <grad l(W_e), u_r v_r^T>`` (Arora, Cohen, Hu, Luo 2019 Thm. 3).

    Returned for every r = 1..min(k, d) (in the SVD order, descending sigma). For N = 1 it is
    ``-<grad, u_r v_r^T>``; for N >= 2 a singular value's speed grows with its size (Arora et al. 2018: "preconditioners
    promoting movement in directions already taken").
    """
    N = _check_depth(depth)
    W = _as_matrix(W_e, "W_e")
    G = _as_matrix(grad, "grad")
    if G.shape != W.shape:
        raise ValueError(f"grad has shape {G.shape}, expected the shape of W_e {W.shape}")
    U, s, Vt = np.linalg.svd(W, full_matrices=False)
    proj = np.einsum("ir,ij,rj->r", U, G, Vt)
    factor = np.ones_like(s) if N == 1 else (s**2) ** (1.0 - 1.0 / N)
    return -N * factor * proj


def single_output_step(w, grad, depth: int, lr: float, weight_decay: float = 0.0) -> np.ndarray:
    """Single-output (k = 1) form of the end-to-end step (Arora, Cohen, Hazan 2018):

    ``w <- (1 - lr*weight_decay*N) w - lr ||w||^{2-2/N} (grad + (N-1) (w_hat^T grad) w_hat)``, ``w_hat = w/||w||``.

    An adaptive step size times a momentum-like emphasis on the current direction. ``w`` and ``grad`` are vectors
    of length d (or 1 x d matrices); returns a vector of length d. Equal to :func:`end_to_end_step` with k = 1.
    """
    if lr < 0 or weight_decay < 0:
        raise ValueError(f"lr and weight_decay must be >= 0, got lr={lr}, weight_decay={weight_decay}")
    N = _check_depth(depth)
    w_vec = _as_matrix(np.reshape(_to_numpy(w), (1, -1)), "w")[0]
    g_vec = _as_matrix(np.reshape(_to_numpy(grad), (1, -1)), "grad")[0]
    if g_vec.shape != w_vec.shape:
        raise ValueError(f"grad has {g_vec.size} entries, expected {w_vec.size}")
    norm = float(np.linalg.norm(w_vec))
    w_hat = w_vec / norm if norm > 0 else np.zeros_like(w_vec)
    speed = 1.0 if N == 1 else norm ** (2.0 - 2.0 / N)
    precond = g_vec + (N - 1) * (w_hat @ g_vec) * w_hat
    return (1.0 - lr * weight_decay * N) * w_vec - lr * speed * precond


__all__ = [
    "PreconditionerSpectrum", "apply_preconditioner", "balanced_factors", "balancedness", "end_to_end_matrix",
    "end_to_end_step", "preconditioner_eigenvalues", "preconditioner_kronecker", "psd_power",
    "single_output_step", "singular_value_velocity",
]

"""Two-layer linear networks: the theory behind R_med (Jiang et al. 2023, §5, §6, App. B, E, F).

Model and data (Jiang et al. 2023, §3, Assumptions 1-3): ``f(x) = W2 W1 x`` with ``W1 in R^{m x d}`` (hidden width m),
``W2 in R^{k x m}`` (the paper's theorem has k = 1), whitened Gaussian inputs ``E[x x^T] = Sigma`` (= I in the
theorem), a linear teacher ``y = A x + noise`` and the population square loss

    L(W1, W2) = 1/2 E||W2 W1 x - y||^2 = 1/2 tr((W2 W1 - A) Sigma (W2 W1 - A)^T) + noise_var * k / 2.

Everything here is numpy: closed forms (gradient, Hessian, Hessian diagonal), the large-batch (population)
dynamics of SGD+M and Adam exactly as in the paper's Eq. (3), and what Theorem 1 predicts for R_med:

* App. F: the Hessian diagonal is ``d^2L/d(W1)_ij^2 = ||W2[:, i]||^2 Sigma_jj`` and
  ``d^2L/d(W2)_ci^2 = (W1 Sigma W1^T)_ii``; both are indexed by the hidden unit i only. When W1 (and W2) are
  approximately rank one with hidden-side singular vector u, both layers' R_med equal
  ``R_u = max_i u_i^2 / median_i u_i^2`` (the paper's §6 (B)).
* Theorem 1: along SGD+M the leading hidden-side singular vector inherits the Gaussian small initialisation, so
  R_med^SGD ~ max/median of m squared Gaussians = Theta(log m) (:func:`gaussian_uniformity`), while Adam's
  sign-like early updates make |u_i| nearly uniform, so R_med^Adam = O(1) (-> 1 as the init scale -> 0).

The exact rates and the time window of Theorem 1 are not recoverable from the paper;
tests check the ordering and the Gaussian-vector prediction, never a hard-coded rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import integrate, stats

__all__ = [
    "TwoLayerProblem",
    "small_gaussian_init",
    "population_loss",
    "population_gradient",
    "hessian_diagonal",
    "hessian",
    "rank_one_diagonal",
    "hidden_singular_vector",
    "gaussian_uniformity",
    "theorem1_prediction",
    "Trajectory",
    "simulate",
]


def _as_cov(cov: np.ndarray | None, d: int) -> np.ndarray:
    if cov is None:
        return np.eye(d)
    cov = np.asarray(cov, dtype=float)
    if cov.shape != (d, d):
        raise ValueError(f"input covariance has shape {cov.shape}; expected ({d}, {d}) to match W1's columns")
    return cov


def _check_shapes(W1: np.ndarray, W2: np.ndarray, A: np.ndarray | None = None) -> None:
    if W1.ndim != 2 or W2.ndim != 2:
        raise ValueError(f"W1 and W2 must be matrices; got shapes {W1.shape} and {W2.shape}")
    if W2.shape[1] != W1.shape[0]:
        raise ValueError(f"W2 has {W2.shape[1]} columns but W1 has {W1.shape[0]} rows (the hidden width)")
    if A is not None and A.shape != (W2.shape[0], W1.shape[1]):
        raise ValueError(f"teacher A has shape {A.shape}; expected (k, d) = ({W2.shape[0]}, {W1.shape[1]})")


@dataclass(frozen=True)
class TwoLayerProblem:
    """A teacher ``A`` (k x d), an input covariance ``cov`` (None = whitened, I) and the output noise variance."""

    A: np.ndarray
    cov: np.ndarray | None = None
    noise_var: float = 0.0

    def __post_init__(self):
        A = np.atleast_2d(np.asarray(self.A, dtype=float))
        object.__setattr__(self, "A", A)
        if self.noise_var < 0:
            raise ValueError(f"noise_var = {self.noise_var} must be >= 0")
        _as_cov(self.cov, A.shape[1])

    @property
    def k(self) -> int:
        """Output dimension ``k`` (rows of the teacher ``A``)."""
        return self.A.shape[0]

    @property
    def d(self) -> int:
        """Input dimension ``d`` (columns of the teacher ``A``)."""
        return self.A.shape[1]


def small_gaussian_init(m: int, d: int, k: int = 1, scale: float = 1e-3,
                        rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Assumption 2 (Jiang et al. 2023, §3): i.i.d. ``N(0, scale^2)`` entries for ``W1`` (m x d) and ``W2`` (k x m)."""
    if m < 1 or d < 1 or k < 1:
        raise ValueError(f"widths must be >= 1; got m={m}, d={d}, k={k}")
    if scale <= 0:
        raise ValueError(f"init scale = {scale} must be > 0")
    rng = np.random.default_rng(0) if rng is None else rng
    return scale * rng.standard_normal((m, d)), scale * rng.standard_normal((k, m))


def population_loss(W1: np.ndarray, W2: np.ndarray, problem: TwoLayerProblem) -> float:
    """``L = 1/2 tr((W2 W1 - A) Sigma (W2 W1 - A)^T) + k noise_var / 2`` (Jiang et al. 2023, §3, Assumption 1)."""
    _check_shapes(W1, W2, problem.A)
    R = W2 @ W1 - problem.A
    cov = _as_cov(problem.cov, W1.shape[1])
    return float(0.5 * np.trace(R @ cov @ R.T) + 0.5 * problem.k * problem.noise_var)


def population_gradient(W1: np.ndarray, W2: np.ndarray, problem: TwoLayerProblem) -> tuple[np.ndarray, np.ndarray]:
    """Large-batch gradient (Assumption 3): ``dL/dW1 = W2^T R Sigma``, ``dL/dW2 = R Sigma W1^T``, ``R = W2 W1 - A``."""
    _check_shapes(W1, W2, problem.A)
    cov = _as_cov(problem.cov, W1.shape[1])
    RS = (W2 @ W1 - problem.A) @ cov
    return W2.T @ RS, RS @ W1.T


def hessian_diagonal(W1: np.ndarray, W2: np.ndarray, cov: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact Hessian diagonal of the population loss (Jiang et al. 2023, App. F, Lemma on the diagonal):

        d^2 L / d(W1)_ij^2 = ||W2[:, i]||^2 * Sigma_jj,        d^2 L / d(W2)_ci^2 = (W1 Sigma W1^T)_ii.

    It does not depend on the teacher: each single coordinate enters the bilinear model linearly. Returns arrays
    shaped like W1 and W2. With Sigma = I the W2 entries are the squared row norms ``||W1[i, :]||^2``.
    """
    W1 = np.asarray(W1, dtype=float)
    W2 = np.asarray(W2, dtype=float)
    _check_shapes(W1, W2)
    cov = _as_cov(cov, W1.shape[1])
    col_norms = np.sum(W2 ** 2, axis=0)                         # ||W2[:, i]||^2, shape (m,)
    D1 = col_norms[:, None] * np.diag(cov)[None, :]
    row_quad = np.einsum("ij,jl,il->i", W1, cov, W1)             # (W1 Sigma W1^T)_ii
    D2 = np.broadcast_to(row_quad[None, :], W2.shape).copy()
    return D1, D2


def hessian(W1: np.ndarray, W2: np.ndarray, problem: TwoLayerProblem) -> np.ndarray:
    """Dense Hessian of the population loss (Jiang et al. 2023, App. E.3), coordinates ``[vec(W1), vec(W2)]`` row-major.

    With ``R = W2 W1 - A``:

        d^2L / d(W1)_ij d(W1)_i'j'  = (W2^T W2)_ii' Sigma_jj'
        d^2L / d(W2)_ci d(W2)_c'i'  = delta_cc' (W1 Sigma W1^T)_ii'
        d^2L / d(W1)_ij d(W2)_ci'   = W2_ci (W1 Sigma)_i'j + delta_ii' (R Sigma)_cj

    The last (residual) term dominates at a small initialisation, which is why the Hessian starts far from diagonal
    and becomes more diagonal as R -> 0 (App. E, Theorem 2). Size ``(md + km)^2``: meant for small widths.
    """
    W1 = np.asarray(W1, dtype=float)
    W2 = np.asarray(W2, dtype=float)
    _check_shapes(W1, W2, problem.A)
    m, d = W1.shape
    k = W2.shape[0]
    cov = _as_cov(problem.cov, d)
    n1 = m * d
    H = np.zeros((n1 + k * m, n1 + k * m))
    H[:n1, :n1] = np.kron(W2.T @ W2, cov)
    H[n1:, n1:] = np.kron(np.eye(k), W1 @ cov @ W1.T)
    RS = (W2 @ W1 - problem.A) @ cov                            # (k, d)
    W1S = W1 @ cov                                              # (m, d)
    # cross[i, j, c, i'] = W2[c, i] * W1S[i', j] + delta_ii' RS[c, j]
    cross = np.einsum("ci,pj->ijcp", W2, W1S)
    idx = np.arange(m)
    cross[idx, :, :, idx] += RS.T[None, :, :]
    C = cross.reshape(n1, k * m)
    H[:n1, n1:] = C
    H[n1:, :n1] = C.T
    return H


def hidden_singular_vector(W: np.ndarray, hidden_axis: int) -> tuple[np.ndarray, float]:
    """Leading singular vector of ``W`` on its hidden-unit side and the rank-one energy fraction s_1^2 / sum s^2.

    For W1 (m x d) the hidden side is axis 0 (left vector); for W2 (k x m) it is axis 1 (right vector).
    """
    W = np.asarray(W, dtype=float)
    if W.ndim != 2 or hidden_axis not in (0, 1):
        raise ValueError(f"need a matrix and hidden_axis in (0, 1); got shape {W.shape}, axis {hidden_axis}")
    U, s, Vt = np.linalg.svd(W, full_matrices=False)
    total = float(np.sum(s ** 2))
    frac = float(s[0] ** 2 / total) if total > 0 else float("nan")
    return (U[:, 0] if hidden_axis == 0 else Vt[0]), frac


def rank_one_diagonal(sigma: float, u: np.ndarray, v: np.ndarray, w2: np.ndarray,
                      cov: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Hessian diagonal when ``W1 = sigma u v^T`` exactly (Jiang et al. 2023, App. F, rank-one lemma; §6 (B)).

        d^2L/d(W1)_ij^2 = w2_i^2 Sigma_jj   (k = 1, W2 = w2^T),    d^2L/d(W2)_i^2 = sigma^2 u_i^2 (v^T Sigma v).

    So the W2 layer's R_med is exactly ``max_i u_i^2 / median_i u_i^2 = R_u`` (for sampled coordinates, the same
    ratio over the sampled hidden units), and the W1 layer's is R_u of W2 (aligned with u in the rank-one phase).
    """
    u = np.asarray(u, dtype=float).ravel()
    v = np.asarray(v, dtype=float).ravel()
    w2 = np.asarray(w2, dtype=float).ravel()
    if w2.shape != u.shape:
        raise ValueError(f"w2 has {w2.size} entries but u has {u.size} (both are indexed by hidden unit)")
    cov = _as_cov(cov, v.size)
    D1 = (w2 ** 2)[:, None] * np.diag(cov)[None, :]
    D2 = (sigma ** 2 * (u ** 2) * float(v @ cov @ v))[None, :]
    return D1, D2


def gaussian_uniformity(m: int, kind: str = "expected") -> float:
    """SGD+M side of Theorem 1 (Jiang et al. 2023, §5, App. C.1, Lemma 3): R_u of a Gaussian hidden-side vector.

    Under SGD+M from a small Gaussian init the leading hidden-side singular vector is ``u ~ g/||g||`` with
    ``g_i`` i.i.d. N(0, 1), so ``R_u = max_i g_i^2 / median_i g_i^2``. ``kind="expected"`` returns
    ``E[max_i g_i^2] / median(chi^2_1)`` with ``E[max] = int_0^inf (1 - F(x)^m) dx`` (F = chi^2_1 cdf) and
    ``median(chi^2_1) = 0.4549...``; ``kind="asymptotic"`` returns the leading order ``2 ln m / 0.4549``, the
    Theta(log m) growth of Theorem 1.
    """
    if m < 1:
        raise ValueError(f"width m = {m} must be >= 1")
    med = float(stats.chi2.median(1))
    if kind == "asymptotic":
        return 2.0 * np.log(m) / med
    if kind != "expected":
        raise ValueError(f"kind = {kind!r}; allowed: 'expected', 'asymptotic'")
    val, _ = integrate.quad(lambda x: -np.expm1(m * stats.chi2.logcdf(x, 1)), 0, np.inf, limit=200)
    return float(val / med)


def theorem1_prediction(m: int) -> dict[str, float]:
    """What Theorem 1 (Jiang et al. 2023, §5) predicts for R_med at hidden width m, in the rank-one window.

    ``sgdm``: the Gaussian-vector value :func:`gaussian_uniformity` (Omega(log m)); ``adam``: 1, the limit of
    a uniform ``|u_i|`` (the theorem states O(1); the constant is not recoverable); ``ratio`` = sgdm / adam.
    """
    sgd = gaussian_uniformity(m)
    return {"sgdm": sgd, "adam": 1.0, "ratio": sgd, "sgdm_asymptotic": gaussian_uniformity(m, "asymptotic")}


@dataclass
class Trajectory:
    """Iterates recorded by :func:`simulate` (steps, losses, W1/W2 snapshots) and the step of divergence, if any."""

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    W1: list[np.ndarray] = field(default_factory=list)
    W2: list[np.ndarray] = field(default_factory=list)
    diverged_at: int | None = None


def simulate(W1: np.ndarray, W2: np.ndarray, problem: TwoLayerProblem, optimizer: str, lr: float, steps: int,
             momentum: float = 0.9, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
             bias_correction: bool = False, record_every: int = 0) -> Trajectory:
    """Large-batch (population-gradient) dynamics of Jiang et al. 2023, Eq. (3), in numpy.

    SGD+M (PyTorch convention; the paper does not state its momentum form):
        ``M <- momentum M + g``,  ``W <- W - lr M``.
    Adam (xi outside the root; no bias correction by default, as the theory's Eq. (3) is read):
        ``M <- b1 M + (1 - b1) g``, ``V <- b2 V + (1 - b2) g^2``, ``W <- W - lr M / (sqrt(V) + eps)``
    (with ``bias_correction`` M and V are divided by ``1 - b^t``). A non-finite loss ends the run and is
    recorded in ``diverged_at``. ``record_every = 0`` records only the first and last iterate.
    """
    if optimizer not in ("sgdm", "adam"):
        raise ValueError(f"optimizer = {optimizer!r}; allowed: 'sgdm', 'adam'")
    if lr <= 0 or steps < 0:
        raise ValueError(f"need lr > 0 and steps >= 0; got lr={lr}, steps={steps}")
    W = [np.array(W1, dtype=float), np.array(W2, dtype=float)]
    _check_shapes(W[0], W[1], problem.A)
    M = [np.zeros_like(w) for w in W]
    V = [np.zeros_like(w) for w in W]
    b1, b2 = betas
    traj = Trajectory()

    def record(t):
        traj.steps.append(t)
        traj.loss.append(population_loss(W[0], W[1], problem))
        traj.W1.append(W[0].copy())
        traj.W2.append(W[1].copy())

    record(0)
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(1, steps + 1):
            G = population_gradient(W[0], W[1], problem)
            for p in range(2):
                if optimizer == "sgdm":
                    M[p] = momentum * M[p] + G[p]
                    W[p] = W[p] - lr * M[p]
                else:
                    M[p] = b1 * M[p] + (1 - b1) * G[p]
                    V[p] = b2 * V[p] + (1 - b2) * G[p] ** 2
                    m_hat, v_hat = (M[p] / (1 - b1 ** t), V[p] / (1 - b2 ** t)) if bias_correction else (M[p], V[p])
                    W[p] = W[p] - lr * m_hat / (np.sqrt(v_hat) + eps)
            if not (np.all(np.isfinite(W[0])) and np.all(np.isfinite(W[1]))):
                traj.diverged_at = t
                break
            if (record_every and t % record_every == 0) or t == steps:
                record(t)
    return traj

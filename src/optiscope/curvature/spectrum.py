"""Krylov and power-iteration eigensolvers and Lanczos quadrature for any symmetric operator on flat vectors.

``A`` is a callable ``x [n] -> A x`` (or, for :func:`lanczos_quadrature`, rows ``[P, n] -> [P, n]``); the
functions know nothing of models or Hessians. ``Hessian.eigenvalues`` and ``Hessian.density`` are the front door.

* :func:`lanczos`: Lanczos with full reorthogonalisation (three-term recurrence, then one classical Gram-Schmidt
  pass, a second where the Daniel-Gragg-Kaufman-Stewart test asks for it), restart on breakdown, and two stopping
  rules (eigenvalue error bound or residual), see ``Hessian.eigenvalues``.
* :func:`power_iteration`: PyHessian's power iteration with deflation (Yao et al. 2020).
* :func:`lanczos_quadrature`: stochastic Lanczos quadrature nodes and weights (Golub and Meurant 2010; Lin, Saad,
  Yang 2016; Ghorbani et al. 2019), several starting vectors advanced together.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["lanczos", "power_iteration", "lanczos_quadrature", "select_ritz", "orthogonalise", "reorthogonalise"]


def _flush_tiny(q: Tensor) -> Tensor:
    """The unit vector ``q`` (float32 or float64) with entries ``|q_i| <= tiny / eps`` set to zero (``tiny``: the
    smallest normal number of the dtype, ``eps``: its machine epsilon; 9.9e-32 in float32, 1.0e-292 in float64);
    other dtypes are returned unchanged.

    Subnormal (denormal) floats make CPU arithmetic many times slower, and a warm-started Krylov basis drifts
    into them: the components of a start vector on directions the operator annihilates (weights into dead ReLU
    units) are carried by the Ritz vector with a weight below one and shrink geometrically from one warm start to
    the next, through the range where their products with the network's small numbers are subnormal. On the
    digits MLP of ``benchmarks/bench_tracker.py`` a few hundred such entries made every Hessian-vector product
    about four times slower. Zeroing them changes ``q`` by at most ``sqrt(n) tiny / eps`` in norm (below 1e-27
    for any ``n < 1e8`` in float32), far below the rounding error ``eps`` of one product, so the recurrence and
    every bound computed from it are unchanged to working precision. (In float16 or bfloat16 ``tiny / eps`` is
    not negligible against a unit vector's entries; those are left alone.)"""
    if q.dtype not in (torch.float32, torch.float64):
        return q
    info = torch.finfo(q.dtype)
    return torch.hardshrink(q, info.tiny / info.eps)


def orthogonalise(w: Tensor, Q: list[Tensor]) -> Tensor:
    """``w`` orthogonalised against the vectors ``Q`` (classical Gram-Schmidt twice)."""
    if not Q:
        return w
    B = torch.stack(Q)
    for _ in range(2):  # classical Gram-Schmidt twice ("twice is enough")
        w = w - B.T @ (B @ w)
    return w


def reorthogonalise(W: Tensor, B: Tensor) -> Tensor:
    """``W [P, n]`` orthogonalised against the rows of ``B [P, j, n]`` (one classical Gram-Schmidt pass, a second
    only where the first removed more than ``1 - 1/sqrt 2`` of the norm: the Daniel-Gragg-Kaufman-Stewart test).

    Row by row with BLAS matrix-vector products (``mv``, ``addmv``): on CPU about 3x faster than ``bmm`` for these
    shapes (one column per batch)."""
    before = W.norm(dim=1)
    W = W.clone()

    def one_pass():
        for p in range(W.shape[0]):
            W[p].addmv_(B[p].T, torch.mv(B[p], W[p]), alpha=-1)

    one_pass()
    if bool((W.norm(dim=1) < 0.7071 * before).any()):
        one_pass()
    return W


def lanczos_quadrature(AT: Callable[[Tensor], Tensor], V: Tensor, m: int, g: torch.Generator):
    """Independent Lanczos runs from each row of ``V``, advanced together so that each step is one batched HVP
    call: the three-term recurrence ``w = A q_j - alpha_j q_j - beta_{j-1} q_{j-1}``, then full
    reorthogonalisation against all earlier ``q`` (:func:`reorthogonalise`). Returns Gauss quadrature nodes and
    weights, each ``[P, m]``."""
    P, n = V.shape
    Q = torch.zeros(P, m, n, dtype=V.dtype, device=V.device)
    q = V / V.norm(dim=1, keepdim=True)
    q_prev = torch.zeros_like(q)
    b_prev = torch.zeros(P, 1, dtype=V.dtype, device=V.device)
    alpha = np.zeros((P, m))
    beta = np.zeros((P, max(m - 1, 0)))
    for j in range(m):
        Q[:, j] = q
        W = AT(q)
        a64 = (q * W).sum(1, dtype=torch.float64)  # float64 accumulation without float64 copies of q and W
        alpha[:, j] = a64.cpu().numpy()
        a = a64.to(W.dtype).unsqueeze(1)
        if j == m - 1:
            break
        W = W - a * q - b_prev * q_prev
        B = Q[:, : j + 1]
        W = reorthogonalise(W, B)
        b = W.norm(dim=1)
        scale = torch.as_tensor(np.abs(alpha[:, : j + 1]).max(1), dtype=b.dtype, device=b.device).clamp_min(1.0)
        broken = b <= 1e-10 * scale
        for p in torch.nonzero(broken).reshape(-1).tolist():  # invariant subspace: continue orthogonally
            w = torch.randn(n, generator=g, dtype=torch.float64).to(V.dtype).to(V.device)
            for _ in range(2):
                w = w - B[p].T @ (B[p] @ w)
            W[p] = w
            b[p] = 0.0
        beta[:, j] = b.double().cpu().numpy()
        q_prev, b_prev = q, b.unsqueeze(1)
        q = W / torch.where(broken, W.norm(dim=1), b).unsqueeze(1)
    nodes = np.zeros((P, m))
    weights = np.zeros((P, m))
    for p in range(P):
        T = np.diag(alpha[p]) + np.diag(beta[p], 1) + np.diag(beta[p], -1)
        theta, S = np.linalg.eigh(T)
        nodes[p], weights[p] = theta, S[0] ** 2
    return nodes, weights


def select_ritz(theta: np.ndarray, which: str) -> np.ndarray:
    """Indices of ``theta`` in the order wanted by ``which`` (``"LA"``, ``"SA"`` or ``"LM"``)."""
    if which == "LA":
        return np.argsort(-theta, kind="stable")
    if which == "SA":
        return np.argsort(theta, kind="stable")
    return np.argsort(-np.abs(theta), kind="stable")


def lanczos(A, start: Tensor, n: int, k: int, which: str, tol: float, max_iter: int, g: torch.Generator,
             stop: str = "residual"):
    """``k`` Ritz pairs of ``A`` (dimension ``n``) from ``start``: ``(values, vectors, residuals, converged,
    history of the leading Ritz value, history of the k wanted Ritz values)``; stopping rules in
    ``Hessian.eigenvalues``."""
    max_iter = max(min(max_iter, n), k)
    q = _flush_tiny(start / start.norm())
    Q: list[Tensor] = [q]
    # rows = Q; capacity grows geometrically (preallocating max_iter + 1 rows costs 300 x n floats up front:
    # 13.5 GB for an 11.2M-parameter ResNet-18, although Lanczos usually stops after a few dozen vectors)
    basis = torch.zeros(1, min(max_iter + 1, 16), n, dtype=start.dtype, device=start.device)
    basis[0, 0] = q
    alpha: list[float] = []
    beta: list[float] = []
    hist: list[float] = []
    ritz: list[np.ndarray] = []
    converged = False
    theta = S = None
    b = 0.0
    for j in range(max_iter):
        w = A(q)
        alpha.append(float(q.double() @ w.double()))
        w = torch.add(w, q, alpha=-alpha[-1])  # w - alpha_j q_j - beta_{j-1} q_{j-1}, two kernels
        if len(Q) >= 2:
            w.add_(Q[-2], alpha=-beta[-1])
        # reorthogonalise(w[None], basis) for one vector, reusing the norms the DGKS test needs
        B = basis[0, : len(Q)]
        before = float(w.norm())
        w = w.addmv(B.T, torch.mv(B, w), alpha=-1)
        b = float(w.norm())
        if b < 0.7071 * before:
            w.addmv_(B.T, torch.mv(B, w), alpha=-1)
            b = float(w.norm())
        m = len(alpha)
        T = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
        theta, S = np.linalg.eigh(T)
        order = select_ritz(theta, which)
        hist.append(float(theta[order[0]]))
        ritz.append(theta[order[:k]].copy())
        scale = max(np.abs(theta).max(), 1e-300)
        breakdown = b <= 1e-10 * scale
        if m >= k and not breakdown:  # after a breakdown the Krylov space may miss multiplicities: go on
            sel = order[:k]
            res = np.abs(b * S[-1, sel])
            size = tol * np.maximum(np.abs(theta[sel]), 1e-12 * scale)
            if stop == "eigenvalue" and m > k and len(ritz) >= 2 and len(ritz[-2]) == k:
                others = np.abs(theta[sel][:, None] - theta[None, :])
                others[others == 0] = np.inf  # the value itself (and exact duplicates, which give no gap)
                gap = others.min(axis=1)
                bound = np.minimum(res, res ** 2 / gap)
                done = np.all(bound <= size) and np.all(np.abs(ritz[-1] - ritz[-2]) <= size)
            else:
                done = bool(np.all(res <= size))
            if done or m >= n:
                converged = True
                break
        if m >= n:
            break
        if breakdown:
            w = orthogonalise(torch.randn(n, generator=g, dtype=torch.float64).to(start.dtype).to(start.device), Q)
            beta.append(0.0)
            q = w / w.norm()
        else:
            beta.append(b)
            q = w / b
        q = _flush_tiny(q)
        Q.append(q)
        if len(Q) > basis.shape[1]:
            grow = min(basis.shape[1], max_iter + 1 - basis.shape[1])
            basis = torch.cat([basis, basis.new_zeros(1, grow, n)], dim=1)
        basis[0, len(Q) - 1] = q
    order = select_ritz(theta, which)[:k]
    Qm = torch.stack(Q[: len(alpha)])
    vecs = [(torch.as_tensor(S[:, i], dtype=torch.float64).to(Qm.device).to(Qm.dtype) @ Qm) for i in order]
    res = np.abs(b * S[-1, order])
    if len(alpha) >= n:
        converged = True
    return theta[order].copy(), vecs, res, converged, hist, ritz


def power_iteration(A, start: Tensor, k: int, tol: float, max_iter: int, g: torch.Generator):
    """PyHessian's power iteration: ``lambda = v^T H v``, ``v <- H v / ||H v||``, deflating earlier eigenvectors."""
    vals, vecs, res, hist = [], [], [], []
    converged = True
    for i in range(k):
        v = start if i == 0 else torch.randn(start.numel(), generator=g, dtype=torch.float64).to(start.dtype)
        v = orthogonalise(v.to(start.device), vecs)
        v = v / v.norm()
        lam = None
        ok = False
        r = math.inf
        x = v
        for _ in range(max_iter):
            Hv = orthogonalise(A(v), vecs)
            new = float(v.double() @ Hv.double())
            hist.append(new)
            r = float((Hv - new * v).norm())
            x = v
            done = lam is not None and abs(new - lam) / (abs(lam) + 1e-6) < tol
            lam = new
            if done:
                ok = True
                break
            v = Hv / Hv.norm()
        converged &= ok
        vals.append(lam)
        vecs.append(x)
        res.append(r)
    return np.array(vals), vecs, np.array(res), converged, hist

"""Correction coefficients of the modified equations of Adam and RMSProp (Cattaneo et al. 2024).

Cattaneo et al. 2024 ("On the implicit bias of Adam") shows by backward error analysis that full-batch Adam with step size h
follows, to O(h^2), the ODE (Cattaneo et al. 2024, §2, Eq. 2-3, in its exact piecewise form)

    d theta_j / dt = - (a1 / R_j) * ( g_j + kappa_j * [H P]_j ),     g = grad E(theta),  H = hess E(theta),

on t in [nh, (n+1)h], where P = a1 g / R is the leading-order step direction and

* eps inside the square root:   R_j = sqrt(a2 g_j^2 + eps),
  kappa_j = h * ( c_beta1(n) - c_beta2(n) * a2 g_j^2 / R_j^2 + 1/2 * eps / R_j^2 )
* eps outside the square root:  R_j = sqrt(a2) |g_j| + eps,
  kappa_j = h * ( c_beta1(n) - c_beta2(n) * sqrt(a2) |g_j| / R_j + 1/2 * eps / R_j ).

``a_b(n)`` is 1 with bias correction and ``1 - b^(n+1)`` without (:func:`moment_scale`), and ``c_b(n)`` is the
memory coefficient of an exponential moving average (:func:`memory_coefficient`). With bias correction
``H P = grad ||grad E||_{1,eps}`` (eps inside) or ``grad Phi_eps(grad E)`` (eps outside, :func:`eps_outside_norm`),
so the correction is the gradient of a norm of the gradient: it penalises that norm when kappa > 0 and
anti-penalises it when kappa < 0. RMSProp is the special case beta1 = 0 without bias correction (Cattaneo et al. 2024, App. B, C).

Everything here is numpy (the layer imports neither lab nor zoo); the Hessian-vector products that turn these
coefficients into a vector field on a model's parameters live in :mod:`optiscope.optim.flows`.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

__all__ = [
    "check_hyperparameters",
    "correction_coefficient",
    "eps_outside_norm",
    "eps_regime",
    "large_eps_effective_lr",
    "memory_coefficient",
    "moment_scale",
    "one_norm_bias",
    "one_norm_coefficient",
    "truncation_horizon",
    "two_norm_coefficient",
]

Algorithm = Literal["adam", "rmsprop"]


def _finite_number(x, name: str) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {x!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {x!r}")
    return v


def check_hyperparameters(h: float | None = None, beta1: float | None = None, beta2: float | None = None,
                          eps: float | None = None, eps_inside_sqrt: bool = True) -> None:
    """Validate Adam/RMSProp hyperparameters; raise ``ValueError`` naming the bad one.

    h > 0; beta1, beta2 in [0, 1); eps > 0 when it sits inside the square root (the modified flow divides by
    sqrt(g^2 + eps), Cattaneo et al. 2024, Remark 1.2) and eps >= 0 outside (eps = 0 outside is allowed but makes the flow
    singular wherever a gradient component vanishes).
    """
    if h is not None:
        v = _finite_number(h, "step size h")
        if v <= 0:
            raise ValueError(f"step size h must be > 0, got {h!r}")
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if b is not None:
            v = _finite_number(b, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {b!r}")
    if eps is not None:
        v = _finite_number(eps, "eps")
        if eps_inside_sqrt and v <= 0:
            raise ValueError(f"eps must be > 0 when it is inside the square root, got {eps!r}")
        if not eps_inside_sqrt and v < 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")


def _check_step(n: int | None) -> None:
    if n is not None and (not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0):
        raise ValueError(f"iteration index n must be a non-negative integer or None, got {n!r}")


def memory_coefficient(b: float, n: int | None = None) -> float:
    """Memory coefficient of a bias-corrected EMA with parameter b at iteration n (Cattaneo et al. 2024, App. I).

        c_b(n) = sum_{k=0}^{n} (1-b) b^(n-k) (n-k) / (1 - b^(n+1))
               = b/(1-b) - (n+1) b^(n+1) / (1 - b^(n+1)),

    the EMA-weighted mean age (in steps) of the averaged gradients. ``c_b(0) = 0`` and c_b(n) -> b/(1-b)
    exponentially fast; ``n=None`` returns the asymptotic value b/(1-b) used in the paper's Eq. (3).
    """
    check_hyperparameters(beta1=b)
    _check_step(n)
    b = float(b)
    if n is None or b == 0.0:
        return b / (1.0 - b)
    bn1 = b ** (n + 1)
    return b / (1.0 - b) - (n + 1) * bn1 / (1.0 - bn1)


def moment_scale(b: float, n: int | None, bias_correction: bool) -> float:
    """Scale a_b(n) of an EMA of a constant signal (Cattaneo et al. 2024, Def. 1.1).

    m^(n+1) of a constant x equals a_b(n) x with a_b(n) = 1 - b^(n+1) without bias correction and a_b(n) = 1 with it
    (the correction divides by exactly this factor). ``n=None`` is the asymptotic value 1.
    """
    check_hyperparameters(beta1=b)
    _check_step(n)
    if bias_correction or n is None:
        return 1.0
    return 1.0 - float(b) ** (n + 1)


def correction_coefficient(g, h: float, beta1: float, beta2: float, eps: float, n: int | None = None,
                           eps_inside_sqrt: bool = True, bias_correction: bool = True,
                           algorithm: Algorithm = "adam", include_discretisation: bool = True) -> np.ndarray:
    """Per-coordinate coefficient kappa_j of the O(h) correction term (Cattaneo et al. 2024, §2 Eq. 3, Thm. 3.1).

    The full-batch modified flow is ``dtheta_j/dt = -(a1/R_j) (g_j + kappa_j [H P]_j)`` (module docstring) with

        eps inside:   kappa_j = h ( c_b1(n) - c_b2(n) a2 g_j^2 / (a2 g_j^2 + eps) + 1/2 eps / (a2 g_j^2 + eps) )
        eps outside:  kappa_j = h ( c_b1(n) - c_b2(n) sqrt(a2)|g_j| / R_j + 1/2 eps / R_j ),  R_j = sqrt(a2)|g_j| + eps

    where c_b(n) is :func:`memory_coefficient` and a2 = :func:`moment_scale` (beta2, n, bias_correction).
    ``n=None`` gives the asymptotic form, which for eps inside is the paper's Eq. (3):
    (h/2) { (1+b1)/(1-b1) - (1+b2)/(1-b2) + (1+b2)/(1-b2) eps/(g^2+eps) }.
    The three terms are the memory of m, the memory of v and the Euler discretisation term.
    ``algorithm="rmsprop"`` is beta1 = 0 without bias correction (Cattaneo et al. 2024, App. B/C: RMSProp keeps no first moment);
    its beta1 argument must then be 0. ``include_discretisation=False`` drops the 1/2 eps term: the coefficient of
    the memoryless *iteration* theta - h P - h^2 Q (Cattaneo et al. 2024, §3 Eq. 11), before its conversion to an ODE.

    Without bias correction the exact piecewise form has no per-coordinate coefficient for n >= 1: the leading
    step a1(l) g / sqrt(a2(l) g^2 + eps) changes with l, so the backward displacement is not a multiple of P^(n).
    Then only ``n=None`` (asymptotic) or ``n=0`` is accepted here; the exact transient is
    :func:`optiscope.optim.flows.minibatch_field` (which the full-batch flow uses in that case).
    """
    if algorithm not in ("adam", "rmsprop"):
        raise ValueError(f"algorithm must be 'adam' or 'rmsprop', got {algorithm!r}")
    if algorithm == "rmsprop":
        if beta1 != 0:
            raise ValueError(f"RMSProp has no first moment: beta1 must be 0, got {beta1!r}")
        bias_correction = False
    check_hyperparameters(h, beta1, beta2, eps, eps_inside_sqrt)
    _check_step(n)
    if not bias_correction and n is not None and n > 0 and (beta1 > 0 or beta2 > 0):
        raise ValueError(f"no per-coordinate correction coefficient exists at n = {n} without bias correction "
                         "(the step direction changes with n); use n=None (asymptotic) or "
                         "optiscope.optim.flows.minibatch_field for the exact transient")
    g = np.asarray(g, dtype=float)
    if not np.all(np.isfinite(g)):
        raise ValueError("gradient contains non-finite values")
    a2 = moment_scale(beta2, n, bias_correction)
    c1 = memory_coefficient(beta1, n)
    c2 = memory_coefficient(beta2, n)
    half = 0.5 if include_discretisation else 0.0
    if eps_inside_sqrt:
        denom2 = a2 * g**2 + eps
        return h * (c1 - c2 * a2 * g**2 / denom2 + half * eps / denom2)
    r = math.sqrt(a2) * np.abs(g) + eps
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(r > 0, math.sqrt(a2) * np.abs(g) / np.where(r > 0, r, 1.0), 1.0)
        disc = np.where(r > 0, eps / np.where(r > 0, r, 1.0), 0.0)
    return h * (c1 - c2 * frac + half * disc)


def one_norm_coefficient(h: float, beta1: float, beta2: float) -> float:
    """Coefficient lambda_1 of ||grad E||_1 in the small-eps modified loss (Cattaneo et al. 2024, §2 Eq. 4-5, Table 1).

    When sqrt(eps) << |g_j| for all j, the flow is sign-descent-like on
    E~ = E + lambda_1 ||grad E||_1 with lambda_1 = (h/2) ( (1+b1)/(1-b1) - (1+b2)/(1-b2) ) = h (b1/(1-b1) - b2/(1-b2)).
    lambda_1 > 0 penalises the one-norm (b1 > b2), lambda_1 < 0 anti-penalises it (b1 < b2, the usual setting).
    RMSProp: beta1 = 0.
    """
    check_hyperparameters(h, beta1, beta2)
    return 0.5 * h * ((1 + beta1) / (1 - beta1) - (1 + beta2) / (1 - beta2))


def two_norm_coefficient(h: float, beta1: float, eps: float, eps_inside_sqrt: bool = True) -> float:
    """Coefficient lambda_2 of ||grad E||_2^2 in the large-eps modified loss (Cattaneo et al. 2024, §2 Eq. 6-7, Ex. 2.1).

    When sqrt(eps) >> |g_j| (eps inside) the flow is heavy-ball-like, dtheta/dt = -eps^{-1/2} grad E~ with
    E~ = E + lambda_2 ||grad E||^2, lambda_2 = h (1+b1) / (4 sqrt(eps) (1-b1)); with eps outside (eps >> |g_j|)
    lambda_2 = h (1+b1) / (4 eps (1-b1)). Always > 0: the squared two-norm is penalised for every beta1, beta2.
    """
    check_hyperparameters(h, beta1, None, eps, True)
    scale = math.sqrt(eps) if eps_inside_sqrt else eps
    return h * (1 + beta1) / (4.0 * scale * (1 - beta1))


def large_eps_effective_lr(h: float, eps: float, eps_inside_sqrt: bool = True) -> float:
    """Effective step size of the large-eps (heavy-ball-like) regime (Cattaneo et al. 2024, §2 Eq. 7, Ex. 2.1): h/sqrt(eps) or h/eps."""
    check_hyperparameters(h, None, None, eps, True)
    return h / (math.sqrt(eps) if eps_inside_sqrt else eps)


def adaptive_edge_of_stability(lr: float, beta1: float) -> float:
    r"""Stability threshold of the preconditioned sharpness for Adam with momentum ``beta1`` (Cohen et al. 2022, cited
    in Cattaneo et al. 2024): the top eigenvalue of ``P^{-1/2} H P^{-1/2}`` settles near ``2 (1 + beta1) / ((1 - beta1) lr)``
    (the heavy-ball stability bound ``2 (1 + beta) / lr`` for an update ``lr (1 - beta) m``)."""
    check_hyperparameters(h=lr, beta1=beta1)
    return 2.0 * (1.0 + beta1) / ((1.0 - beta1) * lr)


def one_norm_bias(beta1: float, beta2: float) -> str:
    """Table 1 of Cattaneo et al. 2024 (small-eps column): ``"penalized"`` if b1 > b2, ``"anti-penalized"`` if b1 < b2, else ``"none"``."""
    check_hyperparameters(beta1=beta1, beta2=beta2)
    if beta1 > beta2:
        return "penalized"
    if beta1 < beta2:
        return "anti-penalized"
    return "none"


def eps_regime(g, eps: float, eps_inside_sqrt: bool = True, margin: float = 10.0) -> str:
    """Which limit of Cattaneo et al. 2024, §2 applies: ``"small"`` if scale(eps) * margin <= |g_j| for every j (Eq. 4-5),
    ``"large"`` if |g_j| * margin <= scale(eps) for every j (Eq. 6-7), else ``"intermediate"``;
    scale(eps) = sqrt(eps) inside the square root and eps outside."""
    check_hyperparameters(eps=eps, eps_inside_sqrt=True)
    if margin < 1:
        raise ValueError(f"margin must be >= 1, got {margin!r}")
    a = np.abs(np.asarray(g, dtype=float)).ravel()
    if a.size == 0:
        raise ValueError("empty gradient")
    scale = math.sqrt(eps) if eps_inside_sqrt else eps
    if np.all(a >= margin * scale):
        return "small"
    if np.all(margin * a <= scale):
        return "large"
    return "intermediate"


def eps_outside_norm(v, eps: float) -> float:
    """The eps-outside analogue of the perturbed one-norm (eps outside; its form is not printed in the paper).

        Phi_eps(v) = sum_i ( |v_i| - eps log(1 + |v_i|/eps) ),   d Phi_eps / d v_i = v_i / (|v_i| + eps),

    so that with eps outside the square root the correction term is a multiple of grad_theta Phi_eps(grad E).
    Phi_eps -> ||v||_1 as eps -> 0 and Phi_eps(v) ~ ||v||^2 / (2 eps) for eps >> |v_i|.
    """
    check_hyperparameters(eps=eps, eps_inside_sqrt=True)
    a = np.abs(np.asarray(v, dtype=float))
    return float(np.sum(a - eps * np.log1p(a / eps)))


def truncation_horizon(beta1: float, beta2: float, tol: float = 1e-6) -> int:
    """History length K after which EMA weights fall below ``tol`` (K ~ 10/(1-max(b1,b2))).

    K = ceil( log(tol) / log(max(b1, b2)) ): terms older than K steps carry weight max(b1,b2)^K <= tol in the
    mini-batch piecewise ODE (Cattaneo et al. 2024, Thm. 3.1) and are dropped. The default tol = 1e-6 keeps the truncation error
    below the O(h^2) error for h >= 1e-3 in our checks (1e-4 did not). Returns 0 when both betas are 0 (memoryless).
    """
    check_hyperparameters(beta1=beta1, beta2=beta2)
    if not 0 < tol < 1:
        raise ValueError(f"tol must lie in (0, 1), got {tol!r}")
    b = max(beta1, beta2)
    if b == 0:
        return 0
    return int(math.ceil(math.log(tol) / math.log(b)))

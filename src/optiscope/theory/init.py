"""Analytic predictions at random initialization (Orvieto et al. 2022: vanishing gradients and curvature).

Three groups of results, each quantity in one function whose docstring gives the math and the paper section:

* **Neural chain** (width-1 deep linear net ``f = x * prod_{l=1}^L w_l``, Orvieto et al. 2022, §3): the exact law of
  ``log|prod w|`` (a Gamma sum for uniform weights, a sum of log-|normal| variables for Gaussian weights, inverted
  numerically through its characteristic function), hence exact medians of the forward output, of a gradient entry
  ``df/dw_i`` (``L-1`` factors), of an off-diagonal Hessian entry ``d2f/dw_i dw_j`` (``L-2`` factors) and of the
  loss-Hessian diagonal ``(df/dw_i)^2``; population moments ``E|f|^p`` and the moment trade-off (Prop. 3: no scale
  stabilizes two moments at once); the gradient-flow escape time of Prop. 7 (upper-bounding ODE, its blow-up time,
  and the exact time of the symmetric flow by quadrature) and the RMSprop-flow bound.
* **MLP moment recursions** (Orvieto et al. 2022, §4, Prop. 8 / Eq. (6), App. B.2 Eq. (41)): exact first and second moments of
  ``||x_l||^2`` through i.i.d. symmetric layers (linear or ReLU), for any width sequence, variance and fourth moment
  (the 2x2 recursion coupling ``E||x||^4`` and ``E sum_j x_j^4``), the Gaussian closed forms ``(1+2/m)^L`` and
  ``(1+5/m)^L``, Mallows' median bound (Thm. 9) and the width needed for a non-vanishing median.
* **Init schemes** (Orvieto et al. 2022, §2): LeCun / Xavier / He variances and uniform ranges, the per-layer gain
  ``c m sigma^2`` and the Thm. 10 scaling exponents of gradient and Hessian-block norms.

Conventions (documented readings where the paper leaves details open): the chain input/target default to
``x = y = 1``; uniform init is ``U[-a, a]`` with ``a = sqrt(3)`` the variance-preserving ("optimal") choice; the loss
is ``l = (1/2)(y - f)^2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import integrate, optimize, special, stats

Distribution = Literal["uniform", "normal"]
Activation = Literal["linear", "relu"]
Scheme = Literal["lecun", "xavier", "he", "torch_default"]

_EULER_GAMMA = 0.5772156649015329

__all__ = [
    "ChainMedians",
    "chain_abs_moment",
    "chain_escape_target",
    "chain_gf_blowup_time",
    "chain_gf_escape_time",
    "chain_gf_escape_time_lower_bound",
    "chain_gf_upper_bound",
    "chain_log_product_cdf",
    "chain_medians",
    "chain_product_median",
    "chain_product_median_approx",
    "chain_rmsprop_escape_time_bound",
    "hessian_block_scaling",
    "init_variance",
    "layer_gain",
    "log_abs_weight_mean_var",
    "lognormal_median",
    "mallows_median_lower_bound",
    "min_width_for_median",
    "mlp_norm_moments",
    "moment_stabilizing_scale",
    "moment_trade_off",
    "normalized_second_moment_growth",
    "uniform_bound",
    "weight_abs_moment",
    "weight_fourth_moment",
]


def _check_dist(dist: str) -> None:
    if dist not in ("uniform", "normal"):
        raise ValueError(f"weight distribution {dist!r} is not supported; use 'uniform' or 'normal'")


def _check_pos(name: str, value: float) -> None:
    if not (isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} = {value!r} must be a finite positive number")


def _check_depth(name: str, value: int, minimum: int = 0) -> None:
    if int(value) != value or value < minimum:
        raise ValueError(f"{name} = {value!r} must be an integer >= {minimum}")


# ---------------------------------------------------------------------------------------------------------------
# Neural chain: population moments (Orvieto et al. 2022, §3, Eq. (2), Prop. 3)
# ---------------------------------------------------------------------------------------------------------------

def weight_abs_moment(p: float, dist: Distribution = "uniform", scale: float = math.sqrt(3.0)) -> float:
    """``E|w|^p`` of one weight (Orvieto et al. 2022, §3, Eq. (2)).

    Uniform ``w ~ U[-a, a]`` (``scale = a``): ``E|w|^p = a^p / (p + 1)``.
    Gaussian ``w ~ N(0, s^2)`` (``scale = s``): ``E|w|^p = s^p 2^{p/2} Gamma((p+1)/2) / sqrt(pi)``.
    """
    _check_dist(dist)
    _check_pos("scale", scale)
    if not p > -1:
        raise ValueError(f"moment order p = {p!r} must be > -1 (E|w|^p is infinite otherwise)")
    if dist == "uniform":
        return float(scale ** p / (p + 1.0))
    return float(scale ** p * 2.0 ** (p / 2.0) * math.exp(special.gammaln((p + 1.0) / 2.0)) / math.sqrt(math.pi))


def chain_abs_moment(p: float, depth: int, dist: Distribution = "uniform", scale: float = math.sqrt(3.0),
                     x: float = 1.0) -> float:
    """``E|f|^p`` of the chain output ``f = x prod_{l=1}^L w_l`` (Orvieto et al. 2022, §3, Eq. (2)): ``|x|^p (E|w|^p)^L``.

    With ``a = sqrt(3)`` (uniform) ``E f^2 = x^2`` for every depth while ``E|f| = |x| (sqrt(3)/2)^L`` vanishes and
    ``E f^4 = x^4 (9/5)^L`` explodes.
    """
    _check_depth("depth", depth)
    return float(abs(x) ** p * weight_abs_moment(p, dist, scale) ** depth)


def moment_stabilizing_scale(p: float, dist: Distribution = "uniform") -> float:
    """The scale that keeps ``E|f|^p`` constant in depth, i.e. solves ``E|w|^p = 1`` (Orvieto et al. 2022, §3, Prop. 2-3).

    Uniform: ``a = (p + 1)^{1/p}`` (``p = 2``: ``sqrt(3)``, the "optimal" Xavier/He analogue; ``p = 1``: ``2``).
    Gaussian: ``s = (sqrt(pi) / (2^{p/2} Gamma((p+1)/2)))^{1/p}`` (``p = 2``: ``1``).
    """
    _check_dist(dist)
    if not p > 0:
        raise ValueError(f"moment order p = {p!r} must be > 0")
    if dist == "uniform":
        return float((p + 1.0) ** (1.0 / p))
    return float((math.sqrt(math.pi) / (2.0 ** (p / 2.0) * math.exp(special.gammaln((p + 1.0) / 2.0)))) ** (1.0 / p))


def moment_trade_off(p: float, q: float, dist: Distribution = "uniform") -> float:
    """Per-layer growth factor of ``E|f|^q`` when the scale stabilizes ``E|f|^p`` (Orvieto et al. 2022, §3, Prop. 3).

    Returns ``E|w_s|^q`` with ``s = moment_stabilizing_scale(p)``; ``E|f|^q`` then scales as this factor to the
    power ``L``. By Lyapunov's inequality ``(E|w|^q)^{1/q}`` increases strictly in ``q`` for a non-degenerate
    weight, so the factor is ``> 1`` for ``q > p`` (explodes) and ``< 1`` for ``q < p`` (vanishes): no single scale
    stabilizes two moments at once.
    """
    return weight_abs_moment(q, dist, moment_stabilizing_scale(p, dist))


# ---------------------------------------------------------------------------------------------------------------
# Neural chain: exact law of log|prod w| and medians (Orvieto et al. 2022, §3, Thm. 6 and the log-Gamma lemma before it)
# ---------------------------------------------------------------------------------------------------------------

def log_abs_weight_mean_var(dist: Distribution = "uniform", scale: float = math.sqrt(3.0)) -> tuple[float, float]:
    """Mean and variance of ``log|w|`` (Orvieto et al. 2022, §3, distribution lemma).

    Uniform ``U[-a, a]``: ``-log(|w|/a) ~ Exp(1)``, so mean ``log a - 1`` and variance ``1``.
    Gaussian ``N(0, s^2)``: mean ``log s - (gamma_E + log 2)/2``, variance ``pi^2/8``.
    """
    _check_dist(dist)
    _check_pos("scale", scale)
    if dist == "uniform":
        return math.log(scale) - 1.0, 1.0
    return math.log(scale) - (_EULER_GAMMA + math.log(2.0)) / 2.0, math.pi ** 2 / 8.0


def _log_abs_std_normal_cf(t: np.ndarray) -> np.ndarray:
    """Characteristic function of ``log|z|``, ``z ~ N(0,1)``: ``E|z|^{it} = 2^{it/2} Gamma((1+it)/2)/sqrt(pi)``."""
    return np.exp(1j * t * math.log(2.0) / 2.0 + special.loggamma((1.0 + 1j * t) / 2.0) - 0.5 * math.log(math.pi))


def chain_log_product_cdf(u: float, n_factors: int, dist: Distribution = "uniform",
                          scale: float = math.sqrt(3.0)) -> float:
    """``P(log|prod_{i=1}^n w_i| <= u)`` exactly (Orvieto et al. 2022, §3, log-distribution lemma behind Thm. 6).

    Uniform: ``log|prod w| = n log a - G_n`` with ``G_n ~ Gamma(n, 1)``, so the CDF is the Gamma survival function
    at ``n log a - u``. Gaussian: ``log|prod w| = n log s + sum log|z_i|``; its CDF is obtained by Gil-Pelaez
    inversion of the characteristic function ``phi(t)^n`` (``phi`` of ``log|z|``), integrated with ``scipy.quad``.
    """
    _check_dist(dist)
    _check_depth("n_factors", n_factors, 1)
    _check_pos("scale", scale)
    if dist == "uniform":
        return float(stats.gamma.sf(n_factors * math.log(scale) - u, a=n_factors))
    v = u - n_factors * math.log(scale)

    def integrand(t: float) -> float:
        if t == 0.0:
            return 0.0
        phi = _log_abs_std_normal_cf(np.array([t]))[0] ** n_factors
        return float(np.imag(np.exp(-1j * t * v) * phi) / t)

    # |phi(t)| ~ exp(-pi |t| / 4) per factor: the tail beyond this bound is below 1e-16.
    upper = 4.0 * 40.0 / (math.pi * n_factors) + 10.0 / math.sqrt(n_factors)
    val, _ = integrate.quad(integrand, 0.0, upper, limit=400, epsabs=1e-12, epsrel=1e-10)
    return float(0.5 - val / math.pi)


def chain_product_median(n_factors: int, dist: Distribution = "uniform", scale: float = math.sqrt(3.0)) -> float:
    """Exact median of ``|prod_{i=1}^n w_i|`` for i.i.d. weights (Orvieto et al. 2022, §3, Thm. 6).

    Uniform ``U[-a, a]``: ``a^n exp(-m_n)`` with ``m_n`` the median of ``Gamma(n, 1)``
    (Choi 1994: ``n - 1/3 < m_n < n`` and ``m_n = n - 1/3 + 8/(405 n) + O(n^-2)``). Gaussian ``N(0, s^2)``:
    ``exp(u*)`` with ``u*`` the root
    of :func:`chain_log_product_cdf` ``= 1/2``. ``n = 0`` gives the empty product ``1``.
    """
    _check_depth("n_factors", n_factors, 0)
    _check_dist(dist)
    _check_pos("scale", scale)
    if n_factors == 0:
        return 1.0
    if dist == "uniform":
        return float(math.exp(n_factors * math.log(scale) - stats.gamma.median(a=n_factors)))
    mu, var = log_abs_weight_mean_var(dist, scale)
    center, spread = n_factors * mu, 10.0 * math.sqrt(n_factors * var) + 1.0
    root = optimize.brentq(lambda u: chain_log_product_cdf(u, n_factors, dist, scale) - 0.5,
                           center - spread, center + spread, xtol=1e-12)
    return float(math.exp(root))


def chain_product_median_approx(n_factors: int, dist: Distribution = "uniform",
                                scale: float = math.sqrt(3.0)) -> float:
    """Closed-form approximations of the median of ``|prod_{i=1}^n w_i|`` (Orvieto et al. 2022, §3, Cor. after Thm. 6).

    Uniform: ``e^{1/3} (a/e)^n`` (from Choi's expansion of the Gamma median; log-error about ``8/(405 n)``).
    Gaussian: the CLT value ``exp(n E log|w|) = (s e^{-(gamma_E + log 2)/2})^n``, which ignores the skew of
    ``log|z|`` and is off by tens of percent at moderate ``n`` (use :func:`chain_product_median` for exact values).
    """
    _check_depth("n_factors", n_factors, 0)
    mu, _ = log_abs_weight_mean_var(dist, scale)
    if dist == "uniform":
        return float(math.exp(1.0 / 3.0) * (scale / math.e) ** n_factors) if n_factors > 0 else 1.0
    return float(math.exp(n_factors * mu))


@dataclass(frozen=True)
class ChainMedians:
    """Exact medians at one depth: ``|f|``, ``|df/dw_i|``, ``|d2f/dw_i dw_j|`` (i != j) and ``d2l/dw_i^2``."""

    depth: int
    forward: float
    gradient: float
    hessian_offdiag: float
    hessian_diag: float


def chain_medians(depth: int, dist: Distribution = "uniform", scale: float = math.sqrt(3.0),
                  x: float = 1.0) -> ChainMedians:
    """Exact medians of the chain's first and second derivatives (Orvieto et al. 2022, §3, Thm. 6).

    ``|f| = |x| prod_{l<=L} |w_l|`` (``L`` factors); ``|df/dw_i| = |x| prod_{j != i} |w_j|`` (``L - 1``);
    ``|d2f/dw_i dw_j| = |x| prod_{k != i,j} |w_k|`` (``L - 2``, ``i != j``, defined for ``L >= 2``, else NaN);
    the loss Hessian diagonal ``d2l/dw_i^2 = (df/dw_i)^2`` exactly (``d2f/dw_i^2 = 0``), so its median is the square
    of the gradient median. All vanish geometrically in ``L`` at the variance-preserving scale.
    """
    _check_depth("depth", depth, 1)
    ax = abs(x)
    g = ax * chain_product_median(depth - 1, dist, scale)
    return ChainMedians(
        depth=int(depth),
        forward=ax * chain_product_median(depth, dist, scale),
        gradient=g,
        hessian_offdiag=ax * chain_product_median(depth - 2, dist, scale) if depth >= 2 else float("nan"),
        hessian_diag=g * g,
    )


# ---------------------------------------------------------------------------------------------------------------
# Neural chain: escape from the plateau (Orvieto et al. 2022, §3, Prop. 7, Eq. (3); App. C.2, Eq. (89))
# ---------------------------------------------------------------------------------------------------------------

def _check_escape_args(depth: int, w0: float, x: float, y: float) -> None:
    _check_depth("depth", depth, 2)
    _check_pos("w0", w0)
    _check_pos("x", x)
    _check_pos("y", y)
    if x * w0 ** depth >= y:
        raise ValueError(f"w0 = {w0} is not below the solution: x * w0^depth = {x * w0 ** depth:.3g} >= y = {y}")


def chain_gf_upper_bound(t: float | np.ndarray, depth: int, w0: float, x: float = 1.0, y: float = 1.0):
    """Upper bound on the symmetric gradient-flow weight ``w(t)`` (Orvieto et al. 2022, §3, Prop. 7, Eq. (3)).

    On ``l = (1/2)(y - x w^L)^2`` with all weights equal to ``w``, the flow is ``w' = x w^{L-1}(y - x w^L)``;
    dropping the negative term gives ``w' <= x y w^{L-1}``, solved by
    ``w(t) <= [w0^{-(L-2)} - (L-2) x y t]^{-1/(L-2)}`` (``L > 2``; ``w0 e^{x y t}`` for ``L = 2``), which
    explodes at :func:`chain_gf_blowup_time`. Returns ``inf`` past the blow-up.
    """
    _check_escape_args(depth, w0, x, y)
    t = np.asarray(t, dtype=float)
    if depth == 2:
        out = w0 * np.exp(x * y * t)
    else:
        k = depth - 2
        base = w0 ** (-k) - k * x * y * t
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(base > 0, np.abs(base) ** (-1.0 / k), np.inf)
    return out if out.ndim else float(out)


def chain_gf_blowup_time(depth: int, w0: float, x: float = 1.0, y: float = 1.0) -> float:
    """Blow-up time of the upper-bounding ODE (Orvieto et al. 2022, §3, Prop. 7): ``t* = w0^{-(L-2)} / ((L-2) x y)`` (``L > 2``).

    Exponential in depth for ``w0 < 1`` (e.g. ``w0 = 1/2``, ``x = y = 1``: ``2^{L-2}/(L-2)``); ``inf`` for ``L = 2``.
    """
    _check_escape_args(depth, w0, x, y)
    if depth == 2:
        return float("inf")
    return float(w0 ** (-(depth - 2)) / ((depth - 2) * x * y))


def chain_escape_target(depth: int, w0: float, loss_fraction: float = 0.5, x: float = 1.0, y: float = 1.0) -> float:
    """Weight value ``w_q`` at which the symmetric chain loss first falls to ``q l(w0)`` (escape criterion).

    ``(1/2)(y - x w_q^L)^2 = q (1/2)(y - x w0^L)^2`` with ``w0 < w_q <= (y/x)^{1/L}`` gives
    ``w_q = ((y - sqrt(q) (y - x w0^L)) / x)^{1/L}``. This is our reading of "escaped" (App. C.2 plots the loss;
    the threshold is a documented option, default ``q = 1/2``).
    """
    _check_escape_args(depth, w0, x, y)
    if not 0.0 <= loss_fraction < 1.0:
        raise ValueError(f"loss_fraction = {loss_fraction!r} must be in [0, 1)")
    return float(((y - math.sqrt(loss_fraction) * (y - x * w0 ** depth)) / x) ** (1.0 / depth))


def chain_gf_escape_time_lower_bound(depth: int, w0: float, loss_fraction: float = 0.5, x: float = 1.0,
                                     y: float = 1.0) -> float:
    """Lower bound on the gradient-flow escape time from the Eq. (3) upper bound (Orvieto et al. 2022, §3, Prop. 7).

    Time for the bounding solution to reach ``w_q`` (:func:`chain_escape_target`):
    ``(w0^{-(L-2)} - w_q^{-(L-2)}) / ((L-2) x y)`` (``log(w_q/w0)/(x y)`` for ``L = 2``); exponential in ``L``.
    """
    wq = chain_escape_target(depth, w0, loss_fraction, x, y)
    if depth == 2:
        return float(math.log(wq / w0) / (x * y))
    k = depth - 2
    return float((w0 ** (-k) - wq ** (-k)) / (k * x * y))


def chain_gf_escape_time(depth: int, w0: float, loss_fraction: float = 0.5, x: float = 1.0, y: float = 1.0) -> float:
    """Exact time for the symmetric gradient flow to reach ``l = q l(w0)`` (Orvieto et al. 2022, §3, Prop. 7; our quadrature).

    ``t = int_{w0}^{w_q} dw / (x w^{L-1} (y - x w^L))``. Using
    ``1/(x w^{L-1}(y - x w^L)) = 1/(x y w^{L-1}) + w/(y (y - x w^L))`` the first part is the closed-form
    :func:`chain_gf_escape_time_lower_bound` and the remaining integrand is bounded, so ``scipy.quad`` is accurate
    even when ``w0^{-L}`` is astronomically large. Gradient descent with a small step ``eta`` needs about
    ``t / eta`` iterations.
    """
    wq = chain_escape_target(depth, w0, loss_fraction, x, y)
    rest, _ = integrate.quad(lambda w: w / (y * (y - x * w ** depth)), w0, wq, epsabs=1e-13, epsrel=1e-11, limit=200)
    return chain_gf_escape_time_lower_bound(depth, w0, loss_fraction, x, y) + float(rest)


def chain_rmsprop_escape_time_bound(depth: int, w0: float, lr: float, loss_fraction: float = 0.5, x: float = 1.0,
                                    y: float = 1.0) -> float:
    """Depth-independent bound on the RMSprop-flow escape time (Orvieto et al. 2022, §3, "Curvature adaptation of RMSprop").

    On ``w' = eta g / sqrt(v)`` with ``g = x y w^{L-1}`` increasing and ``v`` a lagging low-pass filter of ``g^2``
    (``v <= g^2``), ``w' >= eta`` and ``w(t) >= w0 + eta t``: the escape target ``w_q`` is reached by
    ``(w_q - w0) / eta``, with no dependence on ``L`` beyond ``w_q`` itself (``w_q <= (y/x)^{1/L}``). The argument
    ignores RMSprop's ``eps``; it needs ``eps << g(0)^2`` (inside the root) or ``eps << |g(0)|`` (outside).
    """
    _check_pos("lr", lr)
    return float((chain_escape_target(depth, w0, loss_fraction, x, y) - w0) / lr)


# ---------------------------------------------------------------------------------------------------------------
# Init schemes and MLP moment recursions (Orvieto et al. 2022, §2, §4, App. B.2)
# ---------------------------------------------------------------------------------------------------------------

def init_variance(scheme: Scheme, fan_in: int, fan_out: int | None = None) -> float:
    """Weight variance of an init scheme (Orvieto et al. 2022, §2, Prop. 2 and the schemes it discusses).

    LeCun ``1/fan_in``; Xavier/Glorot ``2/(fan_in + fan_out)``; He/Kaiming ``2/fan_in``; PyTorch's ``nn.Linear``
    default (``kaiming_uniform_(a=sqrt(5))`` = ``U[-1/sqrt(fan_in), 1/sqrt(fan_in)]``) ``1/(3 fan_in)``.
    """
    _check_depth("fan_in", fan_in, 1)
    if scheme == "lecun":
        return 1.0 / fan_in
    if scheme == "xavier":
        fo = fan_in if fan_out is None else fan_out
        _check_depth("fan_out", fo, 1)
        return 2.0 / (fan_in + fo)
    if scheme == "he":
        return 2.0 / fan_in
    if scheme == "torch_default":
        return 1.0 / (3.0 * fan_in)
    raise ValueError(f"init scheme {scheme!r} is not supported; use lecun, xavier, he or torch_default")


def uniform_bound(variance: float) -> float:
    """Half-width ``a`` of ``U[-a, a]`` with the given variance (Orvieto et al. 2022, §2): ``variance = a^2 / 3``, ``a = sqrt(3 v)``."""
    _check_pos("variance", variance)
    return math.sqrt(3.0 * variance)


def weight_fourth_moment(variance: float, dist: Distribution) -> float:
    """``mu_4 = E w^4`` (Orvieto et al. 2022, Assumption 1): ``3 sigma^4`` (Gaussian), ``(9/5) sigma^4`` (uniform, ``a^4/5``)."""
    _check_pos("variance", variance)
    _check_dist(dist)
    return 3.0 * variance ** 2 if dist == "normal" else 1.8 * variance ** 2


def layer_gain(variance: float, width: int, activation: Activation) -> float:
    """Per-layer factor of ``E||x_l||^2`` (Orvieto et al. 2022, §2, Prop. 2): ``c m sigma^2``, ``c = 1`` (linear), ``1/2`` (ReLU).

    ``E||x_L||^2 = (c m sigma^2)^L ||x||^2`` for square layers; ``1`` is "critical" (Xavier linear, He ReLU).
    """
    _check_pos("variance", variance)
    _check_depth("width", width, 1)
    if activation not in ("linear", "relu"):
        raise ValueError(f"activation {activation!r} is not supported; use 'linear' or 'relu'")
    return (1.0 if activation == "linear" else 0.5) * width * variance


def mlp_norm_moments(widths: Sequence[int], variances: Sequence[float], fourth_moments: Sequence[float],
                     activation: Activation, x: np.ndarray | Sequence[float],
                     activate_last: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``E||x_l||^2`` and ``E||x_l||^4`` through an i.i.d.-initialized MLP (Orvieto et al. 2022, §4, Prop. 8; App. B.2, Eq. (41)).

    Layer ``l`` maps ``x_{l-1}`` (width ``widths[l-1]``) to ``h = W_l x_{l-1}`` (width ``m = widths[l]``) with
    i.i.d. symmetric entries of variance ``s^2 = variances[l-1]`` and fourth moment ``mu = fourth_moments[l-1]``,
    then ``x_l = h`` (linear) or ``relu(h)`` (ReLU; the last layer stays linear unless ``activate_last``). No biases.
    Conditioning on ``x = x_{l-1}`` with ``A = ||x||^4`` and ``B = sum_j x_j^4``:

    * linear: ``E||h||^2 = m s^2 ||x||^2``, ``E||h||^4 = m(m+2) s^4 A + m(mu - 3 s^4) B``,
      ``E sum_i h_i^4 = 3 m s^4 A + m (mu - 3 s^4) B``;
    * ReLU: ``E||x_l||^2 = (m/2) s^2 ||x||^2``, ``E||x_l||^4 = m(m+5)/4 s^4 A + (m/2)(mu - 3 s^4) B``,
      ``E sum_i x_{l,i}^4 = (3m/2) s^4 A + (m/2)(mu - 3 s^4) B``,

    a linear 2x2 recursion on ``(E||x||^4, E sum x^4)``. For Gaussian weights ``mu = 3 s^4`` decouples it and gives
    Eq. (6): ``E||x_L||^4 / (E||x_L||^2)^2 = (1 + 2/m)^L`` (linear), ``(1 + 5/m)^L`` (ReLU) for constant width.

    ``widths`` is ``[d_0, m_1, ..., m_L]``; ``x`` the (fixed) input. Returns two arrays of length ``L + 1`` (index 0:
    the input).
    """
    widths = [int(w) for w in widths]
    n_layers = len(widths) - 1
    if n_layers < 1 or any(w < 1 for w in widths):
        raise ValueError(f"widths = {widths!r} must list >= 2 positive widths [d_0, m_1, ..., m_L]")
    if len(variances) != n_layers or len(fourth_moments) != n_layers:
        raise ValueError(f"need {n_layers} variances and fourth moments, got {len(variances)} and "
                         f"{len(fourth_moments)}")
    if activation not in ("linear", "relu"):
        raise ValueError(f"activation {activation!r} is not supported; use 'linear' or 'relu'")
    xv = np.asarray(x, dtype=float).reshape(-1)
    if xv.size != widths[0]:
        raise ValueError(f"input has {xv.size} entries but widths[0] = {widths[0]}")
    m2 = np.empty(n_layers + 1)
    m4 = np.empty(n_layers + 1)
    m2[0] = float(xv @ xv)
    m4[0] = m2[0] ** 2
    s4 = float(np.sum(xv ** 4))
    for l in range(1, n_layers + 1):
        m, var, mu = widths[l], float(variances[l - 1]), float(fourth_moments[l - 1])
        _check_pos("variance", var)
        if mu < var ** 2:
            raise ValueError(f"fourth moment {mu} < variance^2 {var ** 2} is impossible (layer {l})")
        excess = mu - 3.0 * var ** 2
        relu = activation == "relu" and (l < n_layers or activate_last)
        if relu:
            m2[l] = 0.5 * m * var * m2[l - 1]
            m4[l], s4 = (m * (m + 5) / 4.0 * var ** 2 * m4[l - 1] + 0.5 * m * excess * s4,
                         1.5 * m * var ** 2 * m4[l - 1] + 0.5 * m * excess * s4)
        else:
            m2[l] = m * var * m2[l - 1]
            m4[l], s4 = (m * (m + 2) * var ** 2 * m4[l - 1] + m * excess * s4,
                         3.0 * m * var ** 2 * m4[l - 1] + m * excess * s4)
    return m2, m4


def normalized_second_moment_growth(width: int, depth: int, activation: Activation) -> float:
    """``E||x_L||^4 / (E||x_L||^2)^2`` for Gaussian weights and constant width (Orvieto et al. 2022, §4, Eq. (6)).

    ``(1 + 2/m)^L`` (linear) or ``(1 + 5/m)^L`` (ReLU, all ``L`` layers activated), independent of the variance:
    at the critical (Xavier / He) variance ``Var(||x_L||^2/||x||^2) = (1 + c/m)^L - 1`` explodes unless ``m``
    grows at least linearly with ``L``. (Exact for an input with ``sum x_j^4`` irrelevant, i.e. Gaussian weights.)
    """
    _check_pos("width", width)
    _check_depth("depth", depth, 0)
    c = {"linear": 2.0, "relu": 5.0}.get(activation)
    if c is None:
        raise ValueError(f"activation {activation!r} is not supported; use 'linear' or 'relu'")
    return float((1.0 + c / width) ** depth)


def mallows_median_lower_bound(mean: float, variance: float) -> float:
    """Mallows-Richter: ``|median - mean| <= std``, so ``median >= mean - sqrt(variance)`` (Orvieto et al. 2022, §4, Thm. 9 proof)."""
    if variance < 0:
        raise ValueError(f"variance = {variance!r} must be >= 0")
    return float(mean - math.sqrt(variance))


def lognormal_median(m1: float, m2: float) -> float:
    """Median of the log-normal matching ``E Y = m1`` and ``E Y^2 = m2``: ``m1^2 / sqrt(m2)``.

    A heuristic for the median of ``||x_L||^2/||x||^2`` from the exact moments of :func:`mlp_norm_moments`
    (``log ||x_L||^2`` is close to Gaussian for ``L, m`` large); with Eq. (6) at the critical variance
    it gives ``(1 + c/m)^{-L/2}``, i.e. about ``exp(-L/m)`` (linear) and ``exp(-5L/(2m))`` (ReLU).
    """
    _check_pos("m1", m1)
    if not m2 >= m1 ** 2:
        raise ValueError(f"m2 = {m2!r} must be >= m1^2 = {m1 ** 2!r}")
    return float(m1 ** 2 / math.sqrt(m2))


def min_width_for_median(depth: int, activation: Activation, level: float = 0.5) -> float:
    """Smallest constant width for which Mallows guarantees ``median(||x_L||^2/||x||^2) >= level`` (Orvieto et al. 2022, §4, Thm. 9).

    At the critical Gaussian variance the mean is ``1`` and the variance ``(1 + c/m)^L - 1`` (Eq. (6)); requiring
    ``1 - sqrt((1 + c/m)^L - 1) >= level`` gives ``m >= c / ((1 + (1 - level)^2)^{1/L} - 1)``, i.e. ``m`` linear in
    ``L`` (about ``9 L`` linear, ``22 L`` ReLU for ``level = 1/2``).
    """
    _check_depth("depth", depth, 1)
    if not 0.0 <= level < 1.0:
        raise ValueError(f"level = {level!r} must be in [0, 1)")
    c = {"linear": 2.0, "relu": 5.0}.get(activation)
    if c is None:
        raise ValueError(f"activation {activation!r} is not supported; use 'linear' or 'relu'")
    return float(c / ((1.0 + (1.0 - level) ** 2) ** (1.0 / depth) - 1.0))


def hessian_block_scaling(depth: int, gain: float) -> dict[str, float]:
    """Thm. 10 scalings (in expectation) of squared norms at init, relative to depth 0 (Orvieto et al. 2022, §4, Thm. 10).

    ``E||grad_{W_l} l||^2 ~ gain^{L-1}``, off-diagonal blocks ``E||H_lk||_F^2 ~ gain^{L-2}`` (residual term),
    diagonal blocks ``E||H_ll||_F^2 ~ gain^{2(L-1)}`` (pure Gauss-Newton ``J_l^T J_l``): with a sub-critical gain
    (LeCun on ReLU: ``1/2``; PyTorch default on linear: ``1/3``) the diagonal vanishes twice as fast (in log) as
    the gradient, so ``Tr H << ||H||_F`` and eigenvalues of both signs must exist.
    """
    _check_depth("depth", depth, 2)
    _check_pos("gain", gain)
    return {"gradient_sq": gain ** (depth - 1), "offdiag_sq": gain ** (depth - 2), "diag_sq": gain ** (2 * (depth - 1))}

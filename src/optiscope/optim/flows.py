"""Modified flows of Adam and RMSProp (Cattaneo et al. 2024, Thm. 3.1 and §2).

Adam's iterates theta^(n) stay O(h) close to the *first-order flow* and O(h^2) close to the *second-order modified
flow*, both piecewise ODEs whose right-hand side changes at t = nh (Cattaneo et al. 2024, Thm. 3.1, App. E):

    first order:   dtheta/dt = -P^(n)(theta)
    second order:  dtheta/dt = -P^(n)(theta) - h [ Q^(n)(theta) + 1/2 (grad P^(n)) P^(n) (theta) ]     t in [nh, (n+1)h]

with, for the mini-batch losses E_k used at iterations k = n-K .. n (history truncated at K),

    M^(n)  = b1(n)^-1 sum_k (1-b1) b1^(n-k) grad E_k          V^(n) = b2(n)^-1 sum_k (1-b2) b2^(n-k) (grad E_k)^2
    R^(n)  = sqrt(V + eps)   [eps outside: sqrt(V) + eps]      P^(n) = M / R
    D^(n,k) = sum_{l=k}^{n-1} P^(l)                           (backward displacement (theta^(k) - theta^(n)) / h)
    Q + 1/2 (grad P)P = dM/R - M dV/(2 R^3)                    [eps outside: dM/R - M dV/(2 sqrt(V) R^2)]
    dM = b1^-1 sum_k (1-b1) b1^(n-k) H_k u_k,   dV = b2^-1 sum_k (1-b2) b2^(n-k) 2 grad E_k * H_k u_k,
    u_k = D^(n,k) + 1/2 P^(n)

(b_i(n) = 1 - beta_i^(n+1) with bias correction, 1 without). Folding 1/2 (grad P)P into u_k makes every Hessian
term a Hessian-vector product with one vector per distinct batch. In the full-batch case this reduces to
``dtheta_j/dt = -(a1/R_j)(g_j + kappa_j [H P]_j)`` with kappa from :func:`optiscope.theory.adam.correction_coefficient`;
the full-batch path uses that closed form (one gradient and one HVP per evaluation).

Integrators: ``"rk4"`` (classical Runge-Kutta with ``substeps`` steps per interval [nh, (n+1)h], the default) and
``"discrete"``, the memoryless iteration theta <- theta - h P - h^2 Q (Cattaneo et al. 2024, §5 footnote, Eq. 11/63; the exact form of Eq. 63 is not
recoverable from the paper, so it is an option, not the default).

RMSProp is Adam with beta1 = 0 and no bias correction (:meth:`AdamHyper.rmsprop`).
Hessian-vector products are forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``) through
:class:`optiscope.curvature.Hessian`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from optiscope.theory.adam import (
    check_hyperparameters,
    correction_coefficient,
    moment_scale,
    truncation_horizon,
)

LossFn = Callable[[dict[str, Tensor]], Tensor]

__all__ = [
    "AdamHyper",
    "FlowTrajectory",
    "NotTwiceDifferentiableError",
    "ParamSpace",
    "adam_iterates",
    "full_batch_correction",
    "full_batch_field",
    "integrate_flow",
    "minibatch_field",
    "model_loss",
]


class NotTwiceDifferentiableError(ValueError):
    """The loss has a finite gradient but a non-finite Hessian-vector product at the point."""


@dataclass(frozen=True)
class AdamHyper:
    """Adam hyperparameters in the paper's notation: h (lr), beta1 (beta), beta2 (rho), eps (Cattaneo et al. 2024, Def. 1.1)."""

    h: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    eps_inside_sqrt: bool = True
    bias_correction: bool = True

    def __post_init__(self) -> None:
        check_hyperparameters(self.h, self.beta1, self.beta2, self.eps, self.eps_inside_sqrt)

    @classmethod
    def rmsprop(cls, h: float, beta: float = 0.99, eps: float = 1e-8, eps_inside_sqrt: bool = True) -> AdamHyper:
        """RMSProp (Cattaneo et al. 2024, App. B/C) = Adam with beta1 = 0 and no bias correction."""
        return cls(h=h, beta1=0.0, beta2=beta, eps=eps, eps_inside_sqrt=eps_inside_sqrt, bias_correction=False)


class ParamSpace:
    """Flat float vector <-> named parameter dict (``model.named_parameters()`` order)."""

    def __init__(self, params: Mapping[str, Tensor]):
        if not params:
            raise ValueError("params is empty: nothing to integrate")
        self.names = list(params)
        self.shapes = [tuple(params[n].shape) for n in self.names]
        self.numels = [int(params[n].numel()) for n in self.names]
        self.numel = sum(self.numels)

    def flatten(self, params: Mapping[str, Tensor]) -> Tensor:
        """Concatenate ``params`` (detached) into one flat vector in this space's order; ``ValueError`` when
        one is missing."""
        missing = [n for n in self.names if n not in params]
        if missing:
            raise ValueError(f"parameter dict lacks {missing}")
        return torch.cat([params[n].detach().reshape(-1) for n in self.names])

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Split a flat vector back into a name -> tensor dict (views of ``vec``); ``ValueError`` on a wrong length."""
        if vec.numel() != self.numel:
            raise ValueError(f"vector has {vec.numel()} entries, the parameters have {self.numel}")
        return {n: p.view(s) for n, p, s in zip(self.names, torch.split(vec, self.numels), self.shapes)}


def model_loss(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], data,
               params: Sequence[str] | None = None) -> tuple[LossFn, dict[str, Tensor]]:
    """``(f, params0)``: the loss of ``model`` on ``data`` as a pure function of a parameter dict, and the current
    parameters (detached copies).

    ``data`` is one ``(X, y)`` batch or an iterable of batches; the loss is the exact sample-weighted mean
    (docs/architecture.md), evaluated through the curvature layer's pure loss (``torch.func.functional_call``; the
    model's parameters and BatchNorm running statistics are never touched).
    """
    from optiscope.curvature._problem import LossFunction

    lf = LossFunction.from_model(model, loss_fn, data, params)
    terms = list(lf.terms)

    def f(p: dict[str, Tensor]) -> Tensor:
        total = None
        for w, term in terms:
            v = w * term(p)
            total = v if total is None else total + v
        return total

    return f, {n: t.clone() for n, t in lf.params.items()}


def _cosine(a: Tensor, b: Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return float("nan")
    return float(torch.dot(a, b) / (na * nb))


class _Oracle:
    """Gradient and Hessian-vector products of one loss on flat vectors (forward-over-reverse via curvature)."""

    def __init__(self, f: LossFn, space: ParamSpace):
        self.f = f
        self.space = space
        self.n_grad = 0
        self.n_hvp = 0

    def _hessian(self, theta: Tensor):
        from optiscope.curvature import Hessian

        return Hessian.from_function(self.f, self.space.unflatten(theta))

    def gradient(self, theta: Tensor) -> tuple[Tensor, object]:
        if not torch.all(torch.isfinite(theta)):
            raise _Diverged()
        from optiscope.curvature import NonFiniteLossError

        try:
            hess = self._hessian(theta)
        except NonFiniteLossError as e:  # the curvature layer refuses a non-finite loss: an outcome of the dynamics
            raise _Diverged() from e
        g = hess.gradient()
        self.n_grad += 1
        return self.space.flatten(g), hess

    def hvp(self, hess, v: Tensor) -> Tensor:
        out = self.space.flatten(hess.hvp(self.space.unflatten(v)))
        self.n_hvp += 1
        if not torch.all(torch.isfinite(out)):
            raise NotTwiceDifferentiableError(
                "the loss is not twice differentiable at this point: the Hessian-vector product is non-finite "
                "while the gradient is finite")
        return out


class _Diverged(Exception):
    pass


def _check_grad(g: Tensor) -> None:
    if not torch.all(torch.isfinite(g)):
        raise _Diverged()


def full_batch_field(f: LossFn | _Oracle, theta: Tensor, hp: AdamHyper, n: int | None, order: int = 2,
                     exact: bool = True, space: ParamSpace | None = None, discrete: bool = False) -> Tensor:
    """Right-hand side of the full-batch flow at flat ``theta`` on interval n (Cattaneo et al. 2024, §2 Eq. 2-3).

    order 1: -a1 g / R.  order 2: -(a1/R)(g + kappa (H P)), kappa = theory.adam.correction_coefficient (exact
    piecewise c_b(n) if ``exact``, else asymptotic); ``discrete=True`` drops the 1/2 eps term (memoryless
    iteration's h^2 Q, see module docstring) and returns -P - h Q.
    """
    oracle = f if isinstance(f, _Oracle) else _Oracle(f, space or _space_for(theta))
    m = None if not exact else n
    if order == 2 and m is not None and m > 0 and not hp.bias_correction:
        if max(hp.beta1, hp.beta2) ** (m + 1) > 1e-12:
            # no closed-form kappa in the transient without bias correction: the exact piecewise field (one batch,
            # whole history) until the moment scales a_b(n) = 1 - b^(n+1) equal 1 to 1e-12
            return minibatch_field([oracle], lambda k: 0, theta, hp, m, order=2, history=m, discrete=discrete)
        m = None
    g, hess = oracle.gradient(theta)
    _check_grad(g)
    a1, r, p = _full_batch_direction(g, hp, m)
    if order == 1:
        return -p
    if order != 2:
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    return -(a1 / r) * (g + _full_batch_bias(oracle, hess, g, p, hp, m, include_discretisation=not discrete))


def _full_batch_direction(g: Tensor, hp: AdamHyper, m: int | None) -> tuple[float, Tensor, Tensor]:
    """``(a1, R, P)`` of the full-batch flow: moment scales ``a_b = 1 - b^(m+1)`` (1 without bias correction),
    ``R = sqrt(a2 g^2 + eps)`` (eps inside) or ``sqrt(a2)|g| + eps`` (outside) and ``P = a1 g / R`` (Cattaneo et al. 2024, §1b)."""
    a1 = moment_scale(hp.beta1, m, hp.bias_correction)
    a2 = moment_scale(hp.beta2, m, hp.bias_correction)
    r = torch.sqrt(a2 * g * g + hp.eps) if hp.eps_inside_sqrt else math.sqrt(a2) * g.abs() + hp.eps
    return a1, r, a1 * g / r


def _full_batch_bias(oracle: _Oracle, hess, g: Tensor, p: Tensor, hp: AdamHyper, m: int | None,
                     include_discretisation: bool = True) -> Tensor:
    """The correction ``kappa(g) * (H P)`` of Cattaneo et al. 2024, Eq. (3): one Hessian-vector product."""
    hp_vec = oracle.hvp(hess, p)
    kappa = torch.as_tensor(
        correction_coefficient(g.detach().cpu().double().numpy(), hp.h, hp.beta1, hp.beta2, hp.eps, m,
                               hp.eps_inside_sqrt, hp.bias_correction, include_discretisation=include_discretisation),
        dtype=g.dtype, device=g.device)
    return kappa * hp_vec


def full_batch_correction(f: LossFn, params: Mapping[str, Tensor], hp: AdamHyper, n: int | None = None) -> dict:
    """The correction term of Cattaneo et al. 2024, Eq. (3) at ``params``: bias = kappa * (H P), with the gradient beside it.

    Without bias correction the asymptotic coefficient (n -> infinity) is used whatever ``n``.
    Returns ``{"gradient", "correction", "norm", "relative", "cosine", "velocity_cosine"}``: flat tensors g and
    bias, ||bias||, ||bias||/||g||, cos(bias, g) (> 0: the correction adds to the gradient, i.e. penalises the
    norm of Cattaneo et al. 2024, Eq. 3; < 0: anti-penalises it) and the cosine between the first- and second-order velocities.
    Raises ``ValueError`` if the gradient is non-finite or the Hessian-vector product is (not twice differentiable).
    """
    space = ParamSpace(params)
    theta = space.flatten(params)
    oracle = _Oracle(f, space)
    m = n if hp.bias_correction else None  # without bias correction only the asymptotic coefficient exists
    g, hess = oracle.gradient(theta)
    if not torch.all(torch.isfinite(g)):
        raise ValueError("the gradient is non-finite at these parameters")
    a1, r, p = _full_batch_direction(g, hp, m)
    bias = _full_batch_bias(oracle, hess, g, p, hp, m)
    gn = float(g.norm())
    return {
        "gradient": g, "correction": bias, "norm": float(bias.norm()),
        "relative": float(bias.norm()) / gn if gn > 0 else float("nan"),
        "cosine": _cosine(bias, g), "velocity_cosine": _cosine(a1 * g / r, a1 * (g + bias) / r),
    }


def _space_for(theta: Tensor) -> ParamSpace:
    return ParamSpace({"theta": theta})


def minibatch_field(oracles: Sequence[_Oracle], schedule: Callable[[int], int], theta: Tensor, hp: AdamHyper,
                    n: int, order: int = 2, history: int | None = None, discrete: bool = False) -> Tensor:
    """Right-hand side of the mini-batch piecewise ODE on interval n (Cattaneo et al. 2024, Thm. 3.1).

    ``oracles[b]`` is batch b's loss, ``schedule(k)`` the batch used at iteration k. Sums over k run over
    max(0, n-K) .. n with K = ``history`` (default :func:`optiscope.theory.adam.truncation_horizon`); K >= n is
    exact. ``discrete=True`` returns -P - h Q (u_k = D^(n,k) without the 1/2 P^(n) term).
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    K = truncation_horizon(hp.beta1, hp.beta2) if history is None else int(history)
    if K < 0:
        raise ValueError(f"history K must be >= 0, got {history!r}")
    k0 = max(0, n - K)
    ks = list(range(k0, n + 1))
    batch_of = {k: int(schedule(k)) for k in ks}
    grads: dict[int, tuple[Tensor, object]] = {}
    for b in set(batch_of.values()):
        if not 0 <= b < len(oracles):
            raise ValueError(f"schedule gave batch {b}; there are {len(oracles)} batches")
        g, hess = oracles[b].gradient(theta)
        _check_grad(g)
        grads[b] = (g, hess)
    b1, b2, eps = hp.beta1, hp.beta2, hp.eps

    def direction(m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        r = torch.sqrt(v + eps) if hp.eps_inside_sqrt else torch.sqrt(v) + eps
        return m / r, r

    # one forward pass over the window: M^(l), V^(l), P^(l) for l = k0..n (sums truncated at k0)
    m = torch.zeros_like(theta)
    v = torch.zeros_like(theta)
    p_hist: list[Tensor] = []
    for l in ks:
        g = grads[batch_of[l]][0]
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_l, v_l = (m / (1 - b1 ** (l + 1)), v / (1 - b2 ** (l + 1))) if hp.bias_correction else (m, v)
        p_l, r_l = direction(m_l, v_l)
        p_hist.append(p_l)
    m_n, v_n, p_n, r_n = m_l, v_l, p_l, r_l
    if order == 1:
        return -p_n
    # D^(n,k) = sum_{l=k}^{n-1} P^(l), accumulated backwards from k = n (D = 0) to k0.
    u_m: dict[int, Tensor] = {b: torch.zeros_like(theta) for b in grads}
    u_v: dict[int, Tensor] = {b: torch.zeros_like(theta) for b in grads}
    d = torch.zeros_like(theta)
    half = 0.0 if discrete else 0.5
    for k in range(n, k0 - 1, -1):
        if k < n:
            d = d + p_hist[k - k0]
        u = d + half * p_n
        b = batch_of[k]
        u_m[b] = u_m[b] + (1 - b1) * b1 ** (n - k) * u
        u_v[b] = u_v[b] + (1 - b2) * b2 ** (n - k) * u
    dm = torch.zeros_like(theta)
    dv = torch.zeros_like(theta)
    for b, (g, hess) in grads.items():
        dm = dm + oracles[b].hvp(hess, u_m[b])
        dv = dv + 2 * g * oracles[b].hvp(hess, u_v[b])
    if hp.bias_correction:
        dm = dm / (1 - b1 ** (n + 1))
        dv = dv / (1 - b2 ** (n + 1))
    if hp.eps_inside_sqrt:
        q = dm / r_n - m_n * dv / (2 * r_n ** 3)
    else:
        sv = torch.sqrt(v_n)
        safe = torch.where(sv > 0, sv, torch.ones_like(sv))
        q = dm / r_n - torch.where(sv > 0, m_n * dv / (2 * safe * r_n ** 2), torch.zeros_like(sv))
    return -p_n - hp.h * q


@dataclass
class FlowTrajectory:
    """Iterates at t = nh for the recorded n: ``steps`` (list[int]), ``thetas`` ([len(steps), d] tensor).

    ``diverged_at`` is the first interval n whose field was non-finite (the flow stops there), else None.
    ``n_grad``/``n_hvp`` count oracle calls so cost is visible.
    """

    steps: list[int]
    thetas: Tensor
    h: float
    order: int
    diverged_at: int | None = None
    n_grad: int = 0
    n_hvp: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def times(self) -> list[float]:
        """The flow times ``t = n h`` of the recorded iterates."""
        return [s * self.h for s in self.steps]

    @property
    def status(self) -> str:
        """``"finished"`` or ``"diverged at step n"``."""
        return "finished" if self.diverged_at is None else f"diverged at step {self.diverged_at}"


def integrate_flow(loss: LossFn | Sequence[LossFn], params0: Mapping[str, Tensor], hp: AdamHyper, steps: int,
                   order: int = 2, substeps: int = 4, method: Literal["rk4", "discrete"] = "rk4",
                   exact: bool = True, history: int | None = None, schedule: Callable[[int], int] | None = None,
                   record_every: int = 1, progress: Callable[[int], None] | None = None) -> FlowTrajectory:
    """Integrate the first- (``order=1``) or second-order (``order=2``) modified flow of Adam for ``steps`` intervals.

    ``loss`` is one full-batch loss ``f(params_dict) -> scalar`` or a sequence of mini-batch losses (then
    ``schedule(k)`` gives the batch of iteration k; default cyclic ``k % len(loss)``; ``history`` is the K of
    :func:`minibatch_field`). ``method="rk4"`` integrates each interval [nh, (n+1)h] with ``substeps`` RK4 steps;
    ``"discrete"`` takes one memoryless step theta - h P - h^2 Q (order 2) or theta - h P (order 1).
    Returns theta at t = nh for n = 0, record_every, ..., steps. A non-finite gradient or state ends the flow with
    ``diverged_at = n``; a finite gradient with a non-finite HVP raises :class:`NotTwiceDifferentiableError`.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if not isinstance(substeps, int) or substeps < 1:
        raise ValueError(f"substeps must be a positive integer, got {substeps!r}")
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    if method not in ("rk4", "discrete"):
        raise ValueError(f"method must be 'rk4' or 'discrete', got {method!r}")
    if not isinstance(record_every, int) or record_every < 1:
        raise ValueError(f"record_every must be a positive integer, got {record_every!r}")
    space = ParamSpace(params0)
    theta = space.flatten(params0).clone()
    if not torch.all(torch.isfinite(theta)):
        raise ValueError("initial parameters contain non-finite values")
    discrete = method == "discrete"
    if callable(loss) and not isinstance(loss, (list, tuple)):
        oracle = _Oracle(loss, space)
        oracles = [oracle]

        def field_fn(x: Tensor, n: int) -> Tensor:
            return full_batch_field(oracle, x, hp, n, order, exact, discrete=discrete)
    else:
        losses = list(loss)
        if not losses:
            raise ValueError("loss is an empty sequence of mini-batch losses")
        oracles = [_Oracle(fk, space) for fk in losses]
        sched = schedule or (lambda k: k % len(losses))

        def field_fn(x: Tensor, n: int) -> Tensor:
            return minibatch_field(oracles, sched, x, hp, n, order, history, discrete=discrete)

    recorded = [0]
    thetas = [theta.clone()]
    diverged_at = None
    dt = hp.h / substeps
    for n in range(steps):
        try:
            if discrete:
                theta = theta + hp.h * field_fn(theta, n)
            else:
                for _ in range(substeps):
                    k1 = field_fn(theta, n)
                    k2 = field_fn(theta + 0.5 * dt * k1, n)
                    k3 = field_fn(theta + 0.5 * dt * k2, n)
                    k4 = field_fn(theta + dt * k3, n)
                    theta = theta + (dt / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
            if not torch.all(torch.isfinite(theta)):
                raise _Diverged()
        except _Diverged:
            diverged_at = n
            break
        if (n + 1) % record_every == 0 or n + 1 == steps:
            recorded.append(n + 1)
            thetas.append(theta.clone())
        if progress is not None:
            progress(n)
    return FlowTrajectory(recorded, torch.stack(thetas), hp.h, order, diverged_at,
                          sum(o.n_grad for o in oracles), sum(o.n_hvp for o in oracles),
                          {"method": method, "substeps": substeps, "exact": exact})


def adam_iterates(loss: LossFn | Sequence[LossFn], params0: Mapping[str, Tensor], hp: AdamHyper, steps: int,
                  schedule: Callable[[int], int] | None = None, record_every: int = 1) -> FlowTrajectory:
    """Run :class:`optiscope.optim.Adam` (or :class:`~optiscope.optim.RMSProp` for ``AdamHyper.rmsprop``) on a flat
    copy of ``params0`` and record theta^(n) at t = nh: the discrete trajectory the flows approximate.

    ``loss`` is a full-batch loss or a sequence of mini-batch losses (``schedule(k)`` picks batch k's loss, default
    cyclic). Returns a trajectory with ``order=0``; a non-finite loss, gradient or iterate stops it with
    ``diverged_at = n`` (an outcome, not an error).
    """
    from optiscope.optim.adaptive import Adam, RMSProp

    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if not isinstance(record_every, int) or record_every < 1:
        raise ValueError(f"record_every must be a positive integer, got {record_every!r}")
    space = ParamSpace(params0)
    theta = space.flatten(params0).clone().requires_grad_(True)
    losses = [loss] if callable(loss) and not isinstance(loss, (list, tuple)) else list(loss)
    if not losses:
        raise ValueError("loss is an empty sequence of mini-batch losses")
    sched = schedule or (lambda k: k % len(losses))
    if hp.beta1 == 0.0 and not hp.bias_correction:
        opt = RMSProp([theta], lr=hp.h, beta=hp.beta2, eps=hp.eps, eps_inside_sqrt=hp.eps_inside_sqrt)
    else:
        opt = Adam([theta], lr=hp.h, betas=(hp.beta1, hp.beta2), eps=hp.eps, eps_inside_sqrt=hp.eps_inside_sqrt,
                   bias_correction=hp.bias_correction)
    recorded, thetas, diverged_at = [0], [theta.detach().clone()], None
    for n in range(steps):
        opt.zero_grad(set_to_none=True)
        value = losses[sched(n)](space.unflatten(theta))
        value.backward()
        if not (torch.isfinite(value) and torch.all(torch.isfinite(theta.grad))):
            diverged_at = n
            break
        opt.step()
        if not torch.all(torch.isfinite(theta.detach())):
            diverged_at = n
            break
        if (n + 1) % record_every == 0 or n + 1 == steps:
            recorded.append(n + 1)
            thetas.append(theta.detach().clone())
    return FlowTrajectory(recorded, torch.stack(thetas), hp.h, 0, diverged_at, steps, 0, {"method": "adam"})

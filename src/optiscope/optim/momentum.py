"""Non-adaptive optimizers: SGD (PyTorch momentum convention), HeavyBall (Velikanov et al. 2023 eq. (1)), SignGD."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from optiscope.optim.base import ExactOptimizer, check_lr, check_momentum, check_weight_decay


class SGD(ExactOptimizer):
    r"""SGD with PyTorch's momentum convention (``torch.optim.SGD``); ``sgdm`` in :data:`OPTIMIZERS`.

    For ``n = 0, 1, ...`` with momentum ``mu``, dampening ``d`` and learning rate ``lr_n`` of step ``n``::

        g       = grad E_n(theta^(n)) + weight_decay * theta^(n)      (coupled L2; Jiang et al. 2023, App. A.7, Li & Arora 2020)
        b^(1)   = g                                                  (first step, if no buffer was set)
        b^(n+1) = mu b^(n) + (1 - d) g                               (later steps, or a pre-set buffer b^(0))
        theta^(n+1) = theta^(n) - lr_n * b^(n+1)                     (nesterov: - lr_n * (g + mu b^(n+1)))

    ``mu = 0`` is plain (mini-batch) gradient descent. A pre-set buffer ``state[p]["momentum_buffer"]`` is used as
    ``b^(0)`` (with ``d = 0`` this equals torch's zero-buffer start when it is zero); the exponential-LR equivalence
    of Li & Arora 2020 needs one (:func:`optiscope.theory.explr.initial_momentum_buffer`, :class:`optiscope.optim.ExpLR`).
    Momentum in (-1, 1) is accepted. Non-adaptive: ``diagonal_preconditioner()`` is ``None`` per parameter.
    """

    def __init__(self, params: Iterable, lr: float = 1e-2, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False) -> None:
        if not isinstance(dampening, (int, float)) or not 0.0 <= dampening <= 1.0:
            raise ValueError(f"invalid dampening={dampening!r}: must lie in [0, 1]")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening = 0")
        defaults = {"lr": check_lr(lr), "momentum": check_momentum(momentum), "dampening": float(dampening),
                        "weight_decay": check_weight_decay(weight_decay), "nesterov": bool(nesterov)}
        super().__init__(params, defaults)

    def _validate_group(self, group):
        check_lr(group["lr"]), check_momentum(group["momentum"]), check_weight_decay(group["weight_decay"])

    @torch.no_grad()
    def step(self, closure=None):
        """One step of the rule in the class docstring."""
        loss = self._closure_loss(closure)
        for group in self.param_groups:
            mu, d, lr = group["momentum"], group["dampening"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"] != 0:
                    g = g.add(p, alpha=group["weight_decay"])
                if mu != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = g.clone()
                    else:
                        buf.mul_(mu).add_(g, alpha=1.0 - d)
                    direction = g.add(buf, alpha=mu) if group["nesterov"] else buf
                else:
                    direction = g
                p.add_(direction, alpha=-lr)
        return loss


class HeavyBall(ExactOptimizer):
    r"""Heavy-ball momentum in Velikanov et al. 2023's parameterization (eq. (1)).

    With learning rate ``alpha = lr`` and momentum ``beta = momentum``::

        theta^(t+1) = theta^(t) - alpha * grad L_B(theta^(t)) + beta * (theta^(t) - theta^(t-1)),   theta^(-1) = theta^(0)

    implemented with the displacement ``delta^(t) = theta^(t) - theta^(t-1)`` (``delta^(0) = 0``):
    ``delta^(t+1) = beta delta^(t) - alpha g``, ``theta^(t+1) = theta^(t) + delta^(t+1)``. The effective learning
    rate is ``alpha_eff = alpha / (1 - beta)`` (:attr:`effective_lr`). Negative momentum ``beta in (-1, 0)`` is
    allowed (Velikanov et al. 2023, §6). For a constant ``lr`` this equals ``torch.optim.SGD(lr, momentum)``; when ``lr`` changes
    the two differ (here the old displacement is kept, torch rescales it by the new lr). Optional coupled L2
    ``weight_decay`` adds ``weight_decay * theta`` to ``g``. Non-adaptive: ``diagonal_preconditioner()`` is ``None``.
    """

    def __init__(self, params: Iterable, lr: float = 1e-2, momentum: float = 0.9, weight_decay: float = 0.0) -> None:
        defaults = {"lr": check_lr(lr), "momentum": check_momentum(momentum),
                        "weight_decay": check_weight_decay(weight_decay)}
        super().__init__(params, defaults)

    def _validate_group(self, group):
        check_lr(group["lr"]), check_momentum(group["momentum"]), check_weight_decay(group["weight_decay"])

    @property
    def effective_lr(self) -> float:
        """``alpha / (1 - beta)`` of the first parameter group (Velikanov et al. 2023, §2; :func:`theory.sgd.effective_learning_rate`)."""
        from optiscope.theory.sgd import effective_learning_rate

        g = self.param_groups[0]
        return effective_learning_rate(g["lr"], g["momentum"])

    @torch.no_grad()
    def step(self, closure=None):
        """One step of the rule in the class docstring."""
        loss = self._closure_loss(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"] != 0:
                    g = g.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                delta = state.get("displacement")
                if delta is None:
                    delta = state["displacement"] = torch.zeros_like(p)
                delta.mul_(group["momentum"]).add_(g, alpha=-group["lr"])
                p.add_(delta)
        return loss


class SignGD(ExactOptimizer):
    r"""Sign gradient descent: ``theta^(n+1) = theta^(n) - lr * sign(g)`` with ``sign(0) = 0``.

    ``g = grad E_n(theta^(n)) [+ weight_decay * theta^(n)]``. This is the ``eps -> 0``, ``beta = rho = 0`` limit of
    Adam / RMSProp that Cattaneo et al. 2024, §3 compares with ("sign-descent-like flow"). Non-adaptive in optiscope's sense (no
    stored second moment): ``diagonal_preconditioner()`` is ``None`` per parameter and ``perturbation_eps`` is None.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        defaults = {"lr": check_lr(lr), "weight_decay": check_weight_decay(weight_decay)}
        super().__init__(params, defaults)

    def _validate_group(self, group):
        check_lr(group["lr"]), check_weight_decay(group["weight_decay"])

    @torch.no_grad()
    def step(self, closure=None):
        """One step of the rule in the class docstring."""
        loss = self._closure_loss(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"] != 0:
                    g = g.add(p, alpha=group["weight_decay"])
                p.add_(torch.sign(g), alpha=-group["lr"])
        return loss

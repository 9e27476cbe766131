"""Adaptive optimizers with exact, documented update rules: Adam, RMSProp, Adagrad, AMSGrad.

Notation (Cattaneo et al. 2024, §1): ``g`` gradient at the current iterate (plus coupled L2 weight decay
``weight_decay * theta`` when set), ``m`` first-moment EMA, ``v`` second-moment EMA, ``n = 0, 1, 2, ...`` the index
of the step being taken (so the bias-correction powers are ``n + 1``), all operations componentwise.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from optiscope.optim.base import (
    ExactOptimizer,
    check_beta,
    check_betas,
    check_eps,
    check_lr,
    check_momentum,
    check_weight_decay,
)


def _grad_with_decay(p: torch.Tensor, weight_decay: float) -> torch.Tensor:
    g = p.grad
    if g.is_sparse:
        raise ValueError("sparse gradients are not supported by optiscope optimizers")
    return g.add(p, alpha=weight_decay) if weight_decay != 0 else g


class Adam(ExactOptimizer):
    r"""Adam exactly as Cattaneo et al. 2024, Def. 1.1 (eps inside the square root) or PyTorch's convention (eps outside).

    With ``b1(n) = 1 - beta1^(n+1)`` and ``b2(n) = 1 - beta2^(n+1)`` (both 1 when ``bias_correction=False``),
    ``m^(0) = v^(0) = 0`` and ``n = 0, 1, 2, ...``::

        g       = grad E_n(theta^(n)) [+ weight_decay * theta^(n)]        (coupled L2, Jiang et al. 2023, App. A.7)
        m^(n+1) = beta1 m^(n) + (1 - beta1) g
        v^(n+1) = beta2 v^(n) + (1 - beta2) g^2
        P       = sqrt( v^(n+1) / b2(n) + eps )          eps_inside_sqrt=True  (Cattaneo et al. 2024, Def. 1.1, default)
        P       = sqrt( v^(n+1) / b2(n) ) + eps          eps_inside_sqrt=False (torch.optim.Adam)
        theta^(n+1) = theta^(n) - lr * ( m^(n+1) / b1(n) ) / P

    ``decoupled_weight_decay=True`` instead applies ``theta <- theta (1 - lr * weight_decay)`` before the step and
    leaves ``g`` undecayed (AdamW). ``diagonal_preconditioner()`` returns ``P`` (update = ``lr * m_hat / P`` with
    ``m_hat = m / b1``); ``perturbation_eps`` is ``eps``.

    Defaults ``lr=1e-3, betas=(0.9, 0.999), eps=1e-8``. Note that with ``eps`` inside the root its scale is
    ``sqrt(eps)`` (1e-4 for 1e-8), as in Cattaneo et al. 2024.
    """

    _has_eps = True

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, eps_inside_sqrt: bool = True, bias_correction: bool = True,
                 weight_decay: float = 0.0, decoupled_weight_decay: bool = False) -> None:
        defaults = {"lr": check_lr(lr), "betas": check_betas(betas), "eps": check_eps(eps),
                        "eps_inside_sqrt": bool(eps_inside_sqrt), "bias_correction": bool(bias_correction),
                        "weight_decay": check_weight_decay(weight_decay),
                        "decoupled_weight_decay": bool(decoupled_weight_decay)}
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"]), check_betas(group["betas"]), check_eps(group["eps"])
        check_weight_decay(group["weight_decay"])

    def _corrections(self, group: dict[str, Any], n: int) -> tuple[float, float]:
        if not group["bias_correction"]:
            return 1.0, 1.0
        beta1, beta2 = group["betas"]
        return 1.0 - beta1 ** (n + 1), 1.0 - beta2 ** (n + 1)

    @staticmethod
    def _denominator_from_v(group, v: torch.Tensor, b2: float) -> torch.Tensor:
        """``sqrt(v / b2 + eps)`` or ``sqrt(v / b2) + eps`` as a new tensor (one allocation)."""
        if group["eps_inside_sqrt"]:
            return torch.div(v, b2).add_(group["eps"]).sqrt_()
        return torch.div(v, b2).sqrt_().add_(group["eps"])

    def _denominator(self, group, p):
        state = self.state.get(p, {})
        v = state.get("v")
        if v is None:
            return self._denominator_from_v(group, torch.zeros_like(p), 1.0)
        # the denominator used by the most recent step (n = step - 1)
        _, b2 = self._corrections(group, state["step"] - 1)
        return self._denominator_from_v(group, self._v_for_denominator(state), b2)

    def _v_for_denominator(self, state: dict[str, Any]) -> torch.Tensor:
        return state["v"]

    @torch.no_grad()
    def step(self, closure=None):
        """One step of the rule in the class docstring (``closure`` re-evaluates the loss, as in torch)."""
        loss = self._closure_loss(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                    self._init_extra_state(state, p)
                n = state["step"]
                if group["decoupled_weight_decay"] and group["weight_decay"] != 0:
                    g = p.grad
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
                else:
                    g = _grad_with_decay(p, group["weight_decay"])
                state["m"].lerp_(g, 1.0 - beta1)  # beta1 m + (1 - beta1) g
                state["v"].mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                self._after_moments(state)
                b1, b2 = self._corrections(group, n)
                denom = self._denominator_from_v(group, self._v_for_denominator(state), b2)
                p.addcdiv_(state["m"], denom, value=-group["lr"] / b1)
                state["step"] = n + 1
        return loss

    def _init_extra_state(self, state: dict[str, Any], p: torch.Tensor) -> None:
        pass

    def _after_moments(self, state: dict[str, Any]) -> None:
        pass


class AMSGrad(Adam):
    r"""AMSGrad (Reddi et al. 2018) as Jiang et al. 2023, App. A.2 uses it (PyTorch's ``Adam(amsgrad=True)`` by default).

    Adam's moments ``m, v`` (class :class:`Adam`) plus the running maximum ``v_max^(n+1) = max(v_max^(n), v^(n+1))``
    (``v_max^(0) = 0``), which replaces ``v`` in the denominator::

        P = sqrt( v_max^(n+1) ) / sqrt(b2(n)) + eps       eps_inside_sqrt=False (default, torch convention)
        P = sqrt( v_max^(n+1) / b2(n) + eps )             eps_inside_sqrt=True
        theta^(n+1) = theta^(n) - lr * ( m^(n+1) / b1(n) ) / P

    ``bias_correction=False`` gives the original Reddi et al. rule (``b1 = b2 = 1``). Jiang et al. 2023 does not print the
    rule; the default is the PyTorch implementation its experiments ran. Defaults ``lr=1e-3, betas=(0.9, 0.999),
    eps=1e-8``.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, eps_inside_sqrt: bool = False, bias_correction: bool = True,
                 weight_decay: float = 0.0, decoupled_weight_decay: bool = False) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, eps_inside_sqrt=eps_inside_sqrt,
                         bias_correction=bias_correction, weight_decay=weight_decay,
                         decoupled_weight_decay=decoupled_weight_decay)

    def _init_extra_state(self, state, p):
        state["v_max"] = torch.zeros_like(p)

    def _after_moments(self, state):
        torch.maximum(state["v_max"], state["v"], out=state["v_max"])

    def _v_for_denominator(self, state):
        return state["v_max"]


class RMSProp(ExactOptimizer):
    r"""RMSProp in the form of Cattaneo et al. 2024 / Orvieto et al. 2022 (no bias correction), eps inside the square root by default.

    ``v^(0) = 0``; for ``n = 0, 1, ...``::

        g       = grad E_n(theta^(n)) [+ weight_decay * theta^(n)]
        v^(n+1) = beta v^(n) + (1 - beta) g^2
        P       = sqrt( v^(n+1) + eps )        eps_inside_sqrt=True  (Cattaneo et al. 2024, §2 form, default)
        P       = sqrt( v^(n+1) ) + eps        eps_inside_sqrt=False (torch.optim.RMSprop)
        theta^(n+1) = theta^(n) - lr * g / P                               (momentum = 0)

    With ``momentum = mu != 0`` (PyTorch's RMSprop momentum, used with 0.9 in Jiang et al. 2023, App. A.2):
    ``b^(n+1) = mu b^(n) + g / P`` (``b^(0) = 0``), ``theta^(n+1) = theta^(n) - lr * b^(n+1)``.
    ``diagonal_preconditioner()`` returns ``P``; ``perturbation_eps`` is ``eps``. Defaults ``lr=1e-3, beta=0.99,
    eps=1e-8``.
    """

    _has_eps = True

    def __init__(self, params: Iterable, lr: float = 1e-3, beta: float = 0.99, eps: float = 1e-8,
                 eps_inside_sqrt: bool = True, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        defaults = {"lr": check_lr(lr), "beta": check_beta(beta, "beta"), "eps": check_eps(eps),
                        "eps_inside_sqrt": bool(eps_inside_sqrt), "momentum": check_momentum(momentum),
                        "weight_decay": check_weight_decay(weight_decay)}
        super().__init__(params, defaults)

    def _validate_group(self, group):
        check_lr(group["lr"]), check_beta(group["beta"], "beta"), check_eps(group["eps"])
        check_momentum(group["momentum"]), check_weight_decay(group["weight_decay"])

    @staticmethod
    def _denom_from_v(group, v):
        return v.add(group["eps"]).sqrt_() if group["eps_inside_sqrt"] else v.sqrt().add_(group["eps"])

    def _denominator(self, group, p):
        v = self.state.get(p, {}).get("v")
        return self._denom_from_v(group, torch.zeros_like(p) if v is None else v)

    @torch.no_grad()
    def step(self, closure=None):
        """One step of the rule in the class docstring."""
        loss = self._closure_loss(closure)
        for group in self.param_groups:
            beta, mu = group["beta"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["v"] = torch.zeros_like(p)
                    if mu != 0:
                        state["momentum_buffer"] = torch.zeros_like(p)
                g = _grad_with_decay(p, group["weight_decay"])
                state["v"].mul_(beta).addcmul_(g, g, value=1.0 - beta)
                denom = self._denom_from_v(group, state["v"])
                if mu != 0:
                    buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
                    buf.mul_(mu).addcdiv_(g, denom)
                    p.add_(buf, alpha=-group["lr"])
                else:
                    p.addcdiv_(g, denom, value=-group["lr"])
                state["step"] += 1
        return loss


class Adagrad(ExactOptimizer):
    r"""Adagrad (Duchi et al. 2011, diagonal version) as Jiang et al. 2023, App. A.1 uses it (``torch.optim.Adagrad``).

    ``s^(0) = initial_accumulator_value``; for ``n = 0, 1, ...``::

        g       = grad E_n(theta^(n)) [+ weight_decay * theta^(n)]
        s^(n+1) = s^(n) + g^2
        lr_n    = lr / (1 + n * lr_decay)
        P       = sqrt( s^(n+1) ) + eps        eps_inside_sqrt=False (default, torch convention)
        P       = sqrt( s^(n+1) + eps )        eps_inside_sqrt=True
        theta^(n+1) = theta^(n) - lr_n * g / P

    ``diagonal_preconditioner()`` returns ``P``; ``perturbation_eps`` is ``eps``. Defaults ``lr=1e-2, eps=1e-10``
    (torch's defaults; Jiang et al. 2023 does not print them).
    """

    _has_eps = True

    def __init__(self, params: Iterable, lr: float = 1e-2, eps: float = 1e-10, lr_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps_inside_sqrt: bool = False,
                 weight_decay: float = 0.0) -> None:
        if not isinstance(lr_decay, (int, float)) or lr_decay < 0:
            raise ValueError(f"invalid lr_decay={lr_decay!r}: must be >= 0")
        if not isinstance(initial_accumulator_value, (int, float)) or initial_accumulator_value < 0:
            raise ValueError(f"invalid initial_accumulator_value={initial_accumulator_value!r}: must be >= 0")
        defaults = {"lr": check_lr(lr), "eps": check_eps(eps), "lr_decay": float(lr_decay),
                        "initial_accumulator_value": float(initial_accumulator_value),
                        "eps_inside_sqrt": bool(eps_inside_sqrt), "weight_decay": check_weight_decay(weight_decay)}
        super().__init__(params, defaults)

    def _validate_group(self, group):
        check_lr(group["lr"]), check_eps(group["eps"]), check_weight_decay(group["weight_decay"])

    @staticmethod
    def _denom_from_sum(group, s):
        return s.add(group["eps"]).sqrt_() if group["eps_inside_sqrt"] else s.sqrt().add_(group["eps"])

    def _denominator(self, group, p):
        s = self.state.get(p, {}).get("sum")
        if s is None:
            s = torch.full_like(p, group["initial_accumulator_value"])
        return self._denom_from_sum(group, s)

    @torch.no_grad()
    def step(self, closure=None):
        """One step of the rule in the class docstring."""
        loss = self._closure_loss(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["sum"] = torch.full_like(p, group["initial_accumulator_value"])
                g = _grad_with_decay(p, group["weight_decay"])
                n = state["step"]
                state["sum"].addcmul_(g, g, value=1.0)
                lr_n = group["lr"] / (1.0 + n * group["lr_decay"])
                p.addcdiv_(g, self._denom_from_sum(group, state["sum"]), value=-lr_n)
                state["step"] = n + 1
        return loss

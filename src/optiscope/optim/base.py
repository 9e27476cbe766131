"""Shared base of optiscope's exact optimizers: hyperparameter validation and the geometry accessors.

Every optimizer in :mod:`optiscope.optim` is a :class:`torch.optim.Optimizer` whose docstring states its update rule
and the paper section it comes from. On top of ``step`` each one exposes

* ``diagonal_preconditioner() -> list[Tensor | None]`` aligned with ``[p for g in param_groups for p in g["params"]]``:
  the current per-coordinate denominator ``P`` of an adaptive method (its update is ``lr * m / P`` with ``m`` the
  (bias-corrected) first moment or the gradient), ``None`` for a non-adaptive method;
* ``perturbation_eps``: the ``eps`` of the perturbed one-norm ``||v||_{1,eps} = sum_i sqrt(v_i^2 + eps)`` (Cattaneo et al. 2024
  §3) that the method implicitly regularises, i.e. the optimizer's own ``eps``; ``None`` for
  methods without one.

Non-finite gradients are not an error here: the update is applied as the rule says (the parameters become
non-finite) and the training loop reports "diverged at step t" (docs/architecture.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch


def check_lr(lr: Any) -> float:
    """``lr`` must be a finite number > 0."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"invalid learning rate lr={lr!r}: must be a finite number > 0")
    return float(lr)


def check_beta(beta: Any, name: str) -> float:
    """A moving-average coefficient must lie in [0, 1)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0.0 <= beta < 1.0):
        raise ValueError(f"invalid {name}={beta!r}: must lie in [0, 1)")
    return float(beta)


def check_betas(betas: Any) -> tuple[float, float]:
    """``betas = (beta1, beta2)``, each in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"invalid betas={betas!r}: must be a pair (beta1, beta2), each in [0, 1)")
    return check_beta(betas[0], "betas[0]"), check_beta(betas[1], "betas[1]")


def check_eps(eps: Any) -> float:
    """``eps`` must be a finite number >= 0."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"invalid eps={eps!r}: must be a finite number >= 0")
    return float(eps)


def check_momentum(momentum: Any) -> float:
    """Momentum must lie in the open interval (-1, 1) (negative momentum: Velikanov et al. 2023, §6)."""
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not (-1.0 < momentum < 1.0):
        raise ValueError(f"invalid momentum={momentum!r}: must lie in (-1, 1)")
    return float(momentum)


def check_weight_decay(weight_decay: Any) -> float:
    """Weight decay must be a finite number >= 0."""
    if (isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float))
            or not math.isfinite(weight_decay) or weight_decay < 0):
        raise ValueError(f"invalid weight_decay={weight_decay!r}: must be a finite number >= 0")
    return float(weight_decay)


def check_params(params: Any) -> Any:
    """Reject a bare tensor (a common mistake: ``Adam(model.weight)`` instead of ``Adam([model.weight])``)."""
    if isinstance(params, torch.Tensor):
        raise ValueError("params must be an iterable of tensors or of parameter-group dicts, not a single Tensor")
    return params


class ExactOptimizer(torch.optim.Optimizer):
    """Base class: ``diagonal_preconditioner`` (``None`` per parameter) and ``perturbation_eps`` (``None``).

    Adaptive subclasses override :meth:`_denominator` and set ``_has_eps = True``.
    """

    _has_eps = False

    def __init__(self, params: Iterable, defaults: dict[str, Any]) -> None:
        super().__init__(check_params(params), defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Re-validate hyperparameters of a group (called on construction and for ``add_param_group``)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._validate_group(self.param_groups[-1])

    def _flat_params(self) -> list[tuple[dict[str, Any], torch.Tensor]]:
        return [(g, p) for g in self.param_groups for p in g["params"]]

    def _denominator(self, group: dict[str, Any], p: torch.Tensor) -> torch.Tensor | None:
        return None

    @torch.no_grad()
    def diagonal_preconditioner(self) -> list[torch.Tensor | None]:
        """Per-parameter denominator ``P`` (a new tensor, same shape as the parameter) or ``None``.

        Aligned with ``[p for g in self.param_groups for p in g["params"]]``. For adaptive methods this is the
        denominator that the most recent step divided by (before the first step the second-moment state is zero,
        so ``P`` is the ``eps`` floor).
        """
        return [self._denominator(g, p) for g, p in self._flat_params()]

    @property
    def perturbation_eps(self) -> float | None:
        """The ``eps`` of the perturbed one-norm ``sum_i sqrt(v_i^2 + eps)`` (Cattaneo et al. 2024, §3), or ``None``.

        All parameter groups must share one ``eps``; otherwise ``ValueError``.
        """
        if not self._has_eps:
            return None
        values = {float(g["eps"]) for g in self.param_groups}
        if len(values) != 1:
            raise ValueError(f"parameter groups use different eps values {sorted(values)}; "
                             "perturbation_eps is defined only for a single eps")
        return values.pop()

    def _closure_loss(self, closure):
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

"""``ExpLR``: the exponential learning-rate schedule equivalent to weight decay (Li & Arora 2020).

The formulas (alpha, the general recurrence, the initial momentum buffer) live in :mod:`optiscope.theory.explr`;
this module applies them to a momentum-SGD optimizer (:class:`optiscope.optim.SGD` or ``torch.optim.SGD``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from optiscope.theory.explr import (equivalent_schedule, explr_alpha, exponential_lr, initial_momentum_buffer,
                                    step_decay_lrs)


class ExpLR(torch.optim.lr_scheduler.LRScheduler):
    r"""Learning rates ``lr_t`` that make momentum SGD *without* weight decay reproduce a run *with* weight decay.

    Li & Arora 2020. The replaced run is momentum SGD (PyTorch convention) with coupled L2 weight
    decay ``weight_decay`` and per-step learning rates ``eta_t = base_lr * multiplier_t`` (``multipliers=None``:
    constant). This scheduler sets, for step ``t = 0, 1, ...`` (the step taken after the ``t``-th
    ``scheduler.step()`` call, counting construction as the 0-th)::

        constant eta:  lr_t = eta * alpha^(-2t-1),   alpha = explr_alpha(eta, weight_decay, momentum)
        schedule:      lr_t = eta_t / (a_t a_{t+1}), a_t from theory.explr.equivalent_schedule

    and, with ``start="exponential"`` (default) and ``set_initial_buffer=True``, writes the initial momentum buffer
    ``-(1 - alpha) theta_0 / (eta alpha)`` into each parameter's ``momentum_buffer`` state. For a loss that is
    scale-invariant in every parameter of the optimizer, the parameters then satisfy ``theta_t = a_t * phi_t``
    (:meth:`scale`), where ``theta_t`` are those of the weight-decay run started from a zero buffer.

    The optimizer must be SGD-like (``momentum`` in its groups, ``dampening = 0``, ``nesterov = False``) and have
    ``weight_decay = 0`` (ExpLR replaces the decay). Put parameters that are not scale-invariant (a final linear
    layer, biases, norm affine parameters) in a different optimizer: the identity is exact only for
    scale-invariant ones. In float32, ``alpha^(-t)`` growth overflows in long runs; use float64 or renormalise.
    A finite schedule of ``T`` multipliers is defined for steps ``0..T`` (step ``T`` continues the last phase, so
    the usual ``scheduler.step()`` after the final optimizer step works); stepping further raises ``ValueError``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, weight_decay: float,
                 multipliers: Sequence[float] | np.ndarray | None = None,
                 start: Literal["exponential", "zero_buffer"] = "exponential",
                 set_initial_buffer: bool = True, last_epoch: int = -1) -> None:
        self.weight_decay = float(weight_decay)
        self._schedules: list[np.ndarray | None] = []
        self._scales: list[np.ndarray | None] = []
        self._alphas: list[float] = []
        self._momenta: list[float] = []
        for i, group in enumerate(optimizer.param_groups):
            if "momentum" not in group or "betas" in group:
                raise ValueError(f"ExpLR needs a momentum-SGD optimizer (param group {i} has no 'momentum' or is "
                                 "adaptive); use optiscope.optim.SGD or torch.optim.SGD")
            if group.get("weight_decay", 0) != 0:
                raise ValueError(f"param group {i} has weight_decay={group['weight_decay']}; ExpLR replaces weight "
                                 "decay, so the optimizer must use weight_decay=0")
            if group.get("dampening", 0) != 0 or group.get("nesterov", False):
                raise ValueError(f"param group {i}: ExpLR needs dampening=0 and nesterov=False")
            base = float(group.get("initial_lr", group["lr"]))
            mom = float(group["momentum"])
            self._alphas.append(explr_alpha(base, self.weight_decay, mom))
            self._momenta.append(mom)
            if multipliers is None:
                self._schedules.append(None)
                self._scales.append(None)
                factor = initial_momentum_buffer(1.0, base, self.weight_decay, mom) if mom > 0 else 0.0
                if start == "zero_buffer":
                    raise ValueError("start='zero_buffer' needs an explicit schedule (multipliers); the closed-form "
                                     "constant schedule uses the exponential start")
            else:
                mult = np.asarray(multipliers, dtype=float)
                # one extra step continuing the last phase, so the customary scheduler.step() after the final
                # optimizer step is defined; stepping further raises
                mult = np.append(mult, mult[-1:]) if mult.ndim == 1 and mult.size else mult
                sched = equivalent_schedule(base * mult, self.weight_decay, mom, start=start)
                self._schedules.append(sched.lrs)
                self._scales.append(sched.scales)
                factor = sched.buffer_factor
            if set_initial_buffer and last_epoch == -1 and mom > 0 and factor != 0:
                for p in group["params"]:
                    optimizer.state[p]["momentum_buffer"] = p.detach().clone().mul_(factor)
        super().__init__(optimizer, last_epoch)

    @classmethod
    def step_decay(cls, optimizer: torch.optim.Optimizer, weight_decay: float, total_steps: int,
                   milestones: Sequence[int] = (), factor: float = 0.1, **kwargs) -> ExpLR:
        """ExpLR equivalent to step decay ``eta_t = base_lr * factor^{#milestones <= t}`` (Li & Arora 2020, TEXP)."""
        return cls(optimizer, weight_decay, multipliers=step_decay_lrs(1.0, total_steps, milestones, factor),
                   **kwargs)

    def _lr_at(self, i: int, base: float, t: int) -> float:
        sched = self._schedules[i]
        if sched is None:
            return exponential_lr(base, self.weight_decay, self._momenta[i], t)
        if t >= len(sched):
            raise ValueError(f"ExpLR schedule has {len(sched)} steps; step {t} is past its end")
        return float(sched[t])

    def get_lr(self) -> list[float]:
        t = self.last_epoch
        return [self._lr_at(i, float(base), t) for i, base in enumerate(self.base_lrs)]

    def scale(self, t: int, group: int = 0) -> float:
        """``a_t`` with ``theta_t = a_t * phi_t`` (``alpha^t`` for a constant schedule)."""
        sched = self._scales[group]
        if sched is None:
            return float(self._alphas[group] ** t)
        return float(sched[t])

    @property
    def alpha(self) -> float:
        """``alpha`` of the first group's base learning rate (:func:`optiscope.theory.explr.explr_alpha`)."""
        return self._alphas[0]

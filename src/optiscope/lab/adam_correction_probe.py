"""Probe ``adam_correction``: the O(h) correction term of Adam's modified flow during training (Cattaneo et al. 2024, §2, Eq. 2-3).

At a checkpoint with parameters theta, the full-batch modified ODE of Adam reads
``dtheta_j/dt = -(a1/R_j)(g_j + bias_j)`` with ``bias = kappa * (H P)`` (one Hessian-vector product; kappa from
:func:`optiscope.theory.adam.correction_coefficient`, P = a1 g / R). The probe reports, on the problem's probe batch,

* ``adam_correction_norm``      ||bias||_2
* ``adam_correction_relative``  ||bias|| / ||g||  (how large the implicit term is against the gradient)
* ``adam_correction_cosine``    cos(bias, g): > 0 the correction adds to the gradient (penalises the perturbed
  one-norm), < 0 it opposes it (anti-penalises it, the typical case beta1 < beta2)
* ``adam_correction_small_eps_fraction``  share of coordinates with |g_j| > sqrt(eps) (eps inside) or > eps
  (outside): how far training is in the small-eps (one-norm) regime of Cattaneo et al. 2024, Eq. 4-5 rather than Eq. 6-7.

Hyperparameters default to the optimizer's (Adam: lr, betas, eps, eps_inside_sqrt, bias_correction; RMSProp: lr,
beta, eps, eps_inside_sqrt); the iteration index n for the exact piecewise coefficients c_b(n) is the optimizer's
step count (``asymptotic=True`` uses the n -> infinity form of Cattaneo et al. 2024, Eq. 3). Pure: works on detached copies through
the curvature layer and never touches parameters, optimizer state or RNG streams.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from optiscope.optim.flows import AdamHyper, full_batch_correction, model_loss

__all__ = ["hyper_from_optimizer", "make_adam_correction_probe"]


def hyper_from_optimizer(optimizer: Any) -> AdamHyper:
    """Adam/RMSProp hyperparameters of the first param group of an optiscope (or torch) Adam/RMSProp optimizer."""
    if optimizer is None or not getattr(optimizer, "param_groups", None):
        raise ValueError("adam_correction: no optimizer to read h, beta1, beta2, eps from; pass them explicitly")
    g = optimizer.param_groups[0]
    inside = bool(g.get("eps_inside_sqrt", False))  # torch.optim.Adam/RMSprop put eps outside
    if "betas" in g:
        b1, b2 = g["betas"]
        return AdamHyper(h=float(g["lr"]), beta1=float(b1), beta2=float(b2), eps=float(g["eps"]),
                         eps_inside_sqrt=inside, bias_correction=bool(g.get("bias_correction", True)))
    if "beta" in g or "alpha" in g:
        beta = g.get("beta", g.get("alpha"))
        return AdamHyper.rmsprop(h=float(g["lr"]), beta=float(beta), eps=float(g["eps"]), eps_inside_sqrt=inside)
    raise ValueError(f"adam_correction: optimizer {type(optimizer).__name__} is neither Adam nor RMSProp")


def _step_count(optimizer: Any) -> int | None:
    if optimizer is None:
        return None
    for st in optimizer.state.values():
        if "step" in st:
            s = st["step"]
            return int(s.item() if isinstance(s, torch.Tensor) else s)
    return None


def make_adam_correction_probe(h: float | None = None, beta1: float | None = None, beta2: float | None = None,
                               eps: float | None = None, eps_inside_sqrt: bool | None = None,
                               bias_correction: bool | None = None, asymptotic: bool = False):
    """Build the ``adam_correction`` probe; explicit hyperparameters override the optimizer's."""
    overrides = {k: v for k, v in dict(h=h, beta1=beta1, beta2=beta2, eps=eps, eps_inside_sqrt=eps_inside_sqrt,
                                       bias_correction=bias_correction).items() if v is not None}
    if overrides:  # validate eagerly so a bad spec fails before training starts
        base = dict(h=1.0, beta1=0.9, beta2=0.999, eps=1e-8, eps_inside_sqrt=True, bias_correction=True)
        AdamHyper(**{**base, **overrides})

    def adam_correction(problem: Any, state: Any) -> dict[str, float]:
        if len(overrides) == 6:
            hp = AdamHyper(**overrides)
        else:
            base = hyper_from_optimizer(state.optimizer)
            hp = AdamHyper(**{**base.__dict__, **overrides})
        step = _step_count(state.optimizer)
        # the flow interval containing the current iterate theta^(n) is n = number of steps taken
        n = None if asymptotic else (step if step is not None else state.step)
        f, params = model_loss(state.model, problem.loss_fn, problem.probe_batch, problem.param_names)
        out = full_batch_correction(f, params, hp, n)
        g = out["gradient"]
        scale = math.sqrt(hp.eps) if hp.eps_inside_sqrt else hp.eps
        return {
            "adam_correction_norm": out["norm"],
            "adam_correction_relative": out["relative"],
            "adam_correction_cosine": out["cosine"],
            "adam_correction_small_eps_fraction": float((g.abs() > scale).double().mean()),
        }

    return adam_correction

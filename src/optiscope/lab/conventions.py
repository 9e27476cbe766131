"""Optimizer conventions: what an optimizer's diagonal preconditioner is, and where optiscope's rules differ from
``torch.optim``'s namesakes.

* :func:`diagonal_preconditioner` returns ``P`` with ``update = lr * m_hat / P`` for optiscope's exact optimizers
  (their own ``diagonal_preconditioner()``) and for ``torch.optim.Adam``/``AdamW`` (also ``amsgrad``),
  ``RMSprop`` (plain and centered) and ``Adagrad``, read from the optimizer's state; probes that need it
  (``precond_sharpness``) therefore work with the optimizer a user already has.
* :func:`convention_note` is one sentence stating where an optimizer's rule differs from ``torch.optim``'s optimizer
  of the same name (optiscope's ``adam`` puts ``eps`` inside the square root, after Cattaneo et al. 2024, Def. 1.1);
  :func:`state_convention` states it once per process and returns it so a run can record it in its manifest.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

__all__ = ["ConventionWarning", "convention_note", "diagonal_preconditioner", "state_convention"]


class ConventionWarning(UserWarning):
    """An optimizer's update rule differs from the ``torch.optim`` optimizer of the same name."""


_STATED: set[str] = set()


def _step_of(st: dict) -> float:
    s = st.get("step", 0)
    return float(s.item() if isinstance(s, torch.Tensor) else s)


def diagonal_preconditioner(optimizer: Any) -> list[torch.Tensor | None] | None:
    """``P`` per parameter of ``optimizer.param_groups`` (None where the optimizer has no state yet), or None for an
    optimizer without a diagonal preconditioner (SGD, momentum).

    torch.optim rules (bias-corrected ``m_hat = m / (1 - beta1^t)`` where the optimizer corrects):

    * ``Adam``/``AdamW``: ``P = sqrt(v / (1 - beta2^t)) + eps`` (``amsgrad``: ``v`` = the running max),
    * ``RMSprop``: ``P = sqrt(v) + eps``; centered: ``P = sqrt(v - g_avg^2) + eps``,
    * ``Adagrad``: ``P = sqrt(sum g^2) + eps``.
    """
    if optimizer is None:
        return None
    if hasattr(optimizer, "diagonal_preconditioner"):
        return list(optimizer.diagonal_preconditioner())
    kind = None
    for cls in type(optimizer).__mro__:
        if cls.__module__.startswith("torch.optim") and cls.__name__ in ("Adam", "AdamW", "RMSprop", "Adagrad"):
            kind = cls.__name__
            break
    if kind is None:
        return None
    out: list[torch.Tensor | None] = []
    for group in optimizer.param_groups:
        eps = float(group["eps"])
        for p in group["params"]:
            st = optimizer.state.get(p) or {}
            if kind in ("Adam", "AdamW"):
                v = st.get("max_exp_avg_sq") if group.get("amsgrad") else st.get("exp_avg_sq")
                if v is None:
                    out.append(None)
                    continue
                b2 = 1.0 - float(group["betas"][1]) ** _step_of(st)
                out.append((v.detach() / b2).sqrt() + eps)
            elif kind == "RMSprop":
                v = st.get("square_avg")
                if v is None:
                    out.append(None)
                    continue
                v = v.detach()
                if group.get("centered") and st.get("grad_avg") is not None:
                    v = v - st["grad_avg"].detach() ** 2
                out.append(v.sqrt() + eps)
            else:
                s = st.get("sum")
                out.append(None if s is None else s.detach().sqrt() + eps)
    return out


def convention_note(optimizer: Any) -> str | None:
    """Where ``optimizer``'s update rule differs from the ``torch.optim`` optimizer of the same name, or None."""
    if optimizer is None or type(optimizer).__module__.startswith("torch.optim"):
        return None
    groups = getattr(optimizer, "param_groups", None) or [{}]
    g = groups[0]
    name = type(optimizer).__name__
    if g.get("eps_inside_sqrt"):
        torch_name = {"Adam": "Adam", "AMSGrad": "Adam(amsgrad=True)", "RMSProp": "RMSprop",
                      "Adagrad": "Adagrad"}.get(name, name)
        return (f"optiscope {name} puts eps inside the square root, sqrt(v_hat + eps) (Cattaneo et al. 2024, "
                f"Def. 1.1; with eps = {g.get('eps')} its scale is sqrt(eps)); torch.optim.{torch_name} uses "
                f"sqrt(v_hat) + eps. Pass eps_inside_sqrt=False for torch's rule.")
    return None


def state_convention(optimizer: Any) -> str | None:
    """:func:`convention_note`, issued as a :class:`ConventionWarning` the first time it occurs in this process;
    returns the note (or None) so the caller can record it."""
    note = convention_note(optimizer)
    if note is not None and note not in _STATED:
        _STATED.add(note)
        warnings.warn(note, ConventionWarning, stacklevel=3)
    return note

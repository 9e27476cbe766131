"""``make_optimizer(spec, params)`` and the ``OPTIMIZERS`` name -> factory table."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch

from optiscope.optim.adaptive import Adagrad, Adam, AMSGrad, RMSProp
from optiscope.optim.momentum import SGD, HeavyBall, SignGD
from optiscope.utils.spec import parse_spec


def _sgdm(params: Iterable, lr: float = 1e-2, momentum: float = 0.9, **kwargs: Any) -> SGD:
    """SGD with PyTorch's momentum convention, momentum 0.9 by default."""
    return SGD(params, lr=lr, momentum=momentum, **kwargs)


_sgdm.__signature__ = inspect.signature(SGD.__init__).replace(  # type: ignore[attr-defined]
    parameters=[p.replace(default=0.9) if p.name == "momentum" else p
                for p in inspect.signature(SGD.__init__).parameters.values()][1:])

#: name -> factory ``(params, **hyperparameters) -> torch.optim.Optimizer``
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": SGD,
    "sgdm": _sgdm,
    "heavyball": HeavyBall,
    "signgd": SignGD,
    "adam": Adam,
    "rmsprop": RMSProp,
    "adagrad": Adagrad,
    "amsgrad": AMSGrad,
}

_TUPLE_ARGS = {"betas"}


def _accepted(factory: Callable[..., Any]) -> list[str]:
    target = factory.__init__ if isinstance(factory, type) else factory
    sig = getattr(factory, "__signature__", None) or inspect.signature(target)
    return [n for n in sig.parameters if n not in ("self", "params")]


def make_optimizer(spec: str | tuple[str, dict[str, Any]], params: Iterable) -> torch.optim.Optimizer:
    """Build an optimizer from ``"adam:lr=1e-3,betas=[0.9,0.999]"`` or ``("adam", {"lr": 1e-3})``.

    Unknown names and unknown or invalid hyperparameters raise ``ValueError`` naming the problem and the valid
    choices (``SpecError`` is a ``ValueError``).
    """
    if isinstance(spec, str):
        name, kwargs = parse_spec(spec, OPTIMIZERS, "optimizer")
    elif isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str):
        name, kwargs = spec[0], dict(spec[1] or {})
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(sorted(OPTIMIZERS))}")
    else:
        raise ValueError(f"optimizer spec must be 'name:k=v,...' or (name, kwargs), got {spec!r}")
    factory = OPTIMIZERS[name]
    accepted = _accepted(factory)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"optimizer {name!r} does not accept {unknown}; valid hyperparameters: {accepted}")
    for k in _TUPLE_ARGS & set(kwargs):
        if isinstance(kwargs[k], list):
            kwargs[k] = tuple(kwargs[k])
    return factory(params, **kwargs)

"""Weight initialisations of Orvieto et al. 2022, §2, drawn from an explicit ``torch.Generator``.

Variances (Orvieto et al. 2022, §2):

* LeCun (LeCun et al. 1998):  ``sigma^2 = 1 / fan_in``
* Xavier / Glorot (2010):     ``sigma^2 = 2 / (fan_in + fan_out)``   (linear networks)
* He (2015):                  ``sigma^2 = 2 / fan_in``                (ReLU networks)

each with a ``normal`` distribution ``N(0, sigma^2)`` or a ``uniform`` one ``U[-r, r]`` with ``r = sqrt(3) sigma``
(``U[-r, r]`` has variance ``r^2 / 3``). An optional ``gain`` multiplies ``sigma``. ``torch`` is PyTorch's default
for ``nn.Linear`` / ``nn.Conv2d``: weights and biases ``U[-1/sqrt(fan_in), 1/sqrt(fan_in)]``. For a convolution,
``fan_in = in_channels * prod(kernel)`` and ``fan_out = out_channels * prod(kernel)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

SCHEMES = ("lecun", "xavier", "he")
DISTRIBUTIONS = ("uniform", "normal")
INITS = tuple(f"{s}_{d}" for s in SCHEMES for d in DISTRIBUTIONS) + ("torch",)


def parse_init(init: str) -> tuple[str, str]:
    """``"he_normal"`` -> ``("he", "normal")``; ``"torch"`` -> ``("torch", "uniform")``; else ``ValueError``."""
    if init == "torch":
        return "torch", "uniform"
    scheme, _, dist = str(init).partition("_")
    if scheme not in SCHEMES or dist not in DISTRIBUTIONS:
        raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
    return scheme, dist


def fans(weight: torch.Tensor) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a ``Linear`` (``out x in``) or ``Conv`` (``out x in x k...``) weight."""
    if weight.ndim < 2:
        raise ValueError(f"fans need a weight with >= 2 dimensions, got shape {tuple(weight.shape)}")
    receptive = math.prod(weight.shape[2:]) if weight.ndim > 2 else 1
    return weight.shape[1] * receptive, weight.shape[0] * receptive


def init_variance(scheme: str, fan_in: int, fan_out: int) -> float:
    """The weight variance sigma^2 of an init scheme (Orvieto et al. 2022, §2): lecun 1/fan_in, xavier 2/(fan_in+fan_out),
    he 2/fan_in, torch 1/(3 fan_in). The formula lives in :func:`optiscope.theory.init.init_variance`."""
    from optiscope.theory.init import init_variance as variance

    if fan_in <= 0 or fan_out <= 0:
        raise ValueError(f"fan_in={fan_in} and fan_out={fan_out} must be positive")
    if scheme not in SCHEMES + ("torch",):
        raise ValueError(f"unknown init scheme {scheme!r}; valid: {', '.join(SCHEMES + ('torch',))}")
    return variance("torch_default" if scheme == "torch" else scheme, fan_in, fan_out)


@torch.no_grad()
def init_weight_(weight: torch.Tensor, init: str, generator: torch.Generator, gain: float = 1.0) -> torch.Tensor:
    """Fill ``weight`` in place with the distribution named by ``init`` (see module docstring), times ``gain``."""
    scheme, dist = parse_init(init)
    fan_in, fan_out = fans(weight)
    std = gain * math.sqrt(init_variance(scheme, fan_in, fan_out))
    if dist == "normal":
        weight.copy_(torch.randn(weight.shape, generator=generator, dtype=weight.dtype) * std)
    else:
        r = math.sqrt(3.0) * std
        weight.copy_((torch.rand(weight.shape, generator=generator, dtype=weight.dtype) * 2.0 - 1.0) * r)
    return weight


@torch.no_grad()
def init_module_(module: torch.nn.Module, init: str, generator: torch.Generator, gain: float = 1.0) -> None:
    """Initialise ``module.weight`` with ``init`` and its bias with zeros (``torch``: ``U[-1/sqrt(fan_in), ..]``)."""
    init_weight_(module.weight, init, generator, gain)
    if getattr(module, "bias", None) is not None:
        if init == "torch":
            bound = 1.0 / math.sqrt(fans(module.weight)[0])
            module.bias.copy_((torch.rand(module.bias.shape, generator=generator, dtype=module.bias.dtype) * 2 - 1)
                              * bound)
        else:
            module.bias.zero_()


@contextmanager
def preserve_global_rng() -> Iterator[None]:
    """Build modules without touching the global RNG (their default init draws from it; ours then overwrites)."""
    with torch.random.fork_rng(devices=[]):
        yield

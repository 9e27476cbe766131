"""The loss as a pure function of a parameter dict (docs/architecture.md).

A :class:`LossFunction` turns ``(model, loss_fn, data)`` or an arbitrary scalar function of a parameter dict into
a list of weighted pure terms ``L(theta) = sum_b w_b * L_b(theta)`` with ``w_b = n_b / N``: the exact mean over
all samples of an iterable of batches. Evaluation never changes the model's parameters, its BatchNorm running
statistics or the global RNG:

* parameters are passed to :func:`torch.func.functional_call` (the module's own tensors are never touched);
* BatchNorm layers in training mode are evaluated on a shallow copy of the module in which they do not track
  running statistics (they normalise with batch statistics, exactly as in a training forward pass, and nothing is
  written back);
* the global RNG is forked and reset to a state captured at construction for every evaluation, so stochastic
  layers (dropout in training mode) see one fixed realisation and training's RNG stream is left untouched;
* scaled-dot-product attention runs under the MATH backend, which is twice differentiable and supports forward
  AD (the fused CPU kernels support neither).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

Term = Callable[[dict[str, Tensor]], Tensor]


def _sdpa_math() -> contextlib.AbstractContextManager:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, Tensor):
        if inputs.dim() == 0:
            raise ValueError("data: inputs must have a leading batch dimension, got a 0-d tensor")
        return int(inputs.shape[0])
    if isinstance(inputs, (tuple, list)) and inputs and isinstance(inputs[0], Tensor):
        return _batch_size(inputs[0])
    if isinstance(inputs, Mapping) and inputs:
        return _batch_size(next(iter(inputs.values())))
    raise ValueError(f"data: cannot infer the batch size of inputs of type {type(inputs).__name__}; "
                     "use a Tensor, a tuple of Tensors or a dict of Tensors")


def _is_batch(obj: Any) -> bool:
    return (isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[1], Tensor)
            and (isinstance(obj[0], (Tensor, Mapping)) or
                 (isinstance(obj[0], (tuple, list)) and len(obj[0]) > 0 and isinstance(obj[0][0], Tensor))))


def normalize_data(data: Any) -> list[tuple[Any, Tensor]]:
    """One ``(inputs, targets)`` batch or an iterable of them -> a non-empty list of batches (ValueError if empty)."""
    if data is None:
        raise ValueError("data is empty: got None; pass one (inputs, targets) batch or an iterable of batches")
    if _is_batch(data):
        batches = [tuple(data)]
    else:
        try:
            batches = [tuple(b) for b in data]
        except TypeError as e:
            raise ValueError(f"data must be an (inputs, targets) batch or an iterable of batches, got "
                             f"{type(data).__name__}") from e
        for i, b in enumerate(batches):
            if not _is_batch(b):
                raise ValueError(f"data: batch {i} is not an (inputs, targets) pair of tensors")
    if not batches:
        raise ValueError("data is empty: the iterable of batches yielded no batch")
    out = []
    for i, (x, y) in enumerate(batches):
        n = _batch_size(x)
        if n == 0:
            raise ValueError(f"data is empty: batch {i} has 0 samples")
        out.append((x, y))
    return out


def _call_inputs(inputs: Any) -> tuple[tuple, dict]:
    if isinstance(inputs, Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    return tuple(inputs), {}


class NonFiniteLossError(ValueError):
    """The loss is NaN or infinite at the given parameters (a ValueError; training code treats it as divergence)."""


class LossFunction:
    """``L(theta) = sum_b w_b L_b(theta)`` over named parameters, evaluated purely (see module docstring).

    Attributes: ``names`` (ordered parameter names), ``params`` (detached copies), ``terms`` (list of
    ``(weight, term)``), ``n_samples``.
    """

    def __init__(self, names: list[str], params: dict[str, Tensor], terms: list[tuple[float, Term]],
                 n_samples: int, rng_devices: list[int] | None = None):
        self.names = names
        self.params = params
        self.terms = terms
        self.n_samples = n_samples
        self._rng_devices = rng_devices or []
        self._cpu_state = torch.get_rng_state()
        self._cuda_states = ([torch.cuda.get_rng_state(d) for d in self._rng_devices]
                             if self._rng_devices else [])

    # ---------------------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module, loss_fn: Callable[[Any, Tensor], Tensor], data: Any,
                   params: Iterable[str] | None = None) -> "LossFunction":
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable (outputs, targets) -> scalar, got {type(loss_fn).__name__}")
        named = dict(model.named_parameters())
        if params is None:
            names = [n for n, p in named.items() if p.requires_grad]
            if not names:
                raise ValueError("model has no trainable parameters (none requires grad); nothing to differentiate")
        else:
            names = [params] if isinstance(params, str) else list(params)
            if not names:
                raise ValueError("params is empty: select at least one parameter name")
            unknown = [n for n in names if n not in named]
            if unknown:
                raise ValueError(f"unknown parameter name(s) {unknown}; the model has {list(named)}")
            if len(set(names)) != len(names):
                raise ValueError(f"params lists a name twice: {names}")
            names = [n for n in named if n in set(names)]  # model order
        for n in names:
            if not named[n].is_floating_point():
                raise ValueError(f"parameter {n!r} is not floating point ({named[n].dtype})")
        batches = normalize_data(data)
        sizes = [_batch_size(x) for x, _ in batches]
        total = sum(sizes)
        frozen = {n: p.detach() for n, p in named.items() if n not in set(names)}
        module = _pure_module(model)
        theta = {n: named[n].detach().clone() for n in names}

        def make_term(x: Any, y: Tensor) -> Term:
            args, kwargs = _call_inputs(x)

            def term(p: dict[str, Tensor]) -> Tensor:
                out = functional_call(module, {**frozen, **p}, args, kwargs, tie_weights=True, strict=False)
                return loss_fn(out, y)

            return term

        terms = [(n / total, make_term(x, y)) for n, (x, y) in zip(sizes, batches)]
        devices = sorted({p.device.index or 0 for p in theta.values() if p.device.type == "cuda"})
        return cls(names, theta, terms, total, devices)

    @classmethod
    def from_function(cls, f: Callable[[dict[str, Tensor]], Tensor], params: Mapping[str, Tensor]) -> "LossFunction":
        if not callable(f):
            raise ValueError(f"f must be callable params_dict -> scalar Tensor, got {type(f).__name__}")
        if not isinstance(params, Mapping):
            raise ValueError(f"params must be a dict name -> Tensor, got {type(params).__name__}")
        if not params:
            raise ValueError("params is empty: no parameters to differentiate")
        theta = {}
        for n, p in params.items():
            if not isinstance(p, Tensor) or not p.is_floating_point():
                raise ValueError(f"params[{n!r}] must be a floating-point Tensor, got {type(p).__name__}")
            theta[str(n)] = p.detach().clone()
        devices = sorted({p.device.index or 0 for p in theta.values() if p.device.type == "cuda"})
        return cls(list(theta), theta, [(1.0, f)], 1, devices)

    # ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def context(self):
        """Fork the RNG (reset to the construction-time state) and force the MATH attention backend."""
        with torch.random.fork_rng(devices=self._rng_devices):
            torch.set_rng_state(self._cpu_state)
            for d, s in zip(self._rng_devices, self._cuda_states):
                torch.cuda.set_rng_state(s, d)
            with _sdpa_math():
                yield

    def check_term(self, index: int, value: Any) -> Tensor:
        if not isinstance(value, Tensor):
            raise ValueError(f"the loss is not a scalar Tensor: got {type(value).__name__}")
        if value.numel() != 1 or value.dim() > 1:
            raise ValueError(f"the loss is not a scalar: got shape {tuple(value.shape)} (batch {index}); "
                             "use a reduction such as mean")
        return value.reshape(())

    def value(self) -> float:
        """The loss at ``params``; ValueError if it is not a finite scalar."""
        total = 0.0
        with torch.no_grad(), self.context():
            for i, (w, term) in enumerate(self.terms):
                v = float(self.check_term(i, term(self.params)))
                if not math.isfinite(v):
                    raise NonFiniteLossError(f"the loss is not finite ({v}) at the given parameters (batch {i})")
                total += w * v
        return total


def _pure_module(model: nn.Module) -> nn.Module:
    """``model`` itself, or a shallow copy whose training-mode BatchNorms track no running statistics."""
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats]
    if not bns:
        return model
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    clone = copy.deepcopy(model, memo)
    for m in clone.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats:
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None
    return clone

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
        self.batches: list[tuple[Any, Tensor]] | None = None  # the data (model problems only), for diagnostics
        self.source: tuple | None = None  # (pure module, loss_fn, frozen params), model problems only
        self._cpu_state = torch.get_rng_state()
        self._cuda_states = ([torch.cuda.get_rng_state(d) for d in self._rng_devices]
                             if self._rng_devices else [])

    # ---------------------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module, loss_fn: Callable[[Any, Tensor], Tensor], data: Any,
                   params: Iterable[str] | None = None, device: Any = None) -> LossFunction:
        """The pure loss of ``model`` on ``data`` (see the module docstring).

        ``device=None``: the model's device; every tensor of ``data`` must already be on it (ValueError otherwise).
        An explicit ``device`` must exist and hold the model; the data are moved to it.
        """
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
        model_device = _model_device(model)
        if device is not None:
            target = resolve_device(device)
            if model_device is not None and not _same_device(model_device, target):
                raise ValueError(f"device={str(device)!r} but the model is on {model_device}; move the model "
                                 f"(model.to({str(target)!r})) or pass device=None to follow it")
            model_device = target
        batches = normalize_data(data)
        if model_device is not None:
            batches = [_place_batch(i, b, model_device, move=device is not None) for i, b in enumerate(batches)]
        sizes = [_batch_size(x) for x, _ in batches]
        total = sum(sizes)
        frozen = {n: p.detach() for n, p in named.items() if n not in set(names)}
        module = _pure_module(model)
        warn_train_mode_randomness(model)
        theta = {n: named[n].detach().clone() for n in names}

        def make_term(x: Any, y: Tensor) -> Term:
            args, kwargs = _call_inputs(x)

            def term(p: dict[str, Tensor]) -> Tensor:
                out = functional_call(module, {**frozen, **p}, args, kwargs, tie_weights=True, strict=False)
                return loss_fn(out, y)

            return term

        terms = [(n / total, make_term(x, y)) for n, (x, y) in zip(sizes, batches)]
        devices = sorted({p.device.index or 0 for p in theta.values() if p.device.type == "cuda"})
        out = cls(names, theta, terms, total, devices)
        out.batches = batches
        out.source = (module, loss_fn, frozen)  # for structured second-order rules (curvature.diagonal)
        return out

    @classmethod
    def from_function(cls, f: Callable[[dict[str, Tensor]], Tensor], params: Mapping[str, Tensor]) -> LossFunction:
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
        """The loss at ``params``; ValueError if it is not a finite scalar, or naming the problem when the model's
        forward pass or the loss rejects the data (wrong input width, integer inputs to a float model, a dtype
        that differs from the parameters')."""
        total = 0.0
        with torch.no_grad(), self.context():
            for i, (w, term) in enumerate(self.terms):
                try:
                    out = term(self.params)
                except (RuntimeError, TypeError, IndexError) as e:
                    if self.batches is None:
                        raise
                    raise ValueError(explain_forward_error(e, i, self.batches[i][0], self.params)) from e
                v = float(self.check_term(i, out))
                if not math.isfinite(v):
                    raise NonFiniteLossError(f"the loss is not finite ({v}) at the given parameters (batch {i})")
                total += w * v
        return total


def random_train_mode_modules(model: nn.Module) -> list[str]:
    """Names of submodules that draw random numbers in the model's current mode: Dropout variants with ``p > 0``
    and RReLU, in training mode."""
    out = []
    for name, m in model.named_modules():
        if not m.training:
            continue
        if (isinstance(m, nn.modules.dropout._DropoutNd) and float(getattr(m, "p", 0.0)) > 0) \
                or isinstance(m, nn.RReLU):
            out.append(f"{name or '<model>'} ({type(m).__name__}{f' p={m.p}' if hasattr(m, 'p') else ''})")
    return out


def warn_train_mode_randomness(model: nn.Module) -> None:
    """Warn (``UserWarning``) when the model is evaluated with train-mode randomness active (see
    :func:`random_train_mode_modules`): the loss is then one random sub-network's, fixed by the RNG state captured
    at construction, and a Hessian with another mask can differ by tens of percent."""
    names = random_train_mode_modules(model)
    if names:
        import warnings

        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        warnings.warn(f"train-mode randomness is active in the model ({len(names)} module(s): {shown}): the loss and "
                      "its Hessian use one frozen dropout mask, i.e. one random sub-network, and another mask gives a "
                      "different Hessian; call model.eval() (or set dropout p=0) to measure the deterministic loss",
                      UserWarning, stacklevel=4)


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


# ------------------------------------------------------------------------------------------------------------------
# devices and data diagnostics
def resolve_device(device: Any) -> torch.device:
    """``device`` (a string, index or ``torch.device``) as a ``torch.device`` that exists on this machine.

    ValueError naming the problem for an unparsable name, ``"meta"`` (no data), a CUDA/MPS device that is not
    available, or a CUDA index beyond ``torch.cuda.device_count()``. ``"cuda"`` means the current CUDA device."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"device={device!r} is not a device name (use 'cpu', 'cuda', 'cuda:N' or 'mps')") from e
    if dev.type == "meta":
        raise ValueError("device='meta' holds no data; a Hessian needs real tensors (use 'cpu' or 'cuda')")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r}: CUDA is not available on this machine (torch "
                             f"{torch.__version__}, built with CUDA {torch.version.cuda}); use device='cpu'")
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= count:
            raise ValueError(f"device={str(device)!r} does not exist: this machine has {count} CUDA device(s) "
                             f"(cuda:0..cuda:{count - 1})")
        return torch.device("cuda", index)
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device={str(device)!r}: MPS is not available on this machine; use device='cpu'")
    return dev


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        ia = torch.cuda.current_device() if a.index is None else a.index
        ib = torch.cuda.current_device() if b.index is None else b.index
        return ia == ib
    return True


def _model_device(model: nn.Module) -> torch.device | None:
    devs = {t.device for t in list(model.parameters()) + list(model.buffers())}
    if not devs:
        return None
    if len(devs) > 1:
        raise ValueError(f"the model's parameters and buffers are on several devices {sorted(map(str, devs))}; "
                         "a Hessian needs them on one device (model.to(device))")
    dev = next(iter(devs))
    if dev.type == "meta":
        raise ValueError("the model's parameters are on the 'meta' device (no data); materialise them first "
                         "(model.to_empty(device=...) and load weights)")
    return dev


def _tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _move(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _move(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_move(v, device) for v in obj)
    return obj


def _place_batch(index: int, batch: tuple[Any, Tensor], device: torch.device, move: bool) -> tuple[Any, Tensor]:
    """The batch on ``device``: moved if ``move``, else ValueError when a tensor of it is elsewhere."""
    if move:
        return _move(batch[0], device), _move(batch[1], device)
    for what, part in (("inputs", batch[0]), ("targets", batch[1])):
        for t in _tensors(part):
            if not _same_device(t.device, device):
                raise ValueError(f"data: the {what} of batch {index} are on {t.device} but the model is on {device}; "
                                 f"move the data (.to({str(device)!r})) or pass device={str(device)!r} to move it")
    return batch


def explain_forward_error(error: BaseException, index: int, inputs: Any, params: Mapping[str, Tensor]) -> str:
    """A one-line ValueError message for a forward pass (or loss) that raised ``error`` on batch ``index``."""
    msg = str(error).splitlines()[0] if str(error) else type(error).__name__
    xs = _tensors(inputs)
    pdtype = next(iter(params.values())).dtype
    x = xs[0] if xs else None
    where = f"batch {index}"
    if x is not None:
        where += f" (inputs of shape {tuple(x.shape)}, dtype {x.dtype})"
    if x is not None and x.is_floating_point() and x.dtype != pdtype:
        return (f"data: the inputs of batch {index} are {x.dtype} but the model's parameters are {pdtype}; convert "
                f"the data (X.to({pdtype})) or the model (model.to({x.dtype})) [{msg}]")
    if x is not None and not x.is_floating_point() and not x.is_complex() and (
            "dtype" in msg.lower() or "scalar type" in msg.lower() or "expected" in msg.lower()
            or "not implemented for" in msg.lower()):
        return (f"data: the inputs of batch {index} are integers ({x.dtype}) but the model expects floating-point "
                f"inputs ({pdtype}); convert them with X.to({pdtype}) (integer inputs are for nn.Embedding) [{msg}]")
    shape_words = ("shape", "size", "dimension", "mat1", "mat2", "expected input", "channels")
    if any(w in msg.lower() for w in shape_words):
        return f"data: the model or the loss rejected the shape of {where}: {msg}; check the input width and shape"
    return f"the model's forward pass or the loss failed on {where}: {type(error).__name__}: {msg}"

"""``Problem``: a model, a loss and its data (docs/architecture.md).

A problem is what every Run, comparison and probe works on: ``model`` (an ``nn.Module``), ``loss_fn(outputs,
targets) -> scalar mean loss``, the training set ``train``, an optional held-out ``eval`` and the fixed large
``probe_batch`` on which curvature probes evaluate the Hessian (Jiang et al. 2023, §4: "When computing Hessian, we
also used large batch sizes").  A *layer* is a named group of parameters; by default one parameter tensor.

Data. ``train`` and ``eval`` may be

* one ``(inputs, targets)`` pair, where ``inputs`` is a tensor, a tuple of tensors (``model(*inputs)``) or a dict of
  tensors (``model(**inputs)``, e.g. Hugging Face ``input_ids``/``attention_mask``) and ``targets`` a tensor;
* a ``torch.utils.data.Dataset`` whose items are ``(input, target)`` samples (collated with ``default_collate``);
* a ``DataLoader`` or any iterable of ``(inputs, targets)`` batches.

A dataset, loader or iterable is read **once, at construction, in its own iteration order** (under a forked RNG, so a
shuffling loader consumes nothing from the global random stream) and concatenated into one in-memory pair. A Run then
draws batch ``t`` as :func:`optiscope.lab.run.batch_indices` ``(t, n, batch_size, data_seed)`` from that pair: the
batch order is a pure function of ``(data_seed, t)`` whatever the user's loader does (its ``shuffle``, sampler and
``batch_size`` do not matter), so compared optimizers see identical batches and a resumed run sees the same batches as
an uninterrupted one. Across processes the guarantee needs the loader itself to be deterministic: use
``shuffle=False`` (or a sampler with a seeded ``generator``), since a shuffling loader would hand over its samples in a
different order each time the ``Problem`` is built. ``probe_batch`` may also be one pair or several batches (a list or a ``DataLoader``); several
batches are kept as they are, and the probes' Hessian is the exact sample-weighted mean over them (a BatchNorm in
training mode normalises each batch with its own statistics, as in training).

``loss_fn`` receives whatever the model returns: a tensor, or an output object such as a Hugging Face
``ModelOutput`` (``lambda out, y: F.cross_entropy(out.logits.flatten(0, 1), y.flatten())`` or
``lambda out, y: out.loss``).

Device. ``device=None`` keeps everything where it is and requires data and model on the same device;
``device="cuda"`` (or ``"cpu"``, ``"cuda:1"``, a ``torch.device``) moves the model and all data there, and Runs train
there. Batch indices and the random generators that draw them stay on the CPU, so the batches (and on the CPU the
numbers) are the same as without ``device``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

TASKS = ("classification", "regression", "lm")

Inputs = Any  # Tensor | tuple[Tensor, ...] | dict[str, Tensor]
Batch = tuple[Any, torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------
# inputs of any structure: a tensor, a tuple/list of tensors, a dict of tensors
# ----------------------------------------------------------------------------------------------------------------
def tensor_leaves(obj: Any) -> list[torch.Tensor]:
    """Every tensor in ``obj`` (a tensor, or nested tuples/lists/dicts of them), in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in tensor_leaves(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in tensor_leaves(v)]
    return []


def _is_inputs(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, Mapping):
        return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj)
    return False


def is_batch(obj: Any) -> bool:
    """True for one ``(inputs, targets)`` pair: inputs a tensor, tuple of tensors or dict of tensors; targets a tensor."""
    return (isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[1], torch.Tensor)
            and _is_inputs(obj[0]))


def n_samples(inputs: Inputs, what: str = "inputs") -> int:
    """Leading (batch) dimension shared by every tensor in ``inputs``; ValueError if they disagree or are 0-d."""
    leaves = tensor_leaves(inputs)
    if not leaves:
        raise ValueError(f"{what} holds no tensor (got {type(inputs).__name__}); use a Tensor, a tuple of Tensors or "
                         "a dict of Tensors")
    sizes = set()
    for t in leaves:
        if t.dim() == 0:
            raise ValueError(f"{what}: a 0-d tensor has no batch dimension")
        sizes.add(int(t.shape[0]))
    if len(sizes) != 1:
        raise ValueError(f"{what}: tensors disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


def select(inputs: Any, index: Any) -> Any:
    """``inputs[index]`` applied to every tensor (a slice or an index tensor, moved to each tensor's device)."""
    if isinstance(inputs, torch.Tensor):
        if isinstance(index, torch.Tensor) and index.device != inputs.device:
            index = index.to(inputs.device)
        return inputs[index]
    if isinstance(inputs, Mapping):
        return {k: select(v, index) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return tuple(select(v, index) for v in inputs)
    raise ValueError(f"cannot index inputs of type {type(inputs).__name__}")


def call_args(inputs: Inputs) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of the model call: ``model(x)``, ``model(*inputs)`` or ``model(**inputs)``."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    return tuple(inputs), {}


def forward(model: nn.Module, inputs: Inputs) -> Any:
    """``model(x)``, ``model(*inputs)`` (tuple) or ``model(**inputs)`` (dict)."""
    args, kwargs = call_args(inputs)
    return model(*args, **kwargs)


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor moved to ``device`` (structure kept)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return tuple(to_device(v, device) for v in obj)
    return obj


def resolve_device(device: Any) -> torch.device:
    """``torch.device`` from ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a device; ValueError if absent."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a device name (cpu, cuda, cuda:N, auto): {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    return dev


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def check_same_device(model: nn.Module, data: Any, what: str) -> None:
    """ValueError when a tensor of ``data`` lies on another device than the model's parameters."""
    dev = model_device(model)
    for t in tensor_leaves(data):
        if t.device != dev:
            raise ValueError(f"{what} is on {t.device} but the model is on {dev}; move one of them "
                             "(lab.Problem(..., device=...) moves both)")


def _describe(obj: Any) -> str:
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)} ({', '.join(type(v).__name__ for v in obj[:3])})"
    if isinstance(obj, Mapping):
        return f"a dict with keys {list(obj)[:5]}"
    return f"a {type(obj).__name__}"


def _not_a_batch(what: str, i: int, b: Any) -> ValueError:
    hint = ""
    if isinstance(b, Mapping):
        hint = ("; a dict batch (e.g. from a Hugging Face collator) needs its targets split off: "
                "[(b, b['labels']) for b in loader]")
    return ValueError(f"{what}: batch {i} is {_describe(b)}, not an (inputs, targets) pair with targets a tensor "
                      f"and inputs a tensor, a tuple of tensors or a dict of tensors{hint}")


def as_batches(data: Any, what: str = "data") -> list[Batch]:
    """One batch, a ``Dataset`` of samples, a ``DataLoader`` or an iterable of batches -> a non-empty list of batches.

    Iterables are consumed once under a forked RNG (a shuffling loader leaves the global random stream untouched).
    """
    if data is None:
        raise ValueError(f"{what} is None; pass an (inputs, targets) pair, a Dataset, a DataLoader or a list of batches")
    if is_batch(data):
        batches = [(data[0], data[1])]
    else:
        from torch.utils.data import DataLoader, Dataset, default_collate

        with torch.random.fork_rng(devices=[]):
            if isinstance(data, Dataset) and not isinstance(data, DataLoader) and hasattr(data, "__len__"):
                n = len(data)
                if n == 0:
                    raise ValueError(f"{what} is empty: the Dataset has 0 samples")
                items = [data[i] for i in range(n)]
                if not (isinstance(items[0], (tuple, list)) and len(items[0]) == 2):
                    raise ValueError(f"{what}: Dataset items must be (input, target) samples, got "
                                     f"{_describe(items[0])}")
                b = default_collate(items)
                b = (b[0], b[1])
                if not is_batch(b):
                    raise _not_a_batch(what, 0, b)
                batches = [b]
            else:
                if isinstance(data, (torch.Tensor, Mapping, str, bytes)):
                    raise ValueError(f"{what} is {_describe(data)}; pass an (inputs, targets) pair, a Dataset, a "
                                     "DataLoader or an iterable of such pairs")
                try:
                    it = iter(data)
                except TypeError:
                    raise ValueError(f"{what} is {_describe(data)}: not an (inputs, targets) pair, a Dataset, a "
                                     "DataLoader or an iterable of batches") from None
                batches = []
                for i, b in enumerate(it):
                    if not is_batch(b):
                        raise _not_a_batch(what, i, b)
                    batches.append((b[0], b[1]))
    if not batches:
        raise ValueError(f"{what} is empty: it yielded no batch")
    for i, (x, y) in enumerate(batches):
        n = n_samples(x, f"{what} batch {i} inputs")
        if n == 0:
            raise ValueError(f"{what} is empty: batch {i} has 0 samples")
        if y.dim() == 0 or len(y) != n:
            raise ValueError(f"{what} batch {i}: inputs have {n} samples but targets have "
                             f"{'no batch dimension' if y.dim() == 0 else len(y)}")
    return batches


def _concat(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, dim=0)
    if isinstance(first, Mapping):
        return {k: torch.cat([p[k] for p in parts], dim=0) for k in first}
    return tuple(torch.cat([p[j] for p in parts], dim=0) for j in range(len(first)))


def concat_batches(batches: list[Batch], what: str = "data") -> Batch:
    """Concatenate batches along the sample dimension (they must share structure, keys and trailing shapes)."""
    if len(batches) == 1:
        return batches[0]
    x0 = batches[0][0]
    for i, (x, _) in enumerate(batches[1:], 1):
        same = (type(x) is type(x0) if not isinstance(x0, Mapping) else isinstance(x, Mapping) and list(x) == list(x0))
        if not same or (isinstance(x0, (tuple, list)) and len(x) != len(x0)):
            raise ValueError(f"{what}: batch {i} has inputs structured differently from batch 0")
    try:
        return _concat([b[0] for b in batches]), torch.cat([b[1] for b in batches], dim=0)
    except RuntimeError as e:
        raise ValueError(f"{what}: batches cannot be concatenated (shapes differ beyond the batch dimension, e.g. "
                         f"padded to different lengths): {e}") from None


def as_dataset(data: Any, what: str = "data") -> Batch:
    """Any accepted data form -> one in-memory ``(inputs, targets)`` pair (see the module docstring)."""
    return concat_batches(as_batches(data, what), what)


# ----------------------------------------------------------------------------------------------------------------
# Problem
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Problem:
    """``Problem(model, loss_fn, train, eval=None, probe_batch=None, task=..., layers=None, device=None)``.

    ``train``/``eval``: any data form of the module docstring (stored as one in-memory ``(inputs, targets)`` pair).
    ``probe_batch`` defaults to the first ``min(n_train, 1024)`` training samples; it may be one pair or several
    batches (kept as a list, see :attr:`probe_batches`). ``layers`` maps layer names to lists of parameter names
    (default: one layer per trainable parameter tensor). ``device`` moves model and data (module docstring).
    """

    model: nn.Module
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor]
    train: Any
    eval: Any = None
    probe_batch: Any = None
    task: str = "classification"
    layers: Mapping[str, Sequence[str]] | None = None
    name: str = "problem"
    n_classes: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    device: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        if not callable(self.loss_fn):
            raise ValueError("loss_fn must be callable as loss_fn(outputs, targets) -> scalar")
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; valid: {', '.join(TASKS)}")
        self.train = as_dataset(self.train, "train")
        if self.eval is not None:
            self.eval = as_dataset(self.eval, "eval")
        if self.probe_batch is None:
            n = min(self.n_train, 1024)
            self.probe_batch = (select(self.train[0], slice(0, n)), self.train[1][:n])
        else:
            pb = as_batches(self.probe_batch, "probe_batch")
            self.probe_batch = pb[0] if len(pb) == 1 else pb
        if self.device is not None:
            dev = resolve_device(self.device)
            self.device = dev
            self.model.to(dev)
            self.train = to_device(self.train, dev)
            if self.eval is not None:
                self.eval = to_device(self.eval, dev)
            if isinstance(self.probe_batch, list):
                self.probe_batch = [to_device(b, dev) for b in self.probe_batch]
            else:
                self.probe_batch = to_device(self.probe_batch, dev)
        else:
            self.device = model_device(self.model)
            for what, d in (("train", self.train), ("eval", self.eval), ("probe_batch", self.probe_batch)):
                if d is not None:
                    check_same_device(self.model, d, what)
        names = self.param_names
        if not names:
            raise ValueError("model has no trainable parameters")
        if self.layers is None:
            self.layers = {n: [n] for n in names}
        else:
            layers = {}
            for lname, pnames in self.layers.items():
                pnames = [pnames] if isinstance(pnames, str) else list(pnames)
                bad = [p for p in pnames if p not in names]
                if bad:
                    raise ValueError(f"layer {lname!r} names unknown parameters {bad}; valid: {names}")
                layers[str(lname)] = pnames
            self.layers = layers

    # -- facts --------------------------------------------------------------------------------------
    @property
    def param_names(self) -> list[str]:
        """Names of the trainable parameters (``named_parameters()`` order)."""
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    @property
    def n_train(self) -> int:
        """Number of training samples."""
        return n_samples(self.train[0], "train inputs")

    @property
    def probe_batches(self) -> list[Batch]:
        """The probe data as a list of ``(inputs, targets)`` batches (one element unless several were given)."""
        return list(self.probe_batch) if isinstance(self.probe_batch, list) else [self.probe_batch]

    def loss(self, model: nn.Module, X: Any, y: torch.Tensor) -> torch.Tensor:
        """``loss_fn(model(X), y)`` with ``X`` a tensor, tuple or dict of tensors."""
        return self.loss_fn(forward(model, X), y)

    def layer_of(self) -> dict[str, str]:
        """Parameter name -> layer name."""
        return {p: lname for lname, ps in self.layers.items() for p in ps}

    # -- construction from the zoo -------------------------------------------------------------------
    @classmethod
    def from_specs(cls, model: str, data: str, seed: int = 0, probe_size: int = 1024, loss: Any = None,
                   dtype: torch.dtype | None = None, device: Any = None, **data_kw: Any) -> Problem:
        """Build from zoo specs: ``Problem.from_specs("mlp:depth=3,width=64", "digits", seed=0)``.

        Unknown model/dataset names raise ``ValueError`` listing the valid ones (from the zoo). The model is built
        on the CPU (so its initialization is the same on every device) and then moved to ``device``.
        """
        from optiscope.zoo import build_model, default_loss, load_dataset

        ds = load_dataset(data, **data_kw)
        net = build_model(model, dataset=ds, seed=seed)
        X, y = ds.train
        if dtype is not None:
            net = net.to(dtype)
            X = X.to(dtype) if X.is_floating_point() else X
            y = y.to(dtype) if y.is_floating_point() else y
        test = getattr(ds, "test", None)
        if test is not None and dtype is not None:
            test = tuple(t.to(dtype) if t.is_floating_point() else t for t in test)
        n = min(len(X), int(probe_size))
        return cls(model=net, loss_fn=loss if loss is not None else default_loss(ds), train=(X, y), eval=test,
                   probe_batch=(X[:n], y[:n]), task=getattr(ds, "task", "classification"),
                   name=f"{model}@{data}", n_classes=getattr(ds, "n_classes", None),
                   meta={"model": model, "data": data, "seed": seed}, device=device)

"""``Problem``: a model, a loss and its data (docs/architecture.md).

A problem is what every Run, comparison and probe works on: ``model`` (an ``nn.Module``), ``loss_fn(outputs,
targets) -> scalar mean loss``, the training set ``train = (X, y)``, an optional held-out ``eval = (X, y)`` and the
fixed large ``probe_batch`` on which curvature probes evaluate the Hessian (Jiang et al. 2023, §4: "When computing Hessian, we
also used large batch sizes").  A *layer* is a named group of parameters; by default one parameter tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

TASKS = ("classification", "regression", "lm")


def _as_pair(data: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise ValueError(f"{what} must be a pair (X, y) of tensors, got {type(data).__name__}")
    X, y = data
    if not (isinstance(X, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise ValueError(f"{what} must be a pair (X, y) of tensors, got ({type(X).__name__}, {type(y).__name__})")
    if len(X) != len(y):
        raise ValueError(f"{what}: X has {len(X)} samples but y has {len(y)}")
    if len(X) == 0:
        raise ValueError(f"{what} is empty")
    return X, y


@dataclass
class Problem:
    """``Problem(model, loss_fn, train=(X, y), eval=None, probe_batch=None, task=..., layers=None)``.

    ``probe_batch`` defaults to the first ``min(len(X), 1024)`` training samples. ``layers`` maps layer names to
    lists of parameter names (default: one layer per trainable parameter tensor).
    """

    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    train: tuple[torch.Tensor, torch.Tensor]
    eval: tuple[torch.Tensor, torch.Tensor] | None = None
    probe_batch: tuple[torch.Tensor, torch.Tensor] | None = None
    task: str = "classification"
    layers: Mapping[str, Sequence[str]] | None = None
    name: str = "problem"
    n_classes: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        if not callable(self.loss_fn):
            raise ValueError("loss_fn must be callable as loss_fn(outputs, targets) -> scalar")
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; valid: {', '.join(TASKS)}")
        self.train = _as_pair(self.train, "train")
        if self.eval is not None:
            self.eval = _as_pair(self.eval, "eval")
        if self.probe_batch is None:
            n = min(len(self.train[0]), 1024)
            self.probe_batch = (self.train[0][:n], self.train[1][:n])
        else:
            self.probe_batch = _as_pair(self.probe_batch, "probe_batch")
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
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    @property
    def n_train(self) -> int:
        return len(self.train[0])

    def loss(self, model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(model(X), y)

    def layer_of(self) -> dict[str, str]:
        """Parameter name -> layer name."""
        return {p: lname for lname, ps in self.layers.items() for p in ps}

    # -- construction from the zoo -------------------------------------------------------------------
    @classmethod
    def from_specs(cls, model: str, data: str, seed: int = 0, probe_size: int = 1024, loss: Any = None,
                   dtype: torch.dtype | None = None, **data_kw: Any) -> Problem:
        """Build from zoo specs: ``Problem.from_specs("mlp:depth=3,width=64", "digits", seed=0)``.

        Unknown model/dataset names raise ``ValueError`` listing the valid ones (from the zoo).
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
                   meta={"model": model, "data": data, "seed": seed})

"""Loggers for :class:`optiscope.Tracker`: TensorBoard, Weights & Biases, MLflow.

Each implements the :class:`optiscope.lab.tracker.MetricsLogger` protocol: ``log_metrics(step, metrics)`` with a flat
``{name: float}`` dict (per-layer values as ``"metric/layer"``), and ``close()``. The optional packages are imported
when a logger is created, never by ``import optiscope``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["MLflowLogger", "TensorBoardLogger", "WandbLogger"]


def _missing(package: str, extra: str) -> ValueError:
    return ValueError(f"{package} is not installed; install it without replacing torch: "
                      f"pip install -c constraints/torch.txt '.[{extra}]'")


class TensorBoardLogger:
    """Each checkpoint's metrics as scalars ``prefix + name`` at ``global_step = step`` (``torch.utils.tensorboard``).

    ``log_dir``: where the event files go (a new ``SummaryWriter``), or pass an existing ``writer`` (it is flushed
    but not closed by :meth:`close`). Non-finite values (an undefined R_med, a diverged loss) are skipped, so
    TensorBoard's plots stay readable; the run store keeps them."""

    def __init__(self, log_dir: str | os.PathLike | None = None, writer: Any = None, prefix: str = "optiscope/"):
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise _missing("tensorboard", "tensorboard") from None
            writer = SummaryWriter(log_dir=None if log_dir is None else str(log_dir))
            self._own = True
        else:
            self._own = False
        self.writer = writer
        self.prefix = str(prefix)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """``writer.add_scalar(prefix + name, value, step)`` for every finite value."""
        for k, v in metrics.items():
            if math.isfinite(float(v)):
                self.writer.add_scalar(self.prefix + k, float(v), int(step))
        self.writer.flush()

    def close(self) -> None:
        """Flush; close the writer if this logger created it."""
        self.writer.flush()
        if self._own:
            self.writer.close()


class WandbLogger:
    """``run.log({prefix + name: value}, step=step)`` on a Weights & Biases run (``wandb.init(...)``'s result).

    ``finish=True`` calls ``run.finish()`` on :meth:`close`. Pass ``run=None`` to use ``wandb.run`` (the active run).
    """

    def __init__(self, run: Any = None, prefix: str = "optiscope/", finish: bool = False):
        if run is None:
            try:
                import wandb
            except ImportError:
                raise _missing("wandb", "wandb") from None
            run = wandb.run
            if run is None:
                raise ValueError("no active W&B run: call wandb.init(...) first or pass run=")
        if not callable(getattr(run, "log", None)):
            raise ValueError(f"run {run!r} has no log(metrics, step=...) method")
        self.run, self.prefix, self.finish = run, str(prefix), bool(finish)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """One ``run.log`` call per checkpoint."""
        self.run.log({self.prefix + k: float(v) for k, v in metrics.items()}, step=int(step))

    def close(self) -> None:
        """``run.finish()`` when ``finish=True``."""
        if self.finish and callable(getattr(self.run, "finish", None)):
            self.run.finish()


class MLflowLogger:
    """``client.log_metrics({prefix + name: value}, step=step)``; ``client`` defaults to the ``mlflow`` module (the
    active run). MLflow refuses NaN in some backends, so non-finite values are skipped."""

    def __init__(self, client: Any = None, prefix: str = "optiscope/"):
        if client is None:
            try:
                import mlflow as client
            except ImportError:
                raise _missing("mlflow", "mlflow") from None
        if not callable(getattr(client, "log_metrics", None)):
            raise ValueError(f"client {client!r} has no log_metrics(metrics, step=...) method")
        self.client, self.prefix = client, str(prefix)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """One ``log_metrics`` call per checkpoint (finite values only)."""
        clean = {self.prefix + k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        if clean:
            self.client.log_metrics(clean, step=int(step))

    def close(self) -> None:
        """Nothing to release (the MLflow run belongs to the caller)."""

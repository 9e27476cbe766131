"""optiscope.integrations: attach a :class:`optiscope.Tracker` to loggers and training frameworks.

Layer: above ``lab`` (these modules import it), below ``experiments``; nothing here is imported by ``import optiscope``,
and every optional package is imported only by the module that needs it:

=======================================  ==================================================  ======================
``loggers.TensorBoardLogger``            writes each checkpoint's metrics as TensorBoard scalars  ``tensorboard``
``loggers.WandbLogger``                  ``run.log(metrics, step=step)`` on a W&B run            ``wandb`` (yours)
``loggers.MLflowLogger``                 ``mlflow.log_metrics(metrics, step=step)``              ``mlflow`` (yours)
``huggingface.OptiscopeCallback``        a ``transformers.TrainerCallback`` running a Tracker    ``transformers``
``lightning.OptiscopeCallback``          a ``lightning.pytorch.Callback`` running a Tracker      ``lightning``
=======================================  ==================================================  ======================

Any other logger is an object with ``log_metrics(step, metrics)`` (and optionally ``close()``), or a function
``fn(step, metrics)`` (:class:`optiscope.lab.tracker.MetricsLogger`). Install the extras without replacing the
pinned torch: ``pip install -c constraints/torch.txt '.[hf]'`` (also ``[tensorboard]``, ``[lightning]``, ``[all]``).
"""

from __future__ import annotations

__all__ = ["MLflowLogger", "TensorBoardLogger", "WandbLogger"]


def __getattr__(name: str):
    if name in __all__:
        from optiscope.integrations import loggers

        return getattr(loggers, name)
    raise AttributeError(f"module 'optiscope.integrations' has no attribute {name!r}")

"""A Lightning ``Callback`` that runs an :class:`optiscope.Tracker` inside ``Trainer.fit()``.

::

    from optiscope.integrations.lightning import OptiscopeCallback

    cb = OptiscopeCallback(probe_data, loss_fn=F.cross_entropy, probes=["loss", "sharpness"], every=50,
                           store="runs/lit")
    lightning.Trainer(max_steps=1000, callbacks=[cb]).fit(module, loader)

The probed model is the ``LightningModule`` itself (``module(inputs)`` is its ``forward``); ``probe_data`` and
``loss_fn`` are as for :class:`optiscope.Tracker` (dict batches with a ``labels`` entry work as in the Hugging Face
callback, with the default ``loss_fn`` reading ``out.loss``). The tracker is created in ``on_fit_start`` (measuring
step 0), stepped after every training batch whose optimizer step advanced ``trainer.global_step`` (gradient
accumulation is respected), with ``trainer.optimizers[0]``, and closed in ``on_fit_end``. Requires ``lightning``
(``pip install -c constraints/torch.txt '.[lightning]'``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError:  # the module stays importable; creating the callback says what to install
    Callback = object
    _MISSING = ("lightning is not installed; install it without replacing torch: "
                "pip install -c constraints/torch.txt '.[lightning]'")
else:
    _MISSING = None

from optiscope.integrations._common import output_loss, probe_batches
from optiscope.lab.problem import model_device
from optiscope.lab.tracker import Tracker

__all__ = ["OptiscopeCallback"]


class OptiscopeCallback(Callback):
    """Run a :class:`optiscope.Tracker` during ``Trainer.fit()`` (module docstring); ``tracker_kw`` go to it."""

    def __init__(self, probe_data: Any, loss_fn: Callable | None = None, label_key: str = "labels",
                 **tracker_kw: Any):
        super().__init__()
        if _MISSING:
            raise ValueError(_MISSING)
        self.probe_data = probe_data
        self.loss_fn = loss_fn or output_loss
        self.label_key = label_key
        self.tracker_kw = tracker_kw
        self.tracker: Tracker | None = None

    @staticmethod
    def _optimizer(trainer):
        opts = getattr(trainer, "optimizers", None) or []
        return opts[0] if opts else None  # the Tracker unwraps LightningOptimizer

    def on_fit_start(self, trainer, pl_module):
        """Create the tracker on the module and measure the current step."""
        data = probe_batches(self.probe_data, model_device(pl_module), self.label_key)
        self.tracker = Tracker(pl_module, self.loss_fn, data, resume=trainer.global_step > 0, **self.tracker_kw)
        self.tracker.step(int(trainer.global_step), optimizer=self._optimizer(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        """After a batch that completed an optimizer step: ``tracker.step(global_step, optimizer)``."""
        t = self.tracker
        if t is not None and (t.last_step is None or trainer.global_step > t.last_step):
            t.step(int(trainer.global_step), optimizer=self._optimizer(trainer))

    def on_fit_end(self, trainer, pl_module):
        """Close the tracker (manifest status ``finished``)."""
        if self.tracker is not None:
            self.tracker.close()

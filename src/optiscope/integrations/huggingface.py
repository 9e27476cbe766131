"""A Hugging Face ``transformers.TrainerCallback`` that runs an :class:`optiscope.Tracker` inside ``Trainer.train()``.

::

    from optiscope.integrations.huggingface import OptiscopeCallback

    cb = OptiscopeCallback(probe_data, probes=["loss", "sharpness"], every=50, store="runs/gpt2", mode="eval")
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb]).train()

``probe_data``: ``(inputs, targets)`` batches, or dict batches as a data collator makes them (``input_ids``,
``attention_mask``, ``labels``); dict batches keep their labels in the inputs and the default ``loss_fn`` is the
model's own ``out.loss``. ``None`` takes the first ``max_batches`` batches of the trainer's training loader
(read once at the start of training, under a forked RNG). The data are moved to the model's device.

The tracker is created in ``on_train_begin`` (measuring step 0), stepped in ``on_step_end`` with
``state.global_step`` (optimizer steps, so gradient accumulation is respected) and the trainer's optimizer (for
``precond_sharpness``: ``torch.optim.AdamW``'s state is read directly), and closed in ``on_train_end``. Requires
``transformers`` (``pip install -c constraints/torch.txt '.[hf]'``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError:  # the module stays importable; creating the callback says what to install
    TrainerCallback = object
    _MISSING = ("transformers is not installed; install it without replacing torch: "
                "pip install -c constraints/torch.txt '.[hf]'")
else:
    _MISSING = None

from optiscope.integrations._common import output_loss, probe_batches
from optiscope.lab.problem import model_device
from optiscope.lab.tracker import Tracker

__all__ = ["OptiscopeCallback"]


class OptiscopeCallback(TrainerCallback):
    """Run a :class:`optiscope.Tracker` during ``Trainer.train()`` (module docstring); ``tracker_kw`` go to it
    (``probes``, ``every``, ``store``, ``mode``, ``loggers``, ``name``, ...)."""

    def __init__(self, probe_data: Any = None, loss_fn: Callable | None = None, label_key: str = "labels",
                 max_batches: int = 1, **tracker_kw: Any):
        if _MISSING:
            raise ValueError(_MISSING)
        self.probe_data = probe_data
        self.loss_fn = loss_fn or output_loss
        self.label_key = label_key
        self.max_batches = int(max_batches)
        self.tracker_kw = tracker_kw
        self.tracker: Tracker | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        """Create the tracker on the trainer's model and measure the current step."""
        import torch

        data = self.probe_data
        if data is None:
            if train_dataloader is None:
                raise ValueError("OptiscopeCallback: no probe_data and the trainer has no training loader")
            with torch.random.fork_rng(devices=[]):
                data = probe_batches(train_dataloader, model_device(model), self.label_key, self.max_batches)
        else:
            data = probe_batches(data, model_device(model), self.label_key)
        self.tracker = Tracker(model, self.loss_fn, data, resume=state.global_step > 0, **self.tracker_kw)
        self.tracker.step(int(state.global_step), optimizer=optimizer)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        """After each optimizer step: ``tracker.step(global_step, optimizer)``."""
        if self.tracker is not None:
            self.tracker.step(int(state.global_step), optimizer=optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        """Close the tracker (manifest status ``finished``)."""
        if self.tracker is not None:
            self.tracker.close()

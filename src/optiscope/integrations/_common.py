"""Shared by the framework callbacks: probe data from dict batches, and the default loss of such batches."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from optiscope.lab.problem import as_batches, is_batch, to_device


def output_loss(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    """The model's own loss, ``outputs.loss`` (Hugging Face models given ``labels``) or ``outputs["loss"]``."""
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    if loss is None:
        raise ValueError(f"the model output ({type(outputs).__name__}) has no .loss: pass labels in the inputs or "
                         "give loss_fn(outputs, targets)")
    return loss


def probe_batches(data: Any, device: torch.device, label_key: str = "labels", max_batches: int | None = None
                  ) -> list[tuple[Any, torch.Tensor]]:
    """Probe data for a callback: ``(inputs, targets)`` batches as for :class:`optiscope.Tracker`, or dict batches
    (a Hugging Face collator's output) taken as ``(batch, batch[label_key])`` with the labels left in the inputs
    (so the model computes ``out.loss``). At most ``max_batches`` are read; all are moved to ``device``."""
    if isinstance(data, Mapping):
        data = [data]
    if not is_batch(data) and not isinstance(data, (list, tuple)):
        items = []
        for i, b in enumerate(data):
            if max_batches is not None and i >= max_batches:
                break
            items.append(b)
        data = items
    if isinstance(data, (list, tuple)) and not is_batch(data):
        data = list(data)[:max_batches] if max_batches is not None else list(data)
        conv = []
        for i, b in enumerate(data):
            if isinstance(b, Mapping):
                if label_key not in b:
                    raise ValueError(f"probe data: dict batch {i} has no {label_key!r} entry (keys: {list(b)}); "
                                     "pass label_key= or (inputs, targets) pairs")
                tensors = {k: v for k, v in b.items() if isinstance(v, torch.Tensor)}
                conv.append((tensors, tensors[label_key]))
            else:
                conv.append(b)
        data = conv
    return [to_device(b, device) for b in as_batches(data, "probe data")]

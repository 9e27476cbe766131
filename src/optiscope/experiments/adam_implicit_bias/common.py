"""Helpers shared by the Cattaneo et al. 2024 experiments (``adam_*``): the bilinear problem and log-log slope fits."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from optiscope.lab.problem import to_device
from optiscope.optim.flows import model_loss
from optiscope.zoo.data import HalfMSELoss
from optiscope.zoo.models import Bilinear


def bilinear_problem(y: float = 1.5, theta0: tuple[float, float] = (2.8, 3.5), device: Any = "cpu"):
    """``(f, params0)`` for E = (y - theta1 theta2)^2 / 2 (Cattaneo et al. 2024, §4) built from
    :class:`optiscope.zoo.models.Bilinear`, in float64 on ``device`` (model and data built on the CPU, then moved)."""
    model = Bilinear(*theta0).double().to(device)
    return model_loss(model, HalfMSELoss(), to_device(Bilinear.data(y, dtype=torch.float64), torch.device(device)))


def loglog_slope(hs, errs) -> float:
    """Least-squares slope of log(err) against log(h): the observed order of accuracy."""
    hs, errs = np.asarray(hs, float), np.asarray(errs, float)
    if len(hs) < 2 or np.any(errs <= 0) or not np.all(np.isfinite(errs)):
        return float("nan")
    return float(np.polyfit(np.log(hs), np.log(errs), 1)[0])


def max_abs_distance(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per recorded step, the max-norm distance ||a_n - b_n||_inf (Cattaneo et al. 2024, §5 Fig. 3 uses the infinity
    norm), as a CPU numpy array whatever the trajectories' device."""
    n = min(len(a), len(b))
    return (a[:n] - b[:n]).abs().amax(dim=1).double().cpu().numpy()

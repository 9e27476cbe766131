"""Mini-batch SGD with momentum through generating functions (Velikanov, Kuznedelev, Yarotsky 2023).

Setting (Velikanov et al. 2023, §2, Prop. 6, output-space form). A linear model in output space: kernel ``K`` (N x N) on a
dataset of size N, error ``e_t = f_t - y`` and loss ``L_t = (1/2N) E||e_t||^2``. With ``H_f = K / N`` and its
eigenpairs ``(lambda_k, u_k)`` the initial error has output-space second moments ``c_k = (u_k . e_0)^2 / N`` so
that ``L_0 = (1/2) sum_k c_k``. SGD with heavy-ball momentum (Velikanov et al. 2023, Eq. 1), batch of size b drawn
uniformly without replacement, fresh each step::

    p_{t+1} = beta p_t + g_t,   e_{t+1} = e_t - alpha p_{t+1},   g_t = (1/b) K[:, B_t] e_t[B_t]

(identical to ``torch.optim.SGD(lr=alpha, momentum=beta)``). Effective learning rate ``alpha_eff = alpha/(1-beta)``.
Noise amplitude ``gamma = (N - b) / (b (N - 1))`` (finite dataset), ``gamma = 1/b`` (infinite dataset).

Spectrally expressible (SE) approximation (Velikanov et al. 2023, §3, Eq. 7 and Eq. 65): the noise added to mode k is
``gamma alpha^2 lambda_k^2 (tau1 sum_l C_l - tau2 C_k)``. Everything here is a function of a :class:`Spectrum`
(eigenvalues, coefficients, optional multiplicities) and the hyper-parameters; the recursion runs in torch
(vectorised over eigenvalues and over a grid of (lr, momentum)), the rest is numpy/scipy.

Conventions chosen where the paper leaves a detail open (documented per function): immediate divergence means the
noiseless condition fails (or ``sum lambda^2 = inf`` for a power law with nu <= 1/2); the synthetic power law
uses exact tail sums ``sum_{l>=k} c_l = K k^-kappa``; Prop. 5 uses output-space ``c_k`` (the paper's two forms differ; this one is used).

Map of the package (every name is importable from ``optiscope.theory.sgd`` itself):

- ``spectrum``: :class:`Spectrum` (from arrays, a kernel, a power law, a file; coarsening), :class:`SpectrumError`,
  :data:`TORCH_THREADS` / :func:`torch_threads` (§2, Prop. 6; §6, Eq. 25).
- ``recursion``: noise amplitude, effective learning rate, the SE second-moment recursion and its loss curves
  (:func:`se_loss_curve`, :func:`se_loss_grid`, :class:`LossCurve`) (Prop. 1, Eq. 5; §3-4, Eq. 7, Eq. 65).
- ``generating``: characteristic polynomial, noise / signal / loss generating functions and their values at z = 1
  (§4-5, Eqs. 16-21).
- ``critical``: noiseless stability, the sharpness threshold, critical learning rate and regularization,
  :func:`stability` and :func:`stability_map` (§5, Prop. 3; App. H).
- ``asymptotics``: power-law fits, phases, large-t loss asymptotics and the transition time (§6, Eq. 25, Thm. 2).
- ``advice``: the negative-momentum criterion (Prop. 5), optimal learning rates in the two phases, and
  :func:`advise` (§6).

The functions and classes are defined in these modules and re-exported here: ``optiscope.theory.sgd.<name>``
works for every public name, as before the split.
"""

# ruff: noqa: F401  (the names of the single module this package replaces, kept importable from here)
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import optimize, special

from optiscope.theory.sgd.advice import (
    Advice,
    _log_c_noise,
    _log_c_signal,
    advise,
    log_constant_momentum_derivative,
    negative_momentum_criterion,
    optimal_lr_noise_dominated,
    optimal_lr_signal_dominated,
)
from optiscope.theory.sgd.asymptotics import (
    Asymptotics,
    PowerLawFit,
    _loglog_fit,
    asymptotic_loss,
    fit_power_law,
    power_law_phase,
    transition_time,
)
from optiscope.theory.sgd.critical import (
    Stability,
    _mode_growth,
    critical_learning_rate,
    critical_regularization,
    effective_lr_bound,
    momentum_sharpness_threshold,
    noiseless_critical_lr,
    noiseless_stable,
    stability,
    stability_map,
)
from optiscope.theory.sgd.generating import (
    _denominators,
    _modes_z,
    characteristic_polynomial,
    loss_generating_function,
    noise_at_one,
    noise_generating_function,
    signal_at_one,
    signal_generating_function,
)
from optiscope.theory.sgd.recursion import (
    LossCurve,
    _check_hyper,
    _se_core,
    _se_core_impl,
    effective_learning_rate,
    noise_amplitude,
    se_loss_curve,
    se_loss_grid,
)
from optiscope.theory.sgd.spectrum import (
    TORCH_THREADS,
    Spectrum,
    SpectrumError,
    _initial_error,
    torch_threads,
)

__all__ = [
    "Advice",
    "Asymptotics",
    "LossCurve",
    "PowerLawFit",
    "Spectrum",
    "SpectrumError",
    "Stability",
    "advise",
    "asymptotic_loss",
    "characteristic_polynomial",
    "critical_learning_rate",
    "critical_regularization",
    "effective_learning_rate",
    "effective_lr_bound",
    "fit_power_law",
    "log_constant_momentum_derivative",
    "loss_generating_function",
    "momentum_sharpness_threshold",
    "negative_momentum_criterion",
    "noise_amplitude",
    "noise_at_one",
    "noise_generating_function",
    "noiseless_critical_lr",
    "noiseless_stable",
    "optimal_lr_noise_dominated",
    "optimal_lr_signal_dominated",
    "power_law_phase",
    "se_loss_curve",
    "se_loss_grid",
    "signal_at_one",
    "signal_generating_function",
    "stability",
    "stability_map",
    "transition_time",
]

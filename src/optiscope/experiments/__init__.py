"""Reproductions of the papers' claims: one subpackage per paper, one module per claim (or group of claims).

* :mod:`.diagonal_uniformity`: Jiang, Malik, Li 2023 (uniformity of the Hessian diagonal, R_med);
* :mod:`.adam_implicit_bias`: Cattaneo, Klusowski, Shigida 2024 (the implicit bias of Adam);
* :mod:`.vanishing_curvature`: Orvieto et al. 2022 (vanishing curvature at random initialisation);
* :mod:`.explr_deep_linear`: research notes after Li & Arora 2020 and Arora et al. 2018, 2019 (exponential
  learning rates, scale invariance, deep linear networks);
* :mod:`.sgd_generating_functions`: Velikanov et al. 2023 (mini-batch SGD via generating functions).

Modules register themselves with :func:`optiscope.experiments.base.register`;
:func:`~optiscope.experiments.base.discover` imports them all. :mod:`.base` (registry, claims, runner) and
:mod:`.reproduce` (many experiments in parallel) serve every paper.
"""

from optiscope.experiments.base import Claim, Result, get, register, registry, run_experiment

__all__ = ["Claim", "Result", "get", "register", "registry", "run_experiment"]

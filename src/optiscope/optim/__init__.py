"""optiscope.optim: optimizers with exact, documented update rules (each a ``torch.optim.Optimizer``).

Every optimizer exposes ``diagonal_preconditioner()`` and ``perturbation_eps`` (see :mod:`optiscope.optim.base`);
``make_optimizer("adam:lr=1e-3,betas=[0.9,0.999]", params)`` builds one by name (``OPTIMIZERS``).
``optim.flows`` (Cattaneo et al. 2024 modified flows) is a separate module.
"""

from optiscope.optim.adaptive import Adagrad, Adam, AMSGrad, RMSProp
from optiscope.optim.base import ExactOptimizer
from optiscope.optim.explr import ExpLR
from optiscope.optim.factory import OPTIMIZERS, make_optimizer
from optiscope.optim.momentum import SGD, HeavyBall, SignGD

__all__ = ["Adam", "AMSGrad", "RMSProp", "Adagrad", "SGD", "HeavyBall", "SignGD", "ExpLR", "ExactOptimizer",
           "OPTIMIZERS", "make_optimizer"]

"""One module per seed claim. Modules register themselves with :func:`optiscope.experiments.base.register`."""

from optiscope.experiments.base import Claim, Result, get, register, registry, run_experiment

__all__ = ["Claim", "Result", "get", "register", "registry", "run_experiment"]

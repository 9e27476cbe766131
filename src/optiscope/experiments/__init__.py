"""One module per reproduced claim (or group of claims) of a paper. Modules register themselves with :func:`optiscope.experiments.base.register`."""

from optiscope.experiments.base import Claim, Result, get, register, registry, run_experiment

__all__ = ["Claim", "Result", "get", "register", "registry", "run_experiment"]

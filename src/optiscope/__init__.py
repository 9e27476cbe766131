"""optiscope: how optimizers interact with the geometry of the loss, checked against theory.

Layers (lower never imports higher): cli > report > experiments > lab > zoo > optim > theory/metrics > curvature.
See the README and ``docs/architecture.md``.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["DistributedHessian", "Hessian", "Tracker", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import optiscope` stays cheap (the CLI imports torch only when it needs it).
    if name == "Hessian":
        from optiscope.curvature import Hessian

        return Hessian
    if name == "DistributedHessian":
        from optiscope.curvature import DistributedHessian

        return DistributedHessian
    if name == "Tracker":
        from optiscope.lab.tracker import Tracker

        return Tracker
    raise AttributeError(f"module 'optiscope' has no attribute {name!r}")

"""optiscope.curvature: the Hessian of a loss as a linear operator.

``Hessian(model, loss_fn, data, params=None)`` and ``Hessian.from_function(f, params)``; see
``docs/architecture.md`` ("curvature") for the API contract.
"""

from optiscope.curvature._problem import NonFiniteLossError
from optiscope.curvature.distributed import DistributedHessian
from optiscope.curvature.hessian import (
    BlockNormResult,
    DensityResult,
    DiagonalBlockResult,
    DiagonalEstimate,
    DiagonalResult,
    EigenResult,
    Hessian,
)
from optiscope.curvature.trace import TRACE_METHODS, TraceResult, trace_estimate

__all__ = [
    "TRACE_METHODS",
    "BlockNormResult",
    "DensityResult",
    "DiagonalBlockResult",
    "DiagonalEstimate",
    "DiagonalResult",
    "DistributedHessian",
    "EigenResult",
    "Hessian",
    "NonFiniteLossError",
    "TraceResult",
    "trace_estimate",
]

"""optiscope.metrics: pure geometry statistics on tensors/arrays."""

from optiscope.metrics.geometry import (
    DiagonalDominance,
    RMedResult,
    diagonal_dominance,
    effective_rank,
    perturbed_one_norm,
    r_med,
    singular_vector_uniformity,
)

__all__ = [
    "RMedResult", "DiagonalDominance", "r_med", "diagonal_dominance", "singular_vector_uniformity",
    "perturbed_one_norm", "effective_rank",
]

"""PAR, pixel-adaptive refinement (AFA, CVPR 2022): CAM -> pseudo-label refinement for ToCo / MCC."""

from .api import par_affinity, par_propagate, par_reasons, par_refine
from .reference import (
    DEFAULT_DILATIONS,
    neighbour_distances,
    neighbour_offsets,
    par_affinity_reference,
    par_propagate_reference,
    par_refine_reference,
)

__all__ = [
    "DEFAULT_DILATIONS",
    "neighbour_distances",
    "neighbour_offsets",
    "par_affinity",
    "par_affinity_reference",
    "par_propagate",
    "par_propagate_reference",
    "par_reasons",
    "par_refine",
    "par_refine_reference",
]

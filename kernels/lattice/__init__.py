"""Permutohedral-lattice bilateral filter (Krähenbühl's densecrf lattice): PyTorch reference and Triton kernels, and
the features of densecrf's two pairwise kernels."""

from .api import PermutohedralLattice, permutohedral_filter, permutohedral_reasons
from .features import bilateral_features, position_features

__all__ = ["PermutohedralLattice", "bilateral_features", "permutohedral_filter", "permutohedral_reasons",
           "position_features"]

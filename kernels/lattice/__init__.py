"""Permutohedral-lattice bilateral filter (Krähenbühl's densecrf lattice): PyTorch reference and Triton kernels."""

from .api import PermutohedralLattice, permutohedral_filter

__all__ = ["PermutohedralLattice", "permutohedral_filter"]

"""Permutohedral-lattice bilateral filter (Krähenbühl's densecrf lattice) in plain PyTorch."""

from .api import permutohedral_filter
from .reference import PermutohedralLattice

__all__ = ["PermutohedralLattice", "permutohedral_filter"]

"""fastwsss.kernels: fused ops and their exact PyTorch references.

Depends on torch (and triton) only; nothing here imports the rest of fastwsss, so the ops drop into any ViT.
Each public op takes ``backend="auto"|"triton"|"torch"`` (see ``_backend.py``).
"""

from .affinity import token_affinity_loss
from .lattice import PermutohedralLattice, permutohedral_filter
from .par import par, par_affinity, par_propagate

__all__ = ["PermutohedralLattice", "par", "par_affinity", "par_propagate", "permutohedral_filter",
           "token_affinity_loss"]

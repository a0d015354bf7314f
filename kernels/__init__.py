"""fastwsss.kernels: fused ops and their exact PyTorch references.

Depends on torch (and triton) only; nothing here imports the rest of fastwsss, so the ops drop into any ViT.
Each public op takes ``backend="auto"|"triton"|"torch"``; ``<op>_reasons`` (``masked_key_attention_reasons``,
``varlen_attention_reasons``, ``token_affinity_reasons``, ``par_reasons``, ``permutohedral_reasons``) says why its
Triton path cannot take given inputs ([] = it can), ``device_reasons`` and ``resolve_backend`` make the same choice
for a caller's own code path, and ``backends_used()`` says which backend each op resolved to (see ``_backend.py``).
"""

from ._backend import backends_used, device_reasons, resolve_backend
from .affinity import token_affinity_loss, token_affinity_reasons, token_affinity_sums
from .attention import (
    MaskedKeyAttention,
    block_forward,
    masked_key_attention,
    masked_key_attention_reasons,
    swap_attention,
    varlen_attention,
    varlen_attention_reasons,
)
from .lattice import (
    PermutohedralLattice,
    bilateral_features,
    permutohedral_filter,
    permutohedral_reasons,
    position_features,
)
from .par import par_affinity, par_propagate, par_reasons, par_refine

__all__ = ["MaskedKeyAttention", "PermutohedralLattice", "backends_used", "bilateral_features", "block_forward",
           "device_reasons", "masked_key_attention", "masked_key_attention_reasons", "par_affinity", "par_propagate",
           "par_reasons", "par_refine", "permutohedral_filter", "permutohedral_reasons", "position_features",
           "resolve_backend", "swap_attention", "token_affinity_loss", "token_affinity_reasons", "token_affinity_sums",
           "varlen_attention", "varlen_attention_reasons"]

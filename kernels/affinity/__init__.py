"""Token affinity loss: ToCo's patch token contrast (PTC) / MCC's affinity loss on ViT patch tokens."""

from .api import token_affinity_loss, token_affinity_reasons, token_affinity_sums
from .reference import (
    loss_from_sums,
    pair_counts,
    pair_masks,
    token_affinity_loss_reference,
    token_affinity_sums_reference,
)

__all__ = ["loss_from_sums", "pair_counts", "pair_masks", "token_affinity_loss", "token_affinity_loss_reference",
           "token_affinity_reasons", "token_affinity_sums", "token_affinity_sums_reference"]

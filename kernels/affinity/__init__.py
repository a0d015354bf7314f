"""Token affinity loss: ToCo's patch token contrast (PTC) / MCC's affinity loss on ViT patch tokens."""

from .api import token_affinity_loss
from .reference import pair_masks, token_affinity_loss_reference

__all__ = ["pair_masks", "token_affinity_loss", "token_affinity_loss_reference"]

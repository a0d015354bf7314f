"""Models: timm ViT backbone (SPEC §1) and the WSSS heads (SPEC §2)."""

from __future__ import annotations

from ..config import ModelConfig
from .backbone import (
    LoadReport,
    create_vit,
    dropped_class_tokens,
    forward_features,
    load_pretrained,
    masked_class_tokens,
    resample_pos_embed,
)
from .network import LargeFOV, Outputs, WSSSNet
from .projector import ProjectionHead, ema_update

__all__ = ["LargeFOV", "LoadReport", "Outputs", "ProjectionHead", "WSSSNet", "build_model", "create_vit",
           "dropped_class_tokens", "ema_update", "forward_features", "load_pretrained", "masked_class_tokens",
           "resample_pos_embed"]


def build_model(cfg: ModelConfig, num_classes: int, projector: dict | None = None) -> WSSSNet:
    """Backbone per ``cfg`` (pretrained from timm or a local file when asked) plus the heads; ``projector``
    (ProjectionHead kwargs) adds the contrast projector and its EMA teacher."""
    vit = create_vit(
        cfg.backbone, img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
        depth=cfg.depth, num_heads=cfg.num_heads, pretrained_timm=cfg.pretrained == "timm",
        freeze_pos_embed=cfg.freeze_pos_embed,
    )
    if cfg.pretrained not in ("", "timm"):
        load_pretrained(vit, cfg.pretrained, strict=cfg.pretrained_strict)
    return WSSSNet(vit, num_classes, aux_layer=cfg.aux_layer, decoder_channels=cfg.decoder_channels,
                   decoder_dilation=cfg.decoder_dilation, projector=projector)

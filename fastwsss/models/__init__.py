"""Models: timm ViT backbone (docs/methods/toco-mcc.md §1) and the WSSS heads (docs/methods/toco-mcc.md §2)."""

from __future__ import annotations

from ..kernels import swap_attention
from .backbone import LoadReport, create_vit, embed_tokens, forward_features, load_pretrained, resample_pos_embed
from .network import LargeFOV, Outputs, WSSSNet
from .projector import ProjectionHead, ema_update, make_teacher

__all__ = ["LargeFOV", "LoadReport", "Outputs", "ProjectionHead", "WSSSNet", "build_model", "create_vit", "ema_update",
           "embed_tokens", "forward_features", "load_pretrained", "make_teacher", "resample_pos_embed"]


def build_model(num_classes: int, *, backbone: str, pretrained: str = "none", pretrained_strict: bool = True,
                img_size: int = 224, patch_size: int | None = None, embed_dim: int | None = None,
                depth: int | None = None, num_heads: int | None = None, aux_layer: int = -3,
                freeze_pos_embed: bool = True, decoder_channels: int = 512, decoder_dilation: int = 5,
                attention_backend: str = "auto") -> WSSSNet:
    """A timm ViT ``backbone`` (``pretrained``: "none" or "" random init, "timm" timm's hub weights, else a local
    file) plus the heads for ``num_classes`` classes. The keyword arguments are ``ModelConfig``'s fields (docs/methods/toco-mcc.md §1,
    §2). The blocks' attention is the kernels' drop-in ``MaskedKeyAttention`` (same weights and, without a key mask,
    timm's computation), running key masks with ``attention_backend``."""
    vit = create_vit(backbone, img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                     num_heads=num_heads, pretrained_timm=pretrained == "timm", freeze_pos_embed=freeze_pos_embed)
    if pretrained not in ("", "none", "timm"):
        load_pretrained(vit, pretrained, strict=pretrained_strict)
    swap_attention(vit, attention_backend)
    return WSSSNet(vit, num_classes, aux_layer=aux_layer, decoder_channels=decoder_channels,
                   decoder_dilation=decoder_dilation)


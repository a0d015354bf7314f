"""The WSSS network: ViT backbone + classifier, auxiliary classifier and LargeFOV decoder (docs/methods/toco-mcc.md §2)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import fp32_arithmetic
from .backbone import forward_features


class LargeFOV(nn.Sequential):
    """3x3 conv dil 5 -> ReLU -> 3x3 conv dil 5 -> ReLU -> 1x1 conv; no conv has a bias (docs/methods/toco-mcc.md §2, as the authors'
    decoder); keeps the stride."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 512, dilation: int = 5):
        super().__init__(
            nn.Conv2d(in_channels, channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, num_classes, 1, bias=False),
        )


class Outputs(NamedTuple):
    cls_logits: torch.Tensor  # [B, C-1]
    aux_logits: torch.Tensor  # [B, C-1]
    seg_logits: torch.Tensor | None  # [B, C, h, w] (stride of the patch size)
    feat: torch.Tensor  # [B, D, h, w] final patch tokens
    aux_feat: torch.Tensor  # [B, D, h, w] block-`aux_layer` patch tokens, before norm
    cls_token: torch.Tensor  # [B, D] final class token


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, N, D] -> [B, D, h, w]."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


def max_pool_logits(feat: torch.Tensor, classifier: nn.Conv2d) -> torch.Tensor:
    """Global max pool of the feature map, then the 1x1 classifier: W . maxpool(F), not max of the CAM."""
    return classifier(feat.amax(dim=(2, 3), keepdim=True)).flatten(1)


class WSSSNet(nn.Module):
    """The network every method starts from; a method adds its own modules (a projector, a teacher) as children
    (``add_module``), so they train, checkpoint and load with it."""

    def __init__(self, backbone: nn.Module, num_classes: int, *, aux_layer: int = -3,
                 decoder_channels: int = 512, decoder_dilation: int = 5):
        super().__init__()
        self.backbone = backbone
        depth = len(backbone.blocks)
        if not -depth <= aux_layer < depth:
            raise ValueError(f"aux_layer={aux_layer} (model.aux_layer) must name one of the backbone's {depth} blocks "
                             f"({-depth}..{depth - 1})")
        self.aux_layer = aux_layer
        dim = backbone.embed_dim
        self.classifier = nn.Conv2d(dim, num_classes - 1, 1, bias=False)
        self.aux_classifier = nn.Conv2d(dim, num_classes - 1, 1, bias=False)
        self.decoder = LargeFOV(dim, num_classes, decoder_channels, decoder_dilation)

    def head_modules(self) -> list[nn.Module]:
        """Modules trained at the head learning rate (everything but the backbone)."""
        return [m for name, m in self.named_children() if name != "backbone"]

    def forward(self, x: torch.Tensor, with_seg: bool = True) -> Outputs:
        cls_token, patches, aux, grid = forward_features(self.backbone, x, self.aux_layer)
        feat, aux_feat = tokens_to_map(patches, grid), tokens_to_map(aux, grid)
        return Outputs(
            cls_logits=max_pool_logits(feat, self.classifier),
            aux_logits=max_pool_logits(aux_feat, self.aux_classifier),
            seg_logits=self.decoder(feat) if with_seg else None,
            feat=feat,
            aux_feat=aux_feat,
            cls_token=cls_token,
        )

    def cams_from(self, out: Outputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(cam, cam_aux) [B, C-1, h, w] float32, detached: conv2d(F, classifier.weight), computed in fp32 from the
        (possibly bf16) features even under autocast: the CAM thresholds and PAR need the authors' fp32 CAMs."""
        with fp32_arithmetic():
            cam = F.conv2d(out.feat.detach().float(), self.classifier.weight.detach().float())
            cam_aux = F.conv2d(out.aux_feat.detach().float(), self.aux_classifier.weight.detach().float())
        return cam, cam_aux

    @torch.no_grad()
    def cams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cams_from(self(x, with_seg=False))

"""Plain ViT backbone (timm modules and parameter names) with SPEC §1 behaviour.

``forward_features`` returns the final class token, the final patch tokens and the patch tokens of an
intermediate block before any norm. The patch part of the position embedding is resampled bicubically
(align_corners False, no antialias) from the model's table to the input's patch grid on every forward.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._compat import ensure_torchvision

log = logging.getLogger(__name__)


def create_vit(
    arch: str = "deit_base_patch16_224",
    *,
    img_size: int = 224,
    patch_size: int | None = None,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    pretrained_timm: bool = False,
    freeze_pos_embed: bool = True,
) -> nn.Module:
    """A timm VisionTransformer without its ImageNet head; dropout, attention dropout and drop-path all 0."""
    ensure_torchvision()
    import timm

    sizes = {"patch_size": patch_size, "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads}
    kwargs = {k: v for k, v in sizes.items() if v is not None}
    vit = timm.create_model(
        arch, pretrained=pretrained_timm, num_classes=0, img_size=img_size,
        drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, **kwargs,
    )
    problems = []
    if getattr(vit, "cls_token", None) is None or vit.num_prefix_tokens != 1:
        problems.append("needs exactly one class token and no register tokens")
    if getattr(vit, "no_embed_class", False) or vit.pos_embed is None:
        problems.append("needs an absolute position embedding that includes the class token")
    if problems:
        raise ValueError(f"timm model {arch!r} is not supported: " + "; ".join(problems))
    vit.pos_embed.requires_grad_(not freeze_pos_embed)
    return vit


def resample_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[1, 1 + G*G, D] table -> [1, 1 + h*w, D]: bicubic on the patch part, class entry as is."""
    cls_pe, patch_pe = pos_embed[:, :1], pos_embed[:, 1:]
    g = math.isqrt(patch_pe.shape[1])
    if g * g != patch_pe.shape[1]:
        raise ValueError(f"position-embedding table of {patch_pe.shape[1]} patches is not square")
    patch_pe = patch_pe.reshape(1, g, g, -1).permute(0, 3, 1, 2)
    patch_pe = F.interpolate(patch_pe, size=grid, mode="bicubic", align_corners=False)
    return torch.cat([cls_pe, patch_pe.flatten(2).transpose(1, 2)], dim=1)


def embed_tokens(vit: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Images [B, 3, H, W] -> tokens [B, 1 + h*w, D] with position embedding; h = H // patch (remainder dropped)."""
    t = vit.patch_embed.proj(x)  # [B, D, h, w]; the strided conv drops remainder pixels
    grid = (t.shape[-2], t.shape[-1])
    t = vit.patch_embed.norm(t.flatten(2).transpose(1, 2))
    t = torch.cat([vit.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
    t = t + resample_pos_embed(vit.pos_embed, grid)
    return vit.norm_pre(vit.patch_drop(vit.pos_drop(t))), grid


def forward_features(
    vit: nn.Module, x: torch.Tensor, aux_layer: int = -3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
    """[B, 3, H, W] -> class token [B, D] (final norm), patch tokens [B, N, D] (final norm),
    patch tokens of block ``aux_layer`` [B, N, D] (before any norm), and the grid (h, w)."""
    t, grid = embed_tokens(vit, x)
    aux_index = aux_layer % len(vit.blocks)
    aux = None
    for i, blk in enumerate(vit.blocks):
        t = blk(t)
        if i == aux_index:
            aux = t[:, 1:]
    t = vit.norm(t)
    return t[:, 0], t[:, 1:], aux, grid


@dataclass
class LoadReport:
    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"pretrained weights {self.path}: {len(self.loaded)} tensors loaded"]
        for title, keys in (("MISSING (left at random init)", self.missing),
                            ("UNEXPECTED (ignored)", self.unexpected), ("resized", self.resized)):
            if keys:
                shown = ", ".join(keys[:12]) + (f", ... ({len(keys) - 12} more)" if len(keys) > 12 else "")
                lines.append(f"  {title}: {len(keys)}: {shown}")
        return "\n".join(lines)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"cannot read pretrained weights {path}: {err}") from err
    for key in ("model", "state_dict", "module"):  # common checkpoint wrappers
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    prefixes = ("module.", "backbone.", "encoder.")
    for prefix in prefixes:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_pretrained(vit: nn.Module, path: str | Path, strict: bool = True) -> LoadReport:
    """Load a timm-named ViT state dict from a local ``.pth`` / ``.pt`` / ``.safetensors`` file.

    The position-embedding table is resampled if its grid differs; ImageNet head weights (``head.*``,
    ``fc_norm.*`` absent from this model) are reported as unexpected. Missing keys raise with the full
    list when ``strict``; the report is always logged.
    """
    path = Path(path)
    sd = _read_state_dict(path)
    own = vit.state_dict()
    report = LoadReport(str(path))
    to_load = {}
    for k, v in sd.items():
        if k not in own:
            report.unexpected.append(k)
            continue
        if k == "pos_embed" and v.shape != own[k].shape and v.shape[-1] == own[k].shape[-1]:
            g = math.isqrt(own[k].shape[1] - 1)
            v = resample_pos_embed(v.float(), (g, g)).to(v.dtype)
            report.resized.append(k)
        if v.shape != own[k].shape:
            raise ValueError(f"{path}: tensor {k!r} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
        to_load[k] = v
    report.loaded = sorted(to_load)
    report.missing = sorted(k for k in own if k not in to_load)
    if report.missing and strict:
        raise ValueError(f"{report}\nrefusing to train from a partially loaded backbone "
                         "(model.pretrained_strict=false to continue anyway)")
    vit.load_state_dict(to_load, strict=False)
    (log.warning if report.missing or report.unexpected else log.info)("%s", report)
    return report

"""Plain ViT backbone (timm modules and parameter names) with docs/methods/toco-mcc.md §1 behaviour.

``forward_features`` returns the final class token, the final patch tokens and the patch tokens of an
intermediate block before any norm. The patch part of the position embedding is resampled bicubically
(align_corners False, no antialias) from the model's table to the input's patch grid on every forward.
"""

from __future__ import annotations

import difflib
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._compat import ensure_torchvision
from ..checkpoint import CheckpointError, is_training_checkpoint, training_checkpoint_message
from ..config import ConfigError

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
    device: str | torch.device | None = None,
) -> nn.Module:
    """A timm VisionTransformer without its ImageNet head; dropout, attention dropout and drop-path all 0.

    An architecture timm does not know, one that is not such a ViT, or sizes timm refuses raise a ConfigError naming
    the ``model.*`` keys these arguments come from. ``device="meta"`` checks all that without memory (parameters
    without data)."""
    ensure_torchvision()
    import timm  # imported before any device context: its module-level tensors stay ordinary ones

    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch.split(".")[0], timm.list_models(), n=3)
        raise ConfigError(f"model.backbone={arch!r} is not a timm model" + (f" (did you mean {', '.join(close)}?)"
                          if close else "") + "; timm.list_models('*vit*') lists its ViTs")
    sizes = {"patch_size": patch_size, "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads}
    kwargs = {k: v for k, v in sizes.items() if v is not None}
    try:
        with torch.device(device) if device is not None else nullcontext():
            vit = timm.create_model(
                arch, pretrained=pretrained_timm, num_classes=0, img_size=img_size,
                drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, **kwargs,
            )
    except (TypeError, AssertionError, ValueError) as err:  # unknown keyword (not a ViT), sizes timm refuses
        given = ", ".join(f"model.{k}={v}" for k, v in {"img_size": img_size, **kwargs}.items())
        raise ConfigError(f"timm cannot build model.backbone={arch!r} with {given}: {err} (fastwsss needs a "
                          "ViT with one class token, e.g. deit_base_patch16_224)") from None
    problems = []
    if getattr(vit, "cls_token", None) is None or getattr(vit, "num_prefix_tokens", 0) != 1:
        problems.append("needs exactly one class token and no register tokens")
    if getattr(vit, "no_embed_class", False) or getattr(vit, "pos_embed", None) is None:
        problems.append("needs an absolute position embedding that includes the class token")
    if problems:
        raise ConfigError(f"model.backbone={arch!r} (a timm model) is not supported: " + "; ".join(problems))
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


def _read_state_dict(path: Path, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a weights file (``map_location="meta"``: names and shapes only, no data read); a file that is
    missing, unreadable, not a state dict, or a fastwsss training checkpoint (whose RNG states ``weights_only``
    refuses) is one clear error naming ``model.pretrained``."""
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path} (model.pretrained)")
    if is_training_checkpoint(path):
        raise CheckpointError(training_checkpoint_message(path))
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            if map_location == "meta":  # the header: names, shapes and dtypes
                with safe_open(str(path), "pt") as f:
                    sd = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}  # noqa: SIM118
            else:
                sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch, pickle, zip and safetensors raise many types for a bad file
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"cannot read pretrained weights {path} (model.pretrained): not a state dict torch.load "
                              f"or safetensors reads ({type(err).__name__}: {first})") from None
    for key in ("model", "state_dict", "module"):  # common checkpoint wrappers
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} (model.pretrained) does not hold a state dict of tensors")
    prefixes = ("module.", "backbone.", "encoder.")
    for prefix in prefixes:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_pretrained(vit: nn.Module, path: str | Path, strict: bool = True) -> LoadReport:
    """Load a timm-named ViT state dict from a local ``.pth`` / ``.pt`` / ``.safetensors`` file.

    The position-embedding table is resampled if its grid differs; ImageNet head weights (``head.*``,
    ``fc_norm.*`` absent from this model) are reported as unexpected. Missing keys raise with the full
    list when ``strict``; the report is always logged. Into a backbone built on the meta device, it checks the file
    against it without reading any tensor's data, and logs nothing (a check at start, before the real load).
    """
    path = Path(path)
    check = any(p.is_meta for p in vit.parameters())
    sd = _read_state_dict(path, "meta" if check else "cpu")
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
            raise CheckpointError(f"{path} (model.pretrained): tensor {k!r} has shape {tuple(v.shape)}, the model "
                                  f"expects {tuple(own[k].shape)}")
        to_load[k] = v
    report.loaded = sorted(to_load)
    report.missing = sorted(k for k in own if k not in to_load)
    if report.missing and strict:
        raise CheckpointError(f"{report}\nrefusing to train from a partially loaded backbone "
                              "(model.pretrained_strict=false to continue anyway)")
    if check:
        return report
    vit.load_state_dict(to_load, strict=False)
    (log.warning if report.missing or report.unexpected else log.info)("%s", report)
    return report

"""MCC, "Masked Collaborative Contrast for Weakly Supervised Semantic Segmentation" (WACV 2024): ToCo with other
local views (docs/methods/toco-mcc.md). Each local view is the local image seen through a random key mask in every
attention layer; a view is negative when the CAM finds little foreground among the tokens it sees. Everything else
is ToCo's (``toco.py``).

The class token of a masked view depends only on the class token and the visible tokens (masked keys weigh 0 in
every layer, everything else is per token), so the default forward drops the hidden tokens (``mcc.forward=drop``);
``masked`` runs the authors' replicated, masked forward. Both go through the kernels' drop-in attention
(``fastwsss.kernels.MaskedKeyAttention`` in every block, ``block_forward``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..config import Config, check_range
from ..kernels import block_forward, device_reasons, resolve_backend
from ..models import WSSSNet, embed_tokens
from ..pseudo import roi_map
from ..runtime import fp32_arithmetic
from .common import contrast_errors
from .toco import ToCo, ToCoTargets, ToCoViews

FORWARDS = ("drop", "masked")


@dataclass
class MCCConfig:
    """``mcc:``, MCC's own settings (its masked local views, docs/methods/toco-mcc.md §6); the rest is ToCo's (``loss:``,
    ``contrast:``)."""

    mask_prob: float = 0.95  # probability that a cell of the token grid is hidden
    mask_cell: int = 4  # tokens per side of one Bernoulli cell
    aux_cam_until: int = 12000  # the views' flags come from the aux CAM while step <= this, then from the CAM
    forward: str = "drop"  # drop = exact token dropping | masked = the authors' forward (views replicated, keys masked)

    def errors(self, cfg: Config) -> list[str]:
        errors = contrast_errors(cfg)
        check_range(errors, "mcc.mask_prob", self.mask_prob, 0.0, 1.0)
        check_range(errors, "mcc.mask_cell", self.mask_cell, 0, lo_open=True)
        if self.forward not in FORWARDS:
            errors.append(f"mcc.forward={self.forward!r} is not one of {', '.join(FORWARDS)}")
        return errors


def random_key_masks(rng: np.random.Generator, num_masks: int, grid: tuple[int, int], mask_prob: float = 0.95,
                     cell: int = 4) -> np.ndarray:
    """MCC key masks (docs/methods/toco-mcc.md §6): one Bernoulli(mask_prob) draw per cell x cell block of the token grid,
    nearest-upsampled to the grid. Returns ``keep`` [num_masks, h*w] bool, True = visible."""
    h, w = grid
    ch, cw = max(1, h // cell), max(1, w // cell)
    masked = rng.random((num_masks, ch, cw)) < mask_prob
    rows = np.minimum(np.arange(h) * ch // h, ch - 1)  # nearest: cell of each token row / column
    cols = np.minimum(np.arange(w) * cw // w, cw - 1)
    return ~masked[:, rows][:, :, cols].reshape(num_masks, h * w)


@dataclass(frozen=True)
class MCCViews(ToCoViews):
    """ToCo's views plus ``key_keep`` [num_masks, h*w] (True = visible), drawn after them from the same generator."""

    num_masks: int = 8
    grid: tuple[int, int] = (28, 28)
    mask_prob: float = 0.95
    mask_cell: int = 4

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        sample = super().__call__(image, rng)
        keep = random_key_masks(rng, self.num_masks, self.grid, self.mask_prob, self.mask_cell)
        return {**sample, "key_keep": torch.from_numpy(keep)}


class MCC(ToCo):
    name = "mcc"
    config = MCCConfig
    log_names: ClassVar[dict[str, str]] = {"cls": "cls_loss", "cls_aux": "cls_loss_aux", "aff": "aff_loss",
                                           "con": "con_loss", "seg": "seg_loss", "reg": "reg_loss"}

    def sample_views(self, model: WSSSNet) -> MCCViews:
        toco, m = super().sample_views(model), self.cfg.mcc
        grid = (self.cfg.data.crop_size // model.backbone.patch_embed.patch_size[0],) * 2
        return MCCViews(**vars(toco), num_masks=self.cfg.contrast.num_local, grid=grid, mask_prob=m.mask_prob,
                        mask_cell=m.mask_cell)

    def flag_source(self, step: int) -> str:
        """Which CAM the views' flags come from: "aux" while ``step <= mcc.aux_cam_until`` (the authors' VOC script:
        the final CAM once ``n_iter > 12000``), then "cam"."""
        return "aux" if step <= self.cfg.mcc.aux_cam_until else "cam"

    def local_views(self, model: WSSSNet, batch: dict, targets: ToCoTargets, step: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The local image under M key masks. A view is negative iff Σ roi·visible <= neg_thresh · Σ visible on the
        token-resolution CAM (so a view seeing nothing is negative)."""
        cfg = self.cfg
        keep = batch["key_keep"]  # [B, M, N] True = visible
        src = targets.cams_aux if self.flag_source(step) == "aux" else targets.cams
        p = model.backbone.patch_embed.patch_size[0]
        grid = (src.shape[-2] // p, src.shape[-1] // p)
        with fp32_arithmetic():
            cam_tok = F.interpolate(src.float(), size=grid, mode="bicubic", align_corners=False)
            roi = roi_map(cam_tok, batch["cls_label"], cfg.cam.low_thresh, cfg.cam.high_thresh).flatten(1)  # [B, N]
            vis = keep.float()
            flags = ((roi[:, None] * vis).sum(-1) > cfg.contrast.neg_thresh * vis.sum(-1)).float()
        forward = dropped_class_tokens if cfg.mcc.forward == "drop" else masked_class_tokens
        return forward(model.backbone, batch["local"], keep, backend=cfg.kernels.backend), flags


# ---- the class tokens of masked views: [B, 3, H, W] images with M key masks [B, M, N] -> [B, M, D]. The blocks'
# attention is the kernels' MaskedKeyAttention; ``backend`` picks the route (the attention modules run with theirs).


def _run_blocks(vit: nn.Module, t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Every block (timm's forward) with the key mask keep [V, 1+L] (True = visible) on its attention; returns the
    final-norm class token [V, D]. A masked key gets weight exactly 0 (-inf, or the reference's -1e12: exp underflows
    to 0 either way), and the class token is always a visible key, so no row is empty."""
    mask = keep[:, None, None, :]  # [V, 1, 1, 1+L], broadcast over heads and queries
    for blk in vit.blocks:
        t = blk(t, attn_mask=mask)
    return vit.norm(t)[:, 0]


def _check_grid(grid: tuple[int, int], num_tokens: int) -> None:
    if grid[0] * grid[1] != num_tokens:
        raise ValueError(f"key_keep has {num_tokens} tokens per mask, the images give a {grid[0]}x{grid[1]} grid")


def _route(op: str, x: torch.Tensor, backend: str) -> str:
    return resolve_backend(backend, op, device_reasons(x))


def masked_class_tokens(vit: nn.Module, x: torch.Tensor, key_keep: torch.Tensor, backend: str = "torch"
                        ) -> torch.Tensor:
    """The authors' forward: each image replicated M times and run over all N patches with masked keys.

    With the Triton backend the images are embedded once and block 1 runs all M masks over the shared tokens in
    one masked-key attention launch (``block_forward(..., key_keep=)``); the views then differ and blocks 2.. run
    one mask per view."""
    B, M, N = key_keep.shape
    if _route("masked_class_tokens", x, backend) == "triton":
        t, grid = embed_tokens(vit, x)  # [B, 1+N, D]
        _check_grid(grid, N)
        keep = torch.cat([key_keep.new_ones(B, M, 1), key_keep], dim=2)  # [B, M, 1+N]
        first, *rest = vit.blocks
        t = block_forward(first, t, key_keep=keep).flatten(0, 1)  # [B*M, 1+N, D]
        mask = keep.flatten(0, 1)[:, None, None, :]
        for blk in rest:
            t = blk(t, attn_mask=mask)
        return vit.norm(t[:, 0]).reshape(B, M, -1)
    t, grid = embed_tokens(vit, x.repeat_interleave(M, dim=0))  # [B*M, 1+N, D]
    _check_grid(grid, N)
    keep = torch.cat([key_keep.new_ones(B * M, 1), key_keep.reshape(B * M, N)], dim=1)
    return _run_blocks(vit, t, keep).reshape(B, M, -1)


def dropped_class_tokens(vit: nn.Module, x: torch.Tensor, key_keep: torch.Tensor, backend: str = "torch"
                         ) -> torch.Tensor:
    """Exact fast path of :func:`masked_class_tokens`: each image is embedded once; each view keeps its visible
    tokens (with their position embeddings), padded to the step's largest view. With the Triton backend the views are
    packed instead (:func:`packed_class_tokens`)."""
    if _route("dropped_class_tokens", x, backend) == "triton":
        return packed_class_tokens(vit, x, key_keep)
    B, M, N = key_keep.shape
    t, grid = embed_tokens(vit, x)  # [B, 1+N, D]
    _check_grid(grid, N)
    counts = key_keep.sum(-1)  # [B, M]
    L = int(counts.max())  # one host sync per step
    order = torch.argsort((~key_keep).to(torch.int8), dim=-1, stable=True)[..., :L]  # visible indices first
    patches = torch.gather(t[:, 1:].unsqueeze(1).expand(B, M, N, t.shape[-1]), 2,
                           order.unsqueeze(-1).expand(B, M, L, t.shape[-1]))  # [B, M, L, D]
    cls = t[:, :1].unsqueeze(1).expand(B, M, 1, t.shape[-1])
    seq = torch.cat([cls, patches], dim=2).reshape(B * M, 1 + L, -1)
    valid = torch.arange(L, device=x.device) < counts.reshape(B * M, 1)  # padding is masked like hidden keys
    keep = torch.cat([valid.new_ones(B * M, 1), valid], dim=1)
    return _run_blocks(vit, seq, keep).reshape(B, M, -1)


def packed_class_tokens(vit: nn.Module, x: torch.Tensor, key_keep: torch.Tensor) -> torch.Tensor:
    """Token dropping without padding: the (class token + visible tokens) of all B·M views form one packed sequence
    [T, D] (cu_seqlens bounds) that every block runs at once, attention block-diagonal per view
    (``block_forward(..., cu_seqlens=)``). Same result as :func:`dropped_class_tokens`. Drop-path, if any, would act
    per token here (the project's ViT has none)."""
    B, M, N = key_keep.shape
    t, grid = embed_tokens(vit, x)  # [B, 1+N, D]
    _check_grid(grid, N)
    keep = torch.cat([key_keep.new_ones(B, M, 1), key_keep], dim=2)  # [B, M, 1+N]: class token first
    rows = torch.arange(B * (1 + N), device=x.device).reshape(B, 1, 1 + N).expand(B, M, 1 + N)[keep]  # one sync
    cu_seqlens = F.pad(keep.sum(-1).flatten().cumsum(0), (1, 0)).to(torch.int32)  # [B*M + 1]
    seq = t.reshape(B * (1 + N), -1)[rows]  # [T, D], view by view
    for blk in vit.blocks:
        seq = block_forward(blk, seq, cu_seqlens=cu_seqlens)
    return vit.norm(seq[cu_seqlens[:-1].long()]).reshape(B, M, -1)

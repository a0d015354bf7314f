"""The local views of the contrast term (SPEC §5, §6): the one place where ToCo and MCC differ. Each returns the
views' class tokens [B, M, D] and flags [B, M] (1 = positive); ``LOCAL_VIEWS`` maps the method to its function."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..config import Config
from ..models import WSSSNet, dropped_class_tokens, forward_features, masked_class_tokens
from ..pseudo import roi_map
from ..runtime import fp32_arithmetic


def sample_generator(cfg: Config, position: int, device: torch.device) -> torch.Generator:
    """A generator seeded by (seed, the sample's global position): a step's random draws are the same however the
    batch is split over processes and micro-batches, and when a step is recomputed."""
    seed = int(np.random.SeedSequence([cfg.train.seed, position, 5]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(seed)


def toco_local_views(model: WSSSNet, batch: dict, cams: torch.Tensor, cams_aux: torch.Tensor, step: int,
                     cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """ToCo (SPEC §5): crops of the local image centred on uncertain / background pixels of the aux-CAM roi.
    Returns class tokens [B, M, D] and flags [B, M] (1 = positive)."""
    local, B = batch["local"], cams_aux.shape[0]
    M, S = cfg.contrast.num_local, cfg.contrast.toco_crop_size
    roi = roi_map(cams_aux, batch["cls_label"], cfg.cam.low_thresh, cfg.cam.high_thresh)  # [B, H, W]
    H, W = roi.shape[-2:]
    half = S // 2
    inner = torch.zeros_like(roi, dtype=torch.bool)
    inner[:, half:H - half, half:W - half] = True
    candidates = inner & (roi <= 1)
    enough = candidates.flatten(1).sum(1, keepdim=True) >= M
    weights = torch.where(enough, candidates.flatten(1), inner.flatten(1)).float()
    centres = torch.stack([torch.multinomial(w, M, replacement=False, generator=sample_generator(cfg, pos, w.device))
                           for w, pos in zip(weights, batch["position"].tolist())])  # [B, M] flat pixel indices
    cy, cx = centres // W, centres % W
    offs = torch.arange(S, device=roi.device) - half
    rows = (cy[..., None] + offs)[..., :, None].expand(B, M, S, S)  # [B, M, S, S]
    cols = (cx[..., None] + offs)[..., None, :].expand(B, M, S, S)
    b = torch.arange(B, device=roi.device)[:, None, None, None].expand(B, M, S, S)
    crops = local.permute(0, 2, 3, 1)[b, rows, cols].permute(0, 1, 4, 2, 3)  # [B, M, 3, S, S]
    with fp32_arithmetic():
        flags = (roi[b, rows, cols].mean(dim=(2, 3)) > cfg.contrast.neg_thresh).float()
    tokens = forward_features(model.backbone, crops.reshape(B * M, *crops.shape[2:]), model.aux_layer)[0]
    return tokens.reshape(B, M, -1), flags


def mcc_local_views(model: WSSSNet, batch: dict, cams: torch.Tensor, cams_aux: torch.Tensor, step: int,
                    cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """MCC (SPEC §6): the local image under M random key masks. A view is negative iff
    Σ roi·visible <= neg_thresh · Σ visible on the token-resolution CAM (so a view seeing nothing is negative)."""
    keep = batch["key_keep"]  # [B, M, N] True = visible
    src = cams_aux if step <= cfg.contrast.mcc_aux_cam_until else cams
    p = model.backbone.patch_embed.patch_size[0]
    grid = (src.shape[-2] // p, src.shape[-1] // p)
    with fp32_arithmetic():
        cam_tok = F.interpolate(src.float(), size=grid, mode="bicubic", align_corners=False)
        roi = roi_map(cam_tok, batch["cls_label"], cfg.cam.low_thresh, cfg.cam.high_thresh).flatten(1)  # [B, N]
        vis = keep.float()
        flags = ((roi[:, None] * vis).sum(-1) > cfg.contrast.neg_thresh * vis.sum(-1)).float()
    forward = dropped_class_tokens if cfg.contrast.mcc_forward == "drop" else masked_class_tokens
    return forward(model.backbone, batch["local"], keep, backend=cfg.kernels.backend), flags


LOCAL_VIEWS = {"toco": toco_local_views, "mcc": mcc_local_views}

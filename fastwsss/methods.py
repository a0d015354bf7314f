"""One training step for every method (SPEC §3). ToCo and MCC differ only in how they make their local views and
flags: ``LOCAL_VIEWS`` below. ``cam`` is the classification baseline (cls + cls_aux only)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .cams import fp32_arithmetic, multiscale_cams
from .config import Config
from .data.transforms import denormalize
from .losses import contrast_loss, reg_loss, seg_loss
from .models import WSSSNet, dropped_class_tokens, ema_update, forward_features, masked_class_tokens
from .pseudo import affinity_label, refine_seg_label


@fp32_arithmetic()
def roi_map(cams: torch.Tensor, cls_label: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """[B, C-1, h, w] -> [B, h, w]: 0 where the best present-class CAM <= low, 2 where >= high, else 1."""
    score = (cls_label[:, :, None, None].float() * cams.float()).amax(1)
    roi = torch.ones_like(score)
    roi[score <= low] = 0
    roi[score >= high] = 2
    return roi


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
    centres = torch.multinomial(weights, M, replacement=False)  # [B, M] flat pixel indices
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

# Each term's name in the authors' training logs (their `Iter: ...; LR: ...; cls_loss: ..., ...` lines), per method:
# the training log and metrics.jsonl use them for the unweighted values. Where a name is assumed, not read from an
# official log, README "Training logs" says so.
LOG_NAMES = {
    "cam": {"cls": "cls_loss", "cls_aux": "cls_loss_aux"},
    "toco": {"cls": "cls_loss", "cls_aux": "cls_loss_aux", "aff": "ptc_loss", "con": "ctc_loss", "seg": "seg_loss",
             "reg": "reg_loss"},
    "mcc": {"cls": "cls_loss", "cls_aux": "cls_loss_aux", "aff": "aff_loss", "con": "con_loss", "seg": "seg_loss",
            "reg": "reg_loss"},
}


class Term(NamedTuple):
    """One loss term of a step: its unweighted value (what the authors' logs print) and its weight in the total."""

    value: torch.Tensor
    weight: float

    @property
    def weighted(self) -> torch.Tensor:
        return self.weight * self.value


def term_weights(cfg: Config, step: int) -> dict[str, float]:
    """Weight of each optional term at this iteration; 0 means it is not computed at all."""
    loss = cfg.loss
    return {name: getattr(loss, f"w_{name}") if step >= getattr(loss, f"{name}_start") else 0.0
            for name in ("aff", "con", "seg", "reg")}


def compute_losses(model: WSSSNet, batch: dict, step: int, cfg: Config) -> dict[str, Term]:
    """Loss terms of one step (the total is the sum of their ``weighted``); a term with weight 0 is not computed."""
    x, cls_label, img_box = batch["img"], batch["cls_label"], batch["img_box"]
    w = term_weights(cfg, step) if cfg.train.method != "cam" else dict.fromkeys(("aff", "con", "seg", "reg"), 0.0)
    out = model(x, with_seg=bool(w["seg"] or w["reg"]))
    losses = {"cls": Term(F.multilabel_soft_margin_loss(out.cls_logits.float(), cls_label), 1.0)}
    if cfg.loss.w_cls_aux:
        losses["cls_aux"] = Term(F.multilabel_soft_margin_loss(out.aux_logits.float(), cls_label), cfg.loss.w_cls_aux)
    if not any(w.values()):
        return losses

    with torch.no_grad():
        cams, cams_aux = multiscale_cams(model, x, tuple(cfg.cam.scales), outputs=out)
    lo, hi, backend = cfg.cam.low_thresh, cfg.cam.high_thresh, cfg.kernels.backend
    if w["seg"] or w["reg"]:
        source = cams_aux if step < cfg.loss.seg_label_aux_until else cams
        with torch.no_grad():
            label = refine_seg_label(source, cls_label, x, img_box, high_thresh=hi, low_thresh=lo,
                                     par_dilations=tuple(cfg.cam.par_dilations), par_num_iter=cfg.cam.par_num_iter,
                                     par_backend=backend, round_denorm=cfg.quirks.round_denorm)
        seg = F.interpolate(out.seg_logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if w["seg"]:
            losses["seg"] = Term(seg_loss(seg, label), w["seg"])
        if w["reg"]:
            losses["reg"] = Term(reg_loss(
                seg, denormalize(x.float()), img_box, label, sigma_rgb=cfg.loss.reg_sigma_rgb,
                sigma_xy=cfg.loss.reg_sigma_xy, scale=cfg.loss.reg_scale, exact_grad=cfg.quirks.exact_reg_grad,
                backend=backend), w["reg"])
    if w["aff"]:
        from fastwsss.kernels import token_affinity_loss

        aff_label = affinity_label(cams_aux, cls_label, img_box, out.feat.shape[-2:], high_thresh=hi, low_thresh=lo,
                                   scale_box_to_grid=cfg.quirks.scale_box_to_grid)
        feats = out.feat.flatten(2).transpose(1, 2)  # [B, N, D]
        losses["aff"] = Term(token_affinity_loss(feats, aff_label, backend=backend), w["aff"])
    if w["con"]:
        local_tokens, local_flags = LOCAL_VIEWS[cfg.train.method](model, batch, cams, cams_aux, step, cfg)
        g2 = forward_features(model.backbone, batch["global2"], model.aux_layer)[0]
        student = model.proj_head(torch.cat([out.cls_token[:, None], g2[:, None], local_tokens], dim=1))
        ema_update(model.proj_head_t, model.proj_head, cfg.contrast.ema_momentum)  # before the teacher forward
        with torch.no_grad():  # the teacher reuses the student's (detached) global features: no dropout anywhere
            teacher = model.proj_head_t(torch.stack([out.cls_token, g2], dim=1).detach())
        flags = torch.cat([local_flags.new_ones(x.shape[0], 2), local_flags], dim=1)
        losses["con"] = Term(contrast_loss(teacher, student, flags, cfg.loss.temperature,
                                           extra_term=cfg.quirks.contrast_extra_term), w["con"])
    return losses

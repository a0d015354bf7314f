"""One training step for every method (SPEC §3): the weighted loss terms, each computed only while weighted. ToCo and
MCC differ only in their local views (``views.LOCAL_VIEWS``); ``cam`` is the classification baseline (cls + cls_aux
only)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..config import Config
from ..data.transforms import denormalize
from ..kernels import token_affinity_loss
from ..models import WSSSNet, ema_update, forward_features
from ..pseudo import affinity_label, multiscale_cams, refine_seg_label
from .losses import contrast_loss, reg_loss, seg_loss
from .views import LOCAL_VIEWS

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
        aff_label = affinity_label(cams_aux, cls_label, img_box, out.feat.shape[-2:], high_thresh=hi, low_thresh=lo,
                                   scale_box_to_grid=cfg.quirks.scale_box_to_grid)
        feats = out.feat.flatten(2).transpose(1, 2)  # [B, N, D]
        losses["aff"] = Term(token_affinity_loss(feats, aff_label, backend=backend,
                                                  num_classes=cfg.data.num_classes), w["aff"])
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

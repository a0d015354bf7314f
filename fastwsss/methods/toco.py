"""ToCo, "Token Contrast for Weakly-Supervised Semantic Segmentation" (CVPR 2023): what it computes is in
docs/methods/toco-mcc.md. On top of the classification terms: the token affinity term (PTC) on the final features
against the aux CAM's token labels, the class-token contrast (CTC) between a projector and its EMA teacher over two
global views and local crops, and the PAR-refined segmentation and regularisation terms of the decoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from ..config import Config, check_range
from ..data.transforms import CropViews, contrast_sample, normalize
from ..models import Outputs, ProjectionHead, WSSSNet, ema_update, forward_features, make_teacher
from ..pseudo import affinity_label, multiscale_cams, roi_map
from ..runtime import fp32_arithmetic
from .base import Iteration, Method, Term
from .common import (
    affinity_term,
    classification_terms,
    contrast_errors,
    label_counts,
    sample_generator,
    seg_reg_terms,
)
from .losses import contrast_loss


@dataclass
class ToCoConfig:
    """``toco:``, ToCo's own settings (its local crops, docs/methods/toco-mcc.md §5); the terms' weights and schedule are ``loss:``, the
    projector, teacher and flags ``contrast:``."""

    crop_size: int = 96  # side of the local crops, in pixels of the training crop

    def errors(self, cfg: Config) -> list[str]:
        errors = contrast_errors(cfg)
        check_range(errors, "toco.crop_size", self.crop_size, 0, lo_open=True)
        centres = max(cfg.data.crop_size - 2 * (self.crop_size // 2), 0) ** 2
        if 0 < self.crop_size and centres < cfg.contrast.num_local:
            errors.append(f"toco.crop_size={self.crop_size} leaves {centres} possible crop centres in a data.crop_size="
                          f"{cfg.data.crop_size} crop for contrast.num_local={cfg.contrast.num_local} local crops (the "
                          "authors' crop_from_roi_neg fails the same way): make toco.crop_size smaller")
        return errors


@dataclass(frozen=True)
class ToCoViews(CropViews):
    """ToCo's training views (``data.transforms.contrast_sample``): ``img``, ``img_box``, the ``local`` image its
    crops are cut from and the second global view ``global2``."""

    share_flip: bool = False
    flip_box: bool = False

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        v = contrast_sample(image, rng, self.crop_size, self.rescale_range, self.jitter_p, self.gray_p, self.blur_p,
                            share_flip=self.share_flip, flip_box=self.flip_box)
        return {"img": torch.from_numpy(normalize(v["img"])), "img_box": torch.tensor(v["img_box"], dtype=torch.long),
                "local": torch.from_numpy(normalize(v["local"])), "global2": torch.from_numpy(normalize(v["global2"]))}


@dataclass
class ToCoTargets:
    """What one part of a step's batch is scored against: the multi-scale CAMs and, while their terms are on, the
    PAR-refined segmentation label and the token affinity label."""

    cams: torch.Tensor | None = None  # [b, C-1, H, W]
    cams_aux: torch.Tensor | None = None
    seg_label: torch.Tensor | None = None  # [b, H, W]
    aff_label: torch.Tensor | None = None  # [b, N]


class ToCo(Method):
    name = "toco"
    config = ToCoConfig
    log_names: ClassVar[dict[str, str]] = {"cls": "cls_loss", "cls_aux": "cls_loss_aux", "aff": "ptc_loss",
                                           "con": "ctc_loss", "seg": "seg_loss", "reg": "reg_loss"}

    def sample_views(self, model: WSSSNet) -> ToCoViews:
        d, q = self.cfg.data, self.cfg.quirks
        return ToCoViews(d.crop_size, tuple(d.rescale_range), d.color_jitter_p, d.grayscale_p, d.blur_p,
                         share_flip=q.share_local_flip, flip_box=q.flip_box)

    def build_model(self) -> WSSSNet:
        """The network plus the contrast projector ``proj_head`` and its EMA teacher ``proj_head_t`` (no grad)."""
        model = super().build_model()
        c = self.cfg.contrast
        model.add_module("proj_head", ProjectionHead(model.backbone.embed_dim, c.proj_dim, c.proj_hidden,
                                                     c.proj_bottleneck))
        model.add_module("proj_head_t", make_teacher(model.proj_head))
        return model

    def weights(self, step: int) -> dict[str, float]:
        loss = self.cfg.loss
        return {name: getattr(loss, f"w_{name}") if step >= getattr(loss, f"{name}_start") else 0.0
                for name in ("aff", "con", "seg", "reg")}

    def before_step(self, model: WSSSNet, step: int) -> None:
        """The projector's EMA teacher, once per step before its forward (docs/methods/toco-mcc.md §2); every step, also while the
        contrast term is off, as the authors' ``forward_proj`` (ToCo's and MCC's) runs it on every iteration."""
        ema_update(model.proj_head_t, model.proj_head, self.cfg.contrast.ema_momentum)

    def seg_label_source(self, step: int) -> str:
        """Which CAM the segmentation labels come from at ``step``: "aux" while ``step <= loss.seg_label_aux_until``
        (the authors' COCO scripts: ``n_iter <= 12000``), then "cam"."""
        until = self.cfg.loss.seg_label_aux_until
        return "aux" if until is not None and step <= until else "cam"

    def forward(self, model: WSSSNet, batch: dict, it: Iteration) -> Outputs:
        return model(batch["img"], with_seg=bool(it.weights["seg"] or it.weights["reg"]))

    @torch.no_grad()
    def targets(self, model: WSSSNet, batch: dict, it: Iteration, out: Outputs | None = None) -> ToCoTargets:
        """``out``: the part's forward, reused as the CAMs' unflipped scale-1 pass (exact: no dropout anywhere);
        without it, that pass is run here."""
        t, w, cfg = ToCoTargets(), it.weights, self.cfg
        if not any(w.values()):
            return t
        x, cls_label, img_box = batch["img"], batch["cls_label"], batch["img_box"]
        if out is None:
            out = model(x, with_seg=False)
        t.cams, t.cams_aux = multiscale_cams(model, x, tuple(cfg.cam.scales), outputs=out)
        if w["seg"] or w["reg"]:
            source = t.cams_aux if self.seg_label_source(it.step) == "aux" else t.cams
            t.seg_label = self.pseudo_labeller()(source, cls_label, x, img_box)
        if w["aff"]:
            t.aff_label = affinity_label(t.cams_aux, cls_label, img_box, out.feat.shape[-2:],
                                         high_thresh=cfg.cam.high_thresh, low_thresh=cfg.cam.low_thresh,
                                         scale_box_to_grid=cfg.quirks.scale_box_to_grid)
        return t

    def counts(self, targets: ToCoTargets, batch: dict) -> dict[str, torch.Tensor]:
        """Images, segmentation-label foreground / background pixels, positive / negative token pairs."""
        counts = super().counts(targets, batch)
        return {**counts, **label_counts(targets.seg_label, targets.aff_label, self.cfg.data.num_classes,
                                         counts["images"])}

    def terms(self, model: WSSSNet, batch: dict, it: Iteration, targets: ToCoTargets, norm: dict[str, torch.Tensor],
              parts: int, out: Outputs) -> dict[str, Term]:
        cfg, w = self.cfg, it.weights
        terms = classification_terms(model, out, batch["cls_label"], norm["images"], cfg.loss.w_cls_aux)
        terms |= seg_reg_terms(out, batch, targets.seg_label, w, norm, cfg)
        if w["aff"]:
            terms["aff"] = affinity_term(out.feat, targets.aff_label, norm, parts, w["aff"], cfg)
        if w["con"]:
            terms["con"] = Term(self.contrast(model, batch, it.step, targets, out, norm["images"]), w["con"])
        return terms

    def contrast(self, model: WSSSNet, batch: dict, step: int, targets: ToCoTargets, out: Outputs,
                 images: torch.Tensor) -> torch.Tensor:
        """The class-token contrast (docs/methods/toco-mcc.md §7.4): the student projector over the class tokens of the image, the
        second global view and the local views, against the teacher's of the two global views."""
        x = batch["img"]
        local_tokens, local_flags = self.local_views(model, batch, targets, step)
        g2 = forward_features(model.backbone, batch["global2"], model.aux_layer)[0]
        student = model.proj_head(torch.cat([out.cls_token[:, None], g2[:, None], local_tokens], dim=1))
        with torch.no_grad():  # the teacher reuses the student's (detached) global features: no dropout anywhere
            teacher = model.proj_head_t(torch.stack([out.cls_token, g2], dim=1).detach())
        flags = torch.cat([local_flags.new_ones(x.shape[0], 2), local_flags], dim=1)
        return contrast_loss(teacher, student, flags, self.cfg.loss.temperature,
                             extra_term=self.cfg.quirks.contrast_extra_term, num_images=images)

    def local_views(self, model: WSSSNet, batch: dict, targets: ToCoTargets, step: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ToCo's local views (docs/methods/toco-mcc.md §5): crops of the local image centred on uncertain / background pixels of the
        aux-CAM roi. Returns their class tokens [B, M, D] and flags [B, M] (1 = positive)."""
        cfg = self.cfg
        local, cams_aux = batch["local"], targets.cams_aux
        B = cams_aux.shape[0]
        M, S = cfg.contrast.num_local, cfg.toco.crop_size
        roi = roi_map(cams_aux, batch["cls_label"], cfg.cam.low_thresh, cfg.cam.high_thresh)  # [B, H, W]
        H, W = roi.shape[-2:]
        half = S // 2
        inner = torch.zeros_like(roi, dtype=torch.bool)
        inner[:, half:H - half, half:W - half] = True
        candidates = inner & (roi <= 1)
        enough = candidates.flatten(1).sum(1, keepdim=True) >= M
        weights = torch.where(enough, candidates.flatten(1), inner.flatten(1)).float()
        centres = torch.stack([torch.multinomial(w, M, replacement=False,
                                                 generator=sample_generator(cfg, pos, w.device))
                               for w, pos in zip(weights, batch["position"].tolist())])  # [B, M] flat pixel indices
        crops, flags = crops_at(local, roi, centres, S, cfg.contrast.neg_thresh)
        tokens = forward_features(model.backbone, crops.flatten(0, 1), model.aux_layer)[0]
        return tokens.reshape(B, M, -1), flags


def crops_at(images: torch.Tensor, roi: torch.Tensor, centres: torch.Tensor, size: int, neg_thresh: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The size x size crops of ``images`` [B, 3, H, W] centred at ``centres`` [B, M] (flat pixel indices; rows
    centre - size // 2 ... , as the authors' crop_from_roi_neg takes them) -> crops [B, M, 3, S, S] and flags [B, M]:
    a crop is negative (0) iff its mean roi <= ``neg_thresh``."""
    B, M = centres.shape
    W, S, half = roi.shape[-1], size, size // 2
    cy, cx = centres // W, centres % W
    offs = torch.arange(S, device=roi.device) - half
    rows = (cy[..., None] + offs)[..., :, None].expand(B, M, S, S)  # [B, M, S, S]
    cols = (cx[..., None] + offs)[..., None, :].expand(B, M, S, S)
    b = torch.arange(B, device=roi.device)[:, None, None, None].expand(B, M, S, S)
    crops = images.permute(0, 2, 3, 1)[b, rows, cols].permute(0, 1, 4, 2, 3)  # [B, M, 3, S, S]
    with fp32_arithmetic():
        flags = (roi[b, rows, cols].mean(dim=(2, 3)) > neg_thresh).float()
    return crops, flags

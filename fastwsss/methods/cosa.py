"""CoSA, "Weakly Supervised Co-training with Swapping Assignments for Semantic Segmentation" (ECCV 2024), as its
official code computes it (docs/methods/cosa.md). ToCo's network (no projector) trained against an EMA copy of the
whole network, the assignment network ("teacher"): on a weakly augmented crop the teacher makes multi-scale CAMs and
segmentation logits; the student sees the same crop through one strong photometric op. The teacher's thresholded
CAMs (main and aux, no PAR) supervise the student's decoder (CAM -> seg), the teacher's sharpened segmentation
supervises the student's CAM (seg -> CAM), plus the classification terms and the gated dense-CRF term. Only the
classification terms train during the loss warm-up. The published numbers are the teacher's."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from ..config import Config, check_range
from ..data.transforms import CropViews, augment, normalize
from ..models import Outputs, WSSSNet
from ..pseudo import PseudoLabeller, multiscale_cams
from ..runtime import fp32_arithmetic
from .base import Iteration, Method, Term
from .common import classification_terms, reg_term
from .losses import seg_label_counts, seg_loss_halves

TEACHER_INITS = ("independent", "copy")
PREDICTORS = ("teacher", "student")


@dataclass
class CoSAConfig:
    """``cosa:``, CoSA's own settings (the terms' shared weights and starts: ``loss.w_seg`` / ``seg_start``,
    ``loss.w_reg`` / ``reg_start``; the main CAM's thresholds and the teacher's scales: ``cam.*``)."""

    momentum: float = 0.9994  # the teacher's EMA, after every optimizer step
    w_cam: float = 0.05  # the seg -> CAM term
    cam_start: int = 6001  # its first iteration (the authors: only cls + cls_aux while n_iter <= 6000)
    softmax_temp: float = 0.01  # of the teacher's segmentation logits, the seg -> CAM target
    seg_fg_alpha: float = 0.5  # the segmentation loss: (1 - a) background CE + a foreground CE
    aux_cam2seg: bool = True  # a second segmentation label from the teacher's aux CAM
    aux_seg_alpha: float = 0.5  # their mix: (1 - a) main label + a aux label
    aux_high_thresh: float = 0.7  # the aux label's thresholds (the main label's are cam.high / low_thresh)
    aux_low_thresh: float = 0.25
    strong_views: bool = True  # the student sees the crop through one photometric op (false: the weak view)
    predict_with: str = "teacher"  # which network infers and is evaluated (the published numbers: the teacher)
    # the official code's quirks, reproduced by default (docs/methods/cosa.md, Q1, Q2, Q7)
    teacher_init: str = "independent"  # independent: a second network, heads drawn anew (Q1) | copy: the student's
    aux_cam_last_scale: bool = True  # the teacher's aux CAM is its last scale's alone (Q2); false: summed
    reg_on_strong: bool = True  # the regularisation filters the strong view's colours (Q7); false: the weak view's

    def errors(self, cfg: Config) -> list[str]:
        errors = []
        for key in ("momentum", "seg_fg_alpha", "aux_seg_alpha", "aux_high_thresh", "aux_low_thresh"):
            check_range(errors, f"cosa.{key}", getattr(self, key), 0.0, 1.0)
        check_range(errors, "cosa.w_cam", self.w_cam, 0.0)
        check_range(errors, "cosa.softmax_temp", self.softmax_temp, 0.0, lo_open=True)
        if self.aux_low_thresh > self.aux_high_thresh:
            errors.append(f"cosa.aux_low_thresh={self.aux_low_thresh} must be <= cosa.aux_high_thresh="
                          f"{self.aux_high_thresh}")
        for key, value, choices in (("teacher_init", self.teacher_init, TEACHER_INITS),
                                    ("predict_with", self.predict_with, PREDICTORS)):
            if value not in choices:
                errors.append(f"cosa.{key}={value!r} is not one of {', '.join(choices)}")
        return errors


# ---- the loader: a weak and a strong view of one crop


STRONG_OPS = ("identity", "autocontrast", "equalize", "solarize", "color", "contrast", "brightness", "sharpness",
              "posterize")


def strong_op(img: Image.Image, op: str, m: int) -> Image.Image:
    """One of CoSA's photometric ops at magnitude m in 1..9 (docs/methods/cosa.md §2.2): the enhancers take the
    factor 1.8 m / 10 + 0.1, solarize inverts levels >= int(25.6 m), posterize keeps 4 - int(0.4 m) bits."""
    if op == "identity":
        return img
    if op == "autocontrast":
        return ImageOps.autocontrast(img)
    if op == "equalize":
        return ImageOps.equalize(img)
    if op == "solarize":
        return ImageOps.solarize(img, threshold=min(int(m * 256 / 10), 255))
    if op == "posterize":
        return ImageOps.posterize(img, 4 - int(m * 4 / 10))
    enhancer = {"color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast, "brightness": ImageEnhance.Brightness,
                "sharpness": ImageEnhance.Sharpness}[op]
    return enhancer(img).enhance(m * 1.8 / 10 + 0.1)


@dataclass(frozen=True)
class CoSAViews(CropViews):
    """The training crop as the weak view ``weak`` and, through one op of :data:`STRONG_OPS` drawn uniformly at a
    magnitude drawn uniformly from 1..9, as the strong view ``img`` that the student trains on; one ``img_box``
    (the views differ in colour only)."""

    strong: bool = True

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        crop, box = augment(image, rng, self.crop_size, self.rescale_range, self.jitter_p, self.gray_p, self.blur_p)
        strong = crop
        if self.strong:
            op, m = STRONG_OPS[int(rng.integers(len(STRONG_OPS)))], int(rng.integers(1, 10))
            strong = np.asarray(strong_op(Image.fromarray(crop), op, m))
        return {"img": torch.from_numpy(normalize(strong)), "weak": torch.from_numpy(normalize(crop)),
                "img_box": torch.tensor(box, dtype=torch.long)}


# ---- the step


@dataclass
class CoSATargets:
    """What the teacher assigns one part of a step's batch, while the terms that read it are on."""

    seg_label: torch.Tensor | None = None  # [b, H, W] from the main CAM
    seg_label_aux: torch.Tensor | None = None  # [b, H, W] from the aux CAM
    cam_target: torch.Tensor | None = None  # [b, C-1, h, w] the seg -> CAM target


@fp32_arithmetic()
def seg_to_cam_target(seg_logits: torch.Tensor, cls_label: torch.Tensor, temperature: float,
                      grid: tuple[int, int]) -> torch.Tensor:
    """The teacher's segmentation logits [b, C, H, W] -> the seg -> CAM target [b, C-1, h, w]: absent classes' logits
    set to -1e5 (background kept), softmax at ``temperature`` over the C channels, the foreground channels
    bilinearly resized to the CAM grid."""
    present = torch.cat([cls_label.new_ones(len(cls_label), 1), cls_label], dim=1).bool()[:, :, None, None]
    probs = (seg_logits.float().masked_fill(~present, -1e5) / temperature).softmax(dim=1)
    return F.interpolate(probs[:, 1:], size=grid, mode="bilinear", align_corners=False)


def fg_weighted_seg_loss(logits: torch.Tensor, label: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor,
                         alpha: float) -> torch.Tensor:
    """(1 - alpha) CE over background pixels / (their count + 1e-6) + alpha CE over foreground pixels / (count +
    1e-6), the counts the whole step's (an empty half gives 0)."""
    fg_ce, bg_ce = seg_loss_halves(logits, label, torch.stack([fg, bg]), eps=1e-6)
    return (1 - alpha) * bg_ce + alpha * fg_ce


def cam_loss(cam: torch.Tensor, target: torch.Tensor, num_pixels: torch.Tensor) -> torch.Tensor:
    """The seg -> CAM term (the official ``cam_loss`` v1): multilabel soft margin between ReLU of the student's raw
    CAM [b, C-1, h, w] and the target, per pixel and class, summed over the part and divided by the step's
    ``num_pixels`` (images x h x w): the mean over the step's pixels of the mean over classes."""
    K = cam.shape[1]
    x = cam.float().relu().permute(0, 2, 3, 1).reshape(-1, K)
    y = target.permute(0, 2, 3, 1).reshape(-1, K)
    return F.multilabel_soft_margin_loss(x, y, reduction="sum") / num_pixels


class CoSA(Method):
    name = "cosa"
    config = CoSAConfig
    log_names: ClassVar[dict[str, str]] = {"cls": "cls_loss", "cls_aux": "cls_aux_loss", "seg": "seg_loss",
                                           "cam": "cam_loss", "reg": "reg_loss"}

    def sample_views(self, model: WSSSNet) -> CoSAViews:
        d = self.cfg.data
        return CoSAViews(d.crop_size, tuple(d.rescale_range), d.color_jitter_p, d.grayscale_p, d.blur_p,
                         strong=self.cfg.cosa.strong_views)

    def build_model(self) -> WSSSNet:
        """The student plus ``teacher``, a whole network of the same shape that never trains (no gradient, in no
        parameter group). ``independent`` builds it as a second network, as the official code does: its backbone
        loads the same pretrained weights, its heads are drawn anew (Q1)."""
        model = super().build_model()
        teacher = super().build_model() if self.cfg.cosa.teacher_init == "independent" else copy.deepcopy(model)
        model.add_module("teacher", teacher.requires_grad_(False))
        return model

    @staticmethod
    def student_parameters(model: WSSSNet) -> list[torch.nn.Parameter]:
        """The student's parameters in registration order, the teacher's counterparts."""
        return [p for name, p in model.named_parameters() if not name.startswith("teacher.")]

    def weights(self, step: int) -> dict[str, float]:
        loss, c = self.cfg.loss, self.cfg.cosa
        return {"seg": loss.w_seg if step >= loss.seg_start else 0.0,
                "cam": c.w_cam if step >= c.cam_start else 0.0,
                "reg": loss.w_reg if step >= loss.reg_start else 0.0}

    @torch.no_grad()
    def after_step(self, model: WSSSNet, step: int) -> None:
        """theta_T <- m theta_T + (1 - m) theta_S over every parameter (the frozen ones too, as the official code),
        after every optimizer step from the first; one fused multi-tensor lerp."""
        torch._foreach_lerp_(list(model.teacher.parameters()), self.student_parameters(model),
                             1.0 - self.cfg.cosa.momentum)

    def forward(self, model: WSSSNet, batch: dict, it: Iteration) -> Outputs:
        return model(batch["img"], with_seg=bool(it.weights["seg"] or it.weights["reg"]))

    def _labeller(self, high: float, low: float) -> PseudoLabeller:
        """The official ``cam2mask``: docs/methods/toco-mcc.md §4.2's labels without PAR (refine_seg_label with no iteration)."""
        return PseudoLabeller(high, low, par_num_iter=0, backend=self.cfg.kernels.backend)

    @torch.no_grad()
    def targets(self, model: WSSSNet, batch: dict, it: Iteration, out: Outputs | None = None) -> CoSATargets:
        """The teacher's multi-scale pass on the weak view (each scale's flip pair in one batch) and what it
        assigns: segmentation labels from its CAMs, the seg -> CAM target from its segmentation."""
        t, w, cfg, c = CoSATargets(), it.weights, self.cfg, self.cfg.cosa
        if not any(w.values()):
            return t
        weak, cls_label, img_box = batch["weak"], batch["cls_label"], batch["img_box"]
        cams, cams_aux, seg = multiscale_cams(model.teacher, weak, tuple(cfg.cam.scales), with_seg=True,
                                              aux_last_scale=c.aux_cam_last_scale)
        if w["seg"] or w["reg"]:
            t.seg_label = self.pseudo_labeller()(cams, cls_label, weak, img_box)
            if c.aux_cam2seg and w["seg"]:
                t.seg_label_aux = self._labeller(c.aux_high_thresh, c.aux_low_thresh)(cams_aux, cls_label, weak,
                                                                                        img_box)
        if w["cam"]:
            p = model.backbone.patch_embed.patch_size[0]
            grid = (weak.shape[-2] // p, weak.shape[-1] // p)
            t.cam_target = seg_to_cam_target(seg, cls_label, c.softmax_temp, grid)
        return t

    def counts(self, targets: CoSATargets, batch: dict) -> dict[str, torch.Tensor]:
        """Images, pixels of the CAM grid, foreground / background pixels of the main and the aux label."""
        counts = super().counts(targets, batch)
        zero = counts["images"].new_zeros(2)
        fg, bg = seg_label_counts(targets.seg_label) if targets.seg_label is not None else zero
        fg_aux, bg_aux = seg_label_counts(targets.seg_label_aux) if targets.seg_label_aux is not None else zero
        cells = targets.cam_target[0, 0].numel() if targets.cam_target is not None else 0
        return {**counts, "fg": fg, "bg": bg, "fg_aux": fg_aux, "bg_aux": bg_aux,
                "cam_pixels": counts["images"] * cells}

    def terms(self, model: WSSSNet, batch: dict, it: Iteration, targets: CoSATargets, norm: dict[str, torch.Tensor],
              parts: int, out: Outputs) -> dict[str, Term]:
        cfg, c, w, x = self.cfg, self.cfg.cosa, it.weights, batch["img"]
        terms = classification_terms(model, out, batch["cls_label"], norm["images"], cfg.loss.w_cls_aux)
        if w["seg"] or w["reg"]:
            seg = F.interpolate(out.seg_logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if w["seg"]:
            loss = fg_weighted_seg_loss(seg, targets.seg_label, norm["fg"], norm["bg"], c.seg_fg_alpha)
            if targets.seg_label_aux is not None:
                aux = fg_weighted_seg_loss(seg, targets.seg_label_aux, norm["fg_aux"], norm["bg_aux"], c.seg_fg_alpha)
                loss = (1 - c.aux_seg_alpha) * loss + c.aux_seg_alpha * aux
            terms["seg"] = Term(loss, w["seg"])
        if w["cam"]:
            cam = F.conv2d(out.feat, model.classifier.weight)  # the student's raw CAM, with gradient
            terms["cam"] = Term(cam_loss(cam, targets.cam_target, norm["cam_pixels"]), w["cam"])
        if w["reg"]:
            image = x if c.reg_on_strong else batch["weak"]
            terms["reg"] = reg_term(seg, image, batch["img_box"], targets.seg_label, w["reg"], norm, cfg)
        return terms

    def predictor(self, model: WSSSNet) -> WSSSNet:
        return model.teacher if self.cfg.cosa.predict_with == "teacher" else model

    def pseudo_labeller(self) -> PseudoLabeller:
        """The main label: the ``cam.*`` thresholds, no PAR."""
        return self._labeller(self.cfg.cam.high_thresh, self.cfg.cam.low_thresh)

"""One training step for every method (SPEC §3): the weighted loss terms, each computed only while weighted. ToCo and
MCC differ only in their local views (``views.LOCAL_VIEWS``); ``cam`` is the classification baseline (cls + cls_aux
only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..data import IGNORE_INDEX
from ..data.transforms import denormalize
from ..kernels import token_affinity_sums
from ..kernels.affinity import pair_counts
from ..models import Outputs, WSSSNet, ema_update, forward_features
from ..pseudo import affinity_label, multiscale_cams, refine_seg_label
from ..runtime import ONE_PROCESS, Dist, all_reduce_sum
from .losses import contrast_loss, reg_loss, seg_label_counts, seg_loss
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
    """Weight of each optional term at this iteration; 0 means it is not computed at all (``cam``: all 0)."""
    loss = cfg.loss
    if cfg.train.method == "cam":
        return dict.fromkeys(("aff", "con", "seg", "reg"), 0.0)
    return {name: getattr(loss, f"w_{name}") if step >= getattr(loss, f"{name}_start") else 0.0
            for name in ("aff", "con", "seg", "reg")}


@dataclass
class Targets:
    """What one part of a step's batch is scored against, made without gradients from the model as it is at the
    start of the step: the multi-scale CAMs and, while their terms are on, the PAR-refined segmentation label and
    the token affinity label."""

    weights: dict[str, float]
    cams: torch.Tensor | None = None  # [b, C-1, H, W]
    cams_aux: torch.Tensor | None = None
    seg_label: torch.Tensor | None = None  # [b, H, W]
    aff_label: torch.Tensor | None = None  # [b, N]


@torch.no_grad()
def make_targets(model: WSSSNet, batch: dict, step: int, cfg: Config, out: Outputs | None = None) -> Targets:
    """``out``: the model's forward of this part's images, reused as the CAMs' unflipped scale-1 pass (exact: no
    dropout anywhere); without it, that pass is run here."""
    t = Targets(term_weights(cfg, step))
    w = t.weights
    if not any(w.values()):
        return t
    x, cls_label, img_box = batch["img"], batch["cls_label"], batch["img_box"]
    if out is None:
        out = model(x, with_seg=False)
    t.cams, t.cams_aux = multiscale_cams(model, x, tuple(cfg.cam.scales), outputs=out)
    lo, hi = cfg.cam.low_thresh, cfg.cam.high_thresh
    if w["seg"] or w["reg"]:
        source = t.cams_aux if step < cfg.loss.seg_label_aux_until else t.cams
        t.seg_label = refine_seg_label(source, cls_label, x, img_box, high_thresh=hi, low_thresh=lo,
                                       par_dilations=tuple(cfg.cam.par_dilations), par_num_iter=cfg.cam.par_num_iter,
                                       par_backend=cfg.kernels.backend, round_denorm=cfg.quirks.round_denorm)
    if w["aff"]:
        t.aff_label = affinity_label(t.cams_aux, cls_label, img_box, out.feat.shape[-2:], high_thresh=hi,
                                     low_thresh=lo, scale_box_to_grid=cfg.quirks.scale_box_to_grid)
    return t


def counts(targets: Targets, batch: dict, cfg: Config) -> torch.Tensor:
    """The denominators this part contributes to the whole step's [images, fg pixels, bg pixels, positive pairs,
    negative pairs] (float64): summed over every part (processes, micro-batches), they normalise each part's terms."""
    x = batch["img"]
    zero = x.new_zeros(2, dtype=torch.float64)
    seg = seg_label_counts(targets.seg_label) if targets.seg_label is not None else zero
    aff = (pair_counts(targets.aff_label, cfg.data.num_classes, IGNORE_INDEX) if targets.aff_label is not None
           else zero)
    return torch.cat([x.new_tensor([float(x.shape[0])], dtype=torch.float64), seg, aff])


def ema_step(model: WSSSNet, step: int, cfg: Config) -> None:
    """The EMA teacher's update, once per step before any teacher forward (SPEC §2), while the contrast term is on."""
    if term_weights(cfg, step)["con"]:
        ema_update(model.proj_head_t, model.proj_head, cfg.contrast.ema_momentum)


def loss_terms(model: WSSSNet, batch: dict, step: int, cfg: Config, targets: Targets, norm: torch.Tensor,
               parts: int = 1, out: Outputs | None = None) -> dict[str, Term]:
    """The loss terms of one part of a step's batch, each term's sum over this part divided by the whole step's
    denominator ``norm`` (from :func:`counts`, summed over the ``parts``): the parts' terms add up to the terms of
    the whole batch computed at once (README "Many GPUs"). ``out``: this part's forward, if already run with grad.

    Every trainable parameter takes part, with a zero gradient where its term is off: AdamW then decays and counts
    steps for idle heads as the reference's weight-0 terms make it do, and DDP needs every parameter every step."""
    x, cls_label, img_box = batch["img"], batch["cls_label"], batch["img_box"]
    w = targets.weights
    if out is None:
        out = model(x, with_seg=bool(w["seg"] or w["reg"]))
    images, fg_bg, pos, neg = norm[0], norm[1:3], norm[3], norm[4]
    idle = sum(p.reshape(-1)[0] for p in model.parameters() if p.requires_grad) * 0.0
    cls = F.multilabel_soft_margin_loss(out.cls_logits.float(), cls_label, reduction="sum") / images
    losses = {"cls": Term(cls + idle, 1.0)}
    if cfg.loss.w_cls_aux:
        cls_aux = F.multilabel_soft_margin_loss(out.aux_logits.float(), cls_label, reduction="sum") / images
        losses["cls_aux"] = Term(cls_aux, cfg.loss.w_cls_aux)
    backend = cfg.kernels.backend
    if w["seg"] or w["reg"]:
        seg = F.interpolate(out.seg_logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if w["seg"]:
            losses["seg"] = Term(seg_loss(seg, targets.seg_label, counts=fg_bg), w["seg"])
        if w["reg"]:
            losses["reg"] = Term(reg_loss(
                seg, denormalize(x.float()), img_box, targets.seg_label, sigma_rgb=cfg.loss.reg_sigma_rgb,
                sigma_xy=cfg.loss.reg_sigma_xy, scale=cfg.loss.reg_scale, exact_grad=cfg.quirks.exact_reg_grad,
                backend=backend, num_images=float(images)), w["reg"])
    if w["aff"]:
        feats = out.feat.flatten(2).transpose(1, 2)  # [b, N, D]
        sp, _, sn, _ = token_affinity_sums(feats, targets.aff_label, backend=backend,
                                           num_classes=cfg.data.num_classes).unbind()
        aff = 0.5 * (1.0 / parts - sp / (pos + 1)) + 0.5 * sn / (neg + 1)  # the constant 0.5 shared by the parts
        losses["aff"] = Term(aff.to(out.feat.dtype), w["aff"])
    if w["con"]:
        local_tokens, local_flags = LOCAL_VIEWS[cfg.train.method](model, batch, targets.cams, targets.cams_aux, step,
                                                                  cfg)
        g2 = forward_features(model.backbone, batch["global2"], model.aux_layer)[0]
        student = model.proj_head(torch.cat([out.cls_token[:, None], g2[:, None], local_tokens], dim=1))
        with torch.no_grad():  # the teacher reuses the student's (detached) global features: no dropout anywhere
            teacher = model.proj_head_t(torch.stack([out.cls_token, g2], dim=1).detach())
        flags = torch.cat([local_flags.new_ones(x.shape[0], 2), local_flags], dim=1)
        losses["con"] = Term(contrast_loss(teacher, student, flags, cfg.loss.temperature,
                                           extra_term=cfg.quirks.contrast_extra_term, num_images=images), w["con"])
    return losses


class TrainStep(nn.Module):
    """One part of a step's batch -> its loss terms, as the module DistributedDataParallel wraps: every trainable
    parameter of ``model`` takes part in every call (``loss_terms``), so DDP runs without find_unused_parameters.

    Without ``targets``, this part's forward (with grad) also makes its targets, and the denominators are summed
    over the processes here (one micro-batch per process and step). With ``train.grad_accum`` > 1 the loop makes every
    micro-batch's targets first (their denominators must be known before any term) and passes them in."""

    def __init__(self, model: WSSSNet, cfg: Config, dist: Dist = ONE_PROCESS, parts: int | None = None):
        """``parts``: into how many parts each step's batch is split (default processes x ``train.grad_accum``)."""
        super().__init__()
        self.model, self.cfg, self.dist = model, cfg, dist
        self.parts = dist.world_size * cfg.train.grad_accum if parts is None else parts

    def forward(self, batch: dict, step: int, targets: Targets | None = None, norm: torch.Tensor | None = None
                ) -> dict[str, Term]:
        w = term_weights(self.cfg, step)
        out = self.model(batch["img"], with_seg=bool(w["seg"] or w["reg"]))
        if targets is None:
            targets = make_targets(self.model, batch, step, self.cfg, out)
            norm = all_reduce_sum(counts(targets, batch, self.cfg), self.dist)
        return loss_terms(self.model, batch, step, self.cfg, targets, norm, self.parts, out)


def compute_losses(model: WSSSNet, batch: dict, step: int, cfg: Config) -> dict[str, Term]:
    """The whole step on one batch in one process: the EMA update, then :class:`TrainStep` (the total is the sum of
    the terms' ``weighted``; a term with weight 0 is not computed)."""
    ema_step(model, step, cfg)
    return TrainStep(model, cfg, parts=1)(batch, step)

"""The pieces the methods of the ToCo lineage share, each written once: the classification terms, the segmentation
and regularisation terms, the token affinity term, and the per-sample random generator of the step's draws.
A method file composes them (``toco.py``, ``mcc.py``, ...)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..config import Config
from ..data.transforms import denormalize
from ..kernels import token_affinity_sums
from ..kernels.affinity import loss_from_sums, pair_counts
from ..models import Outputs, WSSSNet
from .base import Term, idle_anchor
from .losses import reg_loss, seg_label_counts, seg_loss


def classification_terms(model: WSSSNet, out: Outputs, cls_label: torch.Tensor, images: torch.Tensor,
                         w_cls_aux: float) -> dict[str, Term]:
    """``cls`` and ``cls_aux`` (docs/methods/toco-mcc.md §7.2): multilabel soft margin of both heads, summed over the part's images and
    divided by the step's ``images``; ``cls`` also carries :func:`idle_anchor` (every parameter gets a gradient)."""
    cls = F.multilabel_soft_margin_loss(out.cls_logits.float(), cls_label, reduction="sum") / images
    terms = {"cls": Term(cls + idle_anchor(model), 1.0)}
    if w_cls_aux:
        aux = F.multilabel_soft_margin_loss(out.aux_logits.float(), cls_label, reduction="sum") / images
        terms["cls_aux"] = Term(aux, w_cls_aux)
    return terms


def seg_reg_terms(out: Outputs, batch: dict, seg_label: torch.Tensor, weights: dict[str, float],
                  norm: dict[str, torch.Tensor], cfg: Config) -> dict[str, Term]:
    """``seg`` (docs/methods/toco-mcc.md §7.5) and ``reg`` (§7.6) on the decoder's logits upsampled to the crop, while weighted."""
    x = batch["img"]
    terms = {}
    if not (weights["seg"] or weights["reg"]):
        return terms
    seg = F.interpolate(out.seg_logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
    if weights["seg"]:
        terms["seg"] = Term(seg_loss(seg, seg_label, counts=torch.stack([norm["fg"], norm["bg"]])), weights["seg"])
    if weights["reg"]:
        terms["reg"] = reg_term(seg, x, batch["img_box"], seg_label, weights["reg"], norm, cfg)
    return terms


def reg_term(seg: torch.Tensor, images: torch.Tensor, img_box: torch.Tensor, seg_label: torch.Tensor, weight: float,
             norm: dict[str, torch.Tensor], cfg: Config) -> Term:
    """The gated dense-CRF regularisation (docs/methods/toco-mcc.md §7.6) of the upsampled logits ``seg`` [b, C, H, W] on the
    normalised ``images``, ``loss.reg_*`` settings, over the step's images."""
    loss = cfg.loss
    return Term(reg_loss(seg, denormalize(images.float()), img_box, seg_label, sigma_rgb=loss.reg_sigma_rgb,
                         sigma_xy=loss.reg_sigma_xy, scale=loss.reg_scale, exact_grad=cfg.quirks.exact_reg_grad,
                         backend=cfg.kernels.backend, num_images=float(norm["images"])), weight)


def affinity_term(feat: torch.Tensor, aff_label: torch.Tensor, norm: dict[str, torch.Tensor], parts: int,
                  weight: float, cfg: Config) -> Term:
    """The token affinity term (ToCo PTC / MCC aff, docs/methods/toco-mcc.md §7.3) of the feature map ``feat`` [b, D, h, w] against the
    token labels [b, N], over the step's positive / negative pair counts ``norm["pos"]`` / ``norm["neg"]``."""
    tokens = feat.flatten(2).transpose(1, 2)  # [b, N, D]
    sp, _, sn, _ = token_affinity_sums(tokens, aff_label, backend=cfg.kernels.backend,
                                       num_classes=cfg.data.num_classes).unbind()
    sums = torch.stack([sp.double(), norm["pos"], sn.double(), norm["neg"]])  # float64, as the denominators
    return Term(loss_from_sums(sums, parts=parts).to(feat.dtype), weight)


def label_counts(seg_label: torch.Tensor | None, aff_label: torch.Tensor | None, num_classes: int,
                 like: torch.Tensor) -> dict[str, torch.Tensor]:
    """The denominators of the segmentation and affinity terms: foreground / background pixels of ``seg_label`` and
    positive / negative token pairs of ``aff_label`` (0 where a label is not made this step), float64 like ``like``."""
    zero = like.new_zeros(2, dtype=torch.float64)
    fg, bg = seg_label_counts(seg_label) if seg_label is not None else zero
    pos, neg = pair_counts(aff_label, num_classes) if aff_label is not None else zero
    return {"fg": fg, "bg": bg, "pos": pos, "neg": neg}


def sample_generator(cfg: Config, position: int, device: torch.device) -> torch.Generator:
    """A generator seeded by (seed, the sample's global position): a step's random draws are the same however the
    batch is split over processes and micro-batches, and when a step is recomputed."""
    seed = int(np.random.SeedSequence([cfg.train.seed, position, 5]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(seed)


def contrast_errors(cfg: Config) -> list[str]:
    """What a method with the contrast term needs of the shared ``contrast:`` section."""
    if cfg.contrast.num_local < 1:
        return [(f"contrast.num_local={cfg.contrast.num_local} must be >= 1 with train.method={cfg.train.method} "
                 "(its contrast term needs local views)")]
    return []

"""Pseudo labels from CAMs (docs/methods/toco-mcc.md §4): the PAR-refined segmentation label, the token affinity label, and the
roi map that the local views' flags are cut from (docs/methods/toco-mcc.md §5, §6)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import IGNORE_INDEX
from ..data.transforms import denormalize_uint8
from ..kernels import par_refine
from ..kernels.par import DEFAULT_DILATIONS
from ..runtime import fp32_arithmetic
from .cams import cam_to_label, ignore_outside_box


@fp32_arithmetic()
def refine_seg_label(
    cams: torch.Tensor,
    cls_label: torch.Tensor,
    images: torch.Tensor,
    img_box: torch.Tensor | None,
    *,
    high_thresh: float = 0.7,
    low_thresh: float = 0.25,
    down_scale: int = 2,
    par_dilations: tuple[int, ...] = DEFAULT_DILATIONS,
    par_num_iter: int = 10,
    par_backend: str = "auto",
    round_denorm: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """CAMs [B, C-1, H, W] in [0, 1] -> segmentation label [B, H, W] (docs/methods/toco-mcc.md §4.2).

    For each background constant (high, low): channels [background, cls-masked CAM] at 1/down_scale size, softmax
    over background + present classes, PAR on the (quantised) image, upsampled, argmax over the present channels.
    That is the reference's per-image channel selection, done for the whole batch: each image's present channels
    (background first, then its classes in order) are gathered into K slots (K = the most any image has; spare
    slots are never chosen), and both channel sets go through one PAR call, sharing the image affinity (exact: PAR
    is per channel). Fusion: high's label, its background -> ignore, background where both say background;
    outside img_box ignore.

    PAR sees the reference's uint8 image (``denormalize_uint8``: truncated levels; ``round_denorm`` rounds them).
    ``par_num_iter`` = 0 leaves the probabilities unrefined (``images`` is then not read).
    """
    B, _, H, W = cams.shape
    cams = cams.float()
    size = (H // down_scale, W // down_scale)
    present = torch.cat([cls_label.new_ones(B, 1), cls_label], dim=1).bool()  # [B, C]
    K = int(present.sum(1).max())
    slots = torch.sort((~present).to(torch.uint8), dim=1, stable=True).indices[:, :K]  # present channels first
    used = present.gather(1, slots)[:, :, None, None]  # [B, K, 1, 1]: False for spare slots
    valid_cam = cls_label[:, :, None, None].to(cams.dtype) * cams
    probs = []
    for bkg in (high_thresh, low_thresh):
        chans = torch.cat([torch.full_like(valid_cam[:, :1], bkg), valid_cam], dim=1)
        chans = F.interpolate(chans, size=size, mode="bilinear", align_corners=False)
        chans = chans.masked_fill(~present[:, :, None, None], -math.inf).softmax(dim=1)
        probs.append(chans.gather(1, slots[:, :, None, None].expand(B, K, *size)))
    refined = torch.cat(probs, dim=1)
    if par_num_iter:  # 0: no refinement (CoSA labels the resampled probabilities as they are)
        img = denormalize_uint8(images, round_levels=round_denorm).float() / 255.0
        img = F.interpolate(img, size=size, mode="bilinear", align_corners=False)
        refined = par_refine(img, refined, dilations=par_dilations, num_iter=par_num_iter, backend=par_backend)
    refined = F.interpolate(refined, size=(H, W), mode="bilinear", align_corners=False)
    # max().indices, not argmax(): same first-maximum index, but torch's CPU argmax over dim 1 is ~10x slower
    label_high, label_low = (slots.gather(1, r.masked_fill(~used, -math.inf).max(dim=1).indices.flatten(1)).view(B, H, W)
                             for r in refined.split(K, dim=1))
    label = label_high.clone()
    label[label_high == 0] = ignore_index
    label[(label_high + label_low) == 0] = 0
    if img_box is not None:
        label = ignore_outside_box(label, img_box, ignore_index)
    return label


@dataclass(frozen=True)
class PseudoLabeller:
    """CAMs -> PAR-refined segmentation labels (:func:`refine_seg_label`) with fixed settings: the one labeller that
    training, evaluation and the pseudo-label export share (a method makes it from the config). Picklable."""

    high_thresh: float = 0.7
    low_thresh: float = 0.25
    par_dilations: tuple[int, ...] = DEFAULT_DILATIONS
    par_num_iter: int = 10
    backend: str = "auto"
    round_denorm: bool = False

    def __call__(self, cams: torch.Tensor, cls_label: torch.Tensor, images: torch.Tensor,
                 img_box: torch.Tensor | None = None) -> torch.Tensor:
        """CAMs [B, C-1, H, W], labels [B, C-1], normalised images [B, 3, H, W] -> labels [B, H, W] (255 uncertain
        or outside ``img_box``)."""
        return refine_seg_label(cams, cls_label, images, img_box, high_thresh=self.high_thresh,
                                low_thresh=self.low_thresh, par_dilations=self.par_dilations,
                                par_num_iter=self.par_num_iter, par_backend=self.backend,
                                round_denorm=self.round_denorm)


def scale_box(img_box: torch.Tensor, image_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """[B, 4] box in image pixels -> the grid cells it touches (the fix of the img_box quirk)."""
    (H, W), (h, w) = image_size, grid
    h0, h1, w0, w1 = img_box.unbind(-1)
    return torch.stack([h0 * h // H, (h1 * h + H - 1) // H, w0 * w // W, (w1 * w + W - 1) // W], dim=-1)


@fp32_arithmetic()
def affinity_label(
    cams_aux: torch.Tensor,
    cls_label: torch.Tensor,
    img_box: torch.Tensor | None,
    grid: tuple[int, int],
    *,
    high_thresh: float = 0.7,
    low_thresh: float = 0.25,
    scale_box_to_grid: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Aux CAMs [B, C-1, H, W] -> token labels [B, h*w] in {0..C-1, ignore} (docs/methods/toco-mcc.md §4.3).

    Faithful default: ``img_box`` (image pixels) is applied to the token grid as is (the reference quirk, which
    drops affinity supervision on padded crops); ``scale_box_to_grid`` maps it onto the grid instead.
    """
    cam = F.interpolate(cams_aux.float(), size=grid, mode="bilinear", align_corners=False)
    if img_box is not None and scale_box_to_grid:
        img_box = scale_box(img_box, cams_aux.shape[-2:], grid)
    label = cam_to_label(cam, cls_label, img_box, ignore_mid=True, high_thresh=high_thresh, low_thresh=low_thresh,
                         ignore_index=ignore_index)
    return label.flatten(1)


@fp32_arithmetic()
def roi_map(cams: torch.Tensor, cls_label: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """[B, C-1, h, w] -> [B, h, w]: 0 where the best present-class CAM <= low, 2 where >= high, else 1."""
    score = (cls_label[:, :, None, None].float() * cams.float()).amax(1)
    roi = torch.ones_like(score)
    roi[score <= low] = 0
    roi[score >= high] = 2
    return roi

"""Class activation maps: multi-scale CAM (docs/methods/toco-mcc.md §3 step 1) and CAM -> label (docs/methods/toco-mcc.md §4.1)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..data import IGNORE_INDEX
from ..runtime import fp32_arithmetic


@torch.no_grad()
def multiscale_cams(model, x: torch.Tensor, scales: Sequence[float] = (1.0, 0.5, 1.5), *,
                    outputs=None, with_seg: bool = False, aux_last_scale: bool = False) -> tuple[torch.Tensor, ...]:
    """Images [B, 3, H, W] -> (cams, cams_aux) [B, C-1, H, W] in [0, 1], and with ``with_seg`` also the
    segmentation logits [B, C, H, W] (fp32; upsampled, flip pair summed, summed over scales).

    Per scale: resize to int(s*H) x int(s*W), batch with the horizontal flip, CAMs upsampled to (H, W),
    flip pair fused by element-wise max, ReLU; summed over scales; per-channel min-max normalised. The model runs
    under the caller's autocast; the CAMs are fp32 from its (possibly bf16) features on (``WSSSNet.cams_from``).
    ``aux_last_scale``: the aux CAM is the last scale's alone (CoSA's quirk), not the sum.

    ``outputs``: the model's own forward of ``x`` (training step), reused as the unflipped scale-1 pass. Exact:
    the network has no dropout or drop-path, so a second forward of the same images gives the same CAMs (the
    reference runs it again); only the flipped images are run at scale 1.
    """
    B, _, H, W = x.shape
    total = total_aux = total_seg = 0
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, size=(int(s * H), int(s * W)), mode="bilinear", align_corners=False)
        if s == 1.0 and outputs is not None and not with_seg:
            pairs = zip(model.cams_from(outputs), model.cams(xs.flip(-1)))
        elif with_seg:
            out = model(torch.cat([xs, xs.flip(-1)]), with_seg=True)
            pairs = (c.split(B) for c in model.cams_from(out))
        else:
            pairs = (c.split(B) for c in model.cams(torch.cat([xs, xs.flip(-1)])))
        fused = []
        with fp32_arithmetic():
            for c, c_flip in pairs:
                c, c_flip = (F.interpolate(v.float(), size=(H, W), mode="bilinear", align_corners=False)
                             for v in (c, c_flip))
                fused.append(torch.maximum(c, c_flip.flip(-1)).relu())
            if with_seg:
                seg = F.interpolate(out.seg_logits.float(), size=(H, W), mode="bilinear", align_corners=False)
                total_seg = total_seg + seg[:B] + seg[B:].flip(-1)
        total = total + fused[0]
        total_aux = fused[1] if aux_last_scale else total_aux + fused[1]
    cams = (minmax_normalize(total), minmax_normalize(total_aux))
    return (*cams, total_seg) if with_seg else cams


@fp32_arithmetic()
def minmax_normalize(cam: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per (image, channel) over (h, w): subtract the min, then divide by the max + eps (fp32)."""
    cam = cam.float()
    cam = cam - cam.amin(dim=(-2, -1), keepdim=True)
    return cam / (cam.amax(dim=(-2, -1), keepdim=True) + eps)


@fp32_arithmetic()
def cam_to_label(
    cam: torch.Tensor,
    cls_label: torch.Tensor,
    img_box: torch.Tensor | None = None,
    *,
    bkg_thresh: float = 0.5,
    high_thresh: float = 0.7,
    low_thresh: float = 0.25,
    ignore_mid: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """CAMs [B, C-1, H, W] and multi-hot labels [B, C-1] -> class labels [B, H, W] in {0..C-1, ignore}.

    Pixels whose best present-class score is <= bkg_thresh are background; with ``ignore_mid`` scores in
    (low, high] are ignored and <= low are background. ``img_box`` [B, 4] = (h0, h1, w0, w1): outside it
    is ignored (boxes are used as given, in the coordinates of ``cam``).
    """
    valid = cls_label[:, :, None, None].float() * cam.float()
    score, idx = valid.max(dim=1)
    label = idx + 1
    if ignore_mid:
        label[score <= high_thresh] = ignore_index
        label[score <= low_thresh] = 0
    else:
        label[score <= bkg_thresh] = 0
    if img_box is not None:
        label = ignore_outside_box(label, img_box, ignore_index)
    return label


def box_mask(img_box: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Boxes [B, 4] = (h0, h1, w0, w1), non-negative -> bool [B, H, W], True inside (rows h0..h1-1, columns
    w0..w1-1, as slicing would give); no host sync."""
    h0, h1, w0, w1 = img_box[:, :, None, None].unbind(1)  # [B, 1, 1] each
    rows = torch.arange(size[0], device=img_box.device)[:, None]
    cols = torch.arange(size[1], device=img_box.device)[None, :]
    return (rows >= h0) & (rows < h1) & (cols >= w0) & (cols < w1)


def ignore_outside_box(label: torch.Tensor, img_box: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Labels [B, H, W]; boxes [B, 4] in label coordinates: outside -> ignore."""
    return label.masked_fill(~box_mask(img_box, label.shape[-2:]).to(label.device), ignore_index)

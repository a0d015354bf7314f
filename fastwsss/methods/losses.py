"""Loss terms of ToCo and MCC (docs/methods/toco-mcc.md §7). Each returns a scalar; weighting and scheduling live in the step.

A term that averages over the batch (images, pixels) takes its denominator as an argument too: a part of a batch
split over processes or micro-batches is divided by the whole batch's count, so the parts add up to the whole."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data import IGNORE_INDEX
from ..kernels import PermutohedralLattice, bilateral_features
from ..pseudo import box_mask


def contrast_loss(teacher: torch.Tensor, student: torch.Tensor, flags: torch.Tensor, temperature: float = 0.5,
                  extra_term: bool = True, num_images: float | torch.Tensor | None = None) -> torch.Tensor:
    """ToCo CTC / MCC InfoNCE (identical code), docs/methods/toco-mcc.md §7.4, in log space so raw dot products cannot overflow.

    teacher [B, A, E] (A = 2 global views), student [B, V, E] (V = 2 globals + locals), flags [B, V] (1 = positive;
    the globals are always positive). With z = t_a . s_j / tau and n_a = sum over negatives of exp(z):
    L_i = [sum_a sum_{j in P} -log(e^z / (e^z + n_a + 1e-4)) + sum_a log(1 + n_a + 1e-4)] / (2 (|P| + 1e-4)).
    ``extra_term`` is the reference's always-run ``for ... else`` term (faithful default; False drops it).
    L = sum_i L_i / ``num_images`` (default B: the mean).
    """
    z = torch.einsum("bae,bve->bav", teacher.float(), student.float()) / temperature  # [B, A, V]
    pos = flags.bool()[:, None, :].expand_as(z)
    log_neg = torch.logsumexp(z.masked_fill(pos, -math.inf), dim=-1, keepdim=True)  # log n_a, -inf if none
    log_eps = torch.full_like(log_neg, math.log(1e-4))
    denom = torch.logsumexp(torch.stack([z, log_neg.expand_as(z), log_eps.expand_as(z)]), dim=0)
    per_pair = (denom - z).masked_fill(~pos, 0.0)  # -log(l / (l + n + eps)) on positive pairs
    total = per_pair.sum(dim=(1, 2))
    if extra_term:
        total = total + torch.logaddexp(log_neg, torch.full_like(log_neg, math.log1p(1e-4))).sum(dim=(1, 2))
    num_pos = flags.float().sum(-1)
    per_image = total / (teacher.shape[1] * (num_pos + 1e-4))
    return per_image.sum() / (teacher.shape[0] if num_images is None else num_images)


def seg_label_counts(label: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """[foreground, background] pixel counts of a segmentation label [B, H, W] (float64): seg_loss's denominators."""
    return torch.stack([((label > 0) & (label != ignore_index)).sum(), (label == 0).sum()]).double()


def seg_loss_halves(logits: torch.Tensor, label: torch.Tensor, counts: torch.Tensor | None = None, eps: float = 0.0,
                    ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """(foreground, background) halves of the segmentation loss: each half's summed CE over its pixel count + eps
    (``counts`` [fg, bg], default this batch's: ``seg_label_counts``). An empty half is 0 (no host sync)."""
    counts = seg_label_counts(label, ignore_index) if counts is None else counts
    halves = []
    for keep, count in zip((label > 0, label == 0), counts.unbind()):
        target = torch.where(keep & (label != ignore_index), label, ignore_index)
        ce = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
        halves.append(ce / torch.where(count > 0, count + eps, 1.0).to(ce.dtype))  # an empty half's ce is 0
    return halves[0], halves[1]


def seg_loss(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = IGNORE_INDEX,
             counts: torch.Tensor | None = None) -> torch.Tensor:
    """0.5 * (CE over foreground pixels + CE over background pixels), docs/methods/toco-mcc.md §7.5 (:func:`seg_loss_halves`). An empty
    half contributes nothing (the reference gives NaN there and poisons the step)."""
    fg, bg = seg_loss_halves(logits, label, counts, ignore_index=ignore_index)
    return 0.5 * (fg + bg)


class _GatedCRFLoss(torch.autograd.Function):
    """-Σ S·AS / B with AS = gate ⊙ K(S), S = P ⊙ ROI (K the lattice filter, gate a constant); backward as the
    reference: dL/dP = -2 AS / B ⊙ ROI, or the exact -(gate·K(S) + K(gate·S)) / B ⊙ ROI."""

    @staticmethod
    def forward(ctx, probs, features, roi, gate, exact_grad, backend="auto", num_images=None):
        lattice = PermutohedralLattice(features, backend=backend)
        seg = probs * roi
        AS = gate * lattice.filter(seg)
        ctx.save_for_backward(roi, gate, AS, seg if exact_grad else None)
        ctx.lattice, ctx.exact_grad = (lattice if exact_grad else None), exact_grad
        ctx.num_images = probs.shape[0] if num_images is None else float(num_images)
        return -(seg * AS).sum() / ctx.num_images

    @staticmethod
    def backward(ctx, grad):
        roi, gate, AS, seg = ctx.saved_tensors
        B = ctx.num_images
        if ctx.exact_grad:
            g = -(AS + ctx.lattice.filter(gate * seg, reverse=True)) / B * roi
        else:
            g = -2.0 * AS / B * roi
        return grad * g, None, None, None, None, None, None


def reg_loss(seg_logits: torch.Tensor, images: torch.Tensor, img_box: torch.Tensor, seg_label: torch.Tensor, *,
             sigma_rgb: float = 15.0, sigma_xy: float = 100.0, scale: float = 0.5, exact_grad: bool = False,
             backend: str = "auto", num_images: float | None = None) -> torch.Tensor:
    """Gated dense-CRF regularisation (docs/methods/toco-mcc.md §7.6). ``seg_logits`` [B, C, H, W] at image size, ``images`` [B, 3, H, W]
    in 0..255, ``img_box`` [B, 4], ``seg_label`` [B, H, W] (255 = ignore). Everything is scaled by ``scale`` (image,
    ROI and label nearest, probabilities bilinear); σ_xy is scaled with it. ``backend`` picks the lattice filter's
    implementation (``fastwsss.kernels.PermutohedralLattice``); the sum is divided by ``num_images`` (default B)."""
    H, W = seg_logits.shape[-2:]
    size = (int(H * scale), int(W * scale))
    probs = F.interpolate(seg_logits.float().softmax(1), size=size, mode="bilinear", align_corners=False)
    roi = box_mask(img_box, (H, W)).to(seg_logits.device)[:, None].float()
    roi = F.interpolate(roi, size=size, mode="nearest")  # [B, 1, h, w]
    label = F.interpolate(seg_label[:, None].float(), size=size, mode="nearest")
    img = F.interpolate(images.float(), size=size, mode="nearest")
    gate = (roi - probs.amax(1, keepdim=True)).masked_fill(label == IGNORE_INDEX, 1.0).clamp_min(0.0)
    features = bilateral_features(img, sigma_rgb, sigma_xy * scale)
    return 1e-7 * _GatedCRFLoss.apply(probs, features, roi, gate.detach(), exact_grad, backend, num_images)

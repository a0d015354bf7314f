"""A plain reading of CoSA's official training step (docs/methods/cosa.md §3), written the straightforward way:
the per-image label loop with host-side decisions (``.item()``, ``.tolist()``) and the per-parameter EMA loop of the
official code, fp32, one piece after the other as the official ``main.py`` calls them. It is the oracle of ``tests/test_cosa.py`` and the baseline that
``benchmarks/method_step.py`` times fastwsss's step against; it reuses nothing of ``fastwsss.methods.cosa``.

The network pieces are fastwsss's ``WSSSNet`` (the same ViT, heads and decoder as the official ``VITNetwork``);
the regularisation term is fastwsss's ``reg_loss`` on the reference lattice (tested against pydensecrf elsewhere).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastwsss.data.transforms import denormalize
from fastwsss.methods.losses import reg_loss


def teacher_camseg(teacher, weak: torch.Tensor, scales) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``multi_scale_camseg``: per scale the image and its flip in one batch; CAMs upsampled, flip pair by max, ReLU,
    summed over scales (the aux list keeps only the current scale: the last scale's aux CAM survives); segmentation
    logits upsampled, flip pair summed, summed over scales; CAMs min-max normalised per image and channel."""
    B, _, H, W = weak.shape
    cams, seg_list = [], []
    aux_kept = None
    for s in scales:
        x = weak if s == 1.0 else F.interpolate(weak, size=(int(H * s), int(W * s)), mode="bilinear",
                                                align_corners=False)
        out = teacher(torch.cat([x, x.flip(-1)]), with_seg=True)
        cam = F.conv2d(out.feat, teacher.classifier.weight)
        cam_aux = F.conv2d(out.aux_feat, teacher.aux_classifier.weight)
        up = [F.interpolate(t, size=(H, W), mode="bilinear", align_corners=False) for t in (cam, cam_aux,
                                                                                           out.seg_logits)]
        cams.append(torch.max(up[0][:B], up[0][B:].flip(-1)).relu())
        aux_kept = [torch.max(up[1][:B], up[1][B:].flip(-1)).relu()]  # overwritten at every scale
        seg_list.append(up[2][:B] + up[2][B:].flip(-1))

    def normalise(cam):
        cam = cam - cam.amin(dim=(-2, -1), keepdim=True)
        return cam / (cam.amax(dim=(-2, -1), keepdim=True) + 1e-5)

    return normalise(sum(cams)), normalise(aux_kept[0]), sum(seg_list)


def cam2mask(valid: torch.Tensor, img_box: torch.Tensor, cls_label: torch.Tensor, high: float, low: float,
             downscale: int = 2) -> torch.Tensor:
    """``cam2mask`` without a refiner: for each background constant, [constant, valid CAM] down-sampled, per image
    the background and present channels softmaxed, up-sampled, argmax mapped to classes, outside the box 255; then
    high's label with its background ignored, background where both say background."""
    B, _, H, W = valid.shape
    labels = []
    for bkg in (high, low):
        stack = torch.cat([torch.full_like(valid[:, :1], bkg), valid], dim=1)
        stack = F.interpolate(stack, size=(H // downscale, W // downscale), mode="bilinear", align_corners=False)
        label = torch.full((B, H, W), 255, dtype=torch.long)
        for i in range(B):
            keep = [0] + [c + 1 for c in range(cls_label.shape[1]) if cls_label[i, c].item() > 0]
            probs = stack[i, keep].softmax(dim=0)
            probs = F.interpolate(probs[None], size=(H, W), mode="bilinear", align_corners=False)[0]
            full = torch.tensor(keep)[probs.argmax(dim=0)]
            h0, h1, w0, w1 = img_box[i].tolist()
            label[i, h0:h1, w0:w1] = full[h0:h1, w0:w1]
        labels.append(label)
    high_label, low_label = labels
    fused = high_label.clone()
    fused[high_label == 0] = 255
    fused[(high_label + low_label) == 0] = 0
    return fused


def seg_loss(pred: torch.Tensor, label: torch.Tensor, fg_alpha: float = 0.5) -> torch.Tensor:
    """``seg_helper.seg_loss``: background and foreground CE, each over its pixel count + 1e-6."""
    bg, fg = label.clone(), label.clone()
    bg[label != 0] = 255
    fg[label == 0] = 255
    bg_loss = F.cross_entropy(pred, bg, ignore_index=255, reduction="sum") / ((bg != 255).sum() + 1e-6)
    fg_loss = F.cross_entropy(pred, fg, ignore_index=255, reduction="sum") / ((fg != 255).sum() + 1e-6)
    return (1 - fg_alpha) * bg_loss + fg_alpha * fg_loss


def cam_loss_v1(cam: torch.Tensor, seg_ps: torch.Tensor, cls_label: torch.Tensor, temperature: float
                ) -> torch.Tensor:
    """``seg_refine_by_label`` then ``cam_loss``: absent classes' logits -1e5, softmax / T, the foreground part
    down-sampled to the CAM grid; multilabel soft margin against ReLU of the raw CAM, mean over pixels."""
    absent = torch.cat([torch.zeros_like(cls_label[:, :1]), 1 - cls_label], dim=1)[:, :, None, None].bool()
    logits = seg_ps.masked_fill(absent, -1e5)
    target = (logits / temperature).softmax(dim=1)[:, 1:]
    target = F.interpolate(target, size=cam.shape[-2:], mode="bilinear", align_corners=False)
    K = cam.shape[1]
    return F.multilabel_soft_margin_loss(cam.relu().permute(0, 2, 3, 1).reshape(-1, K),
                                         target.permute(0, 2, 3, 1).reshape(-1, K))


def step_terms(model, teacher, batch: dict, cfg, step: int) -> dict[str, torch.Tensor]:
    """The unweighted terms and the ``total`` of one official step (fp32), the teacher's assignments included."""
    c, cam = cfg.cosa, cfg.cam
    strong, weak, cls_label, img_box = batch["img"], batch["weak"], batch["cls_label"], batch["img_box"]
    with torch.no_grad():
        cams, cams_aux, seg_ps = teacher_camseg(teacher, weak, cam.scales)
        label = cam2mask(cls_label[:, :, None, None] * cams, img_box, cls_label, cam.high_thresh, cam.low_thresh)
        label_aux = cam2mask(cls_label[:, :, None, None] * cams_aux, img_box, cls_label, c.aux_high_thresh,
                             c.aux_low_thresh)
    out = model(strong, with_seg=True)
    terms = {"cls": F.multilabel_soft_margin_loss(out.cls_logits, cls_label),
             "cls_aux": F.multilabel_soft_margin_loss(out.aux_logits, cls_label)}
    seg = F.interpolate(out.seg_logits, size=strong.shape[-2:], mode="bilinear", align_corners=False)
    terms["seg"] = ((1 - c.aux_seg_alpha) * seg_loss(seg, label, c.seg_fg_alpha)
                    + c.aux_seg_alpha * seg_loss(seg, label_aux, c.seg_fg_alpha))
    terms["cam"] = cam_loss_v1(F.conv2d(out.feat, model.classifier.weight), seg_ps, cls_label, c.softmax_temp)
    loss = cfg.loss
    terms["reg"] = reg_loss(seg, denormalize(strong), img_box, label, sigma_rgb=loss.reg_sigma_rgb,
                            sigma_xy=loss.reg_sigma_xy, scale=loss.reg_scale, backend="torch")
    warm = step <= min(loss.seg_start, c.cam_start, loss.reg_start) - 1  # the official n_iter <= warmup_iters
    w = {"seg": 0.0, "cam": 0.0, "reg": 0.0} if warm else {"seg": loss.w_seg, "cam": c.w_cam, "reg": loss.w_reg}
    terms["total"] = terms["cls"] + terms["cls_aux"] + sum(w[k] * terms[k] for k in w)
    return terms


@torch.no_grad()
def ema_update(teacher, student_parameters, momentum: float) -> None:
    """After ``optimizer.step()``: each teacher parameter <- m * itself + (1 - m) * the student's, one by one."""
    for t, s in zip(teacher.parameters(), student_parameters, strict=True):
        t.data = momentum * t.data + (1 - momentum) * s.data


def run_step(model, batch: dict, cfg, step: int) -> dict[str, torch.Tensor]:
    """``step_terms`` as ``benchmarks/method_step.py`` calls every official reading (the teacher is the model's)."""
    return step_terms(model, model.teacher, batch, cfg, step)


def after_step(model, method, cfg) -> None:
    """After the optimizer step: the teacher's EMA, parameter by parameter."""
    ema_update(model.teacher, method.student_parameters(model), cfg.cosa.momentum)

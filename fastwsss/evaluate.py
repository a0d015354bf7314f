"""Evaluation (SPEC §10): confusion-matrix mIoU over a whole split, per-class tables, CAM evaluation,
and two trivial baselines that every reported number is shown beside."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .cams import cam_to_label, multiscale_cams
from .data import IGNORE_INDEX, EvalDataset, read_mask
from .kernels.par import DEFAULT_DILATIONS
from .visualize import colorize, heatmap, save_grid


class ConfusionMatrix:
    """C x C counts, rows = ground truth, columns = prediction; ``ignore_index`` pixels are skipped."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.mat = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred, gt) -> None:
        pred = np.asarray(pred.cpu() if torch.is_tensor(pred) else pred).astype(np.int64).ravel()
        gt = np.asarray(gt.cpu() if torch.is_tensor(gt) else gt).astype(np.int64).ravel()
        if pred.shape != gt.shape:
            raise ValueError(f"prediction has {pred.size} pixels, ground truth {gt.size}")
        keep = gt != self.ignore_index
        pred, gt = pred[keep], gt[keep]
        if gt.size and (gt.max() >= self.num_classes or pred.max() >= self.num_classes or pred.min() < 0):
            raise ValueError(f"labels outside 0..{self.num_classes - 1} (ground truth max {gt.max()}, "
                             f"prediction range {pred.min()}..{pred.max()})")
        self.mat += np.bincount(gt * self.num_classes + pred, minlength=self.num_classes**2).reshape(
            self.num_classes, self.num_classes)

    def iou(self) -> np.ndarray:
        """IoU_c = TP / (TP + FP + FN); NaN for classes absent from the ground truth."""
        tp = np.diag(self.mat).astype(np.float64)
        gt, pred = self.mat.sum(1), self.mat.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = tp / (gt + pred - tp)
        iou[gt == 0] = np.nan
        return iou

    def miou(self) -> float:
        """Mean IoU over the classes present in the ground truth."""
        iou = self.iou()
        return float(np.nanmean(iou)) if not np.all(np.isnan(iou)) else float("nan")


def format_table(class_names: list[str], columns: dict[str, ConfusionMatrix]) -> str:
    """Per-class IoU (%) table, one column per named result, mIoU in the last row."""
    heads = list(columns)
    width = max(8, *(len(h) for h in heads))
    name_w = max(10, *(len(n) for n in class_names))
    ious = {h: cm.iou() for h, cm in columns.items()}
    lines = [f"{'class':<{name_w}}" + "".join(f"{h:>{width + 2}}" for h in heads)]
    for c, name in enumerate(class_names):
        cells = ["-" if np.isnan(ious[h][c]) else f"{100 * ious[h][c]:.1f}" for h in heads]
        lines.append(f"{name:<{name_w}}" + "".join(f"{v:>{width + 2}}" for v in cells))
    lines.append(f"{'mIoU':<{name_w}}" + "".join(f"{100 * columns[h].miou():>{width + 2}.1f}" for h in heads))
    return "\n".join(lines)


def class_pixel_prior(pixel_counts: np.ndarray) -> np.ndarray:
    """Fraction of all (non-ignored) training pixels per class, [C]."""
    totals = pixel_counts.sum(0).astype(np.float64)
    return totals / max(totals.sum(), 1.0)


def trivial_baselines(dataset: EvalDataset, prior: np.ndarray) -> dict[str, ConfusionMatrix]:
    """'all background', and 'every pixel = the most likely present class': with the ground-truth image
    labels, the present foreground class of largest training pixel share fills the whole image."""
    items, C = dataset.items, dataset.items.num_classes
    out = {"all-bg": ConfusionMatrix(C), "likely-cls": ConfusionMatrix(C)}
    for i in range(len(dataset)):
        gt = read_mask(items.mask_path(items.names[i]))
        present = np.nonzero(items.cls_labels[i])[0] + 1
        guess = present[np.argmax(prior[present])] if present.size else 0
        out["all-bg"].update(np.zeros_like(gt), gt)
        out["likely-cls"].update(np.full_like(gt, guess), gt)
    return out


EVAL_MODES = ("cam", "aux-cam", "seg", "pseudo")


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    dataset: EvalDataset,
    *,
    scales: tuple[float, ...],
    bkg_thresh: float,
    modes: tuple[str, ...] = ("cam", "aux-cam"),
    high_thresh: float = 0.7,
    low_thresh: float = 0.25,
    device: torch.device,
    autocast: Callable[[], object] = nullcontext,
    num_vis: int = 0,
    vis_path: str | Path | None = None,
    num_workers: int = 0,
    batch_size: int = 1,
    par_dilations: tuple[int, ...] = DEFAULT_DILATIONS,
    par_num_iter: int = 10,
    par_backend: str = "auto",
) -> dict[str, ConfusionMatrix]:
    """Stream the split into one confusion matrix per mode:

    - ``cam`` / ``aux-cam``: multi-scale CAM -> label with the ground-truth image labels and the background threshold;
    - ``seg``: single-scale decoder prediction upsampled to the image;
    - ``pseudo``: the PAR-refined training label made from the multi-scale CAM (SPEC §4.2), uncertain pixels
      counted as background.

    A PNG grid of the first ``num_vis`` images goes to ``vis_path``. ``batch_size`` > 1 needs images of one size.
    """
    from .pseudo import refine_seg_label

    unknown = set(modes) - set(EVAL_MODES)
    if unknown:
        raise ValueError(f"unknown evaluation modes {sorted(unknown)}; choose from {EVAL_MODES}")
    C = dataset.items.num_classes
    results = {m: ConfusionMatrix(C) for m in modes}
    rows = []
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    for s in loader:
        x, cls_label = s["img"].to(device), s["cls_label"].to(device)
        with autocast():
            cams, cams_aux = multiscale_cams(model, x, scales)
            seg = model(x).seg_logits if "seg" in modes else None
        labels = {}
        for key, c in (("cam", cams), ("aux-cam", cams_aux)):
            labels[key] = cam_to_label(c.float(), cls_label, bkg_thresh=bkg_thresh).cpu()
        if seg is not None:
            labels["seg"] = F.interpolate(seg.float(), size=x.shape[-2:], mode="bilinear",
                                          align_corners=False).argmax(1).cpu()
        if "pseudo" in modes:
            pseudo = refine_seg_label(cams.float(), cls_label, x, None, high_thresh=high_thresh,
                                      low_thresh=low_thresh, par_dilations=par_dilations, par_num_iter=par_num_iter,
                                      par_backend=par_backend)
            labels["pseudo"] = pseudo.masked_fill(pseudo == IGNORE_INDEX, 0).cpu()
        for m in modes:
            results[m].update(labels[m], s["mask"])
        if vis_path is not None and len(rows) < num_vis:
            peak = (cls_label[:, :, None, None] * cams).amax(1).float().cpu().numpy()
            shown = labels["seg"] if "seg" in labels else labels["cam"]
            for j in range(min(len(x), num_vis - len(rows))):
                raw = s["raw"][j].numpy()
                rows.append([raw, heatmap(peak[j], raw), colorize(labels["cam"][j].numpy()),
                             colorize(shown[j].numpy()), colorize(s["mask"][j].numpy())])
    model.train(was_training)
    if rows:
        save_grid(rows, vis_path)
    return results

"""Scores: the C x C confusion matrix and mIoU of docs/methods/toco-mcc.md §10, the per-class table every result is printed in, and the
two trivial baselines every reported number is shown beside."""

from __future__ import annotations

import numpy as np
import torch

from ..data import IGNORE_INDEX, EvalDataset, read_mask


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


def class_pixel_prior(pixel_counts: np.ndarray | None, cls_labels: np.ndarray | None = None) -> np.ndarray:
    """Fraction of all (non-ignored) training pixels per class, [C]; without masks (labels from a file), the
    fraction of training images that hold each foreground class (background 0)."""
    if pixel_counts is None:
        freq = np.asarray(cls_labels, dtype=np.float64).mean(0)
        return np.concatenate([[0.0], freq])
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


def results_json(results: dict[str, ConfusionMatrix], names: list[str], **info) -> dict:
    """mIoU and per-class IoU of each mode (IoU of classes absent from the ground truth: null)."""
    out = dict(info)
    for mode, cm in results.items():
        iou = cm.iou()
        out[mode] = {"miou": cm.miou(), "per_class": {n: None if np.isnan(v) else float(v) for n, v in zip(names, iou)},
                     "confusion_matrix": cm.mat.tolist()}
    return out

"""Datasets in the VOC / COCO layouts, training augmentation, and the synthetic demo data."""

from __future__ import annotations

from pathlib import Path

from ..config import DataConfig
from .datasets import (
    IGNORE_INDEX,
    DataError,
    EvalDataset,
    ResumableSampler,
    SegmentationList,
    TrainDataset,
    read_image,
    read_mask,
)
from .synthetic import generate_dataset

__all__ = ["IGNORE_INDEX", "DataError", "EvalDataset", "ResumableSampler", "SegmentationList", "TrainDataset",
           "class_names", "open_split", "open_splits", "read_image", "read_mask"]


def open_split(cfg: DataConfig, split: str) -> SegmentationList:
    """One split list of ``cfg``'s dataset (the COCO layout for ``coco``, VOC's for ``voc`` and ``synthetic``)."""
    layout = "coco" if cfg.dataset == "coco" else "voc"
    return SegmentationList(cfg.root, split, layout, cfg.num_classes)


def open_splits(cfg: DataConfig) -> tuple[SegmentationList, SegmentationList]:
    """Train and val split lists of ``cfg``; synthetic data is generated into ``cfg.root`` first if missing."""
    if cfg.dataset == "synthetic":
        s = cfg.synthetic
        generate_dataset(cfg.root, num_train=s.num_train, num_val=s.num_val, image_size=s.image_size, seed=s.seed,
                         num_workers=min(cfg.num_workers, 2))
    return open_split(cfg, cfg.train_split), open_split(cfg, cfg.val_split)


VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def class_names(cfg: DataConfig) -> list[str]:
    """Names from ``<root>/classes.txt`` when present (synthetic, custom data), VOC's for 21 classes,
    else ``class_<i>``."""
    path = Path(cfg.root) / "classes.txt"
    if path.is_file():
        names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        if len(names) == cfg.num_classes:
            return names
    if cfg.num_classes == len(VOC_CLASSES):
        return list(VOC_CLASSES)
    return ["background"] + [f"class_{i}" for i in range(1, cfg.num_classes)]

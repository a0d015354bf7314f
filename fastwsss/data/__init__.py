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
from .labels import LabelFileError, read_class_names, read_label_file
from .synthetic import generate_dataset

__all__ = ["IGNORE_INDEX", "DataError", "EvalDataset", "LabelFileError", "ResumableSampler", "SegmentationList",
           "TrainDataset", "class_names", "open_split", "open_splits", "read_class_names", "read_image",
           "read_label_file", "read_mask"]


def open_split(cfg: DataConfig, split: str) -> SegmentationList:
    """One split of ``cfg``'s dataset: the COCO layout for ``coco``, VOC's for ``voc`` and ``synthetic``, any
    images listed by a label file for ``folder``. ``data.labels`` / ``data.val_labels`` give the train / val split's
    image-level labels from a file instead of from masks."""
    labels = cfg.labels if split == cfg.train_split else cfg.val_labels if split == cfg.val_split else ""
    if cfg.dataset == "folder" and not labels:
        raise DataError(f"data.dataset=folder: split {split!r} has no label file (data.labels is the train split's, "
                        "data.val_labels the val split's)")
    layout = {"coco": "coco", "folder": "folder"}.get(cfg.dataset, "voc")
    return SegmentationList(cfg.root, split, layout, cfg.num_classes, labels=labels or None,
                            class_names=class_names(cfg), masks=cfg.masks or None)


def open_splits(cfg: DataConfig) -> tuple[SegmentationList, SegmentationList | None]:
    """Train and val split lists of ``cfg`` (val None: a folder dataset without data.val_labels); synthetic data is
    generated into ``cfg.root`` first if missing."""
    if cfg.dataset == "synthetic":
        s = cfg.synthetic
        generate_dataset(cfg.root, num_train=s.num_train, num_val=s.num_val, image_size=s.image_size, seed=s.seed,
                         num_workers=min(cfg.num_workers, 2), clutter=s.clutter, colour_cue=s.colour_cue)
    val = None if cfg.dataset == "folder" and not cfg.val_labels else open_split(cfg, cfg.val_split)
    return open_split(cfg, cfg.train_split), val


VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def class_names(cfg: DataConfig) -> list[str]:
    """[background, ...]: from ``data.class_names`` when set, else ``<root>/classes.txt`` when present (synthetic,
    converted COCO, your own data), VOC's for 21 classes, else ``class_<i>``. A names file that counts other classes
    than ``data.num_classes`` is an error: the model would train phantom classes, or miss some."""
    if cfg.class_names:
        return read_class_names(cfg.class_names, cfg.num_classes)
    path = Path(cfg.root) / "classes.txt"
    if path.is_file():
        names = read_class_names(path)
        if len(names) != cfg.num_classes:
            raise LabelFileError(f"data.num_classes={cfg.num_classes} but {path} names {len(names)} classes "
                                 f"(background included): set data.num_classes={len(names)}, or data.class_names to "
                                 "a file of the classes to train")
        return names
    if cfg.num_classes == len(VOC_CLASSES):
        return list(VOC_CLASSES)
    return ["background"] + [f"class_{i}" for i in range(1, cfg.num_classes)]

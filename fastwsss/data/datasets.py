"""VOC- and COCO-layout segmentation datasets with image-level labels derived from the masks.

Layouts (docs/methods/toco-mcc.md §9):
- ``voc``: ``JPEGImages/<name>.jpg``, ``SegmentationClassAug/<name>.png``, lists ``ImageSets/Segmentation/<split>.txt``.
- ``coco``: ``JPEGImages/{train2014,val2014}/<name>.jpg``, ``SegmentationClass/{train2014,val2014}/<name>.png``
  (VOC-style class indices), lists ``ImageSets/<split>.txt``; the subset folder is read off the name
  (``COCO_val2014_...``), or off the list line (``val2017/000000000139``). ``python -m fastwsss.data.coco`` makes
  the masks and lists from COCO's annotation files.

Image-level labels are never a separate download: each mask's class pixel counts are scanned once and cached
(``<root>/.fastwsss_cache``, or ``~/.cache/fastwsss`` when the root is read-only).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

from ..files import atomic_write
from .labels import read_label_file
from .transforms import IMAGENET_MEAN, IMAGENET_STD, normalize

IGNORE_INDEX = 255
LAYOUTS = ("voc", "coco", "folder")


class DataError(RuntimeError):
    pass


def read_image(path: Path) -> Image.Image:
    """An RGB image. 16-bit grey images (PIL modes I;16*, I) are scaled to 8 bits, not clipped to white."""
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I"):  # 16-bit grey PNG / TIFF: 0..65535
                grey = np.asarray(im, dtype=np.float64) / 257.0
                return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8)).convert("RGB")
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"corrupt or unreadable image {path}: {err}") from err


def read_mask(path: Path) -> np.ndarray:
    """Class-index mask [H, W] uint8 (palette PNGs are read as indices, not colours)."""
    if not path.is_file():
        raise DataError(f"mask not found: {path}")
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DataError(f"mask {path} has mode {im.mode}; expected a palette (P) or grey (L) class-index PNG")
            return np.asarray(im, dtype=np.uint8).copy()
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"corrupt or unreadable mask {path}: {err}") from err


class SegmentationList:
    """Names, paths and image-level labels of one split of a dataset.

    Layouts: ``voc`` and ``coco`` (the standard folders; the split is a list file) and ``folder`` (any images under
    ``root``; the split is the label file, whose paths are relative to ``root``). Image-level labels come from the
    masks (scanned once, cached) or, given ``labels`` (a CSV or ``cls_labels_onehot.npy``, see ``labels.py``), from
    that file: then masks are needed only to evaluate (``has_masks``), from ``masks`` (a folder of ``<name>.png``)
    for the folder layout. ``class_names`` ([background, ...]) resolve the classes a CSV names.
    """

    def __init__(self, root: str | os.PathLike, split: str, layout: str = "voc", num_classes: int = 21, *,
                 labels: str | os.PathLike | None = None, class_names: list[str] | None = None,
                 masks: str | os.PathLike | None = None):
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
        self.root, self.split, self.layout, self.num_classes = Path(root), split, layout, num_classes
        self.masks = Path(masks) if masks else None
        self._files: dict[str, Path] = {}
        if not self.root.is_dir():
            raise DataError(f"dataset root not found: {self.root}")
        if layout == "folder" and labels is None:
            raise DataError(f"the folder layout lists its images in a label file: none given for split {split!r}")
        classes = class_names or [f"class_{i}" for i in range(num_classes)]
        if len(classes) != num_classes:
            raise DataError(f"{len(classes)} class names for data.num_classes={num_classes}")
        self._folders: dict[str, str] = {}
        if layout == "folder":
            self.list_path = Path(labels)
            self.names, file_labels, self._files = read_label_file(labels, classes, images=self.root)
        else:
            list_path = self.root / ("ImageSets/Segmentation" if layout == "voc" else "ImageSets") / f"{split}.txt"
            if not list_path.is_file():
                raise DataError(f"split list not found: {list_path}")
            lines = [ln.split()[0] for ln in list_path.read_text().splitlines() if ln.strip()]
            self.names = [Path(ln).stem for ln in lines]
            self.list_path = list_path
            # coco: a line may name the subset folder (``val2017/000000000139``: 2017's names do not carry it)
            if layout == "coco":
                self._folders = {Path(ln).stem: Path(ln).parent.name for ln in lines if Path(ln).parent.name}
            if labels is not None:
                listed, table, _ = read_label_file(labels, classes)
                rows = {n: i for i, n in enumerate(listed)}
                unlabelled = [n for n in self.names if n not in rows]
                if unlabelled:
                    more = f" (and {len(unlabelled) - 3} more)" if len(unlabelled) > 3 else ""
                    raise DataError(f"{len(unlabelled)} image(s) of {list_path} have no labels in {labels}: "
                                    f"{', '.join(unlabelled[:3])}{more}")
                file_labels = table[[rows[n] for n in self.names]]
        if not self.names:
            raise DataError(f"split list is empty: {self.list_path}")
        self._check_exist("image", self.image_path)
        self.has_masks = all(self.mask_path(n).is_file() for n in self.names)
        if labels is None:
            self._check_exist("mask", self.mask_path)
            self.pixel_counts = self._class_pixel_counts()  # [N, C] int64
            self.cls_labels = self.pixel_counts[:, 1:] > 0  # [N, C-1] image-level labels
        else:
            self.pixel_counts = None  # no masks are read for labels: the file is the supervision
            self.cls_labels = file_labels

    def _check_exist(self, kind: str, path_of) -> None:
        missing = [str(p) for p in map(path_of, self.names) if not p.is_file()]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise DataError(f"{len(missing)} {kind}(s) of {self.list_path} not found: {', '.join(missing[:3])}{more}")

    def _subset(self, name: str) -> str:
        """The folder of a COCO image: the list line's (``val2017/<name>``), else the one its name carries
        (``COCO_train2014_<id>``)."""
        if name in self._folders:
            return self._folders[name]
        found = re.search(r"(?:train|val|test)\d{4}", name)
        if found:
            return found.group(0)
        raise DataError(f"COCO image name {name!r} names no subset folder (like COCO_train2014_...) and its line in "
                        f"{self.list_path} gives none (like val2017/{name})")

    def image_path(self, name: str) -> Path:
        if self.layout == "folder":
            return self._files[name]
        if self.layout == "voc":
            return self.root / "JPEGImages" / f"{name}.jpg"
        return self.root / "JPEGImages" / self._subset(name) / f"{name}.jpg"

    def mask_path(self, name: str) -> Path:
        if self.layout == "folder":
            return (self.masks or self.root / "masks") / f"{name}.png"
        if self.layout == "voc":
            return self.root / "SegmentationClassAug" / f"{name}.png"
        return self.root / "SegmentationClass" / self._subset(name) / f"{name}.png"

    def check_images(self, names: list[str] | None = None, min_side: int = 1) -> None:
        """Decode every image of ``names`` (default: the split) and raise one DataError naming each one that is
        unreadable or has a side shorter than ``min_side`` pixels; what would otherwise fail mid-run, found now."""
        problems = []
        for name in tqdm(names if names is not None else self.names, desc=f"checking {self.split} images",
                         leave=False, disable=len(names or self.names) < 500):
            path = self.image_path(name)
            try:
                w, h = read_image(path).size
            except DataError as err:
                problems.append(str(err))
                continue
            if min(w, h) < min_side:
                problems.append(f"image {path} is {w}x{h}: a side under {min_side} px gives the model no token at "
                                "its smallest scale")
        if problems:
            more = f"\n  (and {len(problems) - 10} more)" if len(problems) > 10 else ""
            raise DataError(f"{len(problems)} image(s) of {self.list_path} cannot be evaluated:\n  "
                            + "\n  ".join(problems[:10]) + more)

    def _class_pixel_counts(self) -> np.ndarray:
        # the key covers the list, the class count and every mask's size and modification time: regenerated or
        # edited masks give new labels, never stale cached ones
        digest = hashlib.sha1(f"{self.list_path.resolve()}|{self.num_classes}|v2|".encode())
        digest.update(self.list_path.read_bytes())
        for name in self.names:
            st = self.mask_path(name).stat()
            digest.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode())
        key = digest.hexdigest()[:16]
        file_name = f"labels_{self.layout}_{self.split}_{key}.npy"
        candidates = [self.root / ".fastwsss_cache", Path.home() / ".cache" / "fastwsss"]
        for d in candidates:
            if (d / file_name).is_file():
                counts = np.load(d / file_name)
                if counts.shape == (len(self.names), self.num_classes):
                    return counts
        counts = np.zeros((len(self.names), self.num_classes), dtype=np.int64)
        for i, name in enumerate(tqdm(self.names, desc=f"labels from masks ({self.split})", leave=False,
                                      disable=len(self.names) < 2000)):
            path = self.mask_path(name)
            hist = np.bincount(read_mask(path).ravel(), minlength=256)
            bad = np.nonzero(hist[self.num_classes:IGNORE_INDEX])[0] + self.num_classes
            if bad.size:
                raise DataError(f"mask {path} holds class values {bad.tolist()} >= data.num_classes="
                                f"{self.num_classes} (only 0..{self.num_classes - 1} and {IGNORE_INDEX} allowed)")
            counts[i] = hist[: self.num_classes]
        def save(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to the temporary's name
                np.save(f, counts)

        for d in candidates:  # first writable location wins; atomic so a killed scan never leaves half a file
            try:
                atomic_write(d / file_name, save)  # readable by whoever may read the root (the umask's mode)
                break
            except OSError:
                continue
        return counts


class TrainDataset(Dataset):
    """Augmented training samples. Indexed by ``(index, position)``: every random choice of a sample is drawn from a
    generator seeded by ``(seed, position)`` (position = samples drawn so far), so a run and its resumption see the
    same data. ``views(image, rng)`` makes the sample's tensors (``img``, ``img_box`` and whatever else the method
    trains on, e.g. ``transforms.CropViews``); the dataset adds ``name``, ``position`` and ``cls_label``."""

    def __init__(self, items: SegmentationList, views: Callable[[Image.Image, np.random.Generator], dict], seed: int):
        self.items, self.views, self.seed = items, views, seed

    def __len__(self) -> int:
        return len(self.items.names)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, position = key
        name = self.items.names[index]
        rng = np.random.default_rng([self.seed, position])
        image = read_image(self.items.image_path(name))
        return {"name": name, "position": position,
                "cls_label": torch.from_numpy(self.items.cls_labels[index].astype(np.float32)), **self.views(image, rng)}


class EvalDataset(Dataset):
    """Images at native resolution with their ground-truth masks."""

    def __init__(self, items: SegmentationList, max_images: int = 0):
        self.items = items
        self.size = len(items.names) if max_images <= 0 else min(max_images, len(items.names))
        missing = [n for n in items.names[:self.size] if not items.mask_path(n).is_file()]
        if missing:  # found now, not in a loader worker
            where = " (data.masks: a folder of <name>.png)" if items.layout == "folder" else ""
            raise DataError(f"split {items.split!r} cannot be evaluated: {len(missing)} of its {self.size} images have "
                            f"no mask, e.g. {items.mask_path(missing[0])}{where}")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        name = self.items.names[index]
        raw = np.array(read_image(self.items.image_path(name)), dtype=np.uint8)
        mask = read_mask(self.items.mask_path(name))
        if mask.shape != raw.shape[:2]:
            raise DataError(f"mask {self.items.mask_path(name)} is {mask.shape}, its image is {raw.shape[:2]}")
        return {
            "name": name,
            "img": torch.from_numpy(normalize(raw)),  # [3, H, W]
            "raw": torch.from_numpy(raw),  # [H, W, 3] uint8
            "mask": torch.from_numpy(mask.astype(np.int64)),  # [H, W]
            "cls_label": torch.from_numpy(self.items.cls_labels[index].astype(np.float32)),
        }


class ResumableSampler(Sampler):
    """Endless stream of ``(index, position)``: epoch e is a permutation seeded by (seed, e); starting at
    ``start`` (samples already drawn) continues the exact stream of an interrupted run.

    Many processes: the global stream is cut into chunks of ``chunk`` positions dealt in turn to the ``world_size``
    ranks; this rank yields its chunks only. With chunk = global batch / (world size x micro-batches), the ranks'
    batches of a step are exactly the one-process batch's samples, whatever the number of processes."""

    def __init__(self, size: int, seed: int, start: int = 0, *, chunk: int = 1, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.start = size, seed, start
        self.chunk, self.rank, self.world_size = chunk, rank, world_size

    def __iter__(self):
        position = self.start
        while True:
            epoch, offset = divmod(position, self.size)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            for i in order[offset:]:
                if (position // self.chunk) % self.world_size == self.rank:
                    yield int(i), position
                position += 1


__all__ = [
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataError",
    "EvalDataset",
    "ResumableSampler",
    "SegmentationList",
    "TrainDataset",
    "read_image",
    "read_mask",
]

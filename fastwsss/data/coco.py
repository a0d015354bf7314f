"""COCO's official instance annotations -> the VOC-style class-index masks that the ``coco`` layout reads.

    python -m fastwsss.data.coco --annotations instances_train2014.json --annotations instances_val2014.json \\
        --root data/coco [--workers N] [--val-part 5000] [--crowd category|ignore] [--keep-unannotated]

Writes, for each annotation file of subset S (``train2014``, ``val2017``, ...; split ``train`` / ``val``):
``<root>/SegmentationClass/S/<name>.png`` (palette PNGs of class indices), the split list ``ImageSets/<split>.txt``,
``ImageSets/<split>_unannotated.txt``, ``ImageSets/val_part.txt`` (from the val split) and ``<root>/classes.txt``.
The rules (docs/data.md):

- classes: the JSON's categories in ascending id become 1..K (COCO's 80 ids 1..90 -> 1..80, as MCC's converter),
  background 0; ``classes.txt`` holds ``background`` then the category names in that order. Any set of ids is taken
  (K <= 254), mapped the same way; train with ``data.num_classes=K+1``.
- overlaps: a pixel belongs to the first annotation, in the JSON's order, that covers it (the reference converter's
  ``mask += (mask == 0) * m * c``).
- crowd regions (``iscrowd=1``): ``category`` (default, the reference) treats one as one more annotation of its
  class, in the JSON's order; ``ignore`` labels the instances first and then sets the crowd pixels no instance
  covers to 255.
- decoding is pycocotools' ``annToRLE`` (``frPyObjects`` + ``merge`` for polygons, ``frPyObjects`` for uncompressed
  RLE, compressed RLE as is) and ``decode``.
- an image without annotations gets an all-background mask and is listed in ``<split>_unannotated.txt``; the split
  list leaves it out unless ``keep_unannotated`` (the reference's lists: 82081 train / 40137 val of 82783 / 40504).
- ``val_part.txt``: the first N names of the sorted val list (ToCo's ``val_part.txt`` is the first 5000).

Resumable: a mask already on disk is kept (``overwrite`` remakes them); every file is written atomically; the
settings and the annotation files' digests are recorded in ``<root>/.fastwsss_coco.json`` so that a rerun with other
settings or another file is refused instead of mixing masks of both.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .. import version_string
from ..files import DirLock, DirLockedError, atomic_write, remove_stale_temps
from ..visualize import voc_palette
from .datasets import IGNORE_INDEX, DataError

try:
    from pycocotools import mask as mask_utils
except ImportError:  # an optional dependency: the `coco` extra
    mask_utils = None

log = logging.getLogger("fastwsss")

CROWD_MODES = ("category", "ignore")
MANIFEST = ".fastwsss_coco.json"
VAL_PART = 5000  # ToCo evaluates during training on the first 5000 val images (its datasets/coco/val_part.txt)
MAX_CATEGORIES = IGNORE_INDEX - 1  # 1..254: 0 is background, 255 ignore
CHUNK = 32  # images per task of the process pool
SUBSET_NAME = re.compile(r"((?:train|val|test)\d{4})")  # what the coco layout reads off an image name


class CocoError(DataError):
    pass


@dataclass
class Subset:
    """One annotation file, parsed and checked: its images and, per image, its annotations in the JSON's order."""

    name: str  # the folder: train2014, val2017, ...
    split: str  # the list: train, val, ...
    path: Path
    digest: str
    categories: list[tuple[int, str]]  # (id, name), ascending id
    images: list[tuple[str, int, int]] = field(default_factory=list)  # (name, height, width), sorted by name
    annotations: dict[str, list[tuple[int, bool, object]]] = field(default_factory=dict)  # name -> (id, crowd, seg)
    num_empty: int = 0  # polygon annotations without a part of 3 points or more (they cover nothing)
    num_crowd: int = 0

    def list_line(self, name: str) -> str:
        """The split-list line of an image: its name where the name carries its folder (2014's
        ``COCO_train2014_...``), else ``<folder>/<name>`` (2017's ``val2017/000000000139``)."""
        found = SUBSET_NAME.search(name)
        return name if found and found.group(1) == self.name else f"{self.name}/{name}"


def _problems(kind: str, items: Sequence[str], path: Path, limit: int = 10) -> str:
    more = f"\n  (and {len(items) - limit} more)" if len(items) > limit else ""
    return f"{path}: {len(items)} {kind}:\n  " + "\n  ".join(items[:limit]) + more


def subset_of(path: Path, images: list[dict]) -> str:
    """The subset an annotation file holds: ``instances_<subset>.json`` (``instances_val2017.json`` -> ``val2017``),
    else the ``<split><year>`` its file name or its images' names carry."""
    stem = path.name.removesuffix(".json")
    if stem.startswith("instances_") and len(stem) > len("instances_"):
        return stem.removeprefix("instances_")
    for text in (stem, *(str(im.get("file_name", "")) for im in images[:1])):
        found = SUBSET_NAME.search(text)
        if found:
            return found.group(1)
    raise CocoError(f"cannot tell which subset {path} holds: name it instances_<subset>.json (e.g. "
                    f"instances_train2014.json) or pass --annotations <subset>={path}")


def split_of(subset: str) -> str:
    """The split list a subset goes to: its name without the year (``train2014`` -> ``train``)."""
    return re.sub(r"\d{4}$", "", subset) or subset


def _digest(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _is_polygon(part) -> bool:
    """A list of (x, y) pairs of finite numbers (bools are no numbers). Fast: this runs on every polygon of the
    file, in the main process."""
    return type(part) is list and not len(part) % 2 and set(map(type, part)) <= {int, float} and \
        math.isfinite(sum(part))


def _segmentation_problem(seg, h: int, w: int) -> str | None:
    """Why ``seg`` is not a polygon list or an RLE of an h x w image (None if it is one)."""
    if isinstance(seg, list):
        if not all(map(_is_polygon, seg)):
            return "a polygon must be a list of (x, y) pairs of numbers"
        return None
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if list(seg["size"]) != [h, w]:
            return f"RLE size {seg['size']} is not the image's [height, width] = [{h}, {w}]"
        counts = seg["counts"]
        if isinstance(counts, list):
            if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts) or sum(counts) != h * w:
                return f"uncompressed RLE counts must be non-negative ints summing to height*width = {h * w}"
            return None
        if isinstance(counts, (str, bytes)):
            return None
        return "RLE counts must be a list of ints (uncompressed) or a string (compressed)"
    return "segmentation must be a list of polygons or an RLE {counts, size}"


def load_annotations(path: str | os.PathLike, subset: str | None = None) -> Subset:
    """Parse and check one instances JSON; every problem of one kind is reported at once (the first ten)."""
    path = Path(path)
    if not path.is_file():
        raise CocoError(f"annotation file not found: {path}")
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise CocoError(f"{path} is not valid JSON: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CocoError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise CocoError(f"{path}: a COCO annotation file is a JSON object, got {type(data).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise CocoError(f"{path}: not a COCO instances file: no list {', '.join(repr(k) for k in missing)}")

    bad = []
    categories: dict[int, str] = {}
    for i, cat in enumerate(data["categories"]):
        cid = cat.get("id") if isinstance(cat, dict) else None
        name = cat.get("name") if isinstance(cat, dict) else None
        if not isinstance(cid, int) or isinstance(cid, bool) or not isinstance(name, str) or not name.strip() \
                or "\n" in name:
            bad.append(f"categories[{i}] = {cat!r}: needs an int 'id' and a 'name' (one line of text)")
        elif cid in categories:
            bad.append(f"categories[{i}]: id {cid} appears twice")
        else:
            categories[cid] = name.strip()
    if bad:
        raise CocoError(_problems("bad category entries", bad, path))
    if not categories or len(categories) > MAX_CATEGORIES:
        raise CocoError(f"{path}: {len(categories)} categories; 1..{MAX_CATEGORIES} fit a class-index PNG "
                        f"(0 background, {IGNORE_INDEX} ignore)")

    images: dict[int, tuple[str, int, int]] = {}
    names = set()
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict):
            bad.append(f"images[{i}] is {type(im).__name__}, not an object")
            continue
        iid, file_name, h, w = im.get("id"), im.get("file_name"), im.get("height"), im.get("width")
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (iid, h, w)) and isinstance(file_name, str)
        if not ok or h <= 0 or w <= 0 or not file_name.strip():
            bad.append(f"images[{i}] (id {iid!r}): needs an int 'id', a 'file_name' and positive int 'height', "
                       "'width'")
            continue
        name = Path(file_name).stem
        if iid in images:
            bad.append(f"images[{i}]: id {iid} appears twice")
        elif name in names:
            bad.append(f"images[{i}]: file name {file_name!r} appears twice")
        else:
            images[iid] = (name, h, w)
            names.add(name)
    if bad:
        raise CocoError(_problems("bad image(s)", bad, path))

    subset = subset or subset_of(path, data["images"])
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", subset):
        raise CocoError(f"subset name {subset!r} (of {path}) must be a plain folder name")
    out = Subset(subset, split_of(subset), path, _digest(path), sorted(categories.items()),
                 sorted(images.values()))
    unknown_image, unknown_cat = [], []
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "segmentation" not in ann:
            bad.append(f"annotations[{i}]: needs 'image_id', 'category_id' and 'segmentation'")
            continue
        aid = ann.get("id", f"#{i}")
        image = images.get(ann.get("image_id"))
        if image is None:
            unknown_image.append(f"annotation {aid}: image_id {ann.get('image_id')!r}")
            continue
        if ann.get("category_id") not in categories:
            unknown_cat.append(f"annotation {aid}: category_id {ann.get('category_id')!r}")
            continue
        name, h, w = image
        seg = ann["segmentation"]
        problem = _segmentation_problem(seg, h, w)
        if problem:
            bad.append(f"annotation {aid} (image {name}): {problem}")
            continue
        crowd = bool(ann.get("iscrowd", 0))
        out.num_crowd += crowd
        if isinstance(seg, list) and not any(len(part) >= 6 for part in seg):
            out.num_empty += 1
        out.annotations.setdefault(name, []).append((ann["category_id"], crowd, seg))
    if unknown_image:
        raise CocoError(_problems("annotation(s) of images not in 'images'", unknown_image, path))
    if unknown_cat:
        raise CocoError(_problems(f"annotation(s) of categories not in 'categories' ({sorted(categories)})",
                                  unknown_cat, path))
    if bad:
        raise CocoError(_problems("bad annotation(s)", bad, path))
    return out


def category_values(categories: Sequence[tuple[int, str]]) -> dict[int, int]:
    """Category id -> class index: ascending ids become 1..K."""
    return {cid: i for i, cid in enumerate(sorted(cid for cid, _ in categories), start=1)}


def decode(seg, h: int, w: int) -> np.ndarray:
    """One annotation's segmentation -> a bool mask [h, w] (column-major, as pycocotools decodes), as pycocotools'
    ``COCO.annToMask``."""
    if isinstance(seg, list):
        # a part of under 3 points covers nothing (pycocotools rasterizes it to nothing, or reads a first part of 2
        # points as a box and fails)
        parts = [p for p in seg if len(p) >= 6]
        if not parts:
            return np.zeros((h, w), dtype=bool, order="F")
        rle = mask_utils.merge(mask_utils.frPyObjects(parts, h, w))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = seg
    return mask_utils.decode(rle).view(bool)  # 0 / 1 bytes


def rasterize(h: int, w: int, annotations: Iterable[tuple[int, bool, object]], crowd: str = "category") -> np.ndarray:
    """Class-index mask [h, w] uint8 of one image from its ``(class index, is crowd, segmentation)`` in the JSON's
    order: each pixel takes the first annotation covering it; with ``crowd="ignore"``, crowd regions are left out of
    that and then mark the pixels still background as 255."""
    mask = np.zeros((h, w), dtype=np.uint8, order="F")  # the order pycocotools decodes in: no strided copies
    crowd_region = None
    for value, is_crowd, seg in reversed(list(annotations)):  # painted last to first: the first one stays on top
        m = decode(seg, h, w)
        if is_crowd and crowd == "ignore":
            crowd_region = m if crowd_region is None else crowd_region | m
        else:
            mask[m] = value
    if crowd_region is not None:
        mask[crowd_region & (mask == 0)] = IGNORE_INDEX
    return np.ascontiguousarray(mask)


_PALETTE = voc_palette().ravel().tolist()


def _png(mask: np.ndarray, path: Path) -> None:
    """A palette PNG of class indices (VOC colours), as ``visualize.palette_image``; zlib level 3 writes it about
    three times faster than PIL's default 6, for masks ~1.5x larger (a few kB)."""
    im = Image.fromarray(mask)
    im.putpalette(_PALETTE)
    im.save(path, format="PNG", compress_level=3)


def _write_masks(tasks: list[tuple[str, int, int, list]], crowd: str) -> list[str]:
    """A worker's chunk: (PNG path, height, width, annotations) -> written PNGs. Returns the paths written."""
    for path, h, w, anns in tasks:
        try:
            mask = rasterize(h, w, anns, crowd)
        except Exception as err:  # noqa: BLE001 - pycocotools raises bare Exceptions; name the image
            raise CocoError(f"cannot decode the annotations of {Path(path).stem}: {err}") from None
        atomic_write(path, lambda tmp, m=mask: _png(m, tmp))
    return [t[0] for t in tasks]


def _write_text(path: Path, text: str) -> bool:
    """Write ``text`` atomically unless the file already holds it. Returns whether it was written."""
    if path.is_file() and path.read_text() == text:
        return False
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return True


def _check_manifest(root: Path, subsets: list[Subset], crowd: str, overwrite: bool) -> dict:
    """The settings of earlier conversions into ``root``: refuse to mix masks made with other settings, another
    annotation file, or other categories (unless ``overwrite``). Returns the updated manifest."""
    path = root / MANIFEST
    try:
        old = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        old = {}
    categories = [list(c) for c in subsets[0].categories]
    manifest = {"format": 1, "categories": categories, "subsets": dict(old.get("subsets", {}))}
    problems = []
    if old.get("categories") not in (None, categories):
        problems.append(f"its classes.txt and masks were made from other categories ({len(old['categories'])})")
    for s in subsets:
        entry = {"annotations": str(s.path), "sha1": s.digest, "split": s.split, "crowd": crowd}
        before = manifest["subsets"].get(s.name)
        if before is not None and (before.get("sha1"), before.get("crowd")) != (s.digest, crowd):
            what = "another annotation file" if before.get("sha1") != s.digest else f"--crowd {before.get('crowd')}"
            problems.append(f"the {s.name} masks were made from {what} ({before.get('annotations')})")
        for other, e in manifest["subsets"].items():
            if other != s.name and e.get("split") == s.split:
                problems.append(f"its {s.split} list holds {other}, not {s.name}")
        manifest["subsets"][s.name] = entry
    if problems and not overwrite:
        raise CocoError(f"{root} was converted with other settings: " + "; ".join(problems)
                        + ". Use another --root, or --overwrite to remake the masks and lists")
    if overwrite:  # forget what this run replaces (and every other subset if the categories changed)
        names = {s.name for s in subsets}
        splits = {s.split for s in subsets}
        same_classes = old.get("categories") in (None, categories)
        manifest["subsets"] = {k: v for k, v in manifest["subsets"].items()
                               if k in names or (same_classes and v.get("split") not in splits)}
    return manifest


def convert(annotations: Sequence[str | os.PathLike | tuple[str, str | os.PathLike]], root: str | os.PathLike, *,
            workers: int = 0, val_part: int = VAL_PART, crowd: str = "category", keep_unannotated: bool = False,
            overwrite: bool = False, progress: bool = True) -> dict:
    """Convert instance annotation files (paths, or ``(subset, path)``) into ``root``; see the module docstring.
    ``workers``: processes (0 = this one). Returns what was done, per subset (the command prints it)."""
    if mask_utils is None:
        raise CocoError("the COCO converter needs pycocotools: pip install 'fastwsss[coco]' (or pycocotools)")
    if crowd not in CROWD_MODES:
        raise CocoError(f"crowd={crowd!r} is not one of {', '.join(CROWD_MODES)}")
    if val_part < 0 or workers < 0:
        raise CocoError("val_part and workers must be >= 0")
    if not annotations:
        raise CocoError("no annotation file given")
    root = Path(root)
    subsets = []
    for item in annotations:
        subset, path = item if isinstance(item, tuple) else (None, item)
        log.info("reading %s", path)
        subsets.append(load_annotations(path, subset))
    for s in subsets[1:]:
        if s.categories != subsets[0].categories:
            raise CocoError(f"{s.path} and {subsets[0].path} have different categories: one class list for both")
    for i, s in enumerate(subsets):
        for t in subsets[:i]:
            if s.name == t.name or s.split == t.split:
                raise CocoError(f"{t.path} and {s.path} both go to subset {s.name} / list {s.split}.txt: convert "
                                "them into different roots, or name the subsets (--annotations SUBSET=FILE)")
    cats = subsets[0].categories
    values = category_values(cats)
    if len(cats) != 80:
        log.warning("%d categories, not COCO's 80: ids %s are mapped in ascending order to 1..%d; train with "
                    "data.num_classes=%d", len(cats), [c for c, _ in cats], len(cats), len(cats) + 1)

    for s in subsets:
        _check_image_sizes(s, root, overwrite)

    t0 = time.time()
    summary: dict = {"root": str(root), "num_classes": len(cats) + 1, "crowd": crowd, "subsets": {}}
    with DirLock(root, "COCO conversion root"):
        manifest = _check_manifest(root, subsets, crowd, overwrite)
        _write_text(root / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        _write_text(root / "classes.txt", "".join(f"{n}\n" for n in ["background", *(name for _, name in cats)]))
        for s in subsets:
            summary["subsets"][s.name] = _convert_subset(s, root, values, workers=workers, crowd=crowd,
                                                         keep_unannotated=keep_unannotated, overwrite=overwrite,
                                                         progress=progress)
            if s.split == "val" and val_part > 0:
                lines = (root / "ImageSets" / "val.txt").read_text().splitlines()[:val_part]
                _write_text(root / "ImageSets" / "val_part.txt", "".join(f"{ln}\n" for ln in lines))
                summary["subsets"][s.name]["val_part"] = len(lines)
    summary["seconds"] = round(time.time() - t0, 2)
    return summary


def _check_image_sizes(s: Subset, root: Path, overwrite: bool) -> None:
    """Each image already in ``<root>/JPEGImages/<subset>`` whose mask is to be written must be the size the JSON
    says (a mask of another size only fails at the first evaluation). PIL reads the size from the file's header,
    without decoding it (tens of microseconds an image)."""
    image_dir, mask_dir = root / "JPEGImages" / s.name, root / "SegmentationClass" / s.name
    bad = []
    for name, h, w in tqdm(s.images, desc=f"{s.name} image sizes", unit="img", leave=False,
                           disable=len(s.images) < 5000, dynamic_ncols=True):
        if not overwrite and (mask_dir / f"{name}.png").is_file():
            continue
        path = image_dir / f"{name}.jpg"
        try:
            with Image.open(path) as im:
                size = im.size
        except FileNotFoundError:
            continue  # counted as missing and named after the conversion
        except (OSError, SyntaxError, ValueError) as err:
            bad.append(f"{path}: unreadable ({err})")
            continue
        if size != (w, h):
            bad.append(f"{path} is {size[0]}x{size[1]}, the JSON says width x height = {w}x{h}")
    if bad:
        raise CocoError(_problems(f"image(s) whose size is not the annotation file's (their masks would not fit "
                                  f"them; is JPEGImages/{s.name} the folder of these annotations?)", bad, s.path))


def _convert_subset(s: Subset, root: Path, values: dict[int, int], *, workers: int, crowd: str,
                    keep_unannotated: bool, overwrite: bool, progress: bool) -> dict:
    mask_dir = root / "SegmentationClass" / s.name
    mask_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(mask_dir)
    remove_stale_temps(root / "ImageSets")
    tasks = []
    for name, h, w in s.images:
        path = mask_dir / f"{name}.png"
        if overwrite or not path.is_file():
            anns = [(values[cid], crowd_flag, seg) for cid, crowd_flag, seg in s.annotations.get(name, ())]
            tasks.append((str(path), h, w, anns))
    chunks = [tasks[i:i + CHUNK] for i in range(0, len(tasks), CHUNK)]
    bar = tqdm(total=len(s.images), initial=len(s.images) - len(tasks), desc=f"{s.name} masks", unit="img",
               disable=not progress, dynamic_ncols=True)
    try:
        if workers == 0 or len(chunks) <= 1:
            for chunk in chunks:
                bar.update(len(_write_masks(chunk, crowd)))
        else:
            with ProcessPoolExecutor(min(workers, len(chunks))) as pool:
                futures = [pool.submit(_write_masks, chunk, crowd) for chunk in chunks]
                try:
                    for future in as_completed(futures):
                        bar.update(len(future.result()))
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    finally:
        bar.close()

    annotated = [name for name, _, _ in s.images if name in s.annotations]
    unannotated = [name for name, _, _ in s.images if name not in s.annotations]
    listed = [name for name, _, _ in s.images] if keep_unannotated else annotated
    lists = root / "ImageSets"
    _write_text(lists / f"{s.split}.txt", "".join(f"{s.list_line(n)}\n" for n in listed))
    _write_text(lists / f"{s.split}_unannotated.txt", "".join(f"{s.list_line(n)}\n" for n in unannotated))
    image_dir = root / "JPEGImages" / s.name
    missing = sum(not (image_dir / f"{n}.jpg").is_file() for n in listed)
    return {"annotations": str(s.path), "split": s.split, "images": len(s.images), "listed": len(listed),
            "unannotated": len(unannotated), "written": len(tasks), "kept": len(s.images) - len(tasks),
            "crowd_annotations": s.num_crowd, "empty_segmentations": s.num_empty, "missing_images": missing}


def _annotation_arg(text: str) -> str | tuple[str, str]:
    subset, sep, path = text.partition("=")
    return (subset, path) if sep and subset and not Path(text).is_file() else text


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m fastwsss.data.coco",
        description="Turn COCO's instances_<subset>.json files into the VOC-style class-index PNGs, split lists and "
                    "classes.txt of the coco layout (docs/data.md).")
    parser.add_argument("--annotations", action="append", required=True, type=_annotation_arg, metavar="[SUBSET=]FILE",
                        help="an instances JSON, e.g. instances_train2014.json; repeat for more. Its subset (the "
                             "folder: train2014) is read off the file name unless given as SUBSET=FILE")
    parser.add_argument("--root", required=True, help="dataset root (data.root), e.g. data/coco")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else os.cpu_count() or 1, help="processes (default: one per core; 0 = this process)")
    parser.add_argument("--val-part", type=int, default=VAL_PART,
                        help=f"images of ImageSets/val_part.txt, the first of the sorted val list (default {VAL_PART}, "
                             "ToCo's; 0 = none)")
    parser.add_argument("--crowd", choices=CROWD_MODES, default="category",
                        help="crowd regions: category = its class, first annotation wins (default, the reference); "
                             "ignore = 255 where no instance covers them")
    parser.add_argument("--keep-unannotated", action="store_true",
                        help="also list images without annotations in the split lists (all-background masks)")
    parser.add_argument("--overwrite", action="store_true", help="remake masks already written, and allow other "
                        "settings than an earlier conversion into --root")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--version", action="version", version=version_string())
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        summary = convert(args.annotations, args.root, workers=args.workers, val_part=args.val_part,
                          crowd=args.crowd, keep_unannotated=args.keep_unannotated, overwrite=args.overwrite,
                          progress=not args.quiet)
    except (DataError, DirLockedError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    for name, s in summary["subsets"].items():
        part = f", val_part.txt: {s['val_part']}" if "val_part" in s else ""
        print(f"{name}: {s['images']} images ({s['written']} masks written, {s['kept']} kept), "
              f"{s['split']}.txt: {s['listed']}, {s['split']}_unannotated.txt: {s['unannotated']}{part}; "
              f"{s['crowd_annotations']} crowd annotation(s)")
        if s["empty_segmentations"]:
            print(f"  {s['empty_segmentations']} annotation(s) with an empty segmentation (they cover nothing)")
        if s["missing_images"]:
            print(f"  {s['missing_images']} listed images are not in {Path(args.root) / 'JPEGImages' / name}: put "
                  f"(or link) COCO's {name} folder there, e.g. ln -s /path/to/coco/{name} "
                  f"{Path(args.root) / 'JPEGImages' / name}")
    print(f"{summary['root']}: classes.txt with {summary['num_classes']} classes (data.num_classes="
          f"{summary['num_classes']}); {summary['seconds']} s")
    return summary


if __name__ == "__main__":
    main()

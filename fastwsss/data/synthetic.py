"""Seeded synthetic weakly-supervised semantic segmentation dataset in PASCAL VOC (or COCO-2014) layout.

The generated dataset lets a training demo run through exactly the same loader as real VOC, while still posing a
genuine WSSS problem: a classifier trained only on image-level labels (the set of classes present) has to discover
*where* the objects are, and the dense masks are only used for evaluation.

Task design
-----------
* **Classes.** Six foreground classes (ids 1..6, 0 = background), see :data:`CLASS_NAMES`. A class is defined by
  its *shape* together with its *texture family*, never by colour:

  1. disk: filled circle, straight stripes;
  2. square: filled square, checkerboard;
  3. triangle: equilateral triangle, dot lattice;
  4. cross: plus sign, wavy stripes (stripes displaced by a sine along their length);
  5. ring: annulus whose hole shows the background, thin grid lines;
  6. star: five-point star, concentric circles around a slightly off-centre point.

  Texture periods are expressed relative to the object radius (with a floor of a few pixels so that they stay
  visible on small objects) and drawn from a class-specific range. Every object gets two random RGB colours, a light one
  (each channel in 150..255) for the pattern and a dark one (0..105) for the gaps, plus a mild random linear
  shading: the hue is random and independent of the class, so colour carries no class information, while the
  pattern is always light-on-dark, which keeps textures learnable from scratch within a CPU demo's budget. Each object also gets
  a random aspect-ratio jitter (±15 %) and a random rotation.
* **Layout.** 1-3 objects per image (classes mostly distinct, occasionally a repeated class), object extent
  (diameter) about 30 %-60 % of the short image side, drawn uniformly in area. Object centres lie anywhere in the
  central 90 % of the image, so objects near the border are partly cut off. Objects are painted in order, so **later
  objects occlude earlier ones**; the mask stores only the *visible* pixels of each object. Layouts in which an
  object keeps less than 40 % of its area (border clipping plus occlusion), or fewer than ~0.4 % of the image pixels,
  are rejected and re-drawn, so every labelled class is actually visible. Foreground covers ~15 % of the pixels on
  average (about 2-35 % per image).
* **Clutter.** The background (mask value 0) is a two-octave smooth random colour field (muted: channels 40..215), overlaid with thin random
  straight and curved lines and small irregular blobs, all in random colours, and finally per-pixel uniform noise
  on the whole image. Clutter is always untextured (solid colour) and its blobs are small, wobbly ellipses, so it
  never reproduces a class's shape+texture combination, but it does defeat "anything that is not smooth is
  foreground" shortcuts.
* **Masks.** Class-index PNGs (mode ``"P"`` with the standard VOC palette) with values in 0..6. No 255 ignore band is
  written: boundaries are exact (the object silhouettes are rasterised without anti-aliasing), so every pixel has a
  well-defined label. Image-level labels are simply the non-zero values present in a mask.

Every sample is rendered from its own generator ``np.random.default_rng([seed, split_id, index])`` (train = 0,
val = 1), so the output is byte-identical for any ``num_workers`` and any split sizes. Rendering is pure, vectorised
numpy (one bounding-box-sized array pass per object), a few milliseconds per 128x128 image including JPEG/PNG
encoding.
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import os
import pathlib
from typing import Literal

import numpy as np
from PIL import Image

from ..visualize import voc_palette

__all__ = ["CLASS_NAMES", "generate_dataset"]

CLASS_NAMES: tuple[str, ...] = ("background", "disk", "square", "triangle", "cross", "ring", "star")

FORMAT_VERSION = 2  # bump whenever the rendering changes: existing datasets are then regenerated
_MARKER_NAME = ".fastwsss_synthetic.json"
_SPLIT_IDS = {"train": 0, "val": 1}

# Layout: object extent (diameter) as a fraction of the short image side, and the visibility rule.
_SCALE_RANGE = (0.3, 0.6)
_CENTRE_MARGIN = 0.05
_MIN_VISIBLE_FRACTION = 0.4
_MIN_VISIBLE_PIXELS_FRACTION = 0.004
_MAX_LAYOUT_TRIES = 12
# Texture periods, in units of the object radius; never shorter than _MIN_PERIOD_PX pixels.
_MIN_PERIOD_PX = 4.0
# The light colour of each class's pattern where the colour cue applies (colour_cue > 0), classes 1..6: light red,
# green, blue, yellow, magenta, cyan; each object jitters it by up to _CUE_JITTER per channel.
_CUE_COLOURS = np.array([[255, 150, 150], [150, 255, 150], [150, 150, 255], [255, 255, 150], [255, 150, 255],
                         [150, 255, 255]], dtype=np.float32)
_CUE_JITTER = 20.0


def _shape_mask(cls: int, u: np.ndarray, v: np.ndarray, hole: float) -> np.ndarray:
    """Membership of object-local coordinates ``u, v`` (units of the object radius, any shape) in class ``cls``."""
    if cls == 1:  # disk
        return u * u + v * v <= 0.95**2
    if cls == 2:  # square
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75
    if cls == 3:  # equilateral triangle, circumradius 1.05 (inradius half of it), apex at +v
        h = 0.525
        s = math.sqrt(3.0) / 2.0
        return (v >= -h) & (s * u + 0.5 * v <= h) & (-s * u + 0.5 * v <= h)
    if cls == 4:  # plus sign
        au, av = np.abs(u), np.abs(v)
        arm, length = 0.32, 1.0
        return ((au <= arm) & (av <= length)) | ((av <= arm) & (au <= length))
    if cls == 5:  # annulus
        rho2 = u * u + v * v
        return (rho2 <= 1.0) & (rho2 >= hole * hole)
    if cls == 6:  # five-point star, outer radius 1, inner radius 0.45
        rho = np.sqrt(u * u + v * v)
        sector = 2.0 * math.pi / 5.0
        beta = np.abs(np.mod(np.arctan2(v, u) + sector / 2.0, sector) - sector / 2.0)
        px, py = rho * np.cos(beta), rho * np.sin(beta)
        bx, by = 0.45 * math.cos(sector / 2.0), 0.45 * math.sin(sector / 2.0)
        return (bx - 1.0) * py - by * (px - 1.0) >= 0.0
    raise ValueError(f"unknown class id {cls}")


def _texture(cls: int, u: np.ndarray, v: np.ndarray, radius_px: float, rng: np.random.Generator) -> np.ndarray:
    """Binary texture pattern of class ``cls`` at local coordinates ``u, v``; shape of ``u``, dtype bool."""
    floor = _MIN_PERIOD_PX / radius_px

    def period(lo: float, hi: float) -> float:
        return max(float(rng.uniform(lo, hi)), floor)

    def rotated(lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
        a = float(rng.uniform(lo, hi))
        c, s = math.cos(a), math.sin(a)
        return c * u + s * v, -s * u + c * v

    def frac(x: np.ndarray) -> np.ndarray:
        return x - np.floor(x)

    if cls == 1:  # straight stripes
        p, duty = period(0.3, 0.5), float(rng.uniform(0.4, 0.6))
        tu, _ = rotated(-math.pi / 4, math.pi / 4)
        return frac(tu / p + rng.uniform()) < duty
    if cls == 2:  # checkerboard
        p = period(0.28, 0.45)
        tu, tv = rotated(0.0, math.pi / 2)
        ph = rng.uniform(size=2)
        return (np.floor(tu / p + ph[0]) + np.floor(tv / p + ph[1])) % 2 == 0
    if cls == 3:  # dot lattice
        p, rd = period(0.3, 0.45), float(rng.uniform(0.25, 0.35))
        tu, tv = rotated(0.0, math.pi / 2)
        ph = rng.uniform(size=2)
        fu, fv = frac(tu / p + ph[0]) - 0.5, frac(tv / p + ph[1]) - 0.5
        return fu * fu + fv * fv < rd * rd
    if cls == 4:  # wavy stripes
        p = period(0.3, 0.45)
        amp, wavelength = float(rng.uniform(0.08, 0.16)), float(rng.uniform(0.6, 1.0))
        tu, tv = rotated(-math.pi / 4, math.pi / 4)
        ph = rng.uniform(size=2)
        return frac((tu + amp * np.sin(2.0 * math.pi * (tv / wavelength + ph[0]))) / p + ph[1]) < 0.5
    if cls == 5:  # grid lines
        p, width = period(0.3, 0.5), float(rng.uniform(0.2, 0.3))
        tu, tv = rotated(0.0, math.pi / 2)
        ph = rng.uniform(size=2)
        return (frac(tu / p + ph[0]) < width) | (frac(tv / p + ph[1]) < width)
    if cls == 6:  # concentric circles
        p = period(0.2, 0.35)
        off = rng.uniform(-0.2, 0.2, size=2)
        du, dv = u - off[0], v - off[1]
        return frac(np.sqrt(du * du + dv * dv) / p + rng.uniform()) < 0.5
    raise ValueError(f"unknown class id {cls}")


def _bilinear_field(rng: np.random.Generator, cells_y: int, cells_x: int, height: int, width: int) -> np.ndarray:
    """Smooth random colour field: a (cells_y+1, cells_x+1, 3) grid of random colours, bilinearly upsampled.

    Returns float32 (height, width, 3) in [0, 255].
    """
    grid = rng.integers(40, 216, size=(cells_y + 1, cells_x + 1, 3), dtype=np.uint8)
    field = Image.fromarray(grid).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(field, dtype=np.float32)


def _draw_background(rng: np.random.Generator, height: int, width: int, clutter: float = 1.0) -> np.ndarray:
    """Cluttered background, float32 (height, width, 3) in [0, 255]-ish; ``clutter`` scales the number of blobs and
    lines (1: 2-5 blobs and 3-7 lines; the random draws are the same for every value, only fewer are painted)."""
    short = min(height, width)
    coarse = _bilinear_field(rng, int(rng.integers(1, 4)), int(rng.integers(1, 4)), height, width)
    fine = _bilinear_field(rng, int(rng.integers(5, 10)), int(rng.integers(5, 10)), height, width)
    canvas = coarse + (fine - 127.5) * float(rng.uniform(20.0, 60.0) / 255.0)

    # Small irregular solid blobs: wobbly ellipses.
    blobs = int(rng.integers(2, 6))
    painted = round(clutter * blobs)
    for k in range(blobs):
        r = float(rng.uniform(0.03, 0.08)) * short
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        y0, y1 = max(int(cy - 1.4 * r), 0), min(int(cy + 1.4 * r) + 1, height)
        x0, x1 = max(int(cx - 1.4 * r), 0), min(int(cx + 1.4 * r) + 1, width)
        if y0 >= y1 or x0 >= x1:
            continue
        dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]
        dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]
        a = float(rng.uniform(0, math.pi))
        c, s = math.cos(a), math.sin(a)
        aspect = float(rng.uniform(0.5, 1.0))
        u, v = (c * dx + s * dy) / r, (-s * dx + c * dy) / (r * aspect)
        wob = rng.uniform(0.0, 0.2, size=2)
        phase = rng.uniform(0, 2 * math.pi, size=2)
        phi = np.arctan2(v, u)
        bound = 1.0 + wob[0] * np.cos(2 * phi + phase[0]) + wob[1] * np.cos(3 * phi + phase[1])
        inside = u * u + v * v <= bound * bound
        colour = rng.uniform(0, 255, size=3).astype(np.float32)
        if k < painted:
            canvas[y0:y1, x0:x1][inside] = colour

    # Thin lines: straight or quadratic Bezier curves, 1-2 px wide, endpoints possibly outside the image.
    lines = int(rng.integers(3, 8))
    painted = round(clutter * lines)
    for k in range(lines):
        pts = rng.uniform(-0.1, 1.1, size=(3, 2)) * np.array([height, width])
        if rng.uniform() < 0.5:
            pts[1] = 0.5 * (pts[0] + pts[2])
        length = float(np.hypot(*(pts[0] - pts[1])) + np.hypot(*(pts[1] - pts[2])))
        t = np.linspace(0.0, 1.0, int(1.5 * length) + 2)[:, None]
        curve = (1 - t) ** 2 * pts[0] + 2 * (1 - t) * t * pts[1] + t**2 * pts[2]
        ys, xs = curve[:, 0].astype(np.int64), curve[:, 1].astype(np.int64)
        if rng.uniform() < 0.4:
            ys, xs = np.concatenate([ys, ys + 1]), np.concatenate([xs, xs])
        keep = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
        colour = rng.uniform(0, 255, size=3).astype(np.float32)
        if k < painted:
            canvas[ys[keep], xs[keep]] = colour
    return canvas


class _Object:
    """One placed object: class, bounding box (clipped to the image) and its local coordinates / mask there."""

    __slots__ = ("box", "cls", "full_area", "mask", "radius", "u", "v")

    def __init__(self, rng: np.random.Generator, cls: int, height: int, width: int) -> None:
        short = min(height, width)
        self.cls = cls
        lo, hi = _SCALE_RANGE  # uniform in area, not in diameter
        self.radius = 0.5 * math.sqrt(float(rng.uniform(lo * lo, hi * hi))) * short
        cy = float(rng.uniform(_CENTRE_MARGIN, 1.0 - _CENTRE_MARGIN)) * height
        cx = float(rng.uniform(_CENTRE_MARGIN, 1.0 - _CENTRE_MARGIN)) * width
        angle = float(rng.uniform(0.0, 2.0 * math.pi))
        aspect = float(rng.uniform(0.85, 1.15))
        hole = float(rng.uniform(0.45, 0.6))
        r = self.radius
        ext = 1.25 * r  # covers the shape for any rotation and aspect jitter
        fy0, fy1 = math.floor(cy - ext), math.ceil(cy + ext)
        fx0, fx1 = math.floor(cx - ext), math.ceil(cx + ext)
        dy = (np.arange(fy0, fy1, dtype=np.float32) + 0.5 - cy)[:, None]
        dx = (np.arange(fx0, fx1, dtype=np.float32) + 0.5 - cx)[None, :]
        c, s = math.cos(angle), math.sin(angle)
        u = (c * dx + s * dy) / (r * aspect)
        v = (-s * dx + c * dy) * (aspect / r)
        full = _shape_mask(cls, u, v, hole)
        self.full_area = int(full.sum())
        y0, y1, x0, x1 = max(fy0, 0), min(fy1, height), max(fx0, 0), min(fx1, width)
        self.box = (y0, y1, x0, x1)
        sl = (slice(y0 - fy0, max(y1 - fy0, y0 - fy0)), slice(x0 - fx0, max(x1 - fx0, x0 - fx0)))
        self.u, self.v, self.mask = u[sl], v[sl], full[sl]


def _sample_classes(rng: np.random.Generator) -> list[int]:
    count = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    classes = [int(c) + 1 for c in rng.permutation(len(CLASS_NAMES) - 1)[:count]]
    for k in range(1, count):
        if rng.uniform() < 0.1:
            classes[k] = classes[int(rng.integers(0, k))]
    return classes


def _layout(rng: np.random.Generator, height: int, width: int) -> list[_Object]:
    """Place 1-3 objects such that each keeps enough visible pixels after border clipping and occlusion."""
    classes = _sample_classes(rng)
    min_pixels = max(12, int(_MIN_VISIBLE_PIXELS_FRACTION * height * width))
    while True:
        for _ in range(_MAX_LAYOUT_TRIES):
            objects = [_Object(rng, c, height, width) for c in classes]
            owner = np.zeros((height, width), dtype=np.uint8)
            for k, obj in enumerate(objects, start=1):
                y0, y1, x0, x1 = obj.box
                owner[y0:y1, x0:x1][obj.mask] = k
            visible = np.bincount(owner.ravel(), minlength=len(objects) + 1)[1:]
            if all(
                vis >= min_pixels and vis >= _MIN_VISIBLE_FRACTION * obj.full_area
                for vis, obj in zip(visible, objects, strict=True)
            ):
                return objects
        if len(classes) == 1:
            return objects  # practically unreachable; keep whatever is visible
        classes = classes[:-1]


def _render(rng: np.random.Generator, height: int, width: int, clutter: float = 1.0,
            colour_cue: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Render one sample. Returns image uint8 (height, width, 3) and class-index mask uint8 (height, width).
    ``colour_cue``: the probability that an object's light colour is its class's (jittered) instead of random; 0
    draws nothing more, so the images are those of the default data."""
    canvas = _draw_background(rng, height, width, clutter)
    label = np.zeros((height, width), dtype=np.uint8)
    for obj in _layout(rng, height, width):
        colours = np.stack([rng.uniform(150.0, 255.0, size=3), rng.uniform(0.0, 105.0, size=3)]).astype(np.float32)
        if colour_cue > 0 and rng.uniform() < colour_cue:
            jitter = rng.uniform(-_CUE_JITTER, _CUE_JITTER, size=3).astype(np.float32)
            colours[0] = np.clip(_CUE_COLOURS[obj.cls - 1] + jitter, 130.0, 255.0)
        y0, y1, x0, x1 = obj.box
        pattern = _texture(obj.cls, obj.u, obj.v, obj.radius, rng)
        a = float(rng.uniform(0.0, 2.0 * math.pi))
        shade = 1.0 + float(rng.uniform(0.0, 0.2)) * (math.cos(a) * obj.u + math.sin(a) * obj.v)
        texel = np.where(pattern[..., None], colours[0], colours[1]) * shade[..., None]
        canvas[y0:y1, x0:x1][obj.mask] = texel[obj.mask]
        label[y0:y1, x0:x1][obj.mask] = obj.cls
    canvas += (rng.random(size=canvas.shape, dtype=np.float32) - 0.5) * float(rng.uniform(6.0, 24.0))
    image = np.clip(canvas + 0.5, 0.0, 255.0).astype(np.uint8)
    return image, label


def _sample_name(layout: str, split: str, index: int) -> str:
    if layout == "voc":
        return f"syn_{split}_{index:06d}"
    return f"COCO_{split}2014_{index:012d}"


def _sample_dirs(root: pathlib.Path, layout: str, split: str) -> tuple[pathlib.Path, pathlib.Path]:
    """(image directory, mask directory) of one split."""
    if layout == "voc":
        return root / "JPEGImages", root / "SegmentationClassAug"
    return root / "JPEGImages" / f"{split}2014", root / "SegmentationClass" / f"{split}2014"


def _list_path(root: pathlib.Path, layout: str, split: str) -> pathlib.Path:
    if layout == "voc":
        return root / "ImageSets" / "Segmentation" / ("train_aug.txt" if split == "train" else "val.txt")
    return root / "ImageSets" / f"{split}.txt"


def _write_sample(task: tuple[str, int], *, root: str, layout: str, height: int, width: int, seed: int,
                  clutter: float, colour_cue: float) -> None:
    split, index = task
    image, label = _render(np.random.default_rng([seed, _SPLIT_IDS[split], index]), height, width, clutter,
                           colour_cue)
    image_dir, mask_dir = _sample_dirs(pathlib.Path(root), layout, split)
    name = _sample_name(layout, split, index)
    Image.fromarray(image).save(image_dir / f"{name}.jpg", format="JPEG", quality=95, subsampling=0)
    mask = Image.fromarray(label)
    mask.putpalette(voc_palette().ravel().tolist())
    mask.save(mask_dir / f"{name}.png", format="PNG")


def _normalise_size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)):
        height = width = int(image_size)
    else:
        height, width = (int(s) for s in image_size)
    if min(height, width) < 16:
        raise ValueError(f"image_size must be at least 16 pixels per side, got {image_size!r}")
    return height, width


def generate_dataset(
    root: str | os.PathLike,
    *,
    num_train: int,
    num_val: int,
    image_size: int | tuple[int, int] = 128,
    seed: int = 0,
    layout: Literal["voc", "coco"] = "voc",
    num_workers: int = 0,
    clutter: float = 1.0,
    colour_cue: float = 0.0,
) -> pathlib.Path:
    """Write the synthetic dataset under ``root`` and return ``root`` as a path.

    ``image_size`` is an int (square) or ``(height, width)``. ``layout="voc"`` writes ``JPEGImages/*.jpg``,
    ``SegmentationClassAug/*.png`` and ``ImageSets/Segmentation/{train_aug,val}.txt`` with names ``syn_train_000000``;
    ``layout="coco"`` writes ``JPEGImages/{train,val}2014/*.jpg``, ``SegmentationClass/{train,val}2014/*.png`` and
    ``ImageSets/{train,val}.txt`` with names ``COCO_train2014_000000000000``. Both write ``classes.txt``.

    Idempotent: the marker ``root/.fastwsss_synthetic.json`` (all output-determining parameters plus a format
    version) is written last; if it already holds identical parameters nothing is written. Otherwise the marker is
    removed first and everything is regenerated (files of an earlier generation that are not overwritten are left
    in place, but are not listed in the split files). ``num_workers > 0`` renders with a process pool; the output is
    byte-identical for every ``num_workers``, so it is not part of the marker. ``clutter`` (>= 0) scales how many
    background blobs and lines are painted (1: the default data; 0: a smooth, noisy background). ``colour_cue`` (in
    [0, 1]) is the probability that an object's light colour is its class's (0: the default data, colour carries no
    class information; 1: every object's class shows in its colour too).
    """
    if layout not in ("voc", "coco"):
        raise ValueError(f"layout must be 'voc' or 'coco', got {layout!r}")
    if num_train < 0 or num_val < 0:
        raise ValueError("num_train and num_val must be non-negative")
    if num_workers < 0:
        raise ValueError("num_workers must be non-negative")
    if not clutter >= 0:
        raise ValueError(f"clutter must be >= 0, got {clutter!r}")
    if not 0 <= colour_cue <= 1:
        raise ValueError(f"colour_cue must be in [0, 1], got {colour_cue!r}")
    height, width = _normalise_size(image_size)
    root = pathlib.Path(root)
    marker_path = root / _MARKER_NAME
    params = {
        "format_version": FORMAT_VERSION,
        "generator": "fastwsss.data.synthetic",
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": [height, width],
        "seed": int(seed),
        "layout": layout,
        **({"clutter": float(clutter)} if clutter != 1.0 else {}),  # the default's marker as before: no regeneration
        **({"colour_cue": float(colour_cue)} if colour_cue else {}),
    }
    try:
        if json.loads(marker_path.read_text()) == params:
            return root
    except (OSError, ValueError):
        pass

    marker_path.unlink(missing_ok=True)
    splits = {"train": int(num_train), "val": int(num_val)}
    for split in splits:
        for directory in (*_sample_dirs(root, layout, split), _list_path(root, layout, split).parent):
            directory.mkdir(parents=True, exist_ok=True)

    tasks = [(split, index) for split, count in splits.items() for index in range(count)]
    write = functools.partial(_write_sample, root=str(root), layout=layout, height=height, width=width, seed=seed,
                              clutter=float(clutter), colour_cue=float(colour_cue))
    if num_workers == 0 or len(tasks) <= 1:
        for task in tasks:
            write(task)
    else:
        chunksize = max(1, len(tasks) // (8 * num_workers))
        with multiprocessing.get_context().Pool(num_workers) as pool:
            for _ in pool.imap_unordered(write, tasks, chunksize=chunksize):
                pass

    for split, count in splits.items():
        names = [_sample_name(layout, split, index) for index in range(count)]
        _list_path(root, layout, split).write_text("".join(f"{name}\n" for name in names))
    (root / "classes.txt").write_text("".join(f"{name}\n" for name in CLASS_NAMES))
    tmp = marker_path.with_name(marker_path.name + ".tmp")
    tmp.write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, marker_path)
    return root

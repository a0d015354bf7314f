"""Predictions for many images, written to a folder: segmentation masks (optionally after the dense CRF), colour
overlays, fused logits, a PNG grid, or PAR-refined pseudo labels; resumable, one image's failure reported and
skipped. ``python -m fastwsss.infer`` is the command (its docstring has the output layout)."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..config import Config
from ..data import IGNORE_INDEX, DataError, class_names, open_split, read_image
from ..data.transforms import normalize
from ..files import DirLock, atomic_write, remove_stale_temps
from ..methods import build_method
from ..pseudo import multiscale_cams
from ..runtime import ONE_PROCESS, Dist, all_gather_objects, broadcast_object, make_autocast, shard
from ..visualize import cam_tiles, colorize, heatmap, overlay, palette_image, save_grid
from .predict import make_crf_runner, multiscale_seg_logits

log = logging.getLogger("fastwsss")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


@dataclass
class ImageItem:
    name: str  # output name, "/"-separated, no suffix
    path: Path
    cls_label: np.ndarray | None = None  # [C-1] image-level labels (splits only; needed by --pseudo)


def list_images(source: str | Path) -> list[ImageItem]:
    """A folder (searched recursively for image suffixes) or a list file (one image path per line, relative to
    the list file's folder unless absolute; ``#`` starts a comment) -> items named by relative path / stem."""
    source = Path(source)
    if source.is_dir():
        unreadable: list[str] = []
        paths = sorted(Path(d) / f for d, _, files in os.walk(source, onerror=lambda e: unreadable.append(
            f"{e.filename} ({e.strerror})")) for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES)
        if unreadable:
            raise DataError(f"{len(unreadable)} folder(s) under {source} cannot be read, so their images would be "
                            f"left out: {'; '.join(unreadable[:5])}")
        # a broken symbolic link is listed (it fails as an unreadable image does, named in the summary), not dropped
        broken = [p for p in paths if p.is_symlink() and not p.exists()]
        if broken:
            log.warning("%d image(s) under %s are broken symbolic links (reported as failed): %s", len(broken),
                        source, ", ".join(f"{p} -> {os.readlink(p)}" for p in broken[:5]))
        items = [ImageItem(p.relative_to(source).with_suffix("").as_posix(), p) for p in paths
                 if p.is_file() or p in broken]
    elif source.is_file():
        lines = [ln.split("#", 1)[0].strip() for ln in source.read_text().splitlines()]
        paths = [Path(ln) if Path(ln).is_absolute() else source.parent / ln for ln in lines if ln]
        items = [ImageItem(p.stem, p) for p in paths]
    else:
        raise FileNotFoundError(f"--images: no such folder or list file: {source}")
    if not items:
        raise DataError(f"no images in {source} (suffixes {', '.join(IMAGE_SUFFIXES)})")
    seen: dict[str, Path] = {}
    clashes = []
    for it in items:
        if it.name in seen:
            clashes.append(f"{seen[it.name]} and {it.path}")
        seen[it.name] = it.path
    if clashes:
        raise DataError(f"{len(clashes)} image(s) in {source} would write the same output name: {'; '.join(clashes[:3])}")
    return items


def split_items(cfg: Config, split: str) -> list[ImageItem]:
    """The images of a split of ``cfg.data`` with their image-level labels."""
    sl = open_split(cfg.data, split)
    return [ImageItem(n, sl.image_path(n), sl.cls_labels[i]) for i, n in enumerate(sl.names)]


class ImageFiles(Dataset):
    """Decodes images in loader workers; a failure comes back as ``{"index", "error"}`` instead of raising."""

    def __init__(self, items: list[ImageItem]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path = self.items[index].path
        if path.is_symlink() and not path.exists():
            return {"index": index, "error": f"{path} is a broken symbolic link (to {os.readlink(path)})"}
        try:
            raw = np.array(read_image(path), dtype=np.uint8)
        except Exception as err:  # noqa: BLE001 -- PIL raises many types on bad files; reported, the rest go on
            return {"index": index, "error": str(err) if isinstance(err, DataError) else
                    f"cannot read image {self.items[index].path}: {type(err).__name__}: {err}"}
        return {"index": index, "raw": torch.from_numpy(raw), "img": torch.from_numpy(normalize(raw))}


def _save_png(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda p: image.save(p, format="PNG"))


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
        np.save(f, array)


class _Writer:
    """Writes one finished image's files (mask last) and collects the rows of the PNG grid."""

    def __init__(self, out: Path, *, overlay: bool, logits: str | None, num_vis: int, names: list[str]):
        self.out, self.overlay, self.logits, self.num_vis, self.names = out, overlay, logits, num_vis, names
        self.rows: list[list[np.ndarray]] = []
        self.captions: list[list[str]] = []

    def mask_path(self, name: str) -> Path:
        return self.out / "masks" / f"{name}.png"

    def __call__(self, name: str, raw: np.ndarray, label: np.ndarray, logits: torch.Tensor | None,
                 cams: np.ndarray | None) -> None:
        if self.overlay:
            rgb = overlay(raw, label, ignore_index=IGNORE_INDEX)
            _save_png(Image.fromarray(rgb), self.out / "overlays" / f"{name}.png")
        if self.logits is not None and logits is not None:
            half = logits.half().cpu()
            path = self.out / "logits" / f"{name}.{self.logits}"
            if self.logits == "npy":
                atomic_write(path, lambda p: _save_npy(p, half.numpy()))
            else:
                atomic_write(path, lambda p: torch.save(half, p))
        if len(self.rows) < self.num_vis and cams is not None:
            self._add_row(raw, label, cams)
        _save_png(palette_image(label), self.mask_path(name))

    def _add_row(self, raw: np.ndarray, label: np.ndarray, cams: np.ndarray) -> None:
        counts = np.bincount(label.ravel().astype(np.int64), minlength=256)[1:IGNORE_INDEX]
        classes = [int(c) + 1 for c in np.argsort(-counts)[:3] if counts[c] > 0 and c < len(cams)]
        if classes:
            tiles, caps = cam_tiles(raw, cams, classes, self.names)
        else:
            tiles, caps = [heatmap(cams.max(0), raw)], ["max CAM"]
        self.rows.append([raw, colorize(label), overlay(raw, label, ignore_index=IGNORE_INDEX), *tiles])
        self.captions.append(["image", "mask", "overlay", *caps])

    def save_grid(self) -> Path | None:
        if not self.rows:
            return None
        return save_grid(self.rows, self.out / "grid.png", captions=self.captions, min_size=160)


def run(cfg: Config, model: torch.nn.Module, items: list[ImageItem], out: str | Path, *, device: torch.device,
        pseudo: bool = False, crf: bool = False, overlay: bool = False, logits: str | None = None, num_vis: int = 0,
        overwrite: bool = False, info: dict | None = None, dist: Dist = ONE_PROCESS) -> dict:
    """Predict ``items`` into ``out`` (layout: module docstring); returns the summary (also ``out/summary.json``).

    Under torchrun (``dist``) the first process locks ``out`` and lists the images still to do; each process predicts
    a contiguous share of them and the summary adds up every process's (the grid shows the first process's)."""
    if pseudo and crf:
        raise ValueError("--pseudo writes PAR-refined CAM labels; --crf applies to segmentation only")
    if pseudo and any(it.cls_label is None for it in items):
        raise ValueError("--pseudo needs image-level labels: give --split (a split of the config's dataset)")
    if logits not in (None, "npy", "pt"):
        raise ValueError(f"logits={logits!r} is not one of npy, pt")
    with DirLock(out, "output folder") if dist.main else nullcontext():
        if dist.main:
            remove_stale_temps(out, recursive=True)
        return _run(cfg, model, items, Path(out), device=device, pseudo=pseudo, crf=crf, overlay=overlay,
                    logits=logits, num_vis=num_vis if dist.main else 0, overwrite=overwrite, info=info, dist=dist)


def _run(cfg: Config, model: torch.nn.Module, items: list[ImageItem], out: Path, *, device: torch.device,
         pseudo: bool, crf: bool, overlay: bool, logits: str | None, num_vis: int, overwrite: bool,
         info: dict | None, dist: Dist) -> dict:
    names = class_names(cfg.data)
    write = _Writer(out, overlay=overlay, logits=logits, num_vis=num_vis, names=names)
    # the list is the first process's, made before anyone writes: the shares neither overlap nor miss an image
    todo = broadcast_object([i for i, it in enumerate(items) if overwrite or not write.mask_path(it.name).is_file()]
                            if dist.main else None, dist)
    skipped = len(items) - len(todo)
    share = shard(len(todo), dist)
    todo = [items[i] for i in todo[share.start:share.stop]]
    autocast = make_autocast(cfg.train.precision, device)
    i, c = cfg.infer, cfg.cam
    patch = model.backbone.patch_embed.patch_size[0]
    used = list(c.scales) if pseudo or num_vis else []  # CAM scales, at the image size
    used += [] if pseudo or i.fusion == "coco" else list(i.scales)  # coco: resized to coco_size first
    min_side = math.ceil(patch / min(used)) if used else 1
    runner = make_crf_runner(cfg, device) if crf and todo else None
    labeller = build_method(cfg).pseudo_labeller()  # the PAR-refined training label (docs/methods/toco-mcc.md §4.2; 255 uncertain)
    waiting: dict[str, tuple[np.ndarray, torch.Tensor, np.ndarray | None]] = {}  # images the CRF still holds
    failures: list[dict] = []
    done = 0
    t0 = time.time()
    loader = DataLoader(ImageFiles(todo), batch_size=None, num_workers=min(i.num_workers, len(todo)))
    bar = tqdm(total=len(todo), desc="pseudo labels" if pseudo else "infer", dynamic_ncols=True, mininterval=1.0,
               disable=not dist.main)

    def finish(name: str, label: np.ndarray) -> None:
        nonlocal done
        raw, fused, cams = waiting.pop(name)
        write(name, raw, label, fused, cams)
        done += 1
        bar.update(1)

    def fail(item: ImageItem, error: str) -> None:
        failures.append({"image": str(item.path), "error": error})
        tqdm.write(f"skipped {item.path}: {error}")
        bar.update(1)
        bar.set_postfix(failed=len(failures))

    try:
        for s in loader:
            item = todo[int(s["index"])]
            if "error" in s:
                fail(item, s["error"])
                continue
            raw = s["raw"].numpy()
            if min(raw.shape[:2]) < min_side:  # the one input the model cannot take; its own errors are not caught
                fail(item, f"{item.path} is {raw.shape[1]}x{raw.shape[0]}: a side under {min_side} px gives the "
                           "model no token at its smallest scale")
                continue
            x = s["img"][None].to(device)
            with autocast():
                want_cams = pseudo or len(write.rows) < num_vis
                cams = multiscale_cams(model, x, tuple(c.scales))[0].float() if want_cams else None
                if pseudo:
                    fused = None
                    label = labeller(cams, torch.from_numpy(item.cls_label)[None].to(device).float(), x)
                    label = label[0].to(torch.uint8).cpu().numpy()
                else:
                    fused = multiscale_seg_logits(model, x, scales=tuple(i.scales), fusion=i.fusion,
                                                  coco_size=i.coco_size)[0]
                    label = fused.argmax(0).to(torch.uint8).cpu().numpy()
            waiting[item.name] = (raw, fused, cams[0].cpu().numpy() if cams is not None else None)
            if runner is None:
                finish(item.name, label)
            else:
                for name, crf_label in runner.submit(item.name, raw, fused.softmax(0)):
                    finish(name, crf_label)
        if runner is not None:
            for name, crf_label in runner.finish():
                finish(name, crf_label)
    finally:
        bar.close()
        if runner is not None:
            runner.close()
    grid = write.save_grid()
    seconds = time.time() - t0
    shares = all_gather_objects({"done": done, "failures": failures, "seconds": seconds}, dist)
    done, seconds = sum(r["done"] for r in shares), max(r["seconds"] for r in shares)
    failures = [f for r in shares for f in r["failures"]]
    summary = {
        **(info or {}), "out": str(out), "mode": "pseudo" if pseudo else "seg",
        "fusion": None if pseudo else i.fusion, "scales": list(c.scales if pseudo else i.scales),
        "crf": i.crf_impl if crf else None, "images": len(items), "done": done, "skipped_finished": skipped,
        "failed": len(failures), "seconds": round(seconds, 2),
        "images_per_s": round(done / seconds, 3) if done and seconds > 0 else None,
        "grid": str(grid) if grid else None, "failures": failures,
        **({"processes": dist.world_size} if dist.enabled else {}),
    }
    if dist.main:
        atomic_write(out / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=1)))
    return summary


def print_summary(summary: dict) -> None:
    rate = f", {summary['images_per_s']} images/s" if summary["images_per_s"] else ""
    print(f"{summary['done']} written, {summary['skipped_finished']} already done, {summary['failed']} failed "
          f"of {summary['images']} images in {summary['seconds']} s{rate} -> {summary['out']}")
    for f in summary["failures"]:
        print(f"  FAILED {f['image']}: {f['error']}")

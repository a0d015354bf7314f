"""Inference from a checkpoint on your own images, and pseudo-label export.

    python -m fastwsss.infer --checkpoint CKPT --images DIR_OR_LIST --out DIR [--crf] [--overlay] [--logits npy]
    python -m fastwsss.infer --checkpoint CKPT --split val --out DIR          # a split of the config's dataset
    python -m fastwsss.infer --checkpoint CKPT --split train_aug --pseudo --out DIR   # CAM -> PAR -> label PNGs

The model is built from the checkpoint's own config; ``key=value`` overrides apply on top (e.g. ``infer.fusion=coco``,
``infer.scales=[1.0]``, ``infer.crf_impl=lattice``, ``train.device=cuda``). Segmentation is the multi-scale + flip
fusion of SPEC §10 (``infer.fusion``: voc | coco), optionally followed by the dense CRF. ``--pseudo`` writes the
training labels of SPEC §4.2 instead (multi-scale CAM with the split's image-level labels, refined by PAR; uncertain
pixels 255), for training any segmentation network on them.

Output (``<name>`` = the image's path relative to ``--images`` without its suffix, or the split's name):

    <out>/masks/<name>.png       class-index palette PNG (VOC colours); written last, so it marks the image done
    <out>/overlays/<name>.png    --overlay: the mask's colours blended over the image
    <out>/logits/<name>.npy|.pt  --logits: fused logits, float16 [C, H, W] at the image size
    <out>/grid.png               --vis N: image / mask / overlay / CAM heat maps of the predicted classes
    <out>/summary.json           counts, failures, timing

Resumable: images whose mask exists are skipped (``--overwrite`` redoes them). A corrupt or unreadable image is
reported and skipped while the rest go on; the exit status is 1 if any image failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import version_string
from .cams import multiscale_cams
from .config import Config
from .data import IGNORE_INDEX, DataError, SegmentationList, class_names, read_image
from .data.transforms import normalize
from .predict import load_model, make_autocast, make_crf_runner, multiscale_seg_logits
from .visualize import cam_tiles, colorize, heatmap, overlay, palette_image, save_grid

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
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        items = [ImageItem(p.relative_to(source).with_suffix("").as_posix(), p) for p in paths]
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
    layout = "coco" if cfg.data.dataset == "coco" else "voc"
    sl = SegmentationList(cfg.data.root, split, layout, cfg.data.num_classes)
    return [ImageItem(n, sl.image_path(n), sl.cls_labels[i]) for i, n in enumerate(sl.names)]


class ImageFiles(Dataset):
    """Decodes images in loader workers; a failure comes back as ``{"index", "error"}`` instead of raising."""

    def __init__(self, items: list[ImageItem]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        try:
            raw = np.array(read_image(self.items[index].path), dtype=np.uint8)
        except Exception as err:  # noqa: BLE001 -- PIL raises many types on bad files; reported, the rest go on
            return {"index": index, "error": str(err) if isinstance(err, DataError) else
                    f"cannot read image {self.items[index].path}: {type(err).__name__}: {err}"}
        return {"index": index, "raw": torch.from_numpy(raw), "img": torch.from_numpy(normalize(raw))}


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename: an interrupted run never leaves a
    half-written file that a resumed run would take as done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _save_png(image: Image.Image, path: Path) -> None:
    _atomic(path, lambda p: image.save(p, format="PNG"))


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
                _atomic(path, lambda p: _save_npy(p, half.numpy()))
            else:
                _atomic(path, lambda p: torch.save(half, p))
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
        overwrite: bool = False, info: dict | None = None) -> dict:
    """Predict ``items`` into ``out`` (layout: module docstring); returns the summary (also ``out/summary.json``)."""
    if pseudo and crf:
        raise ValueError("--pseudo writes PAR-refined CAM labels; --crf applies to segmentation only")
    if pseudo and any(it.cls_label is None for it in items):
        raise ValueError("--pseudo needs image-level labels: give --split (a split of the config's dataset)")
    if logits not in (None, "npy", "pt"):
        raise ValueError(f"logits={logits!r} is not one of npy, pt")
    out = Path(out)
    names = class_names(cfg.data)
    write = _Writer(out, overlay=overlay, logits=logits, num_vis=num_vis, names=names)
    todo = [it for it in items if overwrite or not write.mask_path(it.name).is_file()]
    skipped = len(items) - len(todo)
    autocast = make_autocast(cfg.train.precision, device)
    i, c = cfg.infer, cfg.cam
    runner = make_crf_runner(cfg, device) if crf and todo else None
    waiting: dict[str, tuple[np.ndarray, torch.Tensor, np.ndarray | None]] = {}  # images the CRF still holds
    failures: list[dict] = []
    done = 0
    t0 = time.time()
    loader = DataLoader(ImageFiles(todo), batch_size=None, num_workers=min(i.num_workers, len(todo)))
    bar = tqdm(total=len(todo), desc="pseudo labels" if pseudo else "infer", dynamic_ncols=True, mininterval=1.0)

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
            x = s["img"][None].to(device)
            try:
                with autocast():
                    want_cams = pseudo or len(write.rows) < num_vis
                    cams = multiscale_cams(model, x, tuple(c.scales))[0].float() if want_cams else None
                    if pseudo:
                        fused = None
                        label = pseudo_label(cfg, cams, torch.from_numpy(item.cls_label)[None].to(device), x)
                    else:
                        fused = multiscale_seg_logits(model, x, scales=tuple(i.scales), fusion=i.fusion,
                                                      coco_size=i.coco_size)[0]
                        label = fused.argmax(0).to(torch.uint8).cpu().numpy()
            except (RuntimeError, ValueError) as err:  # e.g. an image smaller than one patch
                fail(item, f"model failed on {item.path} ({raw.shape[1]}x{raw.shape[0]}): {err}")
                continue
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
    summary = {
        **(info or {}), "out": str(out), "mode": "pseudo" if pseudo else "seg",
        "fusion": None if pseudo else i.fusion, "scales": list(c.scales if pseudo else i.scales),
        "crf": i.crf_impl if crf else None, "images": len(items), "done": done, "skipped_finished": skipped,
        "failed": len(failures), "seconds": round(seconds, 2),
        "images_per_s": round(done / seconds, 3) if done and seconds > 0 else None,
        "grid": str(grid) if grid else None, "failures": failures,
    }
    _atomic(out / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=1)))
    return summary


def pseudo_label(cfg: Config, cams: torch.Tensor, cls_label: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """Multi-scale CAMs [1, C-1, H, W] -> the PAR-refined training label [H, W] uint8 (SPEC §4.2; 255 uncertain)."""
    from .pseudo import refine_seg_label

    c = cfg.cam
    label = refine_seg_label(cams, cls_label.float(), x, None, high_thresh=c.high_thresh, low_thresh=c.low_thresh,
                             par_dilations=tuple(c.par_dilations), par_num_iter=c.par_num_iter,
                             par_backend=cfg.kernels.backend, round_denorm=cfg.quirks.round_denorm)
    return label[0].to(torch.uint8).cpu().numpy()


def print_summary(summary: dict) -> None:
    rate = f", {summary['images_per_s']} images/s" if summary["images_per_s"] else ""
    print(f"{summary['done']} written, {summary['skipped_finished']} already done, {summary['failed']} failed "
          f"of {summary['images']} images in {summary['seconds']} s{rate} -> {summary['out']}")
    for f in summary["failures"]:
        print(f"  FAILED {f['image']}: {f['error']}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m fastwsss.infer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images (recursive) or a list file of image paths")
    source.add_argument("--split", help="a split list of the checkpoint config's dataset (data.root), e.g. val")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--pseudo", action="store_true", help="write PAR-refined CAM pseudo labels (needs --split)")
    parser.add_argument("--crf", action="store_true", help="dense CRF after the segmentation (infer.crf_*)")
    parser.add_argument("--overlay", action="store_true", help="also write colour overlays")
    parser.add_argument("--logits", choices=("npy", "pt"), help="also write the fused logits (float16)")
    parser.add_argument("--vis", type=int, default=0, metavar="N", help="PNG grid of the first N images")
    parser.add_argument("--overwrite", action="store_true", help="redo images whose mask already exists")
    parser.add_argument("--version", action="version", version=version_string())
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. infer.fusion=coco")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if args.pseudo and args.split is None:
        parser.error("--pseudo needs --split: pseudo labels use the split's image-level labels")

    from .train import resolve_device

    model, cfg, iteration = load_model(args.checkpoint, args.overrides)
    device = resolve_device(cfg.train.device)
    model.to(device)
    items = list_images(args.images) if args.images else split_items(cfg, args.split)
    info = {"checkpoint": args.checkpoint, "iteration": iteration, "source": args.images or f"split {args.split}"}
    summary = run(cfg, model, items, args.out, device=device, pseudo=args.pseudo, crf=args.crf, overlay=args.overlay,
                  logits=args.logits, num_vis=args.vis, overwrite=args.overwrite, info=info)
    print_summary(summary)
    return summary


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)

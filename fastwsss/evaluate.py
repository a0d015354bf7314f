"""Evaluation (SPEC §10): confusion-matrix mIoU over a whole split, per-class tables, CAM evaluation,
and two trivial baselines that every reported number is shown beside.

``python -m fastwsss.evaluate --checkpoint CKPT [--split val] [--modes seg,cam,pseudo] [--crf] [--json out.json]``
streams a whole split through a checkpoint's model (segmentation with the multi-scale + flip fusion of
``infer.fusion``), or ``--predictions DIR`` evaluates stored PNGs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from .cams import cam_to_label, multiscale_cams
from .crf import CRFRunner
from .data import IGNORE_INDEX, DataError, EvalDataset, SegmentationList, read_mask
from .kernels.par import DEFAULT_DILATIONS
from .visualize import colorize, heatmap, palette_image, save_grid


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
CRF_MODE = "seg-crf"  # the segmentation after the dense CRF; needs a CRFRunner (never run during training)


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
    round_denorm: bool = False,
    seg_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    crf: CRFRunner | None = None,
    save_dir: str | Path | None = None,
    progress: bool = False,
) -> dict[str, ConfusionMatrix]:
    """Stream the split into one confusion matrix per mode:

    - ``cam`` / ``aux-cam``: multi-scale CAM -> label with the ground-truth image labels and the background threshold;
    - ``seg``: the decoder's prediction at the image size: ``seg_fn(x)`` -> logits [B, C, H, W] when given (e.g. the
      multi-scale + flip fusion of ``fastwsss.predict``), else the single-scale logits upsampled;
    - ``seg-crf``: the same logits -> softmax -> dense CRF through ``crf`` (its worker pool runs while the model
      goes on; at most a few images are in flight);
    - ``pseudo``: the PAR-refined training label made from the multi-scale CAM (SPEC §4.2), uncertain pixels
      counted as background.

    Nothing is kept per image unless ``save_dir`` is given: then each mode's prediction is written as a palette PNG
    ``save_dir/<mode>/<name>.png``. A PNG grid of the first ``num_vis`` images goes to ``vis_path``.
    ``batch_size`` > 1 needs images of one size.
    """
    from .pseudo import refine_seg_label

    unknown = set(modes) - {*EVAL_MODES, CRF_MODE}
    if unknown:
        raise ValueError(f"unknown evaluation modes {sorted(unknown)}; choose from {(*EVAL_MODES, CRF_MODE)}")
    if CRF_MODE in modes and crf is None:
        raise ValueError(f"mode {CRF_MODE!r} needs a CRFRunner (crf=...)")
    C = dataset.items.num_classes
    results = {m: ConfusionMatrix(C) for m in modes}
    save_dir = Path(save_dir) if save_dir is not None else None
    rows = []
    in_flight: dict[str, torch.Tensor] = {}  # ground truth of the images the CRF still holds

    def crf_done(finished) -> None:
        for name, label in finished:
            results[CRF_MODE].update(label, in_flight.pop(name))
            if save_dir is not None:
                _save_label(label, save_dir / CRF_MODE / f"{name}.png")

    want_cams = bool({"cam", "aux-cam", "pseudo"} & set(modes)) or (vis_path is not None and num_vis > 0)
    want_seg = "seg" in modes or CRF_MODE in modes
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    for s in tqdm(loader, desc="evaluate", disable=not progress, dynamic_ncols=True, mininterval=2.0):
        x, cls_label = s["img"].to(device), s["cls_label"].to(device)
        with autocast():
            cams, cams_aux = multiscale_cams(model, x, scales) if want_cams else (None, None)
            if want_seg:
                seg = seg_fn(x) if seg_fn is not None else model(x).seg_logits
        labels = {}
        if want_cams:
            for key, c in (("cam", cams), ("aux-cam", cams_aux)):
                labels[key] = cam_to_label(c.float(), cls_label, bkg_thresh=bkg_thresh).cpu()
        if want_seg:
            seg = F.interpolate(seg.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
            labels["seg"] = seg.argmax(1).cpu()
        if "pseudo" in modes:
            pseudo = refine_seg_label(cams.float(), cls_label, x, None, high_thresh=high_thresh,
                                      low_thresh=low_thresh, par_dilations=par_dilations, par_num_iter=par_num_iter,
                                      par_backend=par_backend, round_denorm=round_denorm)
            labels["pseudo"] = pseudo.masked_fill(pseudo == IGNORE_INDEX, 0).cpu()
        for m in modes:
            if m != CRF_MODE:
                results[m].update(labels[m], s["mask"])
        if save_dir is not None:
            for m in modes:
                if m != CRF_MODE:
                    for j, name in enumerate(s["name"]):
                        _save_label(labels[m][j].numpy(), save_dir / m / f"{name}.png")
        if CRF_MODE in modes:
            probs = seg.softmax(1)
            for j, name in enumerate(s["name"]):
                in_flight[name] = s["mask"][j]
                crf_done(crf.submit(name, s["raw"][j], probs[j]))
        if vis_path is not None and len(rows) < num_vis:
            peak = (cls_label[:, :, None, None] * cams).amax(1).float().cpu().numpy()
            shown = labels["seg"] if "seg" in labels else labels["cam"]
            for j in range(min(len(x), num_vis - len(rows))):
                raw = s["raw"][j].numpy()
                rows.append([raw, heatmap(peak[j], raw), colorize(labels["cam"][j].numpy()),
                             colorize(shown[j].numpy()), colorize(s["mask"][j].numpy())])
    if CRF_MODE in modes:
        crf_done(crf.finish())
    model.train(was_training)
    if rows:
        save_grid(rows, vis_path)
    return results


def _save_label(label: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    palette_image(np.asarray(label)).save(path)


def evaluate_predictions(pred_dir: str | Path, items: SegmentationList, max_images: int = 0,
                         ignore_as: int = 0) -> ConfusionMatrix:
    """Stored class-index PNGs ``pred_dir/<name>.png`` (e.g. from ``fastwsss.infer`` or ``save_dir``) against the
    split's ground truth; predicted ``ignore`` pixels (pseudo labels) count as ``ignore_as``."""
    pred_dir = Path(pred_dir)
    names = items.names if max_images <= 0 else items.names[:max_images]
    missing = [n for n in names if not (pred_dir / f"{n}.png").is_file()]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise DataError(f"{len(missing)} of {len(names)} predictions missing in {pred_dir}: "
                        f"{', '.join(missing[:3])}{more}")
    cm = ConfusionMatrix(items.num_classes)
    for name in tqdm(names, desc="evaluate predictions", disable=len(names) < 200, dynamic_ncols=True):
        pred, gt = read_mask(pred_dir / f"{name}.png"), read_mask(items.mask_path(name))
        if pred.shape != gt.shape:
            raise DataError(f"prediction {pred_dir / name}.png is {pred.shape}, its ground truth {gt.shape}")
        cm.update(np.where(pred == IGNORE_INDEX, ignore_as, pred), gt)
    return cm


def results_json(results: dict[str, ConfusionMatrix], names: list[str], **info) -> dict:
    """mIoU and per-class IoU of each mode (IoU of classes absent from the ground truth: null)."""
    out = dict(info)
    for mode, cm in results.items():
        iou = cm.iou()
        out[mode] = {"miou": cm.miou(), "per_class": {n: None if np.isnan(v) else float(v) for n, v in zip(names, iou)},
                     "confusion_matrix": cm.mat.tolist()}
    return out


def main(argv: list[str] | None = None) -> dict:
    """``python -m fastwsss.evaluate --checkpoint CKPT [--split val] [--modes seg,cam,pseudo] [--crf]``."""
    import argparse
    import json
    import time

    from . import version_string
    from .config import load_config
    from .data import class_names
    from .predict import load_model, make_autocast, make_crf_runner, multiscale_seg_logits
    from .train import resolve_device

    parser = argparse.ArgumentParser(
        prog="python -m fastwsss.evaluate",
        description="Whole-split evaluation from a checkpoint (streaming: one confusion matrix per mode), or of "
                    "stored prediction PNGs (--predictions). Modes: cam, aux-cam (multi-scale CAM with the "
                    "ground-truth image labels), seg (multi-scale + flip segmentation, infer.fusion / infer.scales), "
                    "pseudo (PAR-refined pseudo labels); --crf adds seg-crf.")
    parser.add_argument("--checkpoint", help="checkpoint file or run directory (its config is used)")
    parser.add_argument("--config", metavar="NAME|FILE",
                        help="with --predictions and no --checkpoint: the config naming the data, a packaged config's "
                             "name (python -m fastwsss.train --help lists them) or a YAML file")
    parser.add_argument("--predictions", help="folder of <name>.png class-index predictions to evaluate instead")
    parser.add_argument("--split", help="split list name (default: data.val_split)")
    parser.add_argument("--modes", default="seg", help=f"comma-separated, from {', '.join(EVAL_MODES)}")
    parser.add_argument("--crf", action="store_true", help="also evaluate seg after the dense CRF (infer.crf_*)")
    parser.add_argument("--max-images", type=int, default=0, help="first N images only (0 = the whole split)")
    parser.add_argument("--json", help="write mIoU, per-class IoU and confusion matrices here")
    parser.add_argument("--save-predictions", help="write each mode's PNG predictions to <dir>/<mode>/<name>.png")
    parser.add_argument("--vis", help="PNG grid of the first images (image / CAM / CAM label / seg / ground truth)")
    parser.add_argument("--num-vis", type=int, default=8)
    parser.add_argument("--version", action="version", version=version_string())
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. infer.fusion=coco")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")

    if args.checkpoint is None and args.predictions is None:
        parser.error("give --checkpoint (evaluate a model) or --predictions (evaluate stored PNGs)")
    t0 = time.time()
    if args.checkpoint is not None:
        model, cfg, iteration = load_model(args.checkpoint, args.overrides)
        device = resolve_device(cfg.train.device)
        model.to(device)
    else:
        cfg = load_config(args.config, args.overrides) if args.config else load_config(None, args.overrides)
        model, iteration = None, None
    layout = "coco" if cfg.data.dataset == "coco" else "voc"
    split = args.split or cfg.data.val_split
    items = SegmentationList(cfg.data.root, split, layout, cfg.data.num_classes)
    names = class_names(cfg.data)
    info = {"checkpoint": args.checkpoint, "iteration": iteration, "split": split, "data_root": cfg.data.root}

    if args.predictions is not None:
        results = {"predictions": evaluate_predictions(args.predictions, items, args.max_images)}
        info["predictions"] = args.predictions
    else:
        modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
        bad = [m for m in modes if m not in EVAL_MODES]
        if bad:
            parser.error(f"unknown modes {bad}; choose from {', '.join(EVAL_MODES)}")
        if args.crf:
            modes = (*modes, CRF_MODE) if "seg" in modes else (*modes, "seg", CRF_MODE)
        i, c = cfg.infer, cfg.cam
        autocast = make_autocast(cfg.train.precision, device)
        dataset = EvalDataset(items, args.max_images)

        def seg_fn(x: torch.Tensor) -> torch.Tensor:
            return multiscale_seg_logits(model, x, scales=tuple(i.scales), fusion=i.fusion, coco_size=i.coco_size)

        crf = make_crf_runner(cfg, device) if args.crf else None
        try:
            results = evaluate_model(
                model, dataset, scales=tuple(c.scales), bkg_thresh=c.bkg_thresh, modes=modes,
                high_thresh=c.high_thresh, low_thresh=c.low_thresh, device=device, autocast=autocast,
                num_vis=args.num_vis if args.vis else 0, vis_path=args.vis, num_workers=i.num_workers,
                par_dilations=tuple(c.par_dilations), par_num_iter=c.par_num_iter, par_backend=cfg.kernels.backend,
                round_denorm=cfg.quirks.round_denorm, seg_fn=seg_fn, crf=crf, save_dir=args.save_predictions, progress=True)
        finally:
            if crf is not None:
                crf.close()
        info.update(num_images=len(dataset), fusion=i.fusion, scales=list(i.scales),
                    crf_impl=i.crf_impl if args.crf else None)
    info["seconds"] = round(time.time() - t0, 1)
    print(f"{split}: {info.get('num_images', len(items.names))} images, {info['seconds']} s; IoU %:")
    print(format_table(names, results))
    out = results_json(results, names, **info)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()

"""Evaluation of a whole split (docs/methods/toco-mcc.md §10), streamed into one confusion matrix per mode: multi-scale CAMs, the
segmentation (optionally after the dense CRF) and the PAR-refined pseudo labels of a model, or stored PNGs. The
training loop calls ``evaluate_model`` for its periodic evaluation; ``python -m fastwsss.evaluate`` for whole splits."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..data import IGNORE_INDEX, DataError, EvalDataset, SegmentationList, read_mask
from ..pseudo import PseudoLabeller, cam_to_label, multiscale_cams
from ..runtime import ONE_PROCESS, Dist, all_reduce_sum, shard
from ..visualize import colorize, heatmap, palette_image, save_grid
from .crf import CRFRunner
from .metrics import ConfusionMatrix

EVAL_MODES = ("cam", "aux-cam", "seg", "pseudo", "lam")
CRF_MODE = "seg-crf"  # the segmentation after the dense CRF; needs a CRFRunner (never run during training)


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    dataset: EvalDataset,
    *,
    scales: tuple[float, ...],
    bkg_thresh: float,
    modes: tuple[str, ...] = ("cam", "aux-cam"),
    labeller: PseudoLabeller | None = None,
    device: torch.device,
    autocast: Callable[[], object] = nullcontext,
    num_vis: int = 0,
    vis_path: str | Path | None = None,
    num_workers: int = 0,
    batch_size: int = 1,
    seg_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    mask_absent_classes: bool = False,
    crf: CRFRunner | None = None,
    save_dir: str | Path | None = None,
    progress: bool = False,
    dist: Dist = ONE_PROCESS,
) -> dict[str, ConfusionMatrix]:
    """Stream the split into one confusion matrix per mode:

    - ``cam`` / ``aux-cam``: multi-scale CAM -> label with the ground-truth image labels and the background threshold;
    - ``lam``: the localisation map of a model that makes one (``model.lams(x)`` -> [B, C-1, H, W] in [0, 1], e.g.
      MoRe's class-token map), labelled as the CAM;
    - ``seg``: the decoder's prediction at the image size: ``seg_fn(x)`` -> logits [B, C, H, W] when given (e.g. the
      multi-scale + flip fusion of ``fastwsss.inference.predict``), else the single-scale logits upsampled;
    - with ``mask_absent_classes`` the logits of classes absent from the image's ground-truth labels are set to -1e5
      first (CoSA's published protocol, which reads the labels);
    - ``seg-crf``: the same logits -> softmax -> dense CRF through ``crf`` (its worker pool runs while the model
      goes on; at most a few images are in flight);
    - ``pseudo``: the training label ``labeller`` makes from the multi-scale CAM (the method's, e.g. PAR-refined,
      docs/methods/toco-mcc.md §4.2), uncertain pixels counted as background.

    Nothing is kept per image unless ``save_dir`` is given: then each mode's prediction is written as a palette PNG
    ``save_dir/<mode>/<name>.png``. A PNG grid of the first ``num_vis`` images goes to ``vis_path``.
    ``batch_size`` > 1 needs images of one size.

    Under torchrun (``dist``) each process takes a contiguous share of the images and the confusion matrices are
    summed over the processes: every process returns exactly the one-process result. Only the first process saves the
    grid and shows progress.
    """
    unknown = set(modes) - {*EVAL_MODES, CRF_MODE}
    if unknown:
        raise ValueError(f"unknown evaluation modes {sorted(unknown)}; choose from {(*EVAL_MODES, CRF_MODE)}")
    if CRF_MODE in modes and crf is None:
        raise ValueError(f"mode {CRF_MODE!r} needs a CRFRunner (crf=...)")
    if "pseudo" in modes and labeller is None:
        raise ValueError("mode 'pseudo' needs the method's pseudo labeller (labeller=...)")
    if "lam" in modes and not hasattr(model, "lams"):
        raise ValueError(f"mode 'lam' needs a model that makes localisation maps (lams(x)); {type(model).__name__} "
                         "makes none")
    if not dist.main:
        num_vis = 0
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
    share = Subset(dataset, shard(len(dataset), dist)) if dist.enabled else dataset
    loader = DataLoader(share, batch_size=batch_size, num_workers=num_workers)
    for s in tqdm(loader, desc="evaluate", disable=not (progress and dist.main), dynamic_ncols=True,
                  mininterval=2.0):
        x, cls_label = s["img"].to(device), s["cls_label"].to(device)
        with autocast():
            cams, cams_aux = multiscale_cams(model, x, scales) if want_cams else (None, None)
            if want_seg:
                seg = seg_fn(x) if seg_fn is not None else model(x).seg_logits
            lams = model.lams(x) if "lam" in modes else None
        labels = {}
        if lams is not None:
            labels["lam"] = cam_to_label(lams.float(), cls_label, bkg_thresh=bkg_thresh).cpu()
        if want_cams:
            for key, c in (("cam", cams), ("aux-cam", cams_aux)):
                labels[key] = cam_to_label(c.float(), cls_label, bkg_thresh=bkg_thresh).cpu()
        if want_seg:
            seg = F.interpolate(seg.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
            if mask_absent_classes:
                present = torch.cat([cls_label.new_ones(len(x), 1), cls_label], dim=1).bool()[:, :, None, None]
                seg = seg.masked_fill(~present, -1e5)
            labels["seg"] = seg.argmax(1).cpu()
        if "pseudo" in modes:
            pseudo = labeller(cams.float(), cls_label, x)
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
    if dist.enabled:  # int64 counts: the sum is exact
        mats = all_reduce_sum(torch.from_numpy(np.stack([results[m].mat for m in modes])).to(device), dist)
        for m, mat in zip(modes, mats.cpu().numpy()):
            results[m].mat = mat
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

"""Evaluation of a whole split: ``python -m fastwsss.evaluate``.

    python -m fastwsss.evaluate --checkpoint CKPT [--split val] [--modes seg,cam,pseudo] [--crf] [--json out.json]
    python -m fastwsss.evaluate --checkpoint CKPT --predictions DIR [--split val]   # stored PNGs

Streams a whole split through a checkpoint's model (segmentation with the multi-scale + flip fusion of
``infer.fusion``) into one confusion matrix per mode, or scores stored class-index PNGs (``--predictions``).
The library part is ``fastwsss.inference.evaluation``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from . import version_string
from .cli import user_errors
from .config import load_config
from .data import EvalDataset, class_names, open_split
from .inference.evaluation import CRF_MODE, EVAL_MODES, evaluate_model, evaluate_predictions
from .inference.metrics import format_table, results_json
from .inference.predict import check_kernel_backend, load_model, make_crf_runner, protocol_seg_fn
from .methods import build_method
from .runtime import init_distributed, make_autocast


@user_errors
def main(argv: list[str] | None = None) -> dict:
    """``python -m fastwsss.evaluate --checkpoint CKPT [--split val] [--modes seg,cam,pseudo] [--crf]``."""
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
    parser.add_argument("--split", help="split list name (default: data.eval_split, else data.val_split; COCO: the "
                                        "whole val, while training evaluates val_part)")
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
        dist, device = init_distributed(cfg.train.device)  # under torchrun: each process scores its share
        check_kernel_backend(cfg.kernels.backend, device)
        model.to(device)
    else:
        cfg = load_config(args.config, args.overrides) if args.config else load_config(None, args.overrides)
        model, iteration = None, None
    split = args.split or cfg.data.eval_split or cfg.data.val_split
    items = open_split(cfg.data, split)
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

        crf = make_crf_runner(cfg, device) if args.crf else None
        try:
            results = evaluate_model(
                model, dataset, scales=tuple(c.scales), bkg_thresh=c.bkg_thresh, modes=modes,
                labeller=build_method(cfg).pseudo_labeller(), device=device, autocast=autocast,
                num_vis=args.num_vis if args.vis else 0, vis_path=args.vis, num_workers=i.num_workers,
                seg_fn=protocol_seg_fn(model, i),
                mask_absent_classes=i.mask_absent_classes, crf=crf, save_dir=args.save_predictions,
                progress=True, dist=dist)
        finally:
            if crf is not None:
                crf.close()
        info.update(num_images=len(dataset), fusion=i.fusion, scales=list(i.scales),
                    mask_absent_classes=i.mask_absent_classes,
                    crf_impl=i.crf_impl if args.crf else None)
    info["seconds"] = round(time.time() - t0, 1)
    out = results_json(results, names, **info)
    if args.checkpoint is not None and not dist.main:
        return out
    print(f"{split}: {info.get('num_images', len(items.names))} images, {info['seconds']} s; IoU %:")
    print(format_table(names, results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()

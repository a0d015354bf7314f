"""Inference from a checkpoint on your own images, and pseudo-label export.

    python -m fastwsss.infer --checkpoint CKPT --images DIR_OR_LIST --out DIR [--crf] [--overlay] [--logits npy]
    python -m fastwsss.infer --checkpoint CKPT --split val --out DIR          # a split of the config's dataset
    python -m fastwsss.infer --checkpoint CKPT --split train_aug --pseudo --out DIR   # CAM -> PAR -> label PNGs

The model is built from the checkpoint's own config; ``key=value`` overrides apply on top (e.g. ``infer.fusion=coco``,
``infer.scales=[1.0]``, ``infer.crf_impl=lattice``, ``train.device=cuda``). Segmentation is the multi-scale + flip
fusion of docs/methods/toco-mcc.md §10 (``infer.fusion``: voc | coco), optionally followed by the dense CRF. ``--pseudo`` writes the
training labels of docs/methods/toco-mcc.md §4.2 instead (multi-scale CAM with the split's image-level labels, refined by PAR; uncertain
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
import logging
import sys

from . import version_string
from .cli import user_errors
from .inference.export import list_images, print_summary, run, split_items
from .inference.predict import check_kernel_backend, load_model
from .runtime import init_distributed


@user_errors
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

    model, cfg, iteration = load_model(args.checkpoint, args.overrides)
    dist, device = init_distributed(cfg.train.device)  # under torchrun: each process predicts its share
    check_kernel_backend(cfg.kernels.backend, device)
    model.to(device)
    items = list_images(args.images) if args.images else split_items(cfg, args.split)
    info = {"checkpoint": args.checkpoint, "iteration": iteration, "source": args.images or f"split {args.split}"}
    summary = run(cfg, model, items, args.out, device=device, pseudo=args.pseudo, crf=args.crf, overlay=args.overlay,
                  logits=args.logits, num_vis=args.vis, overwrite=args.overwrite, info=info, dist=dist)
    if dist.main:
        print_summary(summary)
    return summary


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)

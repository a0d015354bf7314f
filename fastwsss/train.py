"""Training: ``python -m fastwsss.train [--config NAME|FILE] [--print-config] [key=value ...]``.

One loop for every method, readable top to bottom: build -> loop (autocast, step, log, eval, checkpoint).
Without ``--config`` it runs the packaged ``demo`` config (synthetic data generated under ./data, a small ViT,
CPU-sized; the run goes to ./runs). ``run.resume=<run dir>`` continues an interrupted run exactly, from that run's
saved config.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from . import version_string
from .cli import user_errors
from .config import Config, load_config, packaged_configs, packaged_configs_help, to_yaml
from .inference.predict import check_model, check_weights
from .methods import METHODS
from .training import NothingToTrain, TrainingInterrupted, train, without_pretrained

DEFAULT_CONFIG = "demo"  # a packaged config (fastwsss.configs)
SUMMARY = {"seg_miou": "segmentation", "seg-ms_miou": "multi-scale + flip", "seg-crf_miou": "+ CRF",  # the last line
           "cam_miou": "CAM", "pseudo_miou": "pseudo labels", "all-bg_miou": "all-background",
           "likely-cls_miou": "most-likely-present-class"}


@user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastwsss.train", description=__doc__,
                                     epilog=packaged_configs_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="NAME|FILE",
                        help=f"a packaged config's name (below) or a YAML file (default: {DEFAULT_CONFIG}; "
                             "when resuming: the run's own)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the fully resolved config (defaults <- YAML <- overrides) and exit without running")
    parser.add_argument("--check-weights", action="store_true",
                        help="build the backbone, load model.pretrained into it and report what was loaded, missing, "
                             "unexpected and resampled; exit 1 if a backbone tensor is missing. Trains nothing")
    parser.add_argument("--version", action="version", version=version_string())
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. train.max_iters=100 data.root=/data/VOC2012")
    args = parser.parse_args(argv)
    path, overrides = args.config, args.overrides
    if path is None:
        resume = next((o.split("=", 1)[1] for o in overrides if o.startswith("run.resume=")), None)
        if resume:  # the run's own config; its early stop was for the interrupted invocation only
            if not Path(resume).exists():
                raise FileNotFoundError(f"run.resume={resume}: no such run directory or checkpoint")
            run_dir = Path(resume) if Path(resume).is_dir() else Path(resume).parent.parent
            path, overrides = run_dir / "config.yaml", ["train.stop_at=null", *overrides]
        else:
            path = DEFAULT_CONFIG
    cfg = load_config(path, overrides, allow_missing=args.print_config)  # printed before any file or weight is needed
    if args.print_config:
        print(to_yaml(cfg), end="")
        return
    if args.check_weights:
        report = check_weights(cfg.model)
        print(report)
        sys.exit(1 if report.missing else 0)
    # a backbone timm cannot build, weights that cannot be read or do not fit: before the data (a resume reads no
    # pretrained weights: its checkpoint holds every weight)
    check_model(without_pretrained(cfg).model if cfg.run.resume else cfg.model)
    try:
        result = train(cfg)
    except TrainingInterrupted as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(128 + stopped.signum)
    except NothingToTrain as done:
        print(done, file=sys.stderr)
        result = done.results
    summary = [f"{title} {100 * result[key]:.1f}" for key, title in SUMMARY.items()
               if not math.isnan(result.get(key, math.nan))]
    if summary:
        print("mIoU %: " + " | ".join(summary))
    if result.get("it_per_s"):
        print(f"it/s ({torch.get_num_threads()} threads) by the terms on: "
              + "; ".join(f"{phase} {rate:.2f}" for phase, rate in result["it_per_s"].items()))
    for line in what_it_showed(cfg, result):
        print(line)


def what_it_showed(cfg: Config, result: dict) -> list[str]:
    """A finished run's last two lines: its segmentation (the CAM baseline: its CAM) against the trivial baselines
    and where the overlays and curves are; then how to compare it with the CAM baseline (or the method with it)."""
    if not result:
        return []

    def pct(key: str) -> str:
        return f"{100 * result[key]:.1f}" if not math.isnan(result.get(key, math.nan)) else "n/a"

    baseline = "seg_miou" not in result  # a method that trains no segmentation (the CAM baseline): its CAM
    shown = ("its CAM (given the image labels)" if baseline else "its segmentation (no labels at test time)")
    key = "cam_miou" if baseline else "seg_miou"
    vis = Path(cfg.run.dir) / "vis" / f"val_{result['step']:06d}.png"
    protocol = ("" if baseline or "seg-crf_miou" not in result
                else f" (single scale; {pct('seg-crf_miou')} % by the papers' test protocol, multi-scale + flip + CRF)")
    first = (f"Shown: {shown} mIoU {pct(key)} %{protocol} against all-background {pct('all-bg_miou')} and "
             f"most-likely-present-class {pct('likely-cls_miou')}; "
             + (f"overlays {vis}, " if vis.is_file() else "")
             + f"curves: python -m fastwsss.plot {cfg.run.dir}")
    packaged = packaged_configs()
    if baseline:
        method = cfg.name.removesuffix("_cam")
        methods = "|".join(name for name, m in METHODS.items() if m.trains_segmentation)
        other = (f"--config {method}" if cfg.name.endswith("_cam") and method in packaged
                 else f"--config {cfg.name} train.method=<{methods}>")
        second = f"Compare with the method on the same data and ViT: python -m fastwsss.train {other}"
    else:
        other = (f"--config {cfg.name}_cam" if f"{cfg.name}_cam" in packaged
                 else f"--config {cfg.name} train.method=cam")
        second = (f"Compare with the CAM baseline (its CAM given the image labels): python -m fastwsss.train {other}"
                  + ("; over several seeds: python benchmarks/demo_seeds.py" if cfg.name.startswith("demo") else ""))
    return [first, second]


if __name__ == "__main__":
    main()

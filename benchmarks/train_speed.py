"""Training speed and memory of a paper config at full size: the reference path against the fast path.

    python benchmarks/train_speed.py --config voc_mcc --path fast [--iters 12] [--json out.json] [key=value ...]

Trains ``--iters`` iterations from random weights with every loss term switched on from the first step, on
generated data in the config's layout (VOC: 500x375 images; COCO: 640x427), and reports the steady iteration rate
(the mean over the log intervals after the first, which holds the compilation and warm-up) and the peak GPU memory.

- ``--path reference``: fp32, every op on its PyTorch reference (``kernels.backend=torch``) and MCC's local views
  through the replicated masked forward, as the authors' code runs it;
- ``--path fast``: bf16 autocast, the Triton kernels (``kernels.backend=auto``) and MCC's token-dropped views.

On a CPU it runs too (slowly, no peak memory): ``--tiny`` shrinks the model and data for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastwsss.config import load_config
from fastwsss.data.synthetic import generate_dataset
from fastwsss.training import train

PATHS = {
    "reference": ["train.precision=fp32", "kernels.backend=torch", "mcc.forward=masked"],
    "fast": ["train.precision=bf16", "kernels.backend=auto", "mcc.forward=drop"],
}
SIZES = {"voc": (375, 500), "coco": (427, 640)}
EVERY_TERM = ["loss.aff_start=0", "loss.con_start=0", "loss.seg_start=0", "loss.reg_start=0"]
RANDOM_WEIGHTS = ["model.pretrained=none"]  # speed and memory do not depend on the weights; no file needed
TINY = ["data.crop_size=64", "data.rescale_range=[0.75,1.25]", "model.backbone=deit_tiny_patch16_224",
        "model.img_size=64", "model.patch_size=8", "model.embed_dim=32", "model.depth=2", "model.aux_layer=-2",
        "model.num_heads=2",
        "model.decoder_channels=16", "train.batch_size=2", "contrast.num_local=2", "toco.crop_size=32",
        "cam.scales=[1.0]"]


def measure(config: str, path: str, iters: int, data_root: Path, run_dir: Path, overrides: list[str],
            tiny: bool = False) -> dict:
    """One run; returns the steady it/s, seconds per iteration, peak GPU memory and what ran."""
    probe = load_config(config, [f"data.root={data_root}", *RANDOM_WEIGHTS])
    layout = probe.data.dataset if probe.data.dataset in SIZES else "voc"
    generate_dataset(data_root, num_train=16 if tiny else 32, num_val=1, layout=layout,
                     image_size=(48, 64) if tiny else SIZES[layout], seed=0)
    # the paper config's class count (the time depends on it), more than the synthetic data's 7: named in a file of
    # its own, as data.num_classes must match the class names (the root's classes.txt names 7)
    names = run_dir.parent / f"classes_{probe.data.num_classes}.txt"
    names.write_text("".join(f"class_{i}\n" for i in range(1, probe.data.num_classes)))
    log_every = max(1, iters // 3)
    cfg = load_config(config, [
        f"data.class_names={names}",
        f"data.root={data_root}", f"run.dir={run_dir}", f"train.max_iters={iters}", f"train.log_interval={log_every}",
        f"train.eval_interval={10**9}", f"train.ckpt_interval={10**9}", "eval.max_images=1", "eval.num_vis=0",
        *EVERY_TERM, *RANDOM_WEIGHTS, *PATHS[path], *(TINY if tiny else []), *overrides])
    cuda = torch.cuda.is_available() and cfg.train.device in ("auto", "cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["it_per_s"] for r in records if "it_per_s" in r]
    steady = rates[1:] or rates  # the first interval holds compilation and warm-up
    rate = statistics.mean(steady)
    return {"config": config, "path": path, "iters": iters, "batch_size": cfg.train.batch_size,
            "crop_size": cfg.data.crop_size, "backbone": cfg.model.backbone, "precision": cfg.train.precision,
            "kernels_backend": cfg.kernels.backend, "mcc_forward": cfg.mcc.forward,
            "it_per_s": round(rate, 3), "s_per_iter": round(1 / rate, 4), "intervals_it_per_s": rates,
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "wall_s": round(wall, 1), "device": torch.cuda.get_device_name() if cuda else "cpu"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="voc_mcc", help="a packaged config name or a YAML path (default voc_mcc)")
    ap.add_argument("--path", choices=sorted(PATHS), default="fast")
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--data", type=Path, help="where the generated data goes (default: a temporary folder)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and data: a smoke run on a CPU")
    ap.add_argument("--json", type=Path, help="also write the result to this file")
    ap.add_argument("overrides", nargs="*", help="key=value, applied last")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp) / "data"
        result = measure(args.config, args.path, args.iters, data, Path(tmp) / "run", args.overrides, args.tiny)
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

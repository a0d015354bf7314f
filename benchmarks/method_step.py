"""One training iteration of a method (forward, backward, optimizer step, teacher update): fastwsss's step against a
plain reading of the official step (``official_<method>.py``: per-image loops, host syncs, fp32), timed in one run
on one device, as a ratio of the median iteration times (the sides alternate). The fast side is exactly what training runs (``fastwsss.training.forward_backward`` with
the method's hooks), under bf16 autocast on a GPU and in fp32 on a CPU.

    python benchmarks/method_step.py --method cosa                     # ViT-B/16 at 448, the paper config's batch
    python benchmarks/method_step.py --method cosa --size small       # ViT-S/16 at 224, batch 2 (a CPU figure)
    python benchmarks/method_step.py --method cosa --size tiny --iters 2    # a smoke run (CI)
    python benchmarks/method_step.py --method more --size small       # MoRe (voc_more), the same sizes

Correctness first: both sides' loss terms are compared on the same weights and batch in fp32 before anything is
timed (relative 1e-4), and no time is reported when they differ.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from fastwsss.config import load_config
from fastwsss.data import SegmentationList, TrainDataset
from fastwsss.data.synthetic import generate_dataset
from fastwsss.methods import build_method
from fastwsss.training import StepModule, build_optimizer, forward_backward

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIGS = {"cosa": "voc_cosa", "more": "voc_more"}
SIZES = {
    "paper": [],
    "small": ["model.backbone=deit_small_patch16_224", "data.crop_size=224", "train.batch_size=2"],
    "tiny": ["model.backbone=deit_tiny_patch16_224", "model.img_size=64", "model.patch_size=8", "model.embed_dim=32",
             "model.depth=3", "model.num_heads=2", "model.decoder_channels=16", "data.crop_size=64",
             "train.batch_size=2", "cam.scales=[1.0,0.5]"],
}
EVERY_TERM = {  # every term on from iteration 0
    "cosa": ["loss.seg_start=0", "loss.reg_start=0", "cosa.cam_start=0"],
    "more": ["loss.seg_start=0", "loss.reg_start=0", "loss.aff_start=0", "more.cle_start=0", "more.une_start=0"],
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def one_batch(method, model, root: Path, device: torch.device) -> dict:
    d = method.cfg.data
    generate_dataset(root, num_train=8, num_val=1, image_size=(int(d.crop_size * 0.9), d.crop_size), seed=0)
    items = SegmentationList(root, "train_aug", num_classes=7)
    ds = TrainDataset(items, method.sample_views(model), seed=0)
    batch = torch.utils.data.default_collate([ds[(i, i)] for i in range(method.cfg.train.batch_size)])
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=sorted(CONFIGS), default="cosa")
    ap.add_argument("--size", choices=sorted(SIZES), default="paper")
    ap.add_argument("--iters", type=int, default=5, help="timed iterations per side (after one warm-up)")
    ap.add_argument("--json", type=Path, help="also write the result here")
    ap.add_argument("overrides", nargs="*", help="key=value, applied last")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    official = importlib.import_module(f"official_{args.method}")
    cfg = load_config(CONFIGS[args.method], ["model.pretrained=none", "data.dataset=synthetic", "data.num_classes=7",
                                             "kernels.backend=auto", *EVERY_TERM[args.method], *SIZES[args.size],
                                             *args.overrides])
    method = build_method(cfg)
    torch.manual_seed(0)
    model = method.build_model().to(device).train()
    with tempfile.TemporaryDirectory() as tmp:
        batch = one_batch(method, model, Path(tmp) / "data", device)
    it = method.iteration(0)

    # correctness: the same weights and batch, fp32, both sides' terms
    fast = StepModule(method, copy.deepcopy(model))
    ours = {k: float(t.value.detach()) for k, t in fast(batch, it).items()}
    ref_model = copy.deepcopy(model)
    want = {k: float(v.detach()) for k, v in official.run_step(ref_model, batch, cfg, 0).items()}
    bad = {k: (v, want[k]) for k, v in ours.items() if abs(v - want[k]) > 1e-4 * max(1.0, abs(want[k]))}
    if bad:
        print(f"method_step: the fast and the official step disagree, nothing timed: {bad}", file=sys.stderr)
        return 1

    amp = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None

    def autocast():
        return torch.autocast(device.type, dtype=amp) if amp else nullcontext()

    def fast_iteration(state):
        step, optimizer, scaler = state
        forward_backward(step, None, [batch], it, scaler, autocast)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_step(step.model, 0)

    def official_iteration(state):
        m, optimizer = state
        terms = official.run_step(m, batch, cfg, 0)
        terms["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        official.after_step(m, method, cfg)

    def once(run, state) -> float:
        sync(device)
        t0 = time.perf_counter()
        run(state)
        sync(device)
        return time.perf_counter() - t0

    fm, om = copy.deepcopy(model), copy.deepcopy(model)
    sides = {"fast": (fast_iteration, (StepModule(method, fm), build_optimizer(fm, method, cfg),
                                       torch.amp.GradScaler(device.type, enabled=False))),
             "official": (official_iteration, (om, build_optimizer(om, method, cfg)))}
    times: dict[str, list[float]] = {k: [] for k in sides}
    for i in range(args.iters + 1):  # the sides alternate, so a busy machine slows both; the first is a warm-up
        for k, (run, state) in sides.items():
            t = once(run, state)
            if i:
                times[k].append(t)
    fast_s, official_s = (statistics.median(times[k]) for k in ("fast", "official"))
    result = {"method": args.method, "size": args.size, "backbone": cfg.model.backbone, "crop": cfg.data.crop_size,
              "batch": cfg.train.batch_size, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "fast_precision": "bf16" if amp else "fp32",
              "fast_s_per_iter": round(fast_s, 4), "official_s_per_iter": round(official_s, 4),
              "speedup": round(official_s / fast_s, 2), "terms_checked": sorted(ours), "iters": args.iters}
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Dense CRF, pydensecrf2 against our lattice mean field: agreement and time on VOC-size photographs.

    python benchmarks/crf_times.py [--threads 1] [--labels 21] [--repeats 3] [--device cpu|cuda]

Images: scikit-image's sample photographs (astronaut, chelsea, coffee) resized to 500x375, the typical VOC size;
unaries from smooth random logits (bicubic-upsampled N(0, 3^2) on a 16-px grid), softmax; docs/methods/toco-mcc.md §10 parameters.
Agreement is checked before anything is timed. Times: wall clock and process CPU time (the CPU time stays
meaningful on a shared, busy machine); the best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fastwsss.inference.crf import CRFParams, dense_crf_pydensecrf, dense_crf_torch


def photographs(size: tuple[int, int]) -> list[tuple[str, np.ndarray]]:
    import skimage.data

    return [(n, np.array(Image.fromarray(getattr(skimage.data, n)()).resize(size, Image.BILINEAR)))
            for n in ("astronaut", "chelsea", "coffee")]


def probs_for(height: int, width: int, labels: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, labels, height // 16 + 2, width // 16 + 2, generator=g) * 3
    return F.interpolate(logits, size=(height, width), mode="bicubic", align_corners=False).softmax(1)[0].numpy()


def best_of(fn, repeats: int, sync=lambda: None) -> tuple[float, float, object]:
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        sync()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--labels", type=int, default=21)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="auto", help="the lattice's backend: auto | torch | triton")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    params = CRFParams()
    images = photographs((500, 375))
    print(f"{len(images)} photographs 500x375, {args.labels} labels, torch {torch.__version__}, "
          f"{args.threads} thread(s), lattice on {dev} (backend {args.backend})")
    print(f"{'image':<10} {'agree %':>8} {'max |dQ|':>9} {'pydensecrf wall/cpu s':>22} {'lattice wall/cpu s':>19}")
    for i, (name, img) in enumerate(images):
        probs = probs_for(*img.shape[:2], args.labels, seed=i)
        rw, rc, ref = best_of(partial(dense_crf_pydensecrf, img, probs, params), args.repeats)
        im, p = torch.from_numpy(img).permute(2, 0, 1)[None].to(dev), torch.from_numpy(probs)[None].to(dev)
        ow, oc, ours = best_of(partial(dense_crf_torch, im, p, params, args.backend), args.repeats, sync)
        ours = ours[0].cpu().numpy()
        agree = 100 * float((ref.argmax(0) == ours.argmax(0)).mean())
        if agree < 99.9:
            raise SystemExit(f"{name}: only {agree:.3f}% of pixels agree; no times reported")
        print(f"{name:<10} {agree:>8.3f} {np.abs(ref - ours).max():>9.1e} {rw:>12.2f} / {rc:<8.2f} {ow:>9.2f} / {oc:<8.2f}")
    batch = torch.stack([torch.from_numpy(img).permute(2, 0, 1) for _, img in images]).to(dev)
    pb = torch.stack([torch.from_numpy(probs_for(*img.shape[:2], args.labels, seed=i))
                      for i, (_, img) in enumerate(images)]).to(dev)
    bw, bc, _ = best_of(partial(dense_crf_torch, batch, pb, params, args.backend), args.repeats, sync)
    print(f"lattice, the {len(images)} images as one batch: {bw:.2f} s wall / {bc:.2f} s cpu "
          f"({bw / len(images):.2f} s per image)")


if __name__ == "__main__":
    main()

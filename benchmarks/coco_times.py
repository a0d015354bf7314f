"""Time of the COCO converter (``python -m fastwsss.data.coco``) per 1000 images, on a generated annotation file
shaped like COCO 2014's instances files.

    python benchmarks/coco_times.py [--images 1000] [--workers 0 1 2] [--seed 0]

The file: images of 480..640 x 360..640 px (COCO's are ~580 x 480 on average), a Poisson(7.3) number of instances
per image (COCO: 7.3), each a polygon of 10..40 vertices (one in ten in two parts), one in a hundred a crowd region
as uncompressed RLE, one image in a hundred without annotation. Times: reading and checking the JSON; converting
into a fresh root with each ``--workers`` (0 = in this process: its CPU time is also given, which stays meaningful
on a busy machine); a second run into the same root (everything kept).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from fastwsss.data.coco import convert, load_annotations


def polygon(rng: np.random.Generator, h: int, w: int) -> list[float]:
    n = int(rng.integers(10, 41))
    cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
    radius = rng.uniform(0.03, 0.3) * min(h, w)
    angles = np.sort(rng.uniform(0, 2 * math.pi, n))
    r = radius * rng.uniform(0.5, 1.0, n)
    xs, ys = np.clip(cx + r * np.cos(angles), 0, w - 1), np.clip(cy + r * np.sin(angles), 0, h - 1)
    return np.round(np.stack([xs, ys], 1).ravel(), 2).tolist()


def crowd_rle(rng: np.random.Generator, h: int, w: int) -> dict:
    y, x = np.mgrid[:h, :w]
    cx, cy, a, b = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h, rng.uniform(0.1, 0.4) * w, rng.uniform(
        0.1, 0.4) * h
    flat = (((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1).ravel(order="F").astype(np.int8)  # COCO: column-major
    runs = np.diff(np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])).tolist()
    return {"counts": [0, *runs] if flat[0] else runs, "size": [h, w]}


def make_file(path: Path, images: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    cats = [{"id": i, "name": f"class{i}"} for i in (*range(1, 12), *range(13, 26), 27, 28, *range(31, 45),
                                                     *range(46, 66), 67, 70, *range(72, 83), *range(84, 91))]
    assert len(cats) == 80
    out = {"images": [], "annotations": [], "categories": cats}
    for i in range(images):
        h, w = int(rng.integers(360, 641)), int(rng.integers(480, 641))
        out["images"].append({"id": i + 1, "file_name": f"COCO_train2014_{i + 1:012d}.jpg", "height": h, "width": w})
        if rng.random() < 0.01:
            continue
        for _ in range(max(1, int(rng.poisson(7.3)))):
            crowd = rng.random() < 0.01
            seg = crowd_rle(rng, h, w) if crowd else [polygon(rng, h, w) for _ in range(2 if rng.random() < 0.1 else 1)]
            out["annotations"].append({"id": len(out["annotations"]) + 1, "image_id": i + 1, "iscrowd": int(crowd),
                                       "category_id": cats[int(rng.integers(len(cats)))]["id"], "segmentation": seg})
    path.write_text(json.dumps(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "instances_train2014.json"
        data = make_file(path, args.images, args.seed)
        per_k = 1000 / args.images
        print(f"{args.images} images, {len(data['annotations'])} annotations, {path.stat().st_size / 1e6:.1f} MB")
        t0 = time.perf_counter()
        load_annotations(path)
        print(f"read + check the JSON: {(time.perf_counter() - t0) * per_k:.2f} s per 1000 images")
        for workers in args.workers:
            root = Path(tmp) / f"root{workers}"
            w0, c0 = time.perf_counter(), time.process_time()
            convert([path], root, workers=workers, progress=False)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            extra = f", CPU {cpu * per_k:.1f} s" if workers == 0 else ""
            print(f"convert, --workers {workers}: {wall * per_k:.1f} s per 1000 images (wall{extra})")
        w0 = time.perf_counter()
        summary = convert([path], root, workers=args.workers[-1], progress=False)
        assert summary["subsets"]["train2014"]["written"] == 0
        print(f"second run, all kept: {(time.perf_counter() - w0) * per_k:.1f} s per 1000 images")


if __name__ == "__main__":
    main()

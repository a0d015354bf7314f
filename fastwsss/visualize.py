"""PNG grids for a person to look at: image / CAM heat map / CAM label / ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map, [n, 3] uint8 (index 255 is the light 'ignore' colour)."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def colorize(label: np.ndarray) -> np.ndarray:
    """Class indices [H, W] -> RGB [H, W, 3] with the VOC palette."""
    return voc_palette()[label.astype(np.int64) % 256]


def heatmap(cam: np.ndarray, image: np.ndarray | None = None, alpha: float = 0.5) -> np.ndarray:
    """Values in [0, 1] [H, W] -> jet-coloured RGB uint8, blended over ``image`` if given."""
    v = np.clip(cam, 0.0, 1.0)[..., None]
    rgb = np.clip(np.concatenate([1.5 - np.abs(4 * v - 3), 1.5 - np.abs(4 * v - 2), 1.5 - np.abs(4 * v - 1)], -1), 0, 1)
    rgb = rgb * 255.0
    if image is not None:
        rgb = alpha * rgb + (1 - alpha) * image.astype(np.float32)
    return rgb.astype(np.uint8)


def save_grid(rows: list[list[np.ndarray]], path: str | Path, gap: int = 2) -> Path:
    """Tiles of RGB uint8 [H, W, 3] (rows of equal length) -> one PNG; tiles are resized to the first's size."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if tile.shape[:2] != (h, w):
                tile = np.asarray(Image.fromarray(tile).resize((w, h), Image.NEAREST))
            grid[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = tile
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path

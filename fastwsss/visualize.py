"""Pictures for a person to look at: palette masks, colour overlays, CAM heat maps, and PNG grids of them
(image / CAM heat map / CAM label / segmentation / ground truth, or per-class CAMs with captions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


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


def palette_image(label: np.ndarray) -> Image.Image:
    """Class indices [H, W] (0..255) -> a palette ("P") PIL image with the VOC colours: readable as indices."""
    if label.ndim != 2 or label.min(initial=0) < 0 or label.max(initial=0) > 255:
        raise ValueError(f"label must be [H, W] with values 0..255, got shape {label.shape}, "
                         f"range {label.min(initial=0)}..{label.max(initial=0)}")
    im = Image.fromarray(label.astype(np.uint8))  # "L"; putpalette makes it "P"
    im.putpalette(voc_palette().ravel().tolist())
    return im


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.5, ignore_index: int | None = None) -> np.ndarray:
    """RGB uint8 [H, W, 3] with the VOC colours of ``label`` [H, W] blended in; background (0) and ``ignore_index``
    pixels keep the image."""
    blend = (1 - alpha) * image.astype(np.float32) + alpha * colorize(label).astype(np.float32)
    keep = label == 0
    if ignore_index is not None:
        keep |= label == ignore_index
    return np.where(keep[..., None], image, blend.round().astype(np.uint8))


def cam_tiles(image: np.ndarray, cams: np.ndarray, classes: list[int], names: list[str] | None = None,
              alpha: float = 0.5) -> tuple[list[np.ndarray], list[str]]:
    """Heat maps of the foreground CAMs ``cams`` [C-1, H, W] (values in [0, 1]) of ``classes`` (1-based class
    indices) over ``image``, with their captions (class names when given)."""
    tiles = [heatmap(cams[c - 1], image, alpha) for c in classes]
    captions = [names[c] if names is not None and c < len(names) else f"class {c}" for c in classes]
    return tiles, captions


def heatmap(cam: np.ndarray, image: np.ndarray | None = None, alpha: float = 0.5) -> np.ndarray:
    """Values in [0, 1] [H, W] -> jet-coloured RGB uint8, blended over ``image`` if given."""
    v = np.clip(cam, 0.0, 1.0)[..., None]
    rgb = np.clip(np.concatenate([1.5 - np.abs(4 * v - 3), 1.5 - np.abs(4 * v - 2), 1.5 - np.abs(4 * v - 1)], -1), 0, 1)
    rgb = rgb * 255.0
    if image is not None:
        rgb = alpha * rgb + (1 - alpha) * image.astype(np.float32)
    return rgb.astype(np.uint8)


def save_grid(rows: list[list[np.ndarray]], path: str | Path, gap: int = 2,
              captions: list[list[str]] | None = None, min_size: int = 0) -> Path:
    """Tiles of RGB uint8 [H, W, 3] -> one PNG; tiles are resized to the first's size (enlarged by a whole factor
    until its short side is >= ``min_size``), shorter rows are padded white. ``captions`` (same nesting as ``rows``,
    "" for none) are written in each tile's top-left corner."""
    h, w = rows[0][0].shape[:2]
    factor = max(1, -(-min_size // min(h, w)))
    h, w = h * factor, w * factor
    cols = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if tile.shape[:2] != (h, w):
                tile = np.asarray(Image.fromarray(tile).resize((w, h), Image.NEAREST))
            grid[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = tile
    image = Image.fromarray(grid)
    if captions:
        draw = ImageDraw.Draw(image)
        for i, row in enumerate(captions):
            for j, text in enumerate(row):
                if text:
                    x, y = j * (w + gap) + 2, i * (h + gap) + 1
                    draw.rectangle(draw.textbbox((x, y), text), fill=(0, 0, 0))
                    draw.text((x, y), text, fill=(255, 255, 255))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path

"""Training augmentation (SPEC §9) with every random choice drawn from an explicit numpy Generator.

Order: random rescale U(lo, hi) (bilinear) -> horizontal flip p 0.5 -> black pad + random crop, recording
``img_box`` = [h0, h1, w0, w1], the crop's valid (non-padded) region -> colour jitter (0.4, 0.4, 0.2, 0.1)
p 0.8 -> grayscale p 0.2 -> Gaussian blur p 1.0 (radius U(0.1, 2.0)).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from .._compat import ensure_torchvision

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def normalize(img: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> ImageNet-normalised float32 [3, H, W]."""
    return ((img.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).copy()


def denormalize(img):
    """Normalised [B, 3, H, W] tensor -> float in [0, 255] (same type and device)."""
    mean = img.new_tensor(IMAGENET_MEAN * 255.0).view(1, 3, 1, 1)
    std = img.new_tensor(IMAGENET_STD * 255.0).view(1, 3, 1, 1)
    return img * std + mean


def random_rescale(img: Image.Image, rng: np.random.Generator, scale_range: tuple[float, float]) -> Image.Image:
    s = rng.uniform(*scale_range)
    w, h = img.size
    return img.resize((max(1, int(w * s)), max(1, int(h * s))), Image.BILINEAR)


def random_pad_crop(img: np.ndarray, rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[int]]:
    """[H, W, 3] -> [size, size, 3]: place the image at a random offset on a black canvas at least ``size``
    large, then crop a random ``size`` window. Returns the crop and its valid region [h0, h1, w0, w1]."""
    h, w = img.shape[:2]
    ch, cw = max(size, h), max(size, w)
    ph, pw = rng.integers(0, ch - h + 1), rng.integers(0, cw - w + 1)
    canvas = np.zeros((ch, cw, 3), dtype=img.dtype)
    canvas[ph:ph + h, pw:pw + w] = img
    sh, sw = rng.integers(0, ch - size + 1), rng.integers(0, cw - size + 1)
    crop = canvas[sh:sh + size, sw:sw + size]
    box = [max(ph - sh, 0), min(ph + h - sh, size), max(pw - sw, 0), min(pw + w - sw, size)]
    return crop, [int(v) for v in box]


def color_jitter(img: Image.Image, rng: np.random.Generator, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.2, hue: float = 0.1) -> Image.Image:
    """torchvision's ColorJitter semantics (random factors, random order), seeded by ``rng``."""
    ensure_torchvision()
    import torchvision.transforms.functional as TF

    ops = [
        lambda im: TF.adjust_brightness(im, rng.uniform(1 - brightness, 1 + brightness)),
        lambda im: TF.adjust_contrast(im, rng.uniform(1 - contrast, 1 + contrast)),
        lambda im: TF.adjust_saturation(im, rng.uniform(1 - saturation, 1 + saturation)),
        lambda im: TF.adjust_hue(im, rng.uniform(-hue, hue)),
    ]
    for i in rng.permutation(4):
        img = ops[i](img)
    return img


def photometric(img: Image.Image, rng: np.random.Generator, jitter_p: float = 0.8, gray_p: float = 0.2,
                blur_p: float = 1.0) -> Image.Image:
    if rng.random() < jitter_p:
        img = color_jitter(img, rng)
    if rng.random() < gray_p:
        img = img.convert("L").convert("RGB")
    if rng.random() < blur_p:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    return img


def augment(img: Image.Image, rng: np.random.Generator, crop_size: int, rescale_range: tuple[float, float],
            jitter_p: float = 0.8, gray_p: float = 0.2, blur_p: float = 1.0) -> tuple[np.ndarray, list[int]]:
    """PIL RGB image -> augmented uint8 crop [S, S, 3] and its img_box."""
    img = random_rescale(img, rng, rescale_range)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    crop, box = random_pad_crop(np.asarray(img), rng, crop_size)
    return np.asarray(photometric(Image.fromarray(crop), rng, jitter_p, gray_p, blur_p)), box

"""Training augmentation (docs/methods/toco-mcc.md §9) with every random choice drawn from an explicit numpy Generator.

Order: random rescale U(lo, hi) (bilinear) -> horizontal flip p 0.5 -> black pad + random crop, recording
``img_box`` = [h0, h1, w0, w1], the crop's valid (non-padded) region -> colour jitter (0.4, 0.4, 0.2, 0.1)
p 0.8 -> grayscale p 0.2 -> Gaussian blur p 1.0 (radius U(0.1, 2.0)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from .._compat import ensure_torchvision

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def normalize(img: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> ImageNet-normalised float32 [3, H, W]."""
    return ((img.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).copy()


# The reference's de-normalisation constants, in pixel units, as its literals (docs/methods/toco-mcc.md §4.2). Not IMAGENET_* x 255: in
# float32 0.224 * 255 = 57.120003, one ulp above float32(57.12) = 57.119999, which moves 26 of the 256 green levels
# of the quantised image that PAR sees.
DENORM_MEAN = (123.675, 116.28, 103.53)
DENORM_STD = (58.395, 57.12, 57.375)


def denormalize(img: torch.Tensor) -> torch.Tensor:
    """Normalised [B, 3, H, W] -> float32 pixel units, per channel ``img * std + mean`` with the reference's literals.

    The reference's arithmetic exactly: the Python literals become float32 scalars, and the multiply and the add are
    two float32 ops, each rounded once (no fused multiply-add)."""
    img = img.float()
    std = img.new_tensor(DENORM_STD).view(1, 3, 1, 1)
    mean = img.new_tensor(DENORM_MEAN).view(1, 3, 1, 1)
    return img * std + mean


def denormalize_uint8(img: torch.Tensor, *, round_levels: bool = False) -> torch.Tensor:
    """Normalised [B, 3, H, W] -> uint8 image, quantised as the reference does: the float -> uint8 conversion
    truncates toward zero, so a level that de-normalises to 25.99998 comes back as 25 (with the training pipeline's
    normalisation, 19 / 7 / 6 of the 256 R / G / B levels come back one lower). ``round_levels`` rounds to the
    nearest level instead (``quirks.round_denorm``): every level then comes back as itself. Values are clamped to
    [0, 255] first, which changes nothing in (-1, 256) and keeps other inputs defined."""
    x = denormalize(img)
    if round_levels:
        x = x.round()
    return x.clamp(0, 255).to(torch.uint8)


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
    """PIL RGB image -> augmented uint8 crop [S, S, 3] and its img_box (flip before the crop: box stays right)."""
    img = random_rescale(img, rng, rescale_range)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    crop, box = random_pad_crop(np.asarray(img), rng, crop_size)
    return np.asarray(photometric(Image.fromarray(crop), rng, jitter_p, gray_p, blur_p)), box


def random_resized_crop(img: Image.Image, rng: np.random.Generator, size: int, scale: tuple[float, float] = (0.4, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), *, torchvision_fallback: bool = False
                        ) -> Image.Image:
    """torchvision's RandomResizedCrop (bicubic), seeded by ``rng``. After 10 rejected draws: the central square
    (ToCo's and MCC's second global view), or with ``torchvision_fallback`` torchvision's own fallback, the central
    crop of the whole image clamped to the ratio range."""
    W, H = img.size
    for _ in range(10):
        area = H * W * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= W and 0 < h <= H:
            i, j = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            return img.resize((size, size), Image.BICUBIC, box=(j, i, j + w, i + h))
    if torchvision_fallback:
        w, h = W, H
        if W / H < min(ratio):
            h = round(W / min(ratio))
        elif W / H > max(ratio):
            w = round(H * max(ratio))
    else:
        w = h = min(H, W)  # the central square
    i, j = (H - h) // 2, (W - w) // 2
    return img.resize((size, size), Image.BICUBIC, box=(j, i, j + w, i + h))


def maybe_flip(img: Image.Image, flip: bool) -> Image.Image:
    return img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img


def contrast_sample(img: Image.Image, rng: np.random.Generator, crop_size: int, rescale_range: tuple[float, float],
                    jitter_p: float = 0.8, gray_p: float = 0.2, blur_p: float = 1.0, *, share_flip: bool = False,
                    flip_box: bool = False) -> dict[str, np.ndarray | list[int]]:
    """ToCo / MCC training views of one image (docs/methods/toco-mcc.md §5, §6, §9), uint8 [S, S, 3] each:

    - ``img``: rescale -> pad + crop (img_box) -> flip -> photometric. Reference quirk: the flip comes after
      img_box is computed and the box is not flipped (``flip_box`` flips it).
    - ``local``: the same crop, its own flip (quirk; ``share_flip`` uses the image's), jitter, grayscale, blur p 0.5.
    - ``global2``: RandomResizedCrop(S, scale (0.4, 1)) of the original image, flip, jitter, grayscale, blur p 0.1,
      solarise p 0.2.
    """
    original = img
    crop, box = random_pad_crop(np.asarray(random_rescale(img, rng, rescale_range)), rng, crop_size)
    base = Image.fromarray(crop)
    flip = bool(rng.random() < 0.5)
    if flip and flip_box:
        box = [box[0], box[1], crop_size - box[3], crop_size - box[2]]
    main = photometric(maybe_flip(base, flip), rng, jitter_p, gray_p, blur_p)
    local_flip = flip if share_flip else bool(rng.random() < 0.5)
    local = photometric(maybe_flip(base, local_flip), rng, jitter_p, gray_p, blur_p=0.5)
    g2 = maybe_flip(random_resized_crop(original, rng, crop_size), bool(rng.random() < 0.5))
    g2 = photometric(g2, rng, jitter_p, gray_p, blur_p=0.1)
    if rng.random() < 0.2:
        g2 = ImageOps.solarize(g2, threshold=128)
    return {"img": np.asarray(main), "img_box": box, "local": np.asarray(local), "global2": np.asarray(g2)}


@dataclass(frozen=True)
class CropViews:
    """The training crop of every method (``augment``): ``views(image, rng)`` -> ``img`` [3, S, S] (ImageNet-normalised
    float32) and ``img_box`` [4] (h0, h1, w0, w1). A method whose loader must produce more views (ToCo's local and
    second global view, MCC's key masks) gives the dataset its own callable of this shape; it must pickle (loader
    workers run it) and draw every random choice from ``rng``."""

    crop_size: int
    rescale_range: tuple[float, float]
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 1.0

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        img, box = augment(image, rng, self.crop_size, self.rescale_range, self.jitter_p, self.gray_p, self.blur_p)
        return {"img": torch.from_numpy(normalize(img)), "img_box": torch.tensor(box, dtype=torch.long)}

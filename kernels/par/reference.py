"""PAR, pixel-adaptive refinement (AFA, CVPR 2022) as ToCo / MCC use it to refine CAMs into pseudo labels.

The exact PyTorch reference: the oracle for a fused kernel and the baseline it is timed against. It follows the
original module operation for operation, except that it never materialises the (B, K, 8·L, h, w) neighbour stack
(L = number of dilations): the 8·L shifted terms are accumulated one at a time, so memory is O((C + K + 8·L)·h·w)
per image instead of O(8·L·(C + K)·h·w).

Neighbour order (the original's 3x3 kernel order, per dilation d, dilations in the order given):
(-d, -d), (-d, 0), (-d, d), (0, -d), (0, d), (d, -d), (d, 0), (d, d) as (dy, dx).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_DILATIONS = (1, 2, 4, 8, 12, 24)
_EPS = 1e-8


def neighbour_offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """The 8·len(dilations) neighbour offsets (dy, dx), in affinity-channel order."""
    return [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def neighbour_distances(dilations: Sequence[int]) -> list[float]:
    """Position distance of each neighbour: d·√2 on the diagonals, d otherwise."""
    return [math.hypot(dy, dx) if dy and dx else float(abs(dy) + abs(dx)) for dy, dx in neighbour_offsets(dilations)]


def position_term(dilations: Sequence[int], w1: float, w2: float, dtype: torch.dtype,
                  device: torch.device | str | None = None) -> Tensor:
    """w2 · softmax over the neighbours of κ_P: the image-independent part of the affinity, shape [8·L]."""
    dist = torch.tensor(neighbour_distances(dilations), dtype=dtype, device=device)
    kappa = -(dist / (dist.std() + _EPS) / w1) ** 2
    return w2 * torch.softmax(kappa, dim=0)


def _pad(x: Tensor, p: int) -> Tensor:
    # replicate padding == clamping neighbour coordinates to the image, for any p (even p >= h or w)
    return F.pad(x, [p, p, p, p], mode="replicate") if p else x


def _neighbour(padded: Tensor, p: int, dy: int, dx: int, h: int, w: int) -> Tensor:
    """neighbour (dy, dx) of every pixel: a view of the padded tensor, no copy."""
    return padded[..., p + dy:p + dy + h, p + dx:p + dx + w]


def _affinity(images: Tensor, dilations: Sequence[int], w1: float, w2: float) -> Tensor:
    """images [B, C, h, w] in the compute dtype -> A [B, 8·L, h, w] in the same dtype."""
    b, _, h, w = images.shape
    offsets = neighbour_offsets(dilations)
    n = len(offsets)
    p = max(dilations)
    padded = _pad(images, p)

    # σ_I: unbiased std over the n neighbours, per pixel and channel; two passes for the same accuracy as torch.std
    mean = torch.zeros_like(images)
    for dy, dx in offsets:
        mean.add_(_neighbour(padded, p, dy, dx, h, w))
    mean = mean / n
    var = torch.zeros_like(images)
    for dy, dx in offsets:
        var.add_((_neighbour(padded, p, dy, dx, h, w) - mean) ** 2)
    sigma = (var / (n - 1)).sqrt()
    del mean, var

    kappa = images.new_empty(b, n, h, w)
    for k, (dy, dx) in enumerate(offsets):
        diff = (_neighbour(padded, p, dy, dx, h, w) - images).abs()
        kappa[:, k] = (-((diff / (sigma + _EPS) / w1) ** 2)).mean(dim=1)
    aff = torch.softmax(kappa, dim=1)
    del kappa
    return aff + position_term(dilations, w1, w2, aff.dtype, aff.device).view(1, n, 1, 1)


def _resize(masks: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(masks.shape[-2:]) == size:
        return masks
    return F.interpolate(masks, size=size, mode="bilinear", align_corners=True)


def _propagate(affinity: Tensor, masks: Tensor, dilations: Sequence[int], num_iter: int) -> Tensor:
    """affinity [B, 8·L, h, w], masks [B, K, h, w], both in the compute dtype -> [B, K, h, w]."""
    h, w = masks.shape[-2:]
    offsets = neighbour_offsets(dilations)
    p = max(dilations)
    for _ in range(num_iter):
        padded = _pad(masks, p)
        out = torch.zeros_like(masks)
        for k, (dy, dx) in enumerate(offsets):
            # [B, 1, h, w] * [B, K, h, w]: one affinity map serves every channel
            out = out.addcmul_(affinity[:, k:k + 1], _neighbour(padded, p, dy, dx, h, w))
        masks = out
    return masks


def par_affinity_reference(images: Tensor, dilations: Sequence[int] = DEFAULT_DILATIONS, w1: float = 0.3,
                           w2: float = 0.01) -> Tensor:
    """images [B, C, h, w] (C = 3, RGB in [0, 1]) -> affinity [B, 8·len(dilations), h, w] in the input dtype.

    A = softmax_k(κ_I) + w2 · softmax_k(κ_P): sums to 1 + w2 over k at every pixel.
    """
    ct = torch.promote_types(images.dtype, torch.float32)
    return _affinity(images.to(ct), dilations, w1, w2).to(images.dtype)


def par_propagate_reference(affinity: Tensor, masks: Tensor, dilations: Sequence[int] = DEFAULT_DILATIONS,
                            num_iter: int = 10) -> Tensor:
    """affinity [B, 8·L, h, w], masks [B, K, h', w'] -> refined masks [B, K, h, w] in the masks' dtype.

    Masks not at (h, w) are first resized bilinearly with align_corners=True.
    """
    ct = torch.promote_types(torch.promote_types(masks.dtype, affinity.dtype), torch.float32)
    out = _resize(masks.to(ct), tuple(affinity.shape[-2:]))
    return _propagate(affinity.to(ct), out, dilations, num_iter).to(masks.dtype)


def par_refine_reference(images: Tensor, masks: Tensor, dilations: Sequence[int] = DEFAULT_DILATIONS,
                         num_iter: int = 10, w1: float = 0.3, w2: float = 0.01) -> Tensor:
    """images [B, C, h, w] (C = 3, RGB in [0, 1]), masks [B, K, h', w'] -> refined masks [B, K, h, w].

    Computes in promote_types(dtype, float32) throughout (the affinity is never rounded to the input dtype) and
    returns the masks' dtype.
    """
    ct = torch.promote_types(torch.promote_types(images.dtype, masks.dtype), torch.float32)
    aff = _affinity(images.to(ct), dilations, w1, w2)
    out = _resize(masks.to(ct), tuple(images.shape[-2:]))
    return _propagate(aff, out, dilations, num_iter).to(masks.dtype)

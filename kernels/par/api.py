"""Public PAR ops: validate, pick the backend, run."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._backend import TRITON_DTYPES, check_devices, device_reasons, resolve_backend
from .reference import DEFAULT_DILATIONS, _resize, par_affinity_reference, par_propagate_reference, par_refine_reference


@torch.library.custom_op("fastwsss::par_affinity", mutates_args=())
def _par_affinity_op(images: Tensor, dilations: list[int], w1: float, w2: float) -> Tensor:
    """images [B, C, h, w] fp32 contiguous -> A [B, 8·L, h, w] fp32 (Triton)."""
    from . import _triton

    return _triton.par_affinity(images, dilations, w1, w2)


@_par_affinity_op.register_fake
def _(images, dilations, w1, w2):
    b, _, h, w = images.shape
    return images.new_empty(b, 8 * len(dilations), h, w)


@torch.library.custom_op("fastwsss::par_propagate", mutates_args=())
def _par_propagate_op(affinity: Tensor, masks: Tensor, dilations: list[int], num_iter: int) -> Tensor:
    """affinity [B, 8·L, h, w], masks [B, K, h, w], both fp32 contiguous -> [B, K, h, w] fp32 (Triton)."""
    from . import _triton

    return _triton.par_propagate(affinity, masks, dilations, num_iter)


@_par_propagate_op.register_fake
def _(affinity, masks, dilations, num_iter):
    return torch.empty_like(masks)


def par_reasons(*tensors: Tensor) -> list[str]:
    """Why the Triton path of the PAR ops (``par_refine``, ``par_affinity``, ``par_propagate``) cannot take these
    inputs ([] = it can): the op's tensor arguments, in its order. The kernels are forward-only: training runs PAR
    under no_grad, and where a gradient is wanted the reference (differentiable) runs instead."""
    reasons = device_reasons(*tensors)
    for t in tensors:
        if t.dtype not in TRITON_DTYPES:
            reasons.append(f"dtype {t.dtype} (the kernels compute in float32; the reference runs {t.dtype})")
        if t.numel() == 0:
            reasons.append(f"empty input {tuple(t.shape)}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        reasons.append("inputs require grad (the Triton PAR is forward-only; the reference is differentiable)")
    return reasons


def _fp32(x: Tensor) -> Tensor:
    return x.to(torch.float32).contiguous()


def _check_dilations(op: str, dilations: Sequence[int]) -> None:
    if len(dilations) == 0 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dilations):
        raise ValueError(f"{op}: dilations must be a non-empty sequence of positive ints, got {dilations!r}")


def _check_4d(op: str, name: str, x: Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"{op}: {name} must be [B, C, h, w], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be floating point, got {x.dtype}")


def _check_devices(op: str, **tensors: Tensor) -> None:
    if errors := check_devices(**tensors):
        raise ValueError(f"{op}: " + "; ".join(errors))


def _check_num_iter(op: str, num_iter: int) -> None:
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 0:
        raise ValueError(f"{op}: num_iter must be an int >= 0, got {num_iter!r}")


def par_affinity(images: Tensor, dilations: Sequence[int] = DEFAULT_DILATIONS, w1: float = 0.3, w2: float = 0.01,
                 backend: str = "auto") -> Tensor:
    """Pixel-adaptive affinity of an image to its 8·len(dilations) dilated neighbours.

    images [B, 3, h, w] in [0, 1] -> A [B, 8·len(dilations), h, w] in the images' dtype; A >= 0 and sums to 1 + w2
    over its channels at every pixel. It depends on the image only: compute it once, then `par_propagate` any number
    of mask sets with it.
    """
    op = "par_affinity"
    _check_4d(op, "images", images)
    _check_dilations(op, dilations)
    if resolve_backend(backend, op, par_reasons(images), images) == "triton":
        return _par_affinity_op(_fp32(images), list(dilations), float(w1), float(w2)).to(images.dtype)
    return par_affinity_reference(images, dilations, w1, w2)


def par_propagate(affinity: Tensor, masks: Tensor, dilations: Sequence[int] = DEFAULT_DILATIONS,
                  num_iter: int = 10, backend: str = "auto") -> Tensor:
    """num_iter rounds of masks <- Σ_k A_k · neighbour_k(masks), neighbours read with replicate padding.

    affinity [B, 8·len(dilations), h, w] from `par_affinity` (same dilations), masks [B, K, h', w'] (resized
    bilinearly, align_corners=True, to (h, w) when h', w' differ) -> [B, K, h, w] in the masks' dtype. Linear in
    masks and channel-wise: channels never mix.
    """
    op = "par_propagate"
    _check_4d(op, "affinity", affinity)
    _check_4d(op, "masks", masks)
    _check_dilations(op, dilations)
    _check_num_iter(op, num_iter)
    if affinity.shape[1] != 8 * len(dilations):
        raise ValueError(f"{op}: affinity has {affinity.shape[1]} channels, dilations {tuple(dilations)} need "
                         f"{8 * len(dilations)}")
    if masks.shape[0] != affinity.shape[0]:
        raise ValueError(f"{op}: batch sizes differ: affinity {affinity.shape[0]}, masks {masks.shape[0]}")
    _check_devices(op, affinity=affinity, masks=masks)
    if resolve_backend(backend, op, par_reasons(affinity, masks), affinity, masks) == "triton":
        out = _fp32(_resize(masks.to(torch.float32), tuple(affinity.shape[-2:])))
        return _par_propagate_op(_fp32(affinity), out, list(dilations), num_iter).to(masks.dtype)
    return par_propagate_reference(affinity, masks, dilations, num_iter)


def par_refine(images: Tensor, masks: Tensor, dilations: Sequence[int] = DEFAULT_DILATIONS, num_iter: int = 10,
               w1: float = 0.3, w2: float = 0.01, backend: str = "auto") -> Tensor:
    """Pixel-adaptive refinement (AFA, CVPR 2022) of masks (CAMs) by the image, as in ToCo / MCC.

    images [B, 3, h, w] in [0, 1], masks [B, K, h', w'] -> refined masks [B, K, h, w] in the masks' dtype.
    Equals `par_propagate(par_affinity(images), masks)`, without rounding the affinity to the input dtype.
    """
    op = "par_refine"
    _check_4d(op, "images", images)
    _check_4d(op, "masks", masks)
    _check_dilations(op, dilations)
    _check_num_iter(op, num_iter)
    if masks.shape[0] != images.shape[0]:
        raise ValueError(f"{op}: batch sizes differ: images {images.shape[0]}, masks {masks.shape[0]}")
    _check_devices(op, images=images, masks=masks)
    if resolve_backend(backend, op, par_reasons(images, masks), images, masks) == "triton":
        aff = _par_affinity_op(_fp32(images), list(dilations), float(w1), float(w2))
        out = _fp32(_resize(masks.to(torch.float32), tuple(images.shape[-2:])))
        return _par_propagate_op(aff, out, list(dilations), num_iter).to(masks.dtype)
    return par_refine_reference(images, masks, dilations, num_iter, w1, w2)

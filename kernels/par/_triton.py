"""Triton kernels of PAR: the 8·L-neighbour image affinity (once per image) and one propagation round per launch.

Neighbours are read through clamped coordinates (= replicate padding, for any dilation); no neighbour stack and no
padded copy is ever built. The only module of the op that imports triton. Derivation and memory cost: README.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _backend
from .._backend import INTERPRET
from .reference import neighbour_offsets, position_term

_EPS = 1e-8


def _empty(shape: tuple[int, ...], like: Tensor) -> Tensor:
    return _backend.empty(*shape, dtype=torch.float32, device=like.device)


@triton.jit
def _neighbour(off_ptr, k, y, x, H, W):
    """Flat index of neighbour k of pixels (y, x), coordinates clamped to the image (replicate padding)."""
    dy = tl.load(off_ptr + 2 * k)
    dx = tl.load(off_ptr + 2 * k + 1)
    yy = tl.minimum(tl.maximum(y + dy, 0), H - 1)
    xx = tl.minimum(tl.maximum(x + dx, 0), W - 1)
    return yy * W + xx


@triton.jit
def _pixels(B, H, W, BLOCK_P: tl.constexpr, INT64: tl.constexpr):
    """This program's BLOCK_P pixels of the flattened (image, pixel) axis: (b, p, y, x, in-range mask), in int32
    unless INT64 (a tensor too large for 32-bit offsets)."""
    pid = tl.program_id(0)
    HW = H * W
    if INT64:
        pid = pid.to(tl.int64)
        HW = HW.to(tl.int64)
    g = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    b = g // HW
    p = g - b * HW
    return b, p, p // W, p % W, g < B * HW


@triton.jit
def _kappa(img_ptr, chan, off_ptr, k, y, x, H, W, centre, sigma, w1, m2, cmask, C):
    """κ_I of neighbour k: mean over colour channels of −(|I_nbr − I| / σ / w1)², σ = σ_I + eps, [BLOCK_P] fp32."""
    v = tl.load(img_ptr + chan + _neighbour(off_ptr, k, y, x, H, W)[None, :], mask=m2, other=0.0)
    t = tl.abs(v - centre) / sigma / w1  # the reference's order of operations
    return -tl.sum(tl.where(cmask[:, None], t * t, 0.0), axis=0) / C


@triton.jit
def par_affinity_fwd_kernel(img_ptr, off_ptr, pos_ptr, aff_ptr, B, C, H, W, w1, eps,
                            NB: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, INT64: tl.constexpr):
    """images [B, C, H, W] fp32 -> A [B, NB, H, W] fp32 = softmax_k(κ_I) + pos (pos = w2·softmax_k(κ_P), [NB]).

    One program = BLOCK_P pixels of the flattened (image, pixel) axis, all colour channels. Four sweeps over the NB
    neighbours (the gathers hit the cache): mean, unbiased variance (two passes, as torch.std), the online softmax's
    max and sum, then the write.
    """
    b, p, y, x, pmask = _pixels(B, H, W, BLOCK_P, INT64)
    HW = H * W
    ch = tl.arange(0, BLOCK_C)
    cmask = ch < C
    m2 = cmask[:, None] & pmask[None, :]
    chan = (b[None, :] * C + ch[:, None]) * HW  # [BLOCK_C, BLOCK_P]
    centre = tl.load(img_ptr + chan + p[None, :], mask=m2, other=0.0)

    total = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    for k in range(NB):
        total += tl.load(img_ptr + chan + _neighbour(off_ptr, k, y, x, H, W)[None, :], mask=m2, other=0.0)
    mean = total / NB
    sq = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    for k in range(NB):
        v = tl.load(img_ptr + chan + _neighbour(off_ptr, k, y, x, H, W)[None, :], mask=m2, other=0.0)
        sq += (v - mean) * (v - mean)
    sigma = tl.sqrt(sq / (NB - 1)) + eps  # flat image: σ_I = 0 -> κ = 0, a uniform softmax

    m = tl.full((BLOCK_P,), float("-inf"), dtype=tl.float32)
    denom = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for k in range(NB):
        kap = _kappa(img_ptr, chan, off_ptr, k, y, x, H, W, centre, sigma, w1, m2, cmask, C)
        m_new = tl.maximum(m, kap)
        denom = denom * tl.exp(m - m_new) + tl.exp(kap - m_new)
        m = m_new
    out = aff_ptr + b * NB * HW + p
    for k in range(NB):
        kap = _kappa(img_ptr, chan, off_ptr, k, y, x, H, W, centre, sigma, w1, m2, cmask, C)
        tl.store(out + k * HW, tl.exp(kap - m) / denom + tl.load(pos_ptr + k), mask=pmask)


@triton.jit
def par_propagate_fwd_kernel(aff_ptr, src_ptr, dst_ptr, valid_ptr, off_ptr, B, K, H, W, NB: tl.constexpr,
                             BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, INT64: tl.constexpr):
    """One round: dst[b, k, p] = Σ_j A[b, j, p] · src[b, k, neighbour_j(p)]. A channel with valid[b, k] = 0 is an
    all-zero mask: its loads are skipped and 0 is written. A [B, NB, H, W], src / dst [B, K, H, W] fp32, valid
    [B, K] int8. One program = BLOCK_K channels × BLOCK_P pixels of the flattened (image, pixel) axis."""
    b, p, y, x, pmask = _pixels(B, H, W, BLOCK_P, INT64)
    HW = H * W
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    smask = (ks < K)[:, None] & pmask[None, :]
    row = b[None, :] * K + ks[:, None]  # [BLOCK_K, BLOCK_P]: (image, channel)
    lmask = smask & (tl.load(valid_ptr + row, mask=smask, other=0) != 0)
    chan = row * HW
    aff = aff_ptr + b * NB * HW + p
    acc = tl.zeros((BLOCK_K, BLOCK_P), dtype=tl.float32)
    for k in range(NB):
        a = tl.load(aff + k * HW, mask=pmask, other=0.0)
        v = tl.load(src_ptr + chan + _neighbour(off_ptr, k, y, x, H, W)[None, :], mask=lmask, other=0.0)
        acc += a[None, :] * v
    tl.store(dst_ptr + chan + p[None, :], acc, mask=smask)


_CONSTANTS: dict[tuple, Tensor] = {}


def _offsets(dilations: Sequence[int], device: torch.device) -> Tensor:
    """Neighbour offsets [NB, 2] int32 (dy, dx) on the device, cached."""
    key = ("offsets", tuple(dilations), str(device))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(neighbour_offsets(dilations), dtype=torch.int32, device=device).contiguous()
    return _CONSTANTS[key]


def _position(dilations: Sequence[int], w1: float, w2: float, device: torch.device) -> Tensor:
    """w2 · softmax_k(κ_P) [NB] fp32 on the device, cached."""
    key = ("position", tuple(dilations), w1, w2, str(device))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = position_term(dilations, w1, w2, torch.float32, device).contiguous()
    return _CONSTANTS[key]


_INT32_LIMIT = 2**31 - 1


def _pixel_block(pixels: int, channels: int, channel_blocks: int, widest: int, device: torch.device) -> int:
    """Pixels per program of a [channels, pixels] tile: ``widest`` (a power of two, bounded by registers), halved
    down to 32 until the grid has at least eight programs per SM, so that a single inference image still fills the
    GPU. Interpreter: large tiles, few programs (~1.3 ms per program)."""
    if INTERPRET:
        return min(triton.next_power_of_2(pixels), max(262144 // channels, 1024))
    bp, target = widest, 8 * _backend.num_sms(device)
    while bp > 32 and triton.cdiv(pixels, bp) * channel_blocks < target:
        bp //= 2
    return bp


def par_affinity(images: Tensor, dilations: Sequence[int], w1: float, w2: float) -> Tensor:
    """images [B, C, h, w] fp32 contiguous -> A [B, 8·len(dilations), h, w] fp32."""
    B, C, H, W = images.shape
    offsets, pos = _offsets(dilations, images.device), _position(dilations, w1, w2, images.device)
    nb = offsets.shape[0]
    aff = _empty((B, nb, H, W), images)
    bc = triton.next_power_of_2(C)
    bp = _pixel_block(B * H * W, bc, 1, 128, images.device)
    par_affinity_fwd_kernel[(triton.cdiv(B * H * W, bp),)](
        images, offsets, pos, aff, B, C, H, W, w1, _EPS, NB=nb, BLOCK_C=bc, BLOCK_P=bp,
        INT64=max(images.numel(), aff.numel()) > _INT32_LIMIT, num_warps=4)
    return aff


def par_propagate(affinity: Tensor, masks: Tensor, dilations: Sequence[int], num_iter: int) -> Tensor:
    """affinity [B, NB, h, w] fp32, masks [B, K, h, w] fp32 (both contiguous, same h, w) -> [B, K, h, w] fp32.

    Ping-pong between two buffers; the input is never written. Channels that are identically zero (absent classes)
    are found in one pass and skipped: a batch pays in memory traffic only for each image's valid channels.
    """
    B, K, H, W = masks.shape
    if num_iter == 0:
        return masks.clone()
    offsets = _offsets(dilations, masks.device)
    nb = offsets.shape[0]
    valid = masks.ne(0).flatten(2).any(-1).to(torch.int8).contiguous()  # [B, K]; NaN counts as valid
    bk = min(triton.next_power_of_2(K), 64 if INTERPRET else 4)
    bp = _pixel_block(B * H * W, bk, triton.cdiv(K, bk), 1024 // bk, masks.device)
    grid = (triton.cdiv(B * H * W, bp), triton.cdiv(K, bk))
    int64 = max(masks.numel(), affinity.numel()) > _INT32_LIMIT
    bufs = [_empty(masks.shape, masks), _empty(masks.shape, masks) if num_iter > 1 else None]
    src = masks
    for it in range(num_iter):
        dst = bufs[it % 2]
        par_propagate_fwd_kernel[grid](affinity, src, dst, valid, offsets, B, K, H, W, NB=nb, BLOCK_K=bk, BLOCK_P=bp,
                                       INT64=int64, num_warps=4)
        src = dst
    return src

"""Triton kernels of the token affinity loss: pair sums (forward) and their gradient (backward).

The pair masks are built from the token labels inside the kernels; tiles of C = X̂ X̂ᵀ live in registers only.
The only module of the op that imports triton. Derivation and memory cost: README.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backend import INTERPRET

# Set by the tests: fresh outputs are filled with NaN so that an element a kernel forgets to write cannot pass.
NAN_FILL = False


def _empty(shape: tuple[int, ...], like: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    if NAN_FILL:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


@triton.jit
def _pair_masks(lab_b, rows, cols, N, ignore_index):
    """(positive, negative) [BLOCK_M, BLOCK_N] masks of one tile: same image, i != j, neither label ignored."""
    li = tl.load(lab_b + rows, mask=rows < N, other=ignore_index)
    lj = tl.load(lab_b + cols, mask=cols < N, other=ignore_index)
    pair = (li != ignore_index)[:, None] & (lj != ignore_index)[None, :] & (rows[:, None] != cols[None, :])
    same = li[:, None] == lj[None, :]
    return pair & same, pair & (li[:, None] != lj[None, :])


@triton.jit
def _cosine_tile(x_b, rows, cols, N, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[rows, cols] = X̂[rows] · X̂[cols]ᵀ for one image, [BLOCK_M, BLOCK_N] fp32 (exact fp32 products)."""
    rmask = rows < N
    cmask = cols < N
    r64 = rows.to(tl.int64) * D
    c64 = cols.to(tl.int64) * D
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        a = tl.load(x_b + r64[:, None] + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        bt = tl.load(x_b + c64[None, :] + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, bt, acc, input_precision="ieee")
    return acc


@triton.jit
def token_affinity_fwd_kernel(x_ptr, lab_ptr, tiles_ptr, part_ptr, N, D, n_tiles, ignore_index,
                              ABSOLUTE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program = one tile (ti, tj >= ti) of one image -> (Σ_P s, |P|, Σ_Nn s, |Nn|) of the tile and its mirror.

    x [B, N, D] fp32 (normalised), labels [B, N] int32, tiles [2, n_tiles] int32, partials [B, n_tiles, 4] fp32.
    """
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    ti = tl.load(tiles_ptr + t)
    tj = tl.load(tiles_ptr + n_tiles + t)
    rows = ti * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tj * BLOCK_N + tl.arange(0, BLOCK_N)
    c = _cosine_tile(x_ptr + b * N * D, rows, cols, N, D, BLOCK_N, BLOCK_N, BLOCK_K)
    if ABSOLUTE:
        c = tl.abs(c)
    pos, neg = _pair_masks(lab_ptr + b * N, rows, cols, N, ignore_index)
    # an off-diagonal tile also stands for its mirror (s and the masks are symmetric)
    w = 2.0 - (ti == tj).to(tl.float32)
    sp = tl.sum(tl.sum(tl.where(pos, c, 0.0), axis=1), axis=0) * w
    n_p = tl.sum(tl.sum(pos.to(tl.float32), axis=1), axis=0) * w
    sn = tl.sum(tl.sum(tl.where(neg, c, 0.0), axis=1), axis=0) * w
    n_n = tl.sum(tl.sum(neg.to(tl.float32), axis=1), axis=0) * w
    out = part_ptr + (b * n_tiles + t) * 4
    tl.store(out, sp)
    tl.store(out + 1, n_p)
    tl.store(out + 2, sn)
    tl.store(out + 3, n_n)


@triton.jit
def token_affinity_bwd_kernel(x_ptr, lab_ptr, coef_ptr, dx_ptr, N, D, ignore_index, ABSOLUTE: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              BLOCK_DO: tl.constexpr):
    """dX̂[rows, dcols] = Σ_j G_ij X̂[j, dcols], G_ij = coef_P·sign(c_ij) on positive pairs, coef_Nn·sign(c_ij) on
    negative ones, 0 elsewhere (sign -> 1 if not ABSOLUTE). One program = BLOCK_M rows × BLOCK_DO features of one
    image; C tiles are recomputed, never stored. coef [2] fp32 = 2·∂L/∂(Σ_P s, Σ_Nn s)."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    x_b = x_ptr + b * N * D
    lab_b = lab_ptr + b * N
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dmask = dcols < D
    coef_p = tl.load(coef_ptr)
    coef_n = tl.load(coef_ptr + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        c = _cosine_tile(x_b, rows, cols, N, D, BLOCK_M, BLOCK_N, BLOCK_K)
        pos, neg = _pair_masks(lab_b, rows, cols, N, ignore_index)
        if ABSOLUTE:
            sign = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))  # torch's subgradient of |c| at 0 is 0
            g = tl.where(pos, coef_p * sign, tl.where(neg, coef_n * sign, 0.0))
        else:
            g = tl.where(pos, coef_p, tl.where(neg, coef_n, 0.0))
        xj = tl.load(x_b + cols.to(tl.int64)[:, None] * D + dcols[None, :],
                     mask=(cols < N)[:, None] & dmask[None, :], other=0.0)
        acc = tl.dot(g, xj, acc, input_precision="ieee")
    out = dx_ptr + b * N * D + rows.to(tl.int64)[:, None] * D + dcols[None, :]
    tl.store(out, acc, mask=(rows < N)[:, None] & dmask[None, :])


def _blocks(d: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, BLOCK_DO, backward num_warps). Interpreter: few large programs (~1.3 ms per program)."""
    if INTERPRET:
        return 128, 128, min(triton.next_power_of_2(d), 1024), 4
    return 64, 32, min(triton.next_power_of_2(d), 128), 8


def token_affinity_sums(xhat: Tensor, labels: Tensor, absolute: bool, ignore_index: int) -> Tensor:
    """xhat [B, N, D] fp32 contiguous (normalised), labels [B, N] int32 -> [Σ_P s, |P|, Σ_Nn s, |Nn|] float64."""
    B, N, D = xhat.shape
    bn, bk, _, _ = _blocks(D)
    t = triton.cdiv(N, bn)
    tiles = torch.triu_indices(t, t, device=xhat.device).to(torch.int32).contiguous()  # [2, t(t+1)/2]: tj >= ti
    n_tiles = tiles.shape[1]
    part = _empty((B, n_tiles, 4), xhat)
    token_affinity_fwd_kernel[(n_tiles, B)](xhat, labels, tiles, part, N, D, n_tiles, ignore_index,
                                            ABSOLUTE=absolute, BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    return part.to(torch.float64).sum(dim=(0, 1))  # fixed-shape reduction: deterministic


def token_affinity_sums_backward(grad: Tensor, xhat: Tensor, labels: Tensor, absolute: bool,
                                 ignore_index: int) -> Tensor:
    """grad [4] (of the sums; the counts' entries are ignored) -> ∂/∂xhat [B, N, D] fp32."""
    B, N, D = xhat.shape
    bn, bk, bdo, warps = _blocks(D)
    coef = (2 * grad[0::2]).to(torch.float32).contiguous()  # (Σ_P s, Σ_Nn s); each pair appears as (i, j), (j, i)
    dx = _empty((B, N, D), xhat)
    grid = (triton.cdiv(N, bn), triton.cdiv(D, bdo), B)
    token_affinity_bwd_kernel[grid](xhat, labels, coef, dx, N, D, ignore_index, ABSOLUTE=absolute, BLOCK_M=bn,
                                    BLOCK_N=bn, BLOCK_K=bk, BLOCK_DO=bdo, num_warps=warps)
    return dx

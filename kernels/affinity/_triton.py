"""Triton kernels of the token affinity loss: pair sums (forward) and their gradient (backward).

The pair masks are built from the token labels inside the kernels; tiles of C = X̂ X̂ᵀ live in registers only.
The only module of the op that imports triton. Derivation and memory cost: README.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _backend
from .._backend import INTERPRET


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
def token_affinity_bwd_kernel(x_ptr, lab_ptr, coef_ptr, part_ptr, B, N, D, ignore_index, n_col_blocks, split,
                              ABSOLUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr):
    """Partial dX̂[rows] = Σ_{j in this program's column blocks} G_ij X̂_j, G_ij = coef_P·sign(c_ij) on positive
    pairs, coef_Nn·sign(c_ij) on negative ones, 0 elsewhere (sign -> 1 if not ABSOLUTE).

    One program = BLOCK_M rows of one image and the column blocks s, s + split, ... (s = program_id(1)): each tile
    C_ij is computed once (K-loop over all of D) and then multiplies every feature slice of X̂_j, accumulated into
    this program's own rows of partial s, part [split, B, N, D] fp32 (read-modify-write of rows no other program
    touches; a barrier orders one column block's writes before the next one's reads). coef [2] fp32 =
    2·∂L/∂(Σ_P s, Σ_Nn s). The caller sums the partials over s in a fixed order: deterministic, no atomics."""
    pid_m = tl.program_id(0)
    s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    x_b = x_ptr + b * N * D
    lab_b = lab_ptr + b * N
    out_b = part_ptr + (s * B + b) * N * D
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    r64 = rows.to(tl.int64)[:, None] * D
    coef_p = tl.load(coef_ptr)
    coef_n = tl.load(coef_ptr + 1)
    for jb in range(s, n_col_blocks, split):
        cols = jb * BLOCK_N + tl.arange(0, BLOCK_N)
        c = _cosine_tile(x_b, rows, cols, N, D, BLOCK_M, BLOCK_N, BLOCK_K)
        pos, neg = _pair_masks(lab_b, rows, cols, N, ignore_index)
        if ABSOLUTE:
            sign = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))  # torch's subgradient of |c| at 0 is 0
            g = tl.where(pos, coef_p * sign, tl.where(neg, coef_n * sign, 0.0))
        else:
            g = tl.where(pos, coef_p, tl.where(neg, coef_n, 0.0))
        c64 = cols.to(tl.int64)[:, None] * D
        cmask = (cols < N)[:, None]
        for d0 in range(0, D, BLOCK_DO):
            dcols = d0 + tl.arange(0, BLOCK_DO)
            dmask = (dcols < D)[None, :]
            xj = tl.load(x_b + c64 + dcols[None, :], mask=cmask & dmask, other=0.0)
            out = out_b + r64 + dcols[None, :]
            omask = rmask[:, None] & dmask
            acc = tl.load(out, mask=omask & (jb != s), other=0.0)  # the first column block starts from 0
            acc = tl.dot(g, xj, acc, input_precision="ieee")
            tl.store(out, acc, mask=omask)
        tl.debug_barrier()  # this block's stores before the next block's loads (other threads may hold them)


def _blocks(d: int) -> dict[str, dict[str, int]]:
    """Tile sizes and warps of each kernel. GPU: the backward's fp32 FMA dots hold a whole K-slice of their A tile
    per thread, so its column block (the K of G·X̂_j) is 32 wide: 101-118 registers, no spills (compile check).
    Interpreter: few large programs (~1.3 ms per program)."""
    if INTERPRET:
        return {"fwd": {"BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4},
                "bwd": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128,
                        "BLOCK_DO": min(triton.next_power_of_2(d), 1024), "num_warps": 4}}
    return {"fwd": {"BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4},
            "bwd": {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_DO": 64, "num_warps": 8}}


def token_affinity_sums(xhat: Tensor, labels: Tensor, absolute: bool, ignore_index: int) -> Tensor:
    """xhat [B, N, D] fp32 contiguous (normalised), labels [B, N] int32 -> [Σ_P s, |P|, Σ_Nn s, |Nn|] float64."""
    B, N, D = xhat.shape
    cfg = _blocks(D)["fwd"]
    t = triton.cdiv(N, cfg["BLOCK_N"])
    tiles = torch.triu_indices(t, t, device=xhat.device).to(torch.int32).contiguous()  # [2, t(t+1)/2]: tj >= ti
    n_tiles = tiles.shape[1]
    part = _backend.empty(B, n_tiles, 4, dtype=torch.float32, device=xhat.device)
    token_affinity_fwd_kernel[(n_tiles, B)](xhat, labels, tiles, part, N, D, n_tiles, ignore_index,
                                            ABSOLUTE=absolute, **cfg)
    return part.to(torch.float64).sum(dim=(0, 1))  # fixed-shape reduction: deterministic


def token_affinity_sums_backward(grad: Tensor, xhat: Tensor, labels: Tensor, absolute: bool,
                                 ignore_index: int) -> Tensor:
    """grad [4] (of the sums; the counts' entries are ignored) -> ∂/∂xhat [B, N, D] fp32.

    The column blocks of each row block are split over ``split`` programs (enough programs for two per SM, at most
    one column block each); their fp32 partials are summed in a fixed order."""
    B, N, D = xhat.shape
    cfg = _blocks(D)["bwd"]
    coef = (2 * grad[0::2]).to(torch.float32).contiguous()  # (Σ_P s, Σ_Nn s); each pair appears as (i, j), (j, i)
    n_rows, n_cols = triton.cdiv(N, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"])
    split = max(1, min(n_cols, triton.cdiv(2 * _backend.num_sms(xhat.device), n_rows * B)))
    part = _backend.empty(split, B, N, D, dtype=torch.float32, device=xhat.device)
    token_affinity_bwd_kernel[(n_rows, split, B)](xhat, labels, coef, part, B, N, D, ignore_index, n_cols, split,
                                                  ABSOLUTE=absolute, **cfg)
    return part[0] if split == 1 else part.sum(0)

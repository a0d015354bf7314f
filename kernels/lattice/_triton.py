"""Triton permutohedral lattice: a fused per-pixel lattice-coordinate kernel, then splat, blur and slice kernels.

The only module of ``kernels.lattice`` that imports triton. ``TritonLattice(features)`` builds the lattice (one kernel
for the per-point elevation / rounding / rank / barycentric weights / vertex codes, then one torch sort and one
batched binary search), ``lattice_filter(values, *lattice.tensors, reverse)`` filters: a segmented-sum splat (no
atomics, fixed summation order), d+1 blur passes, one slice. Everything accumulates in float32. README.md has the math.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import _backend
from .._backend import INTERPRET
from .reference import PermutohedralLattice as ReferenceLattice
from .reference import _scale_factors, check_features

__all__ = ["MAX_FEATURES", "TritonLattice", "lattice_filter"]

MAX_FEATURES = 14  # d + 2 <= 16: the coordinate kernel keeps [BLOCK, 16, 16] rank tiles
SEG = 32  # splat: at most SEG items summed per row and level (long rows become several levels)
_CODE_LIMIT = 1 << 62
# The interpreter pays ~1.3 ms per program: big blocks there. GPU blocks keep every kernel under ~120 registers with
# no spills (benchmarks/compile_check.py; before -> after in README.md) and give a 224^2 batch several waves.
_BLOCKS = ({"coords": 4096, "splat": 4096, "blur": 4096, "slice": 4096, "channels": 64} if INTERPRET else
           {"coords": 16, "splat": 32, "blur": 32, "slice": 32, "channels": 32})
_INT32_LIMIT = 2**31 - 1


def _empty(*shape, dtype=torch.float32, device=None) -> torch.Tensor:
    return _backend.empty(*shape, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------------------- kernels


@triton.jit
def lattice_coords_kernel(feat_ptr, consts_ptr, radix_ptr, codes_ptr, bary_ptr, P, Np, N, stride_fb, stride_fc,
                          D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr):
    """Per lattice point p (image p // Np, pixel p % Np; pixels >= N are densecrf's zero padding): densecrf's
    float32 elevation, closest remainder-0 point (round half to even), rank, barycentric weights [P, D+1] and the
    int64 mixed-radix codes of the D+1 enclosing simplex vertices [P, D+1]. Launch with enable_fp_fusion=False:
    every float32 operation must round exactly as densecrf's (an FMA in ``sm - j * cf`` changes rounding ties)."""
    pid = tl.program_id(0).to(tl.int64)
    p = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    pmask = p < P
    img = p // Np
    n = p - img * Np
    fmask = pmask & (n < N)
    col = tl.arange(0, DP)  # coordinate / slot index
    valid = col < D + 1
    down = tl.load(consts_ptr + D)  # float32(1 / (D+1))
    up = tl.load(consts_ptr + D + 1)  # D + 1

    # elevate (densecrf's order): for j = D..1: elevated[j] = sm - j * cf; sm += cf.  elevated[0] = sm
    sm = tl.zeros([BLOCK], dtype=tl.float32)
    elev = tl.zeros([BLOCK, DP], dtype=tl.float32)
    for t in tl.static_range(D):
        j = D - t
        f = tl.load(feat_ptr + img * stride_fb + (j - 1) * stride_fc + n, mask=fmask, other=0.0)
        cf = f * tl.load(consts_ptr + (j - 1))
        e = sm - tl.load(consts_ptr + D + 2 + j) * cf
        elev = tl.where(col[None, :] == j, e[:, None], elev)
        sm = sm + cf
    elev = tl.where(col[None, :] == 0, sm[:, None], elev)

    # closest remainder-0 point: round half to EVEN (densecrf's SSE cvtps2dq), exact via |x| = floor + frac
    x = elev * down
    ax = tl.abs(x)
    fl = tl.floor(ax)
    frac = ax - fl  # exact for ax >= 0
    odd = (fl - 2.0 * tl.floor(fl * 0.5)) == 1.0
    r = fl + ((frac > 0.5) | ((frac == 0.5) & odd)).to(tl.float32)
    rd = tl.where(valid[None, :], tl.where(x < 0, -r, r), 0.0)
    rem0f = rd * up
    total = tl.sum(rd, axis=1)  # small integers: exact in any order

    # rank[i] = #{j > i: diff_j > diff_i} + #{j < i: diff_j >= diff_i}  (densecrf's pairwise '<', ties to later)
    diff = elev - rem0f
    ci = col[:, None]
    cj = col[None, :]
    later = ((cj > ci) & (cj < D + 1))[None, :, :]
    earlier = (cj < ci)[None, :, :]
    di = diff[:, :, None]
    dj = diff[:, None, :]
    cnt = (later & (dj > di)) | (earlier & (dj >= di))
    rank = tl.sum(cnt.to(tl.int32), axis=2) + total.to(tl.int32)[:, None]
    rem0 = rem0f.to(tl.int64)
    shift = (D + 1) * ((rank < 0).to(tl.int32) - (rank > D).to(tl.int32))
    rank = rank + shift
    rem0 = rem0 + shift.to(tl.int64)

    # barycentric weights, accumulated slot by slot in densecrf's order
    v = (elev - rem0.to(tl.float32)) * down
    pos = D - rank
    bary = tl.zeros([BLOCK, DP], dtype=tl.float32)
    for i in tl.static_range(D + 1):
        sel = col[None, :] == i
        vi = tl.sum(tl.where(sel, v, 0.0), axis=1)[:, None]
        pi = tl.sum(tl.where(sel, pos, 0), axis=1)[:, None]
        bary = bary + tl.where(col[None, :] == pi, vi, 0.0)
        bary = bary - tl.where(col[None, :] == pi + 1, vi, 0.0)
    b0 = tl.sum(tl.where(col[None, :] == 0, bary, 0.0), axis=1)
    blast = tl.sum(tl.where(col[None, :] == D + 1, bary, 0.0), axis=1)
    b0 = b0 + (1.0 + blast)
    bary = tl.where(col[None, :] == 0, b0[:, None], bary)
    tl.store(bary_ptr + p[:, None] * (D + 1) + col[None, :], bary, mask=pmask[:, None] & valid[None, :])

    # vertex r of the simplex: key_i = rem0_i + (r if rank_i <= D - r else r - (D+1)), i < D; code = mixed radix
    dmask = col < D
    lo = tl.load(radix_ptr + col, mask=dmask, other=0)
    stride = tl.load(radix_ptr + D + col, mask=dmask, other=0)
    img_stride = tl.load(radix_ptr + 2 * D)
    base = img * img_stride + tl.sum((rem0 - lo[None, :]) * stride[None, :], axis=1)
    for rr in tl.static_range(D + 1):
        delta = tl.where(rank > D - rr, rr - (D + 1), rr).to(tl.int64)
        code = base + tl.sum(delta * stride[None, :], axis=1)
        tl.store(codes_ptr + p * (D + 1) + rr, code, mask=pmask)


@triton.jit
def _rows(n, BLOCK: tl.constexpr, INT64: tl.constexpr):
    """Indices program_id(0)·BLOCK + [0, BLOCK) (int32 unless INT64: offsets too large for 32 bits) and their
    in-range mask (< n)."""
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    return i, i < n


@triton.jit
def lattice_splat_kernel(src_ptr, item_pix_ptr, item_w_ptr, row_ptr, dst_ptr, R, C, N, stride_sb, stride_sc,
                         FIRST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """dst[r, :] = sum over items k in [row_ptr[r], row_ptr[r+1]) of (in order, float32):
    FIRST: w[k] * values[pixel[k], :] (pixel -1 = a padding point: nothing); else: src[k, :] (an earlier level's
    partial sums). Rows hold at most SEG items, so every program does bounded, similar work."""
    r, rmask = _rows(R, BLOCK_R, INT64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    start = tl.load(row_ptr + r, mask=rmask, other=0)
    cnt = (tl.load(row_ptr + r + 1, mask=rmask, other=0) - start).to(tl.int32)
    if not INT64:
        start = start.to(tl.int32)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    kmax = tl.max(cnt, axis=0)
    for k in range(kmax):
        live = k < cnt
        it = start + k
        if FIRST:
            pix = tl.load(item_pix_ptr + it, mask=live, other=-1)
            if INT64:
                pix = pix.to(tl.int64)
            w = tl.load(item_w_ptr + it, mask=live, other=0.0)
            ok = live & (pix >= 0)
            b = pix // N
            nn = pix - b * N
            x = tl.load(src_ptr + (b * stride_sb + nn)[:, None] + c[None, :] * stride_sc,
                        mask=ok[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            acc += w[:, None] * x
        else:
            x = tl.load(src_ptr + (it * C)[:, None] + c[None, :], mask=live[:, None] & cmask[None, :], other=0.0)
            acc += x
    tl.store(dst_ptr + (r * C)[:, None] + c[None, :], acc, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def lattice_blur_kernel(src_ptr, dst_ptr, nbr_ptr, M, C, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr,
                        INT64: tl.constexpr):
    """One blur pass along one lattice axis: dst[v] = src[v] + 0.5 * (src[n1(v)] + src[n2(v)]); a neighbour -1 (not
    in the lattice) contributes 0. ``nbr_ptr`` points at this axis's [2, M] int32 neighbour table."""
    v, vmask = _rows(M, BLOCK_V, INT64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    n1 = tl.load(nbr_ptr + v, mask=vmask, other=-1)
    n2 = tl.load(nbr_ptr + M + v, mask=vmask, other=-1)
    if INT64:
        n1 = n1.to(tl.int64)
        n2 = n2.to(tl.int64)
    m = vmask[:, None] & cmask[None, :]
    old = tl.load(src_ptr + (v * C)[:, None] + c[None, :], mask=m, other=0.0)
    a = tl.load(src_ptr + (n1 * C)[:, None] + c[None, :], mask=m & (n1 >= 0)[:, None], other=0.0)
    b = tl.load(src_ptr + (n2 * C)[:, None] + c[None, :], mask=m & (n2 >= 0)[:, None], other=0.0)
    tl.store(dst_ptr + (v * C)[:, None] + c[None, :], old + 0.5 * (a + b), mask=m)


@triton.jit
def lattice_slice_kernel(lat_ptr, off_ptr, bary_ptr, out_ptr, P, N, Np, C, alpha, stride_ob, stride_oc,
                         D1: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """out[b, :, n] = alpha * sum_r bary[pt, r] * lat[off[pt, r], :], pt = b * Np + n, for the P = B*N pixels."""
    p, pmask = _rows(P, BLOCK_P, INT64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    b = p // N
    n = p - b * N
    pt = (b * Np + n) * D1
    m = pmask[:, None] & cmask[None, :]
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for r in tl.static_range(D1):
        o = tl.load(off_ptr + pt + r, mask=pmask, other=0)
        if INT64:
            o = o.to(tl.int64)
        w = tl.load(bary_ptr + pt + r, mask=pmask, other=0.0)
        acc += w[:, None] * tl.load(lat_ptr + (o * C)[:, None] + c[None, :], mask=m, other=0.0)
    out = acc * alpha
    tl.store(out_ptr + (b * stride_ob + n)[:, None] + c[None, :] * stride_oc, out.to(out_ptr.dtype.element_ty),
             mask=m)


# ------------------------------------------------------------------------------------------------------ launchers


def _radix(f: torch.Tensor, pad: int) -> tuple[list[int], list[int], int] | None:
    """Mixed-radix layout of the vertex codes from per-channel feature bounds (interval arithmetic on the
    elevation, margins for rounding, the rank wrap, the simplex corners and the blur shifts). Any layout that
    keeps every digit in range works: codes only need to be injective and shift by a constant per blur step.
    ``f`` [B, d, N] float32. Returns (lo, strides, image stride), or None when the codes would overflow int64."""
    B, d, _ = f.shape
    fmin, fmax = check_features(f)  # finite, and within the keys' float32 range (the reference's limit too)
    if f.numel() == 0:
        return [0] * d, [1] * d, 1
    if pad:  # densecrf's zero padding points
        fmin, fmax = [min(a, 0.0) for a in fmin], [max(a, 0.0) for a in fmax]
    scale = _scale_factors(d).tolist()
    cf = [(a * s, b * s) for a, b, s in zip(fmin, fmax, scale)]
    lo, hi = [], []
    for i in range(d):  # key coordinates 0..d-1 (the last one is implied)
        tail_lo = sum(c[0] for c in cf[i:])
        tail_hi = sum(c[1] for c in cf[i:])
        if i == 0:
            e_lo, e_hi = tail_lo, tail_hi
        else:
            e_lo, e_hi = tail_lo - i * cf[i - 1][1], tail_hi - i * cf[i - 1][0]
        slop = 1e-3 + 1e-5 * max(abs(e_lo), abs(e_hi))
        q = d + 1
        lo.append((math.floor((e_lo - slop) / q) - 2) * q - 2 * d - 1)
        hi.append((math.ceil((e_hi + slop) / q) + 2) * q + 2 * d + 1)
    spans = [h - l + 1 for l, h in zip(lo, hi)]
    strides, acc = [0] * d, 1
    for i in range(d - 1, -1, -1):
        strides[i] = acc
        acc *= spans[i]
    if acc * B >= _CODE_LIMIT:
        return None
    return lo, strides, acc


def _splat_levels(row_ptr: torch.Tensor, seg: int) -> list[torch.Tensor]:
    """Row pointers of the splat's levels, first to last. Level 0 sums entries; each later level sums the previous
    level's rows; the last level's rows are the lattice vertices. A vertex with more than ``seg`` entries is split
    into pieces of ``seg``, recursively, so that no row of any level sums more than ``seg`` items."""
    levels = []
    top = row_ptr
    while True:
        counts = top[1:] - top[:-1]
        if counts.numel() == 0 or int(counts.max()) <= seg:
            levels.append(top)
            return levels
        pieces = ((counts + seg - 1) // seg).clamp_min_(1)
        ends = pieces.cumsum(0)
        rows = torch.arange(counts.numel(), device=top.device).repeat_interleave(pieces)
        k = torch.arange(rows.numel(), device=top.device) - (ends - pieces)[rows]
        levels.append(torch.cat([top[:-1][rows] + k * seg, top[-1:]]))
        top = torch.cat([ends.new_zeros(1), ends])


class TritonLattice:
    """A permutohedral lattice per image of a batch, built with the Triton coordinate kernel; ``tensors`` are what
    ``lattice_filter`` needs. Same constructor contract as the reference ``PermutohedralLattice``.

    ``tensors`` = (offsets [P, d+1] int32 vertex of each point's simplex corner, bary [P, d+1] float32 weights,
    neighbors [d+1, 2, M] int32 blur neighbours (-1 = none), splat_pix [E] int32 pixel of each vertex-sorted entry
    (-1 = padding point), splat_w [E] float32, splat_ptrs: the levels' row pointers (int64)), with P = B * Np lattice
    points (Np = H*W rounded up to densecrf's blocks of 4 with ``densecrf_padding``).
    """

    def __init__(self, features: torch.Tensor, densecrf_padding: bool = True, seg: int = SEG):
        B, d, H, W = features.shape
        N = H * W
        self.batch, self.d, self.height, self.width, self.num_pixels = B, d, H, W, N
        self.device = dev = features.device
        self.alpha = 1.0 / (1.0 + 2.0 ** (-d))
        self._densecrf_padding = densecrf_padding
        self._ref = None
        pad = (-N) % 4 if densecrf_padding else 0
        Np = N + pad
        P = B * Np
        f = features.detach().to(torch.float32).reshape(B, d, N).contiguous()
        radix = _radix(f, pad)
        if radix is None:  # key range beyond int64 codes: the reference's row hash builds it, we filter it
            self._from_reference(ReferenceLattice(features, densecrf_padding), seg)
            return
        lo, strides, img_stride = radix

        consts = torch.tensor(_scale_factors(d).tolist() + [1.0 / (d + 1), float(d + 1)]
                              + [float(j) for j in range(d + 1)], dtype=torch.float32).to(dev)
        radix_t = torch.tensor(lo + strides + [img_stride], dtype=torch.int64).to(dev)
        codes = torch.empty(P, d + 1, dtype=torch.int64, device=dev)
        bary = _empty(P, d + 1, device=dev)
        if P:
            BLOCK = _BLOCKS["coords"]
            lattice_coords_kernel[(triton.cdiv(P, BLOCK),)](
                f, consts, radix_t, codes, bary, P, Np, N, f.stride(0), f.stride(1),
                D=d, DP=triton.next_power_of_2(d + 2), BLOCK=BLOCK, enable_fp_fusion=False)

        # number the distinct vertices: one stable sort (entries of a vertex stay in point order)
        E = P * (d + 1)
        sorted_codes, perm = torch.sort(codes.reshape(-1), stable=True)
        new = torch.ones(E, dtype=torch.bool, device=dev)
        new[1:] = sorted_codes[1:] != sorted_codes[:-1]
        starts = new.nonzero().squeeze(1)
        M = starts.numel()
        vid = new.cumsum(0) - 1
        offsets = torch.empty(E, dtype=torch.int32, device=dev)
        offsets[perm] = vid.to(torch.int32)
        row_ptr = torch.cat([starts, starts.new_full((1,), E)])
        point = perm // (d + 1)
        img = point // Np
        n = point - img * Np
        splat_pix = torch.where(n < N, img * N + n, -1).to(torch.int32)
        splat_w = bary.reshape(-1)[perm]

        # blur neighbours: code +- delta_j, one batched binary search over the sorted vertex codes
        uniq = sorted_codes[starts]
        deltas = [-sum(strides) + ((d + 1) * strides[j] if j < d else 0) for j in range(d + 1)]
        shifts = torch.tensor([s * dj for dj in deltas for s in (1, -1)], dtype=torch.int64, device=dev)
        q = uniq[None, :] + shifts[:, None]  # [2(d+1), M]
        pos = torch.searchsorted(uniq, q).clamp_(max=max(M - 1, 0))
        found = uniq[pos] == q if M else torch.zeros_like(q, dtype=torch.bool)
        neighbors = torch.where(found, pos, -1).to(torch.int32).reshape(d + 1, 2, M)

        self.num_vertices = M
        self.tensors = (offsets.reshape(P, d + 1), bary, neighbors, splat_pix, splat_w, _splat_levels(row_ptr, seg))

    def _from_reference(self, ref: ReferenceLattice, seg: int) -> None:
        M, d = ref.num_vertices, self.d
        splat = ref._splat
        neighbors = torch.where(ref.neighbors >= M, -1, ref.neighbors).to(torch.int32)
        self.num_vertices = M
        self._ref = ref
        self.tensors = (ref.offsets.to(torch.int32), ref.weights.to(torch.float32), neighbors,
                        splat.col_indices().to(torch.int32), splat.values().to(torch.float32),
                        _splat_levels(splat.crow_indices().to(torch.int64), seg))
        assert self.tensors[0].shape == (self.batch * self.num_pixels, d + 1)

    def reference(self) -> ReferenceLattice:
        """The same lattice as the PyTorch reference object (float64 sparse operators), built from these tensors:
        what float64 values are filtered with."""
        if self._ref is None:
            B, N, d = self.batch, self.num_pixels, self.d
            offsets, bary, neighbors = self.tensors[:3]
            Np = offsets.shape[0] // max(B, 1)
            ref = ReferenceLattice.__new__(ReferenceLattice)
            ref.batch, ref.d, ref.height, ref.width, ref.num_pixels = B, d, self.height, self.width, N
            ref.device, ref.num_vertices, ref.alpha = self.device, self.num_vertices, self.alpha
            ref.offsets = offsets.reshape(B, Np, d + 1)[:, :N].reshape(B * N, d + 1).to(torch.int64)
            ref.weights = bary.reshape(B, Np, d + 1)[:, :N].reshape(B * N, d + 1).to(torch.float64)
            ref.neighbors = torch.where(neighbors < 0, self.num_vertices, neighbors.to(torch.int64))
            ref._build_operators()
            self._ref = ref
        return self._ref


def lattice_filter(values: torch.Tensor, offsets: torch.Tensor, bary: torch.Tensor, neighbors: torch.Tensor,
                   splat_pix: torch.Tensor, splat_w: torch.Tensor, splat_ptrs: list[torch.Tensor],
                   reverse: bool) -> torch.Tensor:
    """values [B, C, H, W] (float16/bfloat16/float32) -> [B, C, H, W] in values.dtype: splat (segmented sums),
    d+1 blur passes (reverse: axes in the opposite order, the transpose), slice times alpha = 1/(1+2^-d)."""
    B, C, H, W = values.shape
    N = H * W
    D1, _, M = neighbors.shape
    d = D1 - 1
    out = _empty(B, C, H, W, dtype=values.dtype, device=values.device)
    if out.numel() == 0:
        return out
    Np = offsets.shape[0] // B
    v = values.reshape(B, C, N)
    if v.stride(2) != 1:
        v = v.contiguous()
    BLOCK_C = min(triton.next_power_of_2(C), _BLOCKS["channels"])
    n_c = triton.cdiv(C, BLOCK_C)
    dev = values.device
    sizes = [values.numel(), offsets.numel(), splat_pix.numel(), M * C, *((p.numel() - 1) * C for p in splat_ptrs)]
    int64 = max(sizes) > _INT32_LIMIT  # 32-bit offsets unless some tensor needs more

    # splat: level 0 gathers the pixels' values, later levels add up partial sums; the last level is the lattice
    src, first = v, True
    for ptr in splat_ptrs:
        R = ptr.numel() - 1
        dst = _empty(R, C, device=dev)
        BLOCK_R = _BLOCKS["splat"]
        lattice_splat_kernel[(triton.cdiv(R, BLOCK_R), n_c)](
            src, splat_pix, splat_w, ptr, dst, R, C, N, v.stride(0), v.stride(1),
            FIRST=first, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, INT64=int64)
        src, first = dst, False
    lat = src
    assert lat.shape[0] == M

    # blur: d+1 passes, double-buffered
    other = _empty(M, C, device=dev)
    BLOCK_V = _BLOCKS["blur"]
    for j in (range(d, -1, -1) if reverse else range(d + 1)):
        lattice_blur_kernel[(triton.cdiv(M, BLOCK_V), n_c)](lat, other, neighbors[j], M, C,
                                                            BLOCK_V=BLOCK_V, BLOCK_C=BLOCK_C, INT64=int64)
        lat, other = other, lat

    BLOCK_P = _BLOCKS["slice"]
    lattice_slice_kernel[(triton.cdiv(B * N, BLOCK_P), n_c)](
        lat, offsets, bary, out, B * N, N, Np, C, 1.0 / (1.0 + 2.0 ** (-d)), out.stride(0), out.stride(1),
        D1=D1, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, INT64=int64)
    return out

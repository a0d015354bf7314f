"""Triton kernels of masked-key attention and of its packed (varlen) form, and their launchers.

The only module of this package that imports triton. Conventions (see README.md): scores are kept in base 2
(s2 = scale·log2(e)·q·k, so softmax = exp2(s2 − lse2)); LSE tensors hold lse2, +inf where a query has no key;
accumulation in fp32; program ids cast to int64 before any pointer arithmetic; every load and store masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _backend
from .._backend import INTERPRET

LOG2E = 1.4426950408889634


# per (fp32, BLOCK_D): (BLOCK_Q, BLOCK_K, num_warps, num_stages) of the forward, dK/dV and dQ kernels. Chosen with
# benchmarks/compile_check.py, which compiles every head dim (before -> after in README.md): no spills on sm_90 or
# sm_80, shared memory within sm_80's 163 KB, and half-precision dots on wgmma (sm_90; every dot's M >= 64) / mma
# (sm_80). fp32 runs IEEE dots on FMAs, whose operands hold a whole K-slice per thread: smaller tiles. tl.dot needs
# every tile dim >= 16 to compile on a GPU.
_TILES: dict[tuple[bool, int], dict[str, tuple]] = {
    (False, 16): {"fwd": (64, 64, 4, 3), "dkdv": (32, 64, 8, 3), "dq": (64, 64, 8, 3)},
    (False, 32): {"fwd": (64, 64, 4, 3), "dkdv": (64, 64, 8, 3), "dq": (64, 32, 8, 3)},
    (False, 64): {"fwd": (64, 64, 4, 3), "dkdv": (64, 64, 8, 3), "dq": (64, 64, 8, 3)},
    (False, 128): {"fwd": (64, 32, 4, 3), "dkdv": (64, 64, 8, 3), "dq": (64, 32, 8, 3)},
    # dK, dV accumulators [64, 256] fp32 alone take 128 registers a thread: key-major, 16-query blocks
    (False, 256): {"fwd": (64, 32, 8, 3), "dkdv": (16, 64, 8, 3), "dq": (64, 16, 8, 3)},
    (True, 16): {"fwd": (32, 32, 8, 3), "dkdv": (32, 32, 8, 3), "dq": (32, 16, 4, 3)},
    (True, 32): {"fwd": (32, 32, 8, 3), "dkdv": (32, 32, 8, 3), "dq": (32, 32, 4, 3)},
    (True, 64): {"fwd": (32, 32, 8, 3), "dkdv": (32, 32, 8, 3), "dq": (32, 32, 4, 3)},
    (True, 128): {"fwd": (32, 16, 8, 3), "dkdv": (16, 16, 8, 3), "dq": (16, 32, 8, 2)},
    (True, 256): {"fwd": (16, 16, 4, 3), "dkdv": (16, 16, 4, 1), "dq": (16, 16, 8, 4)},
}
# (fp32, BLOCK_D) whose dK/dV kernels run key-major (KEY_MAJOR): every dot's M is then the key block, so the query
# block can drop below wgmma's 64 where registers are short
_KEY_MAJOR = {(False, 16), (False, 256)}


def _configs(head_dim: int, dtype: torch.dtype) -> dict[str, dict]:
    """Tiles, warps and pipeline stages of the forward, dK/dV (and its KEY_MAJOR) and dQ kernels at this head dim (the
    API pads it to a multiple of 16) and dtype."""
    key = (dtype == torch.float32, max(16, triton.next_power_of_2(head_dim)))
    out = {name: {"BLOCK_Q": bq, "BLOCK_K": bk, "BLOCK_D": key[1], "num_warps": w, "num_stages": st}
           for name, (bq, bk, w, st) in _TILES[key].items()}
    out["dkdv"]["KEY_MAJOR"] = key in _KEY_MAJOR
    return out


def _launch_opts(dtype: torch.dtype) -> dict:
    # the interpreter has no real bf16: upcast right after tl.load there. fp32 parity needs IEEE dots (not tf32).
    return {"UPCAST": INTERPRET and dtype == torch.bfloat16,
            "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32"}


def _alloc(*shape: int, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Every buffer the launchers hand to a kernel."""
    return _backend.empty(*shape, dtype=like.dtype if dtype is None else dtype, device=like.device)


def masked_out_buffer(q: Tensor, num_masks: int) -> Tensor:
    """[B, M, H, N, D] view of a [B, M, N, H, D] buffer: a layer's [B, M, N, H·D] output is then a free reshape.
    The fake kernel in api.py builds the same layout."""
    B, H, N, D = q.shape
    return _alloc(B, num_masks, N, H, D, like=q).permute(0, 1, 3, 2, 4)


def _row_view(t: Tensor) -> Tensor:
    """Kernels read rows with explicit strides, assuming a unit stride along the head dim. With a head dim that is a
    multiple of 16 (the API pads to one), rows that do not start at 16-byte-aligned addresses with strides divisible
    by 16 (a slice, an odd layout) are copied, so each launch gets Triton's aligned specialisation (vectorised loads;
    the one the compile check compiles)."""
    if t.stride(-1) != 1:
        return t.contiguous()
    if t.shape[-1] % 16 == 0 and (t.data_ptr() % 16 or any(s % 16 for s in t.stride()[:-1])):
        return t.clone(memory_format=torch.contiguous_format)
    return t


@triton.jit
def _load(ptrs, mask, UPCAST: tl.constexpr):
    """A masked load (0 where masked); UPCAST (the interpreter, which has no real bf16): to fp32 right away."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _load_rows(base, rows, stride, offs_d, mask, UPCAST: tl.constexpr):
    """[rows, BLOCK_D] tile of a tensor whose rows are `stride` apart from `base` (unit stride along the head dim)."""
    return _load(base + rows[:, None] * stride + offs_d[None, :], mask, UPCAST)


@triton.jit
def _load_pair(A, B, rows, stride_a, stride_b, offs_d, mask, UPCAST: tl.constexpr):
    """The same rows of two tensors (k and v, or q and dO)."""
    return _load_rows(A, rows, stride_a, offs_d, mask, UPCAST), _load_rows(B, rows, stride_b, offs_d, mask, UPCAST)


@triton.jit
def _load_lse_delta(lse_ptrs, delta_ptrs, ok):
    """lse2 and δ of query rows; masked rows get lse2 = +inf (so P = exp2(s − lse2) = 0) and δ = 0."""
    return tl.load(lse_ptrs, mask=ok, other=float("inf")), tl.load(delta_ptrs, mask=ok, other=0.0)


@triton.jit
def _finite(x):
    """x with its NaN / ±inf set to 0. Packed tiles hold several sequences: a dot whose other operand is 0 on the
    pairs of different sequences (P here) would still carry a NaN / ±inf across as 0·NaN (see varlen_attention_fwd)."""
    return tl.where(tl.abs(x) < float("inf"), x, 0.0)


@triton.jit
def _online_softmax_step(q, k, v, ok, m_i, l_i, acc, qk_scale, DOT_PRECISION: tl.constexpr):
    """Fold one key block into the running (max, sum, acc) of each query row; ok: pairs that may attend."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: avoid (-inf) - (-inf)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _finish(m_i, l_i, acc, has_keys):
    """out = acc / l, lse2 = m + log2(l). A row with no key to see (has_keys false: a mask with none visible): out 0,
    lse2 +inf (so exp2(s − lse2) = 0). A row whose keys all scored −inf, or that met a NaN / +inf score: out and
    lse2 NaN, as the reference's softmax (and so P = NaN for its keys in the backward, as there)."""
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, tl.where(has_keys, float("nan"), 1.0))  # per row: no [BLOCK_Q, BLOCK_D] select
    return acc / l_safe[:, None], tl.where(seen, m_i + tl.log2(l_safe), tl.where(has_keys, float("nan"), float("inf")))


@triton.jit
def _scores(q, k, qk_scale, DOT_PRECISION: tl.constexpr):
    """Base-2 scores s2 = scale·log2(e)·q·kᵀ of one [query block, key block] tile."""
    return tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale


@triton.jit
def _score_grads(s, v, do, lse, delta, ok, DOT_PRECISION: tl.constexpr):
    """P and dS = P ∘ (dO·Vᵀ − δ) of one tile from its scores (dS w.r.t. the scaled scores); both exactly 0 on the
    pairs outside ok (not P·(…): a NaN in dP or δ stays in its own pairs)."""
    p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    return p, tl.where(ok, p * (dp - delta[:, None]), 0.0)


@triton.jit
def _dkdv_step(q, k, v, do, lse, delta, ok, dk, dv, qk_scale, DOT_PRECISION: tl.constexpr, KEY_MAJOR: tl.constexpr):
    """Add one query block's contribution to a key block's dK (w.r.t. the scaled scores) and dV; ok: the pairs that may
    attend. KEY_MAJOR: Sᵀ, Pᵀ, dPᵀ, dSᵀ (and ok) are [key block, query block] tiles, so that every dot's M is the key
    block (wgmma needs M >= 64) and the query block may be smaller than 64 where registers are short (_configs);
    else [query block, key block]."""
    if KEY_MAJOR:
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.where(ok, tl.exp2(s_t - lse[None, :]), 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = tl.where(ok, p_t * (dp_t - delta[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    else:
        p, ds = _score_grads(_scores(q, k, qk_scale, DOT_PRECISION), v, do, lse, delta, ok, DOT_PRECISION)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _dq_step(s, k, v, do, lse, delta, ok, dq, DOT_PRECISION: tl.constexpr):
    """Add one key block's contribution (scores s) to a query block's dQ (w.r.t. the scaled scores)."""
    _, ds = _score_grads(s, v, do, lse, delta, ok, DOT_PRECISION)
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)


# ---- many masks over shared q, k, v: q, k, v [B, H, N, D], key_idx [B, M, N], counts [B, M]


@triton.jit
def _visible_keys(IDX_ROW, start, count, BLOCK: tl.constexpr):
    """Entries start .. start + BLOCK − 1 of one mask's key list IDX_ROW (visible keys first): their positions, which
    of them are visible (< count), and the key indices (int64; 0 where not visible)."""
    offs = start + tl.arange(0, BLOCK)
    ok = offs < count
    return offs, ok, tl.load(IDX_ROW + offs, mask=ok, other=0).to(tl.int64)


@triton.jit
def masked_key_attention_fwd_kernel(
    Q, K, V, KEY_IDX, COUNTS, OUT, LSE,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_om, stride_oh, stride_on,
    M, H, N, D, qk_scale,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (b·M·H + m·H + h, query block): the query block against the visible keys of mask m only."""
    pid = tl.program_id(0).to(tl.int64)
    h = pid % H
    bm = pid // H
    b = bm // M
    m = bm % M
    offs_q = tl.program_id(1).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = offs_q < N
    d_ok = offs_d < D
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_q, stride_qn, offs_d, q_ok[:, None] & d_ok[None, :], UPCAST)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    count = tl.load(COUNTS + bm)
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for start in range(0, count, BLOCK_K):  # visible keys only: the first `count` entries of the index list
        _, k_ok, kid = _visible_keys(KEY_IDX + bm * N, start, count, BLOCK_K)
        k, v = _load_pair(k_base, v_base, kid, stride_kn, stride_vn, offs_d, k_ok[:, None] & d_ok[None, :], UPCAST)
        m_i, l_i, acc = _online_softmax_step(q, k, v, k_ok[None, :], m_i, l_i, acc, qk_scale, DOT_PRECISION)
    out, lse = _finish(m_i, l_i, acc, count > 0)
    tl.store(OUT + b * stride_ob + m * stride_om + h * stride_oh + offs_q[:, None] * stride_on + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid * N + offs_q, lse, mask=q_ok)


@triton.jit
def masked_key_attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, KEY_IDX, COUNTS, DK_PART, DV_PART,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_dom, stride_doh, stride_don,
    M, H, N, D, qk_scale, scale,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KEY_MAJOR: tl.constexpr,
):
    """Program (b·M·H + m·H + h, visible-key block): that block's dK, dV under mask m, summed over every query;
    stored at the keys' compact positions of mask m in DK_PART / DV_PART [B, M, H, N, D] fp32. A program past the
    mask's visible count does nothing."""
    pid = tl.program_id(0).to(tl.int64)
    h = pid % H
    bm = pid // H
    b = bm // M
    m = bm % M
    count = tl.load(COUNTS + bm)
    start = tl.program_id(1) * BLOCK_K
    if start < count:
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        offs_k, k_ok, kid = _visible_keys(KEY_IDX + bm * N, start, count, BLOCK_K)
        kv_mask = k_ok[:, None] & d_ok[None, :]
        # two loads, not `_load_pair`: with it ptxas gives the half-precision specializations one more register
        k = _load_rows(K + b * stride_kb + h * stride_kh, kid, stride_kn, offs_d, kv_mask, UPCAST)
        v = _load_rows(V + b * stride_vb + h * stride_vh, kid, stride_vn, offs_d, kv_mask, UPCAST)
        dk = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + m * stride_dom + h * stride_doh
        for q_start in range(0, N, BLOCK_Q):
            offs_q = q_start + tl.arange(0, BLOCK_Q).to(tl.int64)
            q_ok = offs_q < N
            q, do = _load_pair(q_base, do_base, offs_q, stride_qn, stride_don, offs_d, q_ok[:, None] & d_ok[None, :],
                               UPCAST)
            lse, delta = _load_lse_delta(LSE + pid * N + offs_q, DELTA + pid * N + offs_q, q_ok)
            ok = k_ok[:, None] & q_ok[None, :] if KEY_MAJOR else q_ok[:, None] & k_ok[None, :]
            dk, dv = _dkdv_step(q, k, v, do, lse, delta, ok, dk, dv, qk_scale, DOT_PRECISION, KEY_MAJOR)
        part = (pid * N + offs_k)[:, None] * D + offs_d[None, :]
        tl.store(DK_PART + part, dk * scale, mask=kv_mask)
        tl.store(DV_PART + part, dv, mask=kv_mask)


@triton.jit
def masked_key_attention_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, KEY_IDX, COUNTS, KEY_POS, DK_PART, DV_PART, DQ, DK, DV,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_dom, stride_doh, stride_don,
    M, H, N, D, qk_scale, scale,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (b·H + h, token block): dQ of the block, summed over the masks and their visible keys; then dK, dV
    of the same tokens as the sum, in mask order, of the partials of the masks that see them (deterministic)."""
    pid = tl.program_id(0).to(tl.int64)
    h = pid % H
    b = pid // H
    offs_q = tl.program_id(1).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = offs_q < N
    d_ok = offs_d < D
    q_mask = q_ok[:, None] & d_ok[None, :]
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_q, stride_qn, offs_d, q_mask, UPCAST)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    dq = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for m in range(M):
        bm = b * M + m
        row = (bm * H + h) * N
        count = tl.load(COUNTS + bm)
        lse, delta = _load_lse_delta(LSE + row + offs_q, DELTA + row + offs_q, q_ok)
        do = _load_rows(DO + b * stride_dob + m * stride_dom + h * stride_doh, offs_q, stride_don, offs_d, q_mask,
                        UPCAST)
        for start in range(0, count, BLOCK_K):
            _, k_ok, kid = _visible_keys(KEY_IDX + bm * N, start, count, BLOCK_K)
            k, v = _load_pair(k_base, v_base, kid, stride_kn, stride_vn, offs_d, k_ok[:, None] & d_ok[None, :], UPCAST)
            dq = _dq_step(_scores(q, k, qk_scale, DOT_PRECISION), k, v, do, lse, delta, q_ok[:, None] & k_ok[None, :],
                          dq, DOT_PRECISION)
    out_rows = (pid * N + offs_q)[:, None] * D + offs_d[None, :]  # DQ, DK, DV: contiguous [B, H, N, D]
    tl.store(DQ + out_rows, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)
    if BLOCK_D > 128:  # dK then dV, one accumulator at a time: two [64, 256] fp32 ones at once spilled
        _sum_partials(DK_PART, DK, KEY_POS, out_rows, q_mask, offs_q, q_ok, offs_d, d_ok, b, h, M, H, N, D, BLOCK_Q,
                      BLOCK_D)
        _sum_partials(DV_PART, DV, KEY_POS, out_rows, q_mask, offs_q, q_ok, offs_d, d_ok, b, h, M, H, N, D, BLOCK_Q,
                      BLOCK_D)
    else:
        dk = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
        for m in range(M):
            bm = b * M + m
            pos = tl.load(KEY_POS + bm * N + offs_q, mask=q_ok, other=-1).to(tl.int64)  # -1: hidden in mask m
            part = ((bm * H + h) * N + pos)[:, None] * D + offs_d[None, :]
            seen = (pos >= 0)[:, None] & d_ok[None, :]
            dk += tl.load(DK_PART + part, mask=seen, other=0.0)
            dv += tl.load(DV_PART + part, mask=seen, other=0.0)
        tl.store(DK + out_rows, dk.to(DK.dtype.element_ty), mask=q_mask)
        tl.store(DV + out_rows, dv.to(DV.dtype.element_ty), mask=q_mask)


@triton.jit
def _sum_partials(PART, OUT, KEY_POS, out_rows, q_mask, offs_q, q_ok, offs_d, d_ok, b, h, M, H, N, D,
                  BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT rows of a token block = the sum, in mask order, of the per-mask partials PART of the masks that see them."""
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for m in range(M):
        bm = b * M + m
        pos = tl.load(KEY_POS + bm * N + offs_q, mask=q_ok, other=-1).to(tl.int64)  # -1: hidden in mask m
        part = ((bm * H + h) * N + pos)[:, None] * D + offs_d[None, :]
        acc += tl.load(PART + part, mask=(pos >= 0)[:, None] & d_ok[None, :], other=0.0)
    tl.store(OUT + out_rows, acc.to(OUT.dtype.element_ty), mask=q_mask)


def _qkv_strides(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, ...]:
    return (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])


def masked_key_attention_fwd(q: Tensor, k: Tensor, v: Tensor, key_idx: Tensor, counts: Tensor,
                             scale: float) -> tuple[Tensor, Tensor]:
    """-> out [B, M, H, N, D] (q's dtype, layout of `masked_out_buffer`), lse2 [B, M, H, N] fp32."""
    q, k, v = _row_view(q), _row_view(k), _row_view(v)
    B, H, N, D = q.shape
    M = key_idx.shape[1]
    out = masked_out_buffer(q, M)
    lse = _alloc(B, M, H, N, like=q, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    cfg = _configs(D, q.dtype)["fwd"]
    masked_key_attention_fwd_kernel[(B * M * H, triton.cdiv(N, cfg["BLOCK_Q"]))](
        q, k, v, key_idx, counts, out, lse, *_qkv_strides(q, k, v), *out.stride()[:4],
        M, H, N, D, scale * LOG2E, **cfg, **_launch_opts(q.dtype),
    )
    return out, lse


def masked_key_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                             key_idx: Tensor, counts: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> dq, dk, dv [B, H, N, D] contiguous, in q's dtype."""
    q, k, v, dout = _row_view(q), _row_view(k), _row_view(v), _row_view(dout)
    B, H, N, D = q.shape
    M = key_idx.shape[1]
    dq, dk, dv = (_alloc(B, H, N, D, like=q) for _ in range(3))
    if dq.numel() == 0:
        return dq, dk, dv
    if M == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = (out.float() * dout.float()).sum(-1).contiguous()  # δ_i = dO_i · O_i, [B, M, H, N]
    rank = torch.arange(N, device=q.device, dtype=torch.int32).expand(B, M, N)
    key_pos = torch.empty_like(key_idx).scatter_(-1, key_idx.long(), rank)  # inverse permutation of key_idx
    key_pos = torch.where(key_pos < counts[..., None], key_pos, -1)  # compact position, -1 = hidden
    dk_part = _alloc(B, M, H, N, D, like=q, dtype=torch.float32)  # only the visible rows are written and read
    dv_part = _alloc(B, M, H, N, D, like=q, dtype=torch.float32)
    cfg, opts = _configs(D, q.dtype), _launch_opts(q.dtype)
    strides = (*_qkv_strides(q, k, v), *dout.stride()[:4])
    masked_key_attention_bwd_dkdv_kernel[(B * M * H, triton.cdiv(N, cfg["dkdv"]["BLOCK_K"]))](
        q, k, v, dout, lse, delta, key_idx, counts, dk_part, dv_part, *strides, M, H, N, D, scale * LOG2E, scale,
        **cfg["dkdv"], **opts,
    )
    masked_key_attention_bwd_kernel[(B * H, triton.cdiv(N, cfg["dq"]["BLOCK_Q"]))](
        q, k, v, dout, lse, delta, key_idx, counts, key_pos, dk_part, dv_part, dq, dk, dv, *strides,
        M, H, N, D, scale * LOG2E, scale, **cfg["dq"], **opts,
    )
    return dq, dk, dv


# ---- packed sequences: q, k, v [T, H, D]; seg [T] = sequence of each token; cu [S + 1] sequence bounds


@triton.jit
def _tile_span(SEG, CU, first_row, T, BLOCK: tl.constexpr):
    """Rows [lo, hi) of every sequence touched by the rows first_row .. first_row + BLOCK − 1 (clipped to T)."""
    first = tl.load(SEG + first_row)
    last = tl.load(SEG + tl.minimum(first_row + BLOCK, T) - 1)
    return tl.load(CU + first), tl.load(CU + last + 1)


@triton.jit
def _packed_rows(SEG, start, end, BLOCK: tl.constexpr, OTHER: tl.constexpr):
    """Packed rows start .. start + BLOCK − 1 (int64), which are < end, and their sequences (OTHER where not: −1 for
    query rows, −2 for key rows, so that padding never pairs)."""
    offs = (start + tl.arange(0, BLOCK)).to(tl.int64)
    ok = offs < end
    return offs, ok, tl.load(SEG + offs, mask=ok, other=OTHER)


@triton.jit
def _packed_tile(SEG, T, BLOCK: tl.constexpr, OTHER: tl.constexpr):
    """This program's rows: tile program_id(0) of BLOCK packed rows, head program_id(1) -> first row, head, and the
    rows, which exist and their sequences as `_packed_rows`."""
    first_row = tl.program_id(0).to(tl.int64) * BLOCK
    offs, ok, seg = _packed_rows(SEG, first_row, T, BLOCK, OTHER)
    return first_row, tl.program_id(1).to(tl.int64), offs, ok, seg


@triton.jit
def varlen_attention_fwd_kernel(
    Q, K, V, SEG, CU, OUT, LSE,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    T, H, D, qk_scale,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (row tile, h): a tile of consecutive packed rows (possibly several short sequences) against the
    keys of the sequences it touches, pairs of different sequences masked out."""
    # the tile written out, not `_packed_tile`: with it ptxas gives one fp32 sm_90 specialization 4 more registers
    first_row = tl.program_id(0).to(tl.int64) * BLOCK_Q
    h = tl.program_id(1).to(tl.int64)
    offs_q = first_row + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = offs_q < T
    d_ok = offs_d < D
    seg_q = tl.load(SEG + offs_q, mask=q_ok, other=-1)
    q = _load_rows(Q + h * stride_qh, offs_q, stride_qt, offs_d, q_ok[:, None] & d_ok[None, :], UPCAST)
    lo, hi = _tile_span(SEG, CU, first_row, T, BLOCK_Q)
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_K):
        offs_k, k_ok, seg_k = _packed_rows(SEG, start, hi, BLOCK_K, -2)
        k, v = _load_pair(K + h * stride_kh, V + h * stride_vh, offs_k, stride_kt, stride_vt, offs_d,
                          k_ok[:, None] & d_ok[None, :], UPCAST)
        ok = seg_q[:, None] == seg_k[None, :]  # q, k as they are: a non-finite one only reaches its row / column of S
        m_i, l_i, acc = _online_softmax_step(q, k, _finite(v), ok, m_i, l_i, acc, qk_scale, DOT_PRECISION)
    out, lse = _finish(m_i, l_i, acc, q_ok)  # a packed row's sequence holds at least that row
    tl.store(OUT + offs_q[:, None] * stride_ot + h * stride_oh + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=q_ok[:, None] & d_ok[None, :])
    tl.store(LSE + offs_q * H + h, lse, mask=q_ok)


@triton.jit
def varlen_attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, SEG, CU, DK, DV,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    T, H, D, qk_scale, scale,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KEY_MAJOR: tl.constexpr,
):
    """Program (key tile, h): dK, dV of a tile of packed keys, summed over the queries of their sequences.
    Every key belongs to one tile: written once, no atomics."""
    first_row, h, offs_k, k_ok, seg_k = _packed_tile(SEG, T, BLOCK_K, -2)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = k_ok[:, None] & d_ok[None, :]
    k, v = _load_pair(K + h * stride_kh, V + h * stride_vh, offs_k, stride_kt, stride_vt, offs_d, kv_mask, UPCAST)
    lo, hi = _tile_span(SEG, CU, first_row, T, BLOCK_K)
    dk = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_Q):
        offs_q, q_ok, seg_q = _packed_rows(SEG, start, hi, BLOCK_Q, -1)
        q, do = _load_pair(Q + h * stride_qh, DO + h * stride_doh, offs_q, stride_qt, stride_dot, offs_d,
                           q_ok[:, None] & d_ok[None, :], UPCAST)
        lse, delta = _load_lse_delta(LSE + offs_q * H + h, DELTA + offs_q * H + h, q_ok)
        ok = seg_k[:, None] == seg_q[None, :] if KEY_MAJOR else seg_q[:, None] == seg_k[None, :]
        dk, dv = _dkdv_step(q, k, v, do, lse, delta, ok, dk, dv, qk_scale, DOT_PRECISION, KEY_MAJOR)
    rows = (offs_k * H + h)[:, None] * D + offs_d[None, :]  # DK, DV: contiguous [T, H, D]
    tl.store(DK + rows, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + rows, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def varlen_attention_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, SEG, CU, DQ, KEY_BAD,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    T, H, D, qk_scale, scale,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (row tile, h): dQ of a tile of packed rows, summed over the keys of their sequences. KEY_BAD [T, H]
    int8: the keys whose k held a NaN / ±inf (zeroed in K): their score is −inf (see varlen_attention_bwd)."""
    first_row, h, offs_q, q_ok, seg_q = _packed_tile(SEG, T, BLOCK_Q, -1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_mask = q_ok[:, None] & d_ok[None, :]
    q, do = _load_pair(Q + h * stride_qh, DO + h * stride_doh, offs_q, stride_qt, stride_dot, offs_d, q_mask, UPCAST)
    lse, delta = _load_lse_delta(LSE + offs_q * H + h, DELTA + offs_q * H + h, q_ok)
    lo, hi = _tile_span(SEG, CU, first_row, T, BLOCK_Q)
    dq = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_K):
        offs_k, k_ok, seg_k = _packed_rows(SEG, start, hi, BLOCK_K, -2)
        k, v = _load_pair(K + h * stride_kh, V + h * stride_vh, offs_k, stride_kt, stride_vt, offs_d,
                          k_ok[:, None] & d_ok[None, :], UPCAST)
        bad = tl.load(KEY_BAD + offs_k * H + h, mask=k_ok, other=0) != 0
        s = tl.where(bad[None, :], float("-inf"), _scores(q, k, qk_scale, DOT_PRECISION))
        dq = _dq_step(s, k, v, do, lse, delta, seg_q[:, None] == seg_k[None, :], dq, DOT_PRECISION)
    rows = (offs_q * H + h)[:, None] * D + offs_d[None, :]
    tl.store(DQ + rows, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


def _in_sequence_of_non_finite(finite: Tensor, seg: Tensor, num_seqs: int) -> Tensor:
    """finite [T, H, D] bool (``isfinite`` of q, k, v or dO) -> bool [T, H, D]: whether some row of each row's
    sequence holds a NaN / ±inf at that (head, dim). Segment sums, no host sync: where the reference's products
    carry such a value through its whole sequence and the kernels, which zeroed it, did not."""
    seg = seg.long()
    bad = torch.zeros(num_seqs, *finite.shape[1:], dtype=torch.float32, device=finite.device)
    return bad.index_add_(0, seg, (~finite).float())[seg] > 0


def varlen_attention_fwd(q: Tensor, k: Tensor, v: Tensor, seg: Tensor, cu_seqlens: Tensor,
                         scale: float) -> tuple[Tensor, Tensor]:
    """-> out [T, H, D] contiguous (q's dtype), lse2 [T, H] fp32. Non-finite values stay in their sequence and reach
    exactly the outputs the reference's do: q, k score as they are (a row with a NaN or +inf score, or only −inf
    ones, is NaN; an infinite key scoring −inf is ignored by that query); v is read with NaN / ±inf as 0 (P·V would
    carry them into the other sequences of a tile as 0·NaN) and they are set here, NaN at their (head, dim) on every
    row of their sequence."""
    q, k, v = _row_view(q), _row_view(k), _row_view(v)
    T, H, D = q.shape
    out = _alloc(T, H, D, like=q)
    lse = _alloc(T, H, like=q, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    cfg = _configs(D, q.dtype)["fwd"]
    varlen_attention_fwd_kernel[(triton.cdiv(T, cfg["BLOCK_Q"]), H)](
        q, k, v, seg, cu_seqlens, out, lse, *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *out.stride()[:2],
        T, H, D, scale * LOG2E, **cfg, **_launch_opts(q.dtype),
    )
    return out.masked_fill_(_in_sequence_of_non_finite(torch.isfinite(v), seg, cu_seqlens.numel() - 1),
                            float("nan")), lse


def varlen_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, seg: Tensor,
                         cu_seqlens: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> dq, dk, dv [T, H, D] contiguous, in q's dtype.

    Non-finite values are kept in their sequence as in the forward. The kernels get q, k, dO with NaN / ±inf set to
    0: q's and dO's change nothing of their own rows (a non-finite q made its row's lse2 NaN, so P = NaN there
    whatever the score; a non-finite dO makes its row's δ = dO·O non-finite), k's take the −inf score the key had
    for every query whose lse2 is finite (a NaN or +inf score would have made it NaN) through KEY_BAD (dK/dV tiles
    score with k as it is). What a zeroed operand's sum would have carried is set here: NaN at the (head, dim) of
    every row of its sequence, in dQ for k, dK for q, dV for dO."""
    q, k, v, dout = _row_view(q), _row_view(k), _row_view(v), _row_view(dout)
    T, H, D = q.shape
    dq, dk, dv = (_alloc(T, H, D, like=q) for _ in range(3))
    if dq.numel() == 0:
        return dq, dk, dv
    delta = (out.float() * dout.float()).sum(-1).contiguous()  # [T, H]: from dO as it is
    fin_q, fin_k, fin_do = torch.isfinite(q), torch.isfinite(k), torch.isfinite(dout)
    q0, k0, do0 = (torch.where(f, x, 0).contiguous() for f, x in ((fin_q, q), (fin_k, k), (fin_do, dout)))
    key_bad = (~fin_k).any(-1).to(torch.int8).contiguous()  # [T, H]
    cfg, opts = _configs(D, q.dtype), _launch_opts(q.dtype)
    strides = (*q0.stride()[:2], *k.stride()[:2], *v.stride()[:2], *do0.stride()[:2])
    varlen_attention_bwd_dkdv_kernel[(triton.cdiv(T, cfg["dkdv"]["BLOCK_K"]), H)](
        q0, k, v, do0, lse, delta, seg, cu_seqlens, dk, dv, *strides, T, H, D, scale * LOG2E, scale,
        **cfg["dkdv"], **opts)
    strides = (*q0.stride()[:2], *k0.stride()[:2], *v.stride()[:2], *do0.stride()[:2])
    varlen_attention_bwd_kernel[(triton.cdiv(T, cfg["dq"]["BLOCK_Q"]), H)](
        q0, k0, v, do0, lse, delta, seg, cu_seqlens, dq, key_bad, *strides, T, H, D, scale * LOG2E, scale,
        **cfg["dq"], **opts)
    S = cu_seqlens.numel() - 1
    nan = float("nan")
    dq.masked_fill_(_in_sequence_of_non_finite(fin_k, seg, S), nan)
    dk.masked_fill_(_in_sequence_of_non_finite(fin_q, seg, S), nan)
    return dq, dk, dv.masked_fill_(_in_sequence_of_non_finite(fin_do, seg, S), nan)

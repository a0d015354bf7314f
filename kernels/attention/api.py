"""Public masked-key and packed (varlen) attention: validate, pick the backend, run.

The Triton path is a pair of ``torch.library`` custom ops per function (forward, backward) with fake kernels and
registered autograd, so it composes with ``torch.compile`` and autograd; both functions' pairs are made by one
factory (``_attention_ops``). triton itself is imported on first use.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor

from .._backend import TRITON_DTYPES, check_devices, device_reasons, resolve_backend
from .reference import masked_key_attention_ref, varlen_attention_ref

MAX_HEAD_DIM = 256
HEAD_DIM_MULTIPLE = 16  # what the kernels are given: see _padded_head_dim


def _padded_head_dim(*ts: Tensor) -> tuple[Tensor, ...]:
    """q, k, v with the head dim zero-padded to a multiple of 16 (unchanged when it is one). Zero columns change no
    score q·k, and the output's extra columns (0) are sliced off, so the result is the same; the gain is that every
    row stride the kernels see is a multiple of 16 elements and Triton vectorises the row loads. With a ragged head
    dim (e.g. 47) the strides are not, every element then needs its own 64-bit address, and at head dims > 32 the
    kernels spilled (the compile check, which compiles every head dim). The kernels' tiles pad to next_pow2(D)
    anyway, so this costs one copy of q, k, v, and only for such head dims."""
    pad = -ts[0].shape[-1] % HEAD_DIM_MULTIPLE
    return ts if pad == 0 else tuple(F.pad(t, (0, pad)) for t in ts)


def _kernel_reasons(q: Tensor, *others: Tensor) -> list[str]:
    """Why the Triton kernels cannot take these inputs ([] = they can)."""
    reasons = device_reasons(q, *others)
    if q.dtype not in TRITON_DTYPES:
        reasons.append(f"dtype {q.dtype} (the kernels take {', '.join(str(d) for d in TRITON_DTYPES)})")
    if q.shape[-1] > MAX_HEAD_DIM:
        reasons.append(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}")
    return reasons


def _check_qkv(op: str, q: Tensor, k: Tensor, v: Tensor, layout: str) -> list[str]:
    errors = []
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != len(layout.split(",")):
            errors.append(f"{name} must be {layout}, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            errors.append(f"{name} must be floating point, got {t.dtype}")
    if not errors and not (q.shape == k.shape == v.shape):
        errors.append(f"q, k, v must have one shape {layout}, got {tuple(q.shape)}, {tuple(k.shape)}, "
                      f"{tuple(v.shape)}")
    if len({q.dtype, k.dtype, v.dtype}) > 1:
        errors.append(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.ndim == len(layout.split(",")) and q.shape[-1] < 1:
        errors.append(f"head dim must be >= 1, got {q.shape[-1]}")
    return errors


def _validated_scale(op: str, errors: list[str], q: Tensor, scale: float | None) -> float:
    """Raise with every input error at once; else the softmax scale (D^-½ unless given)."""
    if errors:
        raise ValueError(f"{op}: " + "; ".join(errors))
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _attention_ops(name: str, index: str, bounds: str, fake_fwd: Callable[..., tuple[Tensor, Tensor]]
                   ) -> torch.library.CustomOpDef:
    """The custom ops ``fastwsss::<name>_fwd`` / ``_bwd`` of one layout and the autograd that links them: both layouts
    take (q, k, v, two int32 index tensors, scale) -- masked: key_idx, counts; packed: seg, cu_seqlens, the names
    their schemas carry -- and run ``_triton.<name>_fwd`` / ``_bwd``. The forward returns (out, lse2); the backward
    dq, dk, dv shaped like q. Returns the forward op."""
    rest = f"Tensor {index}, Tensor {bounds}, float scale"

    @torch.library.custom_op(f"fastwsss::{name}_fwd", mutates_args=(),
                             schema=f"(Tensor q, Tensor k, Tensor v, {rest}) -> (Tensor, Tensor)")
    def fwd(q, k, v, idx, bnd, scale):
        from . import _triton

        return getattr(_triton, f"{name}_fwd")(q, k, v, idx, bnd, scale)

    @torch.library.custom_op(f"fastwsss::{name}_bwd", mutates_args=(), schema=f"(Tensor dout, Tensor q, Tensor k, "
                             f"Tensor v, Tensor out, Tensor lse, {rest}) -> (Tensor, Tensor, Tensor)")
    def bwd(dout, q, k, v, out, lse, idx, bnd, scale):
        from . import _triton

        return getattr(_triton, f"{name}_bwd")(dout, q, k, v, out, lse, idx, bnd, scale)

    @bwd.register_fake
    def _(dout, q, *_):
        return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)

    def setup_context(ctx, inputs, output):
        q, k, v, idx, bnd, scale = inputs
        ctx.save_for_backward(q, k, v, *output, idx, bnd)
        ctx.scale = scale

    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, idx, bnd = ctx.saved_tensors
        return (*bwd(dout, q, k, v, out, lse, idx, bnd, ctx.scale), None, None, None)

    fwd.register_fake(fake_fwd)
    fwd.register_autograd(backward, setup_context=setup_context)
    return fwd


# ---- many key masks over shared q, k, v


def compact_keys(key_keep: Tensor) -> tuple[Tensor, Tensor]:
    """key_keep [B, M, N] bool -> key_idx [B, M, N] int32 (each mask's visible key indices first, ascending, then
    the hidden ones) and counts [B, M] int32. A stable sort, in torch, no host sync."""
    key_idx = torch.argsort((~key_keep).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return key_idx, key_keep.sum(-1, dtype=torch.int32)


def _empty_masked_out(q: Tensor, num_masks: int) -> Tensor:
    """The output layout of the kernel (``_triton.masked_out_buffer``): [B, M, H, N, D] view of [B, M, N, H, D]."""
    B, H, N, D = q.shape
    return q.new_empty(B, num_masks, N, H, D).permute(0, 1, 3, 2, 4)


def _masked_fake(q, k, v, key_idx, counts, scale):
    B, H, N, _ = q.shape
    return _empty_masked_out(q, key_idx.shape[1]), q.new_empty(B, key_idx.shape[1], H, N, dtype=torch.float32)


_masked_fwd = _attention_ops("masked_key_attention", "key_idx", "counts", _masked_fake)


def masked_key_attention_reasons(q: Tensor, k: Tensor, v: Tensor, key_keep: Tensor | None = None) -> list[str]:
    """Why the Triton path cannot take these (valid) inputs; [] = it can."""
    return _kernel_reasons(q, k, v, *([] if key_keep is None else [key_keep]))


def masked_key_attention(q: Tensor, k: Tensor, v: Tensor, key_keep: Tensor, scale: float | None = None,
                         backend: str = "auto") -> Tensor:
    """Self-attention of shared q, k, v under M key masks at once.

    q, k, v [B, H, N, D] (fp32 / fp16 / bf16), key_keep [B, M, N] bool (True = visible key) -> [B, M, H, N, D] in
    q's dtype: out[b, m, :, i] = softmax over the keys visible in mask m of scale·q_i·k_j, times v_j; every query
    (visible or not) gets an output. A mask with no visible key gives 0 and zero gradient. scale defaults to D^-½.
    The kernel works on each mask's visible keys only (no [B·M, H, N, N] scores, no M-fold copies of q, k, v).
    """
    op = "masked_key_attention"
    errors = _check_qkv(op, q, k, v, "[B, H, N, D]") + check_devices(q=q, k=k, v=v, key_keep=key_keep)
    if key_keep.dtype != torch.bool:
        errors.append(f"key_keep must be bool, got {key_keep.dtype}")
    if key_keep.ndim != 3 or (q.ndim == 4 and (key_keep.shape[0] != q.shape[0] or key_keep.shape[2] != q.shape[2])):
        expect = f"[{q.shape[0]}, M, {q.shape[2]}]" if q.ndim == 4 else "[B, M, N]"
        errors.append(f"key_keep must be [B, M, N] = {expect}, got shape {tuple(key_keep.shape)}")
    scale = _validated_scale(op, errors, q, scale)
    if resolve_backend(backend, op, masked_key_attention_reasons(q, k, v, key_keep), q) == "torch":
        return masked_key_attention_ref(q, k, v, key_keep, scale)
    key_idx, counts = compact_keys(key_keep)
    return _masked_fwd(*_padded_head_dim(q, k, v), key_idx, counts, scale)[0][..., :q.shape[-1]]


# ---- packed sequences (block-diagonal attention)


def segment_ids(cu_seqlens: Tensor, total: int) -> Tensor:
    """cu_seqlens [S + 1] -> [total] int32: the sequence of each packed row (no host sync)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seqs = torch.arange(lengths.numel(), device=cu_seqlens.device, dtype=torch.int32)
    return torch.repeat_interleave(seqs, lengths, output_size=total)


def _varlen_fake(q, k, v, seg, cu_seqlens, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


_varlen_fwd = _attention_ops("varlen_attention", "seg", "cu_seqlens", _varlen_fake)


def varlen_attention_reasons(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor) -> list[str]:
    """Why the Triton path cannot take these (valid) inputs; [] = it can."""
    return _kernel_reasons(q, k, v, cu_seqlens)


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float | None = None,
                     backend: str = "auto") -> Tensor:
    """Self-attention within each of S packed sequences (block-diagonal attention).

    q, k, v [T, H, D] (fp32 / fp16 / bf16), cu_seqlens [S + 1] int (0 = cu[0] <= ... <= cu[S] = T; sequence s is
    rows cu[s] : cu[s + 1], empty sequences allowed) -> [T, H, D] in q's dtype. The kernel tiles the packed rows
    (a tile may span several short sequences) and visits only the keys of the sequences a tile touches, so no
    max_seqlen (and no host sync) is needed. The bounds are checked when cu_seqlens is on the CPU; on a GPU that
    check would cost a sync, so bounds outside [0, T] there are undefined behaviour.
    """
    op = "varlen_attention"
    errors = _check_qkv(op, q, k, v, "[T, H, D]") + check_devices(q=q, k=k, v=v, cu_seqlens=cu_seqlens)
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 1:
        errors.append(f"cu_seqlens must be [S + 1] with S >= 0, got shape {tuple(cu_seqlens.shape)}")
    elif cu_seqlens.dtype not in (torch.int32, torch.int64):
        errors.append(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    elif cu_seqlens.device.type == "cpu" and q.ndim == 3:
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != q.shape[0] or any(a > b for a, b in pairwise(cu)):
            errors.append(f"cu_seqlens must rise from 0 to T = {q.shape[0]}, got {cu if len(cu) <= 12 else '...'}")
    scale = _validated_scale(op, errors, q, scale)
    if resolve_backend(backend, op, varlen_attention_reasons(q, k, v, cu_seqlens), q) == "torch":
        return varlen_attention_ref(q, k, v, cu_seqlens, scale)
    seg = segment_ids(cu_seqlens, q.shape[0])
    return _varlen_fwd(*_padded_head_dim(q, k, v), seg, cu_seqlens.to(torch.int32), scale)[0][..., :q.shape[-1]]

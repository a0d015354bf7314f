"""Exact PyTorch references of masked-key attention and its packed (varlen) form.

They compute in promote_types(dtype, float32) and return the input dtype: the oracle of the parity tests, the CPU
fallback and the benchmark baseline. Both materialise the scores ([B, M, H, N, N], or [H, L, L] per sequence).
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import Tensor


def _masked_softmax(scores: Tensor, keep: Tensor) -> Tensor:
    """Softmax over the last dim restricted to ``keep``; a row with no kept entry is all 0 (gradient 0, no NaN)."""
    any_kept = keep.any(-1, keepdim=True)
    scores = scores.masked_fill(~(keep | ~any_kept), float("-inf"))  # an empty row keeps all: finite softmax ...
    return torch.softmax(scores, dim=-1) * any_kept  # ... zeroed afterwards


def masked_key_attention_ref(q: Tensor, k: Tensor, v: Tensor, key_keep: Tensor, scale: float | None = None) -> Tensor:
    """q, k, v [B, H, N, D] shared by M key masks key_keep [B, M, N] (True = visible) -> [B, M, H, N, D].

    out[b, m, h, i] = Σ_{j: keep[b, m, j]} softmax_j(scale · q_i·k_j) v_j; 0 where mask m has no visible key.
    """
    ct = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bhnd,bhkd->bhnk", q.to(ct), k.to(ct)) * scale  # [B, H, N, N]
    p = _masked_softmax(scores[:, None], key_keep[:, :, None, None, :])  # [B, M, H, N, N]
    return torch.einsum("bmhnk,bhkd->bmhnd", p, v.to(ct)).to(q.dtype)


def varlen_attention_ref(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float | None = None) -> Tensor:
    """Packed sequences q, k, v [T, H, D], sequence s = rows cu_seqlens[s] : cu_seqlens[s + 1] -> [T, H, D].

    Block-diagonal attention: each token attends to every token of its own sequence.
    """
    ct = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bounds = cu_seqlens.tolist()
    outs = []
    for lo, hi in pairwise(bounds):
        qs, ks, vs = (t[lo:hi].to(ct).transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        p = torch.softmax(qs @ ks.transpose(-1, -2) * scale, dim=-1)
        outs.append((p @ vs).transpose(0, 1))
    if not outs:
        return q.new_empty(q.shape)
    return torch.cat(outs).to(q.dtype)

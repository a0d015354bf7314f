"""Exact PyTorch references of masked-key attention and its packed (varlen) form.

They compute in promote_types(dtype, float32) and return the input dtype: the oracle of the parity tests, the CPU
fallback and the benchmark baseline. Both materialise the scores ([B, M, H, N, N], or [H, L, L] per sequence); the
masked one also the keys and values per mask ([B, M, H, N, D]), so that hidden keys never enter a product.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import Tensor


def _masked_softmax(scores: Tensor, keep: Tensor) -> Tensor:
    """Softmax over the last dim restricted to ``keep``; a row with no kept entry is all 0 (gradient 0, no NaN).
    Only masked_fill (never a product with the mask), so that nothing of a masked entry, NaN included, reaches the
    result or, through the backward, the gradients."""
    any_kept = keep.any(-1, keepdim=True)
    scores = scores.masked_fill(~keep, float("-inf")).masked_fill(~any_kept, 0.0)  # an empty row: a finite softmax ...
    return torch.softmax(scores, dim=-1).masked_fill(~any_kept, 0.0)  # ... zeroed afterwards


def visible_keys(x: Tensor, key_keep: Tensor) -> Tensor:
    """x [B, H, N, D] under M key masks key_keep [B, M, N] -> [B, M, H, N, D], hidden keys' rows 0: a hidden key's k
    and v then never meet a product (0·NaN is NaN), forward or backward."""
    return torch.where(key_keep[:, :, None, :, None], x[:, None], 0)


def masked_key_attention_ref(q: Tensor, k: Tensor, v: Tensor, key_keep: Tensor, scale: float | None = None) -> Tensor:
    """q, k, v [B, H, N, D] shared by M key masks key_keep [B, M, N] (True = visible) -> [B, M, H, N, D].

    out[b, m, h, i] = Σ_{j: keep[b, m, j]} softmax_j(scale · q_i·k_j) v_j; 0 where mask m has no visible key.
    A hidden key influences nothing, whatever its values (NaN and ±inf included): k and v are zeroed per mask
    (materialised, [B, M, H, N, D]) before any product, as the kernel never loads them.
    """
    ct = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bhnd,bmhkd->bmhnk", q.to(ct), visible_keys(k.to(ct), key_keep)) * scale  # [B, M, H, N, N]
    p = _masked_softmax(scores, key_keep[:, :, None, None, :])
    return torch.einsum("bmhnk,bmhkd->bmhnd", p, visible_keys(v.to(ct), key_keep)).to(q.dtype)


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

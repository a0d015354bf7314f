"""Masked-key attention: M key masks over shared q, k, v (MCC's local views, masked route) and the packed views of
the token-dropping route, forward and forward + backward.

Shapes come from MCC training (docs/methods/toco-mcc.md §6): ViT-B/16 (12 heads of 64) at 448² (N = 1 + 28², 8 masks per image, one
Bernoulli(0.95) "masked" draw per 4×4 cell of the token grid, class token always visible) and at 224². bf16 on a
GPU; on a CPU one small fp32 case per provider as a smoke test (`--benchmark-disable`).

Providers (masked): reference (materialises [B, M, H, N, N]); sdpa-replicated (q, k, v copied M times, boolean
mask); flex (FlexAttention, block-mask build inside the timed call because masks change every step; compiled on
a GPU; on a CPU eager and forward only: its backward is not implemented there and compiling it takes ~80 s);
xformers (tensor bias over replicated q, k, v; where installed and on a GPU); triton (this package).
Providers (packed): reference (loop over views), sdpa-padded (views padded to the longest, key padding mask: the
layout of `dropped_class_tokens`), triton (`varlen_attention`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastwsss.kernels.attention import (
    masked_key_attention,
    masked_key_attention_ref,
    varlen_attention,
    varlen_attention_ref,
)
from fastwsss.kernels.testing import DEVICE, GPU, assert_close
from fastwsss.methods.mcc import random_key_masks

DTYPE = torch.bfloat16 if GPU else torch.float32
# (out, grads) vs the fp32 reference on the same inputs: |out − ref| <= tol·(|ref| + max(rms(ref), 0.1)), the
# criterion of tests/kernels/test_attention.py
TOL = {torch.bfloat16: (1.6e-2, 8e-2), torch.float16: (2e-3, 2e-2), torch.float32: (1e-4, 1e-3)}

CASES = {  # name: (B, M, H, token grid side, D)
    "vit448-B4-M8-H12-N785-D64": (4, 8, 12, 28, 64),
    "vit224-B4-M8-H12-N197-D64": (4, 8, 12, 14, 64),
} if GPU else {"cpu-B1-M3-H2-N65-D32": (1, 3, 2, 8, 32)}


def _make_case(name: str):
    B, M, H, g, D = CASES[name]
    N = 1 + g * g
    rng = np.random.default_rng(0)
    patches = torch.from_numpy(random_key_masks(rng, B * M, (g, g))).reshape(B, M, g * g)
    keep = torch.cat([torch.ones(B, M, 1, dtype=torch.bool), patches], dim=2).to(DEVICE)  # class token visible
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=gen).to(DEVICE, DTYPE) for _ in range(3))
    return q, k, v, keep


def _check(outs, refs, what: str) -> None:
    """The output, then the gradients, each against the fp32 reference (TOL's criterion)."""
    tol_out, tol_grad = TOL[DTYPE]
    for i, (out, ref) in enumerate(zip(outs, refs, strict=True)):
        assert_close(out, ref, tol_out if i == 0 else tol_grad, f"{what} output {i}", floor=0.1)


def _timed(fn, inputs, direction: str):
    """fwd: fn(*inputs) without autograd -> (out,); fwd+bwd: (out, *grads) under a fixed upstream gradient."""
    if direction == "fwd":
        def run():
            with torch.no_grad():
                return (fn(*inputs),)
        return run
    leaves = [x.detach().requires_grad_() for x in inputs]
    grad_out = []

    def run():
        out = fn(*leaves)
        if not grad_out:
            grad_out.append(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out))
        return (out, *torch.autograd.grad(out, leaves, grad_out[0]))
    return run


_REFS: dict = {}


def _reference(key, fn, inputs, direction: str):
    """fp32 reference outputs (and gradients) on the same inputs, computed once per case."""
    if (key, direction) not in _REFS:
        _REFS[(key, direction)] = tuple(t.detach() for t in _timed(fn, [x.float() for x in inputs], direction)())
    return _REFS[(key, direction)]


# ---- M masks over shared q, k, v


def _replicate(t: torch.Tensor, M: int) -> torch.Tensor:
    B, H, N, D = t.shape
    return t[:, None].expand(B, M, H, N, D).reshape(B * M, H, N, D)


def _sdpa_replicated(keep):
    B, M, N = keep.shape

    def fn(q, k, v):
        o = F.scaled_dot_product_attention(_replicate(q, M), _replicate(k, M), _replicate(v, M),
                                           attn_mask=keep.reshape(B * M, 1, 1, N))
        return o.reshape(B, M, *o.shape[1:])
    return fn


def _flex(keep, direction: str):
    if not GPU and direction != "fwd":
        pytest.skip("FlexAttention has no backward on CPU")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, M, N = keep.shape
    flat = keep.reshape(B * M, N)
    attend = torch.compile(flex_attention) if GPU else flex_attention
    build = torch.compile(create_block_mask) if GPU else create_block_mask

    def fn(q, k, v):
        block_mask = build(lambda b, h, qi, ki: flat[b, ki], B * M, None, N, N, device=q.device)
        o = attend(_replicate(q, M), _replicate(k, M), _replicate(v, M), block_mask=block_mask)
        return o.reshape(B, M, *o.shape[1:])
    return fn


def _xformers(keep):
    if not GPU:
        pytest.skip("xformers attention raises NotImplementedError on CPU")
    try:
        import xformers.ops as xops
    except ImportError:
        pytest.skip("xformers is not installed")
    B, M, N = keep.shape

    def fn(q, k, v):
        H = q.shape[1]
        pad = -N % 8  # xformers wants the bias's last dim 8-aligned: slice a padded buffer
        bias = torch.zeros(B * M, H, N, N + pad, device=q.device, dtype=q.dtype)[..., :N]
        bias.masked_fill_(~keep.reshape(B * M, 1, 1, N), float("-inf"))
        q2, k2, v2 = (_replicate(t, M).transpose(1, 2) for t in (q, k, v))  # [B·M, N, H, D]
        o = xops.memory_efficient_attention(q2, k2, v2, attn_bias=bias)
        return o.transpose(1, 2).reshape(B, M, H, N, -1)
    return fn


MASKED_PROVIDERS = ["reference", "sdpa-replicated", "flex", "xformers", "triton"]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", MASKED_PROVIDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_masked_key_attention(run_case, case, provider, direction):
    q, k, v, keep = _make_case(case)
    fn = {
        "reference": lambda: lambda q, k, v: masked_key_attention_ref(q, k, v, keep),
        "sdpa-replicated": lambda: _sdpa_replicated(keep),
        "flex": lambda: _flex(keep, direction),
        "xformers": lambda: _xformers(keep),
        "triton": lambda: lambda q, k, v: masked_key_attention(q, k, v, keep, backend="triton"),
    }[provider]()
    refs = _reference(case, lambda q, k, v: masked_key_attention_ref(q, k, v, keep), (q, k, v), direction)
    B, M, N = keep.shape
    run_case(_timed(fn, (q, k, v), direction), lambda outs: _check(outs, refs, provider), provider=provider,
             direction=direction, dtype=DTYPE, shape=f"B{B} M{M} H{q.shape[1]} N{N} D{q.shape[-1]}",
             visible_keys_mean=round(float(keep.sum(-1).float().mean()), 1))


# ---- the packed views of token dropping


def _packed_case(name: str):
    q, _, _, keep = _make_case(name)
    H, D = q.shape[1], q.shape[-1]
    lengths = keep.sum(-1).flatten()  # 1 + visible patches, per view
    T = int(lengths.sum())
    gen = torch.Generator().manual_seed(0)
    qp, kp, vp = (torch.randn(T, H, D, generator=gen).to(DEVICE, DTYPE) for _ in range(3))
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return qp, kp, vp, cu


def _padded(cu: torch.Tensor):
    """Views padded to the longest, key padding masked: [S, H, L, D] in, packed rows out."""
    lengths = cu.diff()
    S, L = lengths.numel(), int(lengths.max())
    valid = torch.arange(L, device=cu.device) < lengths[:, None]  # [S, L]
    seq, pos = valid.nonzero(as_tuple=True)

    def fn(q, k, v):
        def pad(t):
            out = t.new_zeros(S, L, *t.shape[1:])
            out[seq, pos] = t
            return out.transpose(1, 2)  # [S, H, L, D]
        o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=valid[:, None, None, :])
        return o.transpose(1, 2)[seq, pos]
    return fn


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["reference", "sdpa-padded", "triton"])
@pytest.mark.parametrize("case", list(CASES))
def test_packed_views(run_case, case, provider, direction):
    q, k, v, cu = _packed_case(case)
    fn = {
        "reference": lambda q, k, v: varlen_attention_ref(q, k, v, cu),
        "sdpa-padded": _padded(cu),
        "triton": lambda q, k, v: varlen_attention(q, k, v, cu, backend="triton"),
    }[provider]
    refs = _reference(f"packed-{case}", lambda q, k, v: varlen_attention_ref(q, k, v, cu), (q, k, v), direction)
    run_case(_timed(fn, (q, k, v), direction), lambda outs: _check(outs, refs, provider), provider=provider,
             direction=direction, dtype=DTYPE, shape=f"T{q.shape[0]} views{cu.numel() - 1} H{q.shape[1]} "
             f"D{q.shape[-1]} longest{int(cu.diff().max())}")

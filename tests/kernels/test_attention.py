"""Masked-key and packed (varlen) attention: Triton kernels (the interpreter on CPU) against the fp32 reference,
forward and backward, edge cases, dispatch, and the timm drop-in layer on a timm ViT the project does not use."""

from __future__ import annotations

import inspect
from functools import partial

import pytest
import torch

from fastwsss.kernels import testing
from fastwsss.kernels.attention import (
    MaskedKeyAttention,
    block_forward,
    masked_key_attention,
    masked_key_attention_ref,
    swap_attention,
    varlen_attention,
    varlen_attention_ref,
)
from fastwsss.kernels.attention.api import compact_keys
from fastwsss.kernels.testing import DEVICE

from parity import nan_filled

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (out, grads) tolerance against the fp32 reference on the same inputs: |out − ref| <= tol·(|ref| + max(rms(ref),
# 0.1)), relative with an absolute floor at the tensor's own scale, so sums that cancel are judged against the size
# of their terms; floor 0.1: a mask with one visible key has dQ = 0 exactly, the kernel gets dP − δ = rounding
# (~1e-6). fp32: IEEE dots, only the summation order differs (online softmax; grads summed over masks and query
# blocks); seen <= 3.2e-5 on grads at N = 197, the margin is for N = 785 x 8 masks. fp16: P and dS are rounded to
# fp16 before their dots (as in every flash kernel) and the results once more: seen 4e-4 (out), 5e-3 (grads: a
# 1-ulp rounding of dV summed over 197 queries). bf16 has 3 fewer mantissa bits: 8x the fp16 numbers.
TOL = {"fp32": (1e-5, 2e-4), "fp16": (2e-3, 2e-2), "bf16": (1.6e-2, 8e-2)}
gpu = pytest.mark.gpu
assert_close = partial(testing.assert_close, floor=0.1)  # the criterion above


@pytest.fixture(autouse=True)
def nan_buffers(monkeypatch):
    """Every buffer a launcher hands to a kernel starts as NaN: an element the kernel fails to write cannot pass
    (and the uninitialised dK/dV partials prove that only the written rows are read back)."""
    nan_filled(monkeypatch, "attention")


def make_keep(kind: str, B: int, M: int, N: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "random":  # plus, where there is room, a mask that sees nothing and one that sees one key
        keep = torch.rand(B, M, N, generator=gen) < 0.4
        if M >= 3:
            keep[0, 0] = False
            keep[0, 1] = False
            keep[0, 1, N // 2] = True
        return keep
    if kind == "all-hidden":
        return torch.zeros(B, M, N, dtype=torch.bool)
    if kind == "one-visible":
        keep = torch.zeros(B, M, N, dtype=torch.bool)
        for b in range(B):
            for m in range(M):
                keep[b, m, (7 * m + 3 * b) % N] = True
        return keep
    if kind == "identical":
        return (torch.rand(B, 1, N, generator=gen) < 0.4).expand(B, M, N).clone()
    if kind == "all-visible":
        return torch.ones(B, M, N, dtype=torch.bool)
    raise ValueError(kind)


def run_both(fn_kernel, fn_ref, inputs, dtype):
    """Kernel on the inputs in `dtype`, reference in fp32 on the same (rounded) values; same upstream gradient."""
    gen = torch.Generator().manual_seed(1)
    low = [x.to(DEVICE, dtype).requires_grad_() for x in inputs]
    high = [x.detach().float().requires_grad_() for x in low]
    out = fn_kernel(*low)
    ref = fn_ref(*high)
    g = torch.randn(ref.shape, generator=gen)
    grads = torch.autograd.grad(out, low, g.to(DEVICE, dtype))
    ref_grads = torch.autograd.grad(ref, high, g.to(ref.device))
    return out, ref, grads, ref_grads


MASKED_CASES = [  # B, M, H, N, D, dtype, mask kind
    pytest.param(1, 1, 1, 8, 16, "fp32", "random", id="B1-M1-H1-N8-D16-fp32-tiny"),
    pytest.param(2, 3, 2, 70, 32, "fp32", "random", id="B2-M3-H2-N70-D32-fp32-ragged"),
    pytest.param(2, 3, 2, 70, 32, "fp16", "random", id="B2-M3-H2-N70-D32-fp16-ragged"),
    pytest.param(2, 2, 1, 1, 16, "fp32", "random", id="B2-M2-H1-N1-D16-fp32"),
    pytest.param(2, 1, 2, 40, 24, "fp32", "random", id="B2-M1-H2-N40-D24-fp32"),
    pytest.param(1, 3, 2, 197, 64, "fp32", "random", id="B1-M3-H2-N197-D64-vit224-fp32"),
    pytest.param(1, 3, 2, 197, 64, "fp16", "random", id="B1-M3-H2-N197-D64-vit224-fp16"),
    pytest.param(2, 3, 2, 70, 32, "fp32", "all-hidden", id="B2-M3-H2-N70-D32-fp32-all-hidden"),
    pytest.param(2, 3, 2, 70, 32, "fp32", "one-visible", id="B2-M3-H2-N70-D32-fp32-one-visible"),
    pytest.param(2, 3, 2, 70, 32, "fp16", "identical", id="B2-M3-H2-N70-D32-fp16-identical"),
    pytest.param(1, 2, 2, 70, 32, "fp32", "all-visible", id="B1-M2-H2-N70-D32-fp32-all-visible"),
    # ragged head dims reach the kernels padded to a multiple of 16; half D <= 16 and D > 128 run dK/dV key-major
    pytest.param(1, 3, 2, 40, 8, "fp16", "random", id="B1-M3-H2-N40-D8-fp16-key-major"),
    pytest.param(1, 2, 1, 30, 200, "fp16", "random", id="B1-M2-H1-N30-D200-fp16-key-major"),
    pytest.param(1, 2, 2, 30, 47, "fp32", "random", id="B1-M2-H2-N30-D47-fp32-padded"),
    pytest.param(2, 3, 2, 70, 32, "bf16", "random", id="B2-M3-H2-N70-D32-bf16", marks=gpu),
    pytest.param(1, 3, 2, 197, 64, "bf16", "one-visible", id="B1-M3-H2-N197-D64-bf16-one-visible", marks=gpu),
    pytest.param(4, 8, 12, 785, 64, "bf16", "random", id="B4-M8-H12-N785-D64-vit448-bf16", marks=gpu),
    pytest.param(4, 8, 12, 785, 64, "fp16", "random", id="B4-M8-H12-N785-D64-vit448-fp16", marks=gpu),
    pytest.param(2, 8, 12, 785, 64, "fp32", "random", id="B2-M8-H12-N785-D64-vit448-fp32", marks=gpu),
]


@pytest.mark.parametrize(("B", "M", "H", "N", "D", "dtype", "kind"), MASKED_CASES)
def test_masked_key_attention_matches_reference(B, M, H, N, D, dtype, kind):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=gen) for _ in range(3))
    keep = make_keep(kind, B, M, N, gen).to(DEVICE)
    out, ref, grads, ref_grads = run_both(
        lambda q, k, v: masked_key_attention(q, k, v, keep, backend="triton"),
        lambda q, k, v: masked_key_attention_ref(q, k, v, keep.to(q.device)), (q, k, v), DTYPES[dtype])
    tol_out, tol_grad = TOL[dtype]
    assert out.shape == (B, M, H, N, D) and out.dtype == DTYPES[dtype]
    assert_close(out, ref, tol_out, "out")
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        assert_close(g, r, tol_grad, f"d{name}")
    if kind == "all-hidden":
        assert out.abs().max() == 0 and all(g.abs().max() == 0 for g in grads)


VARLEN_CASES = [  # sequence lengths, H, D, dtype
    pytest.param([8], 1, 16, "fp32", id="S1-T8-H1-D16-fp32-tiny"),
    pytest.param([1, 0, 39, 100, 3, 70], 2, 32, "fp32", id="S6-T213-H2-D32-fp32-ragged"),
    pytest.param([1, 0, 39, 100, 3, 70], 2, 32, "fp16", id="S6-T213-H2-D32-fp16-ragged"),
    pytest.param([1] * 5, 2, 16, "fp32", id="S5-T5-H2-D16-fp32-singletons"),
    pytest.param([197, 197], 2, 64, "fp32", id="S2-T394-H2-D64-vit224-fp32"),
    pytest.param([1 + (7 * i) % 23 for i in range(24)], 2, 64, "fp32", id="S24-mcc-views-H2-D64-fp32"),
    pytest.param([1, 0, 39, 20, 3], 2, 8, "fp16", id="S5-T63-H2-D8-fp16-key-major"),
    pytest.param([5, 30, 1], 1, 200, "fp16", id="S3-T36-H1-D200-fp16-key-major"),
    pytest.param([1, 0, 39, 100, 3, 70], 2, 32, "bf16", id="S6-T213-H2-D32-bf16", marks=gpu),
    pytest.param([1 + (13 * i) % 80 for i in range(32)] + [785] * 4, 12, 64, "bf16", id="S36-vit448-H12-D64-bf16",
                 marks=gpu),
]


@pytest.mark.parametrize(("lengths", "H", "D", "dtype"), VARLEN_CASES)
def test_varlen_attention_matches_reference(lengths, H, D, dtype):
    gen = torch.Generator().manual_seed(0)
    T = sum(lengths)
    q, k, v = (torch.randn(T, H, D, generator=gen) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    out, ref, grads, ref_grads = run_both(
        lambda q, k, v: varlen_attention(q, k, v, cu.to(DEVICE), backend="triton"),
        lambda q, k, v: varlen_attention_ref(q, k, v, cu), (q, k, v), DTYPES[dtype])
    tol_out, tol_grad = TOL[dtype]
    assert_close(out, ref, tol_out, "out")
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        assert_close(g, r, tol_grad, f"d{name}")


def test_varlen_equals_masked_key_attention_on_dropped_tokens():
    """Packing the visible keys of each mask as its own sequence gives the visible queries' rows of the masked
    form (the identity MCC's token dropping rests on)."""
    gen = torch.Generator().manual_seed(3)
    B, M, H, N, D = 2, 3, 2, 30, 16
    q, k, v = (torch.randn(B, H, N, D, generator=gen, device=DEVICE) for _ in range(3))
    keep = make_keep("random", B, M, N, gen).to(DEVICE)
    masked = masked_key_attention(q, k, v, keep, backend="triton")  # [B, M, H, N, D]
    b, m, n = keep.nonzero(as_tuple=True)  # visible (b, m, n), view by view
    packed = varlen_attention(*(t.permute(0, 2, 1, 3)[b, n] for t in (q, k, v)),
                              torch.nn.functional.pad(keep.sum(-1).flatten().cumsum(0), (1, 0)), backend="triton")
    assert_close(packed, masked.permute(0, 1, 3, 2, 4)[b, m, n], 2e-6, "packed vs masked")


def test_backward_is_deterministic():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 70, 32, generator=gen, device=DEVICE, requires_grad=True) for _ in range(3))
    keep = make_keep("identical", 1, 4, 70, gen).to(DEVICE)
    g = torch.randn(1, 4, 2, 70, 32, generator=gen).to(DEVICE)
    first, second = (torch.autograd.grad(masked_key_attention(q, k, v, keep, backend="triton"), (q, k, v), g)
                     for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_kernels_get_aligned_rows():
    """What the launchers hand the kernels: rows at 16-byte-aligned addresses with strides divisible by 16 (Triton's
    vectorised specialization, the one the compile check compiles), copied only where they are not."""
    from fastwsss.kernels.attention._triton import _row_view

    def aligned(t):
        return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(st % 16 == 0 for st in t.stride()[:-1])

    x = torch.randn(2, 3, 5, 80)
    assert _row_view(x) is x
    qkv = torch.randn(2, 5, 3, 3, 64).permute(2, 0, 3, 1, 4)  # timm's q, k, v views into one qkv buffer
    assert all(_row_view(t) is t for t in qkv.unbind(0))
    for odd in (x[..., 3:67], x[:, :, :, :64].transpose(2, 3).contiguous().transpose(2, 3)):
        out = _row_view(odd)
        assert aligned(out) and torch.equal(out, odd)


def test_compact_keys_lists_visible_keys_first_in_order():
    keep = torch.tensor([[[False, True, False, True], [False] * 4, [True] * 4]])
    idx, counts = compact_keys(keep)
    assert counts.tolist() == [[2, 0, 4]] and idx.dtype == torch.int32
    assert idx[0, 0, :2].tolist() == [1, 3] and idx[0, 2].tolist() == [0, 1, 2, 3]
    assert sorted(idx[0, 0].tolist()) == [0, 1, 2, 3]  # a permutation: the backward inverts it


def test_auto_falls_back_and_triton_lists_every_reason():
    q = torch.randn(1, 1, 5, 8, dtype=torch.float64, device="meta")
    keep = torch.ones(1, 2, 5, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="masked_key_attention") as err:
        masked_key_attention(q, q, q, keep, backend="triton")
    assert "float64" in str(err.value) and "meta" in str(err.value)
    qc = torch.randn(1, 1, 5, 8, dtype=torch.float64)
    keep = torch.ones(1, 2, 5, dtype=torch.bool)
    out = masked_key_attention(qc, qc, qc, keep)  # auto: the reference
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, masked_key_attention_ref(qc, qc, qc, keep))
    with pytest.raises(ValueError, match="backend="):
        masked_key_attention(qc, qc, qc, keep, backend="cuda")


def test_validation_names_every_problem():
    q = torch.randn(2, 3, 5, 8)
    with pytest.raises(ValueError) as err:
        masked_key_attention(q, q[0], q.half(), torch.ones(2, 4, 6))
    msg = str(err.value)
    assert "k must be [B, H, N, D]" in msg and "share a dtype" in msg and "key_keep must be bool" in msg
    assert "[2, M, 5]" in msg
    with pytest.raises(ValueError, match="rise from 0 to T = 5"):
        varlen_attention(q[0, 0][:, None], q[0, 0][:, None], q[0, 0][:, None], torch.tensor([0, 3, 4]))
    with pytest.raises(ValueError, match="cu_seqlens must be int32 or int64"):
        varlen_attention(q[0], q[0], q[0], torch.tensor([0.0, 3.0]))


def test_custom_ops_pass_opcheck():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=gen, device=DEVICE, requires_grad=True) for _ in range(3))
    idx, counts = compact_keys(make_keep("random", 1, 3, 20, gen).to(DEVICE))
    torch.library.opcheck(torch.ops.fastwsss.masked_key_attention_fwd.default, (q, k, v, idx, counts, 0.25))
    qp, kp, vp = (torch.randn(20, 2, 16, generator=gen, device=DEVICE, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 7, 7, 20], dtype=torch.int32, device=DEVICE)
    seg = torch.tensor([0] * 7 + [2] * 13, dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(torch.ops.fastwsss.varlen_attention_fwd.default, (qp, kp, vp, seg, cu, 0.25))


def test_custom_ops_under_torch_compile():
    """fullgraph capture through both layouts' forward and backward ops (aot_eager: the graph, without inductor's
    CPU compile): the same output and gradients as eager. (The public varlen_attention checks CPU cu_seqlens on the
    host, which no graph can hold, so the ops are called directly.)"""
    gen = torch.Generator().manual_seed(0)
    idx, counts = compact_keys(make_keep("random", 1, 3, 20, gen).to(DEVICE))
    cu = torch.tensor([0, 7, 7, 20], dtype=torch.int32, device=DEVICE)
    seg = torch.tensor([0] * 7 + [2] * 13, dtype=torch.int32, device=DEVICE)
    ops = torch.ops.fastwsss
    for fn, shape in ((lambda q, k, v: ops.masked_key_attention_fwd(q, k, v, idx, counts, 0.25)[0], (1, 2, 20, 16)),
                      (lambda q, k, v: ops.varlen_attention_fwd(q, k, v, seg, cu, 0.25)[0], (20, 2, 16))):
        inputs = [torch.randn(shape, generator=gen, device=DEVICE) for _ in range(3)]
        eager_in = [x.clone().requires_grad_() for x in inputs]
        compiled_in = [x.clone().requires_grad_() for x in inputs]
        out = torch.compile(fn, fullgraph=True, backend="aot_eager")(*compiled_in)
        want = fn(*eager_in)
        g = torch.randn(want.shape, generator=gen).to(DEVICE)
        assert_close(out, want, 1e-6, "compiled out")
        for a, b in zip(torch.autograd.grad(out, compiled_in, g), torch.autograd.grad(want, eager_in, g), strict=True):
            assert_close(a, b, 1e-6, "compiled grad")


# ---- the timm drop-in, on a timm ViT this project does not otherwise use (register token, qk-norm, layer scale)


@pytest.fixture
def timm_vit():
    from fastwsss._compat import ensure_torchvision

    ensure_torchvision()
    import timm

    def make(**extra):
        torch.manual_seed(0)
        return timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                 embed_dim=64, depth=2, num_heads=2, qk_norm=True, init_values=0.1, reg_tokens=1,
                                 num_classes=5, **extra).to(DEVICE).eval()

    return make


def _set_backend(model, backend):
    for m in model.modules():
        if isinstance(m, MaskedKeyAttention):
            m.backend = backend


def test_attn_layer_drop_in_identical_without_masks(timm_vit):
    ref = timm_vit()
    model = timm_vit(attn_layer=MaskedKeyAttention)
    model.load_state_dict(ref.state_dict())  # strict: timm's parameter names
    assert sum(isinstance(m, MaskedKeyAttention) for m in model.modules()) == 2
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    expected = ref(x)
    _set_backend(model, "torch")
    assert torch.equal(model(x), expected)  # timm's own computation, bit for bit
    _set_backend(model, "triton")
    assert_close(model(x), expected, 1e-5, "logits through the kernel")


def test_swap_attention_keeps_weights_and_masks_keys(timm_vit):
    ref = timm_vit()
    model = swap_attention(timm_vit(), backend="triton")
    assert [type(b.attn) for b in model.blocks] == [MaskedKeyAttention] * 2
    before = {n: p for n, p in ref.named_parameters()}
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert model.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    assert_close(model(x), ref(x), 1e-5, "logits without masks")

    # key masks: the kernel through timm's own Block (a boolean [B, 1, 1, N] attn_mask is read as a key mask)
    tokens = ref.norm_pre(ref._pos_embed(ref.patch_embed(x)))  # [B, 2 + 16, C]: class + register + patches
    N = tokens.shape[1]
    keep = torch.rand(2, N, device=DEVICE) < 0.5
    keep[:, :2] = True
    want, got = tokens, tokens.clone().requires_grad_()
    t = got
    for blk_ref, blk in zip(ref.blocks, model.blocks, strict=True):
        want = blk_ref(want, attn_mask=keep[:, None, None, :])
        t = blk(t, attn_mask=keep[:, None, None, :])
    assert_close(t, want, 1e-5, "masked blocks")
    if "attn_mask" in inspect.signature(ref.forward_features).parameters:
        assert_close(model.forward_features(x, attn_mask=keep[:, None, None, :]),
                     ref.forward_features(x, attn_mask=keep[:, None, None, :]), 1e-5, "masked forward_features")


def test_layer_runs_many_masks_in_one_call(timm_vit):
    """key_keep [B, M, N] -> [B, M, N, C]: q, k, v projected once; each mask equals timm's attention under it;
    gradients too."""
    attn_ref = timm_vit().blocks[0].attn
    layer = MaskedKeyAttention.from_attention(attn_ref, backend="triton")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 18, 64, generator=gen).to(DEVICE).requires_grad_()
    keep = (torch.rand(2, 3, 18, generator=gen) < 0.5).to(DEVICE)
    keep[..., 0] = True
    out = layer(x, key_keep=keep)
    assert out.shape == (2, 3, 18, 64)
    want = torch.stack([attn_ref(x, attn_mask=keep[:, m, None, None, :]) for m in range(3)], dim=1)
    assert_close(out, want, 1e-5, "out")
    g = torch.randn(out.shape, generator=gen).to(DEVICE)
    got = torch.autograd.grad(out, (x, attn_ref.qkv.weight), g)
    ref_grads = torch.autograd.grad(want, (x, attn_ref.qkv.weight), g)
    for name, a, b in zip(("dx", "dW_qkv"), got, ref_grads, strict=True):
        assert_close(a, b, 5e-5, name)
    assert_close(layer(x, key_keep=keep[:, 1]), want[:, 1], 1e-5, "key_keep [B, N]")


def test_unmasked_auto_takes_timms_attention(timm_vit, monkeypatch):
    """No mask at all under backend="auto": timm's own computation (SDPA; FlashAttention on a GPU), bit for bit, and
    recorded as "torch" (before: the masked-key kernel with every key visible, where the interpreter or a GPU can
    run it); a key mask still takes the kernel, and backend="triton" still forces it without a mask."""
    from fastwsss.kernels import _backend, backends_used

    monkeypatch.setattr(_backend, "_used", {})
    attn_ref = timm_vit().blocks[0].attn
    layer = MaskedKeyAttention.from_attention(attn_ref)  # auto
    op = "MaskedKeyAttention attention"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 18, 64, generator=gen).to(DEVICE)
    assert torch.equal(layer(x), attn_ref(x))
    assert backends_used(reset=True) == {op: "torch"}
    keep = (torch.rand(2, 18, generator=gen) < 0.5).to(DEVICE)
    keep[:, 0] = True
    assert_close(layer(x, key_keep=keep), attn_ref(x, attn_mask=keep[:, None, None, :]), 1e-5, "key mask, auto")
    assert backends_used(reset=True) == {op: "triton", "masked_key_attention": "triton"}
    layer.backend = "triton"
    assert_close(layer(x), attn_ref(x), 1e-5, "no mask, triton")
    assert backends_used() == {op: "triton", "masked_key_attention": "triton"}


def test_layer_falls_back_for_masks_it_cannot_take(timm_vit):
    attn_ref = timm_vit().blocks[0].attn
    layer = MaskedKeyAttention.from_attention(attn_ref)  # auto
    x = torch.randn(2, 18, 64, device=DEVICE)
    additive = torch.randn(2, 1, 18, 18, device=DEVICE)
    assert torch.equal(layer(x, attn_mask=additive), attn_ref(x, attn_mask=additive))
    assert torch.equal(layer(x, is_causal=True), attn_ref(x, is_causal=True))
    layer.backend = "triton"
    with pytest.raises(ValueError, match="is not a boolean key mask"):
        layer(x, attn_mask=additive)
    layer.train()
    layer.attn_drop.p = 0.1
    with pytest.raises(ValueError, match="attention dropout"):
        layer(x)


# ---- block_forward: a whole timm Block with the drop-in's key masks or packed sequences


def test_block_forward_without_extras_is_the_block(timm_vit):
    """Neither key_keep nor cu_seqlens: block(x), and with "auto" timm's own block bit for bit."""
    ref = timm_vit()
    model = swap_attention(timm_vit())  # auto
    x = torch.randn(2, 18, 64, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    for blk_ref, blk in zip(ref.blocks, model.blocks, strict=True):
        assert torch.equal(block_forward(blk, x), blk(x))
        assert torch.equal(block_forward(blk, x), blk_ref(x))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_block_forward_many_masks_equals_one_run_per_mask(timm_vit, backend):
    """key_keep [B, M, N] -> [B, M, N, C]: mask m equals timm's block under that key mask alone, and equals
    block_forward with key_keep [B, N]; gradients w.r.t. x too."""
    ref = timm_vit()
    model = swap_attention(timm_vit(), backend=backend)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 18, 64, generator=gen).to(DEVICE).requires_grad_()
    keep = (torch.rand(2, 3, 18, generator=gen) < 0.5).to(DEVICE)
    keep[..., :2] = True  # class and register token
    keep[1, 2] = True  # a mask that hides nothing
    blk, blk_ref = model.blocks[1], ref.blocks[1]
    out = block_forward(blk, x, key_keep=keep)
    assert out.shape == (2, 3, 18, 64)
    want = torch.stack([blk_ref(x, attn_mask=keep[:, m, None, None, :]) for m in range(3)], dim=1)
    assert_close(out, want, 1e-5, f"{backend}: masks in one call vs one timm run per mask")
    each = torch.stack([block_forward(blk, x, key_keep=keep[:, m]) for m in range(3)], dim=1)
    assert_close(out, each, 1e-5, f"{backend}: key_keep [B, M, N] vs [B, N] per mask")
    g = torch.randn(out.shape, generator=gen).to(DEVICE)
    (dx,), (dx_ref,) = torch.autograd.grad(out, x, g), torch.autograd.grad(want, x, g)
    assert_close(dx, dx_ref, 5e-5, f"{backend}: dx")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_block_forward_packed_equals_one_run_per_sequence(timm_vit, backend):
    """cu_seqlens: packed x [T, C] -> [T, C], each sequence as timm's block on it alone (empty and single-token
    sequences included); the drop-in's forward(cu_seqlens=) is the attention part."""
    ref = timm_vit()
    model = swap_attention(timm_vit(), backend=backend)
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 1, 12, 0, 7]
    seqs = [torch.randn(n, 64, generator=gen).to(DEVICE) for n in lengths]
    packed = torch.cat(seqs)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    blk, blk_ref = model.blocks[0], ref.blocks[0]
    out = block_forward(blk, packed, cu_seqlens=cu)
    want = torch.cat([blk_ref(s[None])[0] for s in seqs if len(s)])
    assert_close(out, want, 1e-5, f"{backend}: packed block vs one run per sequence")
    attn = blk.attn(blk.norm1(packed), cu_seqlens=cu)
    assert_close(attn, torch.cat([blk_ref.attn(blk_ref.norm1(s[None]))[0] for s in seqs if len(s)]), 1e-5,
                 f"{backend}: packed attention")


def test_block_forward_refuses_what_it_cannot_run(timm_vit):
    ref = timm_vit()
    x = torch.randn(2, 18, 64, device=DEVICE)
    keep = torch.ones(2, 18, dtype=torch.bool, device=DEVICE)
    cu = torch.tensor([0, 18, 36], device=DEVICE)
    with pytest.raises(TypeError, match="need a MaskedKeyAttention"):
        block_forward(ref.blocks[0], x, key_keep=keep)  # timm's own Attention takes no key_keep
    blk = swap_attention(ref).blocks[0]
    with pytest.raises(ValueError, match="not both"):
        block_forward(blk, x, key_keep=keep, cu_seqlens=cu)
    with pytest.raises(ValueError, match="takes no attn_mask"):
        blk.attn(x.flatten(0, 1), key_keep=keep, cu_seqlens=cu)
    with pytest.raises(ValueError, match="packed sequences"):
        blk.attn(x, cu_seqlens=cu)
    drop = swap_attention(timm_vit(drop_path_rate=0.1)).train().blocks[1]
    with pytest.raises(ValueError, match="drop path"):
        block_forward(drop, x, key_keep=keep)


# ---- non-finite values: where they may go, on both backends


def _poisoned_run(fn_kernel, fn_ref, inputs, g):
    """(kernel out, reference out, kernel grads, reference grads) on the same fp32 inputs and upstream gradient."""
    low = [x.to(DEVICE).requires_grad_() for x in inputs]
    high = [x.detach().clone().requires_grad_() for x in inputs]
    out, ref = fn_kernel(*low), fn_ref(*high)
    return (out, ref, torch.autograd.grad(out, low, g.to(DEVICE), allow_unused=True),
            torch.autograd.grad(ref, high, g, allow_unused=True))


def assert_same_non_finite(out, ref, tol, what):
    """The same elements are non-finite (NaN or ±inf, as the reference), and the finite ones agree."""
    fin, ref_fin = torch.isfinite(out.detach().cpu()), torch.isfinite(ref.detach())
    assert torch.equal(fin, ref_fin), f"{what}: {int((fin != ref_fin).sum())} elements differ in finiteness, e.g. " \
                                      f"at {tuple((fin != ref_fin).nonzero()[0].tolist())}"
    assert_close(out.detach().nan_to_num(0.0, 0.0, 0.0), ref.detach().nan_to_num(0.0, 0.0, 0.0), tol, what,
                 where=ref_fin)


LENGTHS = [3, 6, 1, 7, 4, 5]  # 26 rows: one tile of every kernel; sequence 1 is rows 3..8, sequence 2 row 9


@pytest.mark.parametrize("row", [5, 9], ids=["seq-of-6", "singleton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["q", "k", "v", "dout"])
def test_varlen_non_finite_stays_in_its_sequence(where, bad, row):
    """A NaN / ±inf in one packed sequence (q, k, v, or the upstream gradient) leaves the other sequences of its tile
    exactly as without it, forward and backward (before: 0·NaN in the tile's dots poisoned them); inside its sequence
    the Triton path is non-finite exactly where the reference is (including an infinite key that scores −inf for
    some queries: they ignore it, as in the reference; and a query whose only key scores −inf: NaN, as there)."""
    gen = torch.Generator().manual_seed(7)
    T, H, D = sum(LENGTHS), 2, 16
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    clean = [torch.randn(T, H, D, generator=gen) for _ in range(3)]
    g = torch.randn(T, H, D, generator=gen)
    inputs, g_bad = [x.clone() for x in clean], g.clone()
    (g_bad if where == "dout" else inputs["qkv".index(where)])[row, 1, 3] = bad
    run = partial(_poisoned_run, lambda q, k, v: varlen_attention(q, k, v, cu.to(DEVICE), backend="triton"),
                  lambda q, k, v: varlen_attention_ref(q, k, v, cu))
    out, ref, grads, ref_grads = run(inputs, g_bad)
    assert not torch.isfinite(ref_grads[0] if where == "dout" else ref).all()  # the case poisons something
    assert_same_non_finite(out, ref, 1e-5, "out")
    for name, a, b in zip("qkv", grads, ref_grads, strict=True):
        assert_same_non_finite(a, b, 2e-4, f"d{name}")
    other = torch.ones(T, dtype=torch.bool)
    other[slice(3, 9) if row == 5 else slice(9, 10)] = False  # the poisoned row's sequence
    out_clean, _, grads_clean, _ = run(clean, g)
    assert torch.equal(out[other], out_clean[other])  # bit for bit: the poisoned rows add exact zeros
    for name, a, b in zip("qkv", grads, grads_clean, strict=True):
        assert torch.equal(a[other], b[other]), f"d{name}"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_masked_hidden_keys_never_matter(bad):
    """NaN / ±inf in k and v of keys that a mask hides: that mask's output and every gradient are those of clean
    inputs on both backends (before: the reference multiplied 0-weights by the NaN, forward and in the softmax
    backward, while the kernel never loads hidden keys); where a mask sees the key, the non-finite value propagates,
    the same on both."""
    gen = torch.Generator().manual_seed(5)
    B, M, H, N, D = 2, 3, 2, 20, 16
    clean = [torch.randn(B, H, N, D, generator=gen) for _ in range(3)]
    keep = torch.rand(B, M, N, generator=gen) < 0.5
    keep[:, :, 4] = False  # key 4: hidden in every mask of both images
    keep[0, :, 9] = torch.tensor([False, True, False])  # key 9 of image 0: seen by mask 1 only
    keep[:, :, 0] = True
    keep = keep.to(DEVICE)
    g = torch.randn(B, M, H, N, D, generator=gen)
    run = partial(_poisoned_run, lambda q, k, v: masked_key_attention(q, k, v, keep, backend="triton"),
                  lambda q, k, v: masked_key_attention_ref(q, k, v, keep.cpu()))
    want, want_ref, _, want_grads = run(clean, g)
    hidden = [x.clone() for x in clean]
    for x in hidden[1:]:
        x[:, 1, 4, 5] = bad
    out, ref, grads, ref_grads = run(hidden, g)
    for backend, o, gs in (("triton", out, grads), ("torch", ref, ref_grads)):
        assert_close(o, want_ref, TOL["fp32"][0], f"{backend} out, hidden {bad}")
        for name, a, b in zip("qkv", gs, want_grads, strict=True):
            assert_close(a, b, TOL["fp32"][1], f"{backend} d{name}, hidden {bad}")
            assert name == "q" or (a[:, :, 4] == 0).all()

    seen = [x.clone() for x in clean]
    for x in seen[1:]:
        x[0, 1, 9, 5] = bad
    out, ref, grads, ref_grads = run(seen, g)
    assert not torch.isfinite(ref[0, 1]).all()  # the mask that sees it
    assert_same_non_finite(out, ref, TOL["fp32"][0], "out, visible NaN")
    for name, a, b in zip("qkv", grads, ref_grads, strict=True):
        assert_same_non_finite(a, b, TOL["fp32"][1], f"d{name}, visible NaN")
    hides = torch.ones(B, M, dtype=torch.bool)
    hides[0, 1] = False
    assert_close(out[hides], want[hides], TOL["fp32"][0], "the masks that hide it")


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_empty_head_dim_is_an_error(backend):
    """Head dim 0 (before: ZeroDivisionError computing D^-½, or an empty output with an explicit scale)."""
    q = torch.randn(1, 2, 5, 0)
    for scale in (None, 0.5):
        with pytest.raises(ValueError, match="head dim must be >= 1, got 0"):
            masked_key_attention(q, q, q, torch.ones(1, 1, 5, dtype=torch.bool), scale, backend=backend)
        with pytest.raises(ValueError, match="head dim must be >= 1, got 0"):
            varlen_attention(q[0], q[0], q[0], torch.tensor([0, 2]), scale, backend=backend)


def test_layer_with_empty_heads_is_an_error():
    with pytest.raises(ValueError, match="head dim must be >= 1"):
        MaskedKeyAttention(8, num_heads=2, attn_head_dim=0)
    with pytest.raises(ValueError, match="head dim must be >= 1"):
        MaskedKeyAttention(0, num_heads=2)
    with pytest.raises(ValueError, match="num_heads must be >= 1"):
        MaskedKeyAttention(8, num_heads=0)

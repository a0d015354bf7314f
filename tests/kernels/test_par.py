"""PAR: the reference checked against a per-pixel Python loop and a transcription of the original (ToCo's
materialising module), the properties callers rely on, and the Triton kernels against the reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastwsss.kernels.par import DEFAULT_DILATIONS, par_affinity, par_propagate, par_refine
from fastwsss.kernels.testing import DEVICE, assert_close

from parity import nan_filled


def naive_par(image: list, masks: list, dilations, num_iter: int, w1: float = 0.3, w2: float = 0.01):
    """The definition, pixel by pixel in Python floats. image [C][h][w], masks [K][h][w] -> (A [h][w][n], masks)."""
    c_, h, w = len(image), len(image[0]), len(image[0][0])
    offs = [(sy * d, sx * d) for d in dilations for sy in (-1, 0, 1) for sx in (-1, 0, 1) if (sy, sx) != (0, 0)]
    n = len(offs)

    def at(a, y, x):
        return a[min(max(y, 0), h - 1)][min(max(x, 0), w - 1)]

    def std(v):
        m = sum(v) / len(v)
        return math.sqrt(sum((u - m) ** 2 for u in v) / (len(v) - 1))

    def softmax(v):
        e = [math.exp(u - max(v)) for u in v]
        return [u / sum(e) for u in e]

    dist = [math.sqrt(oy * oy + ox * ox) for oy, ox in offs]
    pos = softmax([-(d / (std(dist) + 1e-8) / w1) ** 2 for d in dist])
    aff = [[None] * w for _ in range(h)]
    for y in range(h):
        for x in range(w):
            kappa = [0.0] * n
            for c in range(c_):
                nb = [at(image[c], y + oy, x + ox) for oy, ox in offs]
                s = std(nb)
                for k in range(n):
                    kappa[k] += -(abs(nb[k] - image[c][y][x]) / (s + 1e-8) / w1) ** 2 / c_
            aff[y][x] = [a + w2 * p for a, p in zip(softmax(kappa), pos, strict=True)]
    for _ in range(num_iter):
        masks = [[[sum(aff[y][x][k] * at(m, y + oy, x + ox) for k, (oy, ox) in enumerate(offs)) for x in range(w)]
                  for y in range(h)] for m in masks]
    return aff, masks


def original_par(imgs, masks, dilations, num_iter, w1=0.3, w2=0.01):
    """ToCo's PAR module (which materialises every (b, c, 48, h, w) stack), transcribed."""
    kernel = torch.zeros(8, 1, 3, 3, dtype=imgs.dtype)
    for i, (r, c) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]):
        kernel[i, 0, r, c] = 1

    def neighbours(x):
        b, c, h, w = x.shape
        out = []
        for d in dilations:
            xp = F.pad(x, [d] * 4, mode="replicate").reshape(b * c, -1, h + 2 * d, w + 2 * d)
            out.append(F.conv2d(xp, kernel, dilation=d).view(b, c, -1, h, w))
        return torch.cat(out, dim=2)

    ker = torch.ones(1, 1, 8, 1, 1, dtype=imgs.dtype)
    ker[0, 0, [0, 2, 5, 7]] = math.sqrt(2)
    pos = torch.cat([ker * d for d in dilations], dim=2)
    masks = F.interpolate(masks, size=imgs.shape[-2:], mode="bilinear", align_corners=True)
    b, c, h, w = imgs.shape
    _imgs = neighbours(imgs)
    _imgs_rep = imgs.unsqueeze(2).repeat(1, 1, _imgs.shape[2], 1, 1)
    _pos_rep = pos.repeat(b, 1, 1, h, w)
    aff = -((_imgs - _imgs_rep).abs() / (_imgs.std(dim=2, keepdim=True) + 1e-8) / w1) ** 2
    aff = aff.mean(dim=1, keepdim=True)
    pos_aff = -(_pos_rep / (_pos_rep.std(dim=2, keepdim=True) + 1e-8) / w1) ** 2
    aff = F.softmax(aff, dim=2) + w2 * F.softmax(pos_aff, dim=2)
    for _ in range(num_iter):
        masks = (neighbours(masks) * aff).sum(2)
    return masks


def rand(*shape, dtype=torch.float64, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("w2", [0.01, 0.05])
def test_affinity_is_nonnegative_and_sums_to_one_plus_w2(w2):
    aff = par_affinity(rand(2, 3, 17, 23, dtype=torch.float32), w2=w2)
    assert aff.shape == (2, 8 * len(DEFAULT_DILATIONS), 17, 23) and aff.dtype == torch.float32
    assert (aff >= 0).all()
    torch.testing.assert_close(aff.sum(1), torch.full((2, 17, 23), 1 + w2), rtol=0, atol=1e-6)


def test_matches_a_per_pixel_loop_including_the_border():
    """5x6 image, dilations (1, 2): every pixel is within 2 of a border, so clamping is exercised everywhere."""
    image, masks = rand(1, 3, 5, 6, seed=1), rand(1, 2, 5, 6, seed=2)
    want_aff, want = naive_par(image[0].tolist(), masks[0].tolist(), (1, 2), num_iter=2)
    aff = par_affinity(image, dilations=(1, 2))
    torch.testing.assert_close(aff[0].permute(1, 2, 0), torch.tensor(want_aff, dtype=torch.float64), rtol=0, atol=1e-12)
    got = par_refine(image, masks, dilations=(1, 2), num_iter=2)
    torch.testing.assert_close(got[0], torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)


def test_matches_the_original_module():
    """Default dilations (24 > the 19x27 image: all-clamped neighbours), low-res masks, 10 iterations."""
    images, masks = rand(2, 3, 19, 27, seed=3), rand(2, 3, 5, 7, seed=4)
    want = original_par(images, masks, DEFAULT_DILATIONS, num_iter=10)
    torch.testing.assert_close(par_refine(images, masks), want, rtol=0, atol=1e-12)
    want32 = original_par(images.float(), masks.float(), DEFAULT_DILATIONS, num_iter=10)
    torch.testing.assert_close(par_refine(images.float(), masks.float()), want32, rtol=1e-5, atol=1e-6)


def test_constant_image_hits_the_eps_guard_without_nan():
    """σ_I = 0 -> κ_I = 0 for every neighbour: uniform 1/48 image term. A constant mask c becomes c·1.01^iter."""
    images = torch.full((1, 3, 6, 7), 0.4, dtype=torch.float64)
    aff = par_affinity(images)
    dist = torch.tensor([d * (math.sqrt(2) if k in (0, 2, 5, 7) else 1.0) for d in DEFAULT_DILATIONS for k in range(8)],
                        dtype=torch.float64)
    pos = torch.softmax(-(dist / (dist.std() + 1e-8) / 0.3) ** 2, dim=0)
    torch.testing.assert_close(aff[0], (1 / 48 + 0.01 * pos).view(48, 1, 1).expand(48, 6, 7), rtol=0, atol=1e-15)
    out = par_refine(images, torch.full((1, 2, 6, 7), 2.0, dtype=torch.float64), num_iter=3)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.full_like(out, 2.0 * 1.01**3), rtol=1e-14, atol=0)


def test_single_channel_and_zero_iterations():
    images, masks = rand(1, 3, 9, 10), rand(1, 1, 9, 10, seed=5)
    out = par_refine(images, masks, num_iter=4)
    assert out.shape == (1, 1, 9, 10)
    torch.testing.assert_close(out, par_refine(images, masks.expand(1, 3, 9, 10), num_iter=4)[:, :1], rtol=0, atol=0)
    torch.testing.assert_close(par_refine(images, masks, num_iter=0), masks, rtol=0, atol=0)


def test_low_resolution_masks_are_upsampled_with_align_corners():
    images, low = rand(2, 3, 16, 20), rand(2, 4, 4, 5, seed=6)
    out = par_refine(images, low, num_iter=3)
    assert out.shape == (2, 4, 16, 20)
    up = F.interpolate(low, size=(16, 20), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out, par_refine(images, up, num_iter=3), rtol=0, atol=0)
    corners = (..., [[0], [-1]], [0, -1])  # align_corners=True keeps the corner values
    torch.testing.assert_close(par_refine(images, low, num_iter=0)[corners], low[corners], rtol=0, atol=1e-15)
    half = F.interpolate(low, size=(16, 20), mode="bilinear", align_corners=False)
    assert (out - par_refine(images, half, num_iter=3)).abs().max() > 1e-3
    torch.testing.assert_close(out, par_propagate(par_affinity(images), low, num_iter=3), rtol=0, atol=1e-15)


def test_batched_equals_per_image():
    images, masks = rand(3, 3, 11, 13), rand(3, 2, 11, 13, seed=7)
    out = par_refine(images, masks, num_iter=5)
    for i in range(3):
        torch.testing.assert_close(out[i:i + 1], par_refine(images[i:i + 1], masks[i:i + 1], num_iter=5), rtol=0,
                                   atol=0)


def test_channels_are_refined_independently():
    images, m1, m2 = rand(2, 3, 12, 14), rand(2, 2, 12, 14, seed=8), rand(2, 3, 12, 14, seed=9)
    both = par_refine(images, torch.cat([m1, m2], dim=1))
    torch.testing.assert_close(both[:, :2], par_refine(images, m1), rtol=0, atol=1e-15)
    torch.testing.assert_close(both[:, 2:], par_refine(images, m2), rtol=0, atol=1e-15)
    zeroed = par_refine(images, torch.cat([m1[:, :1], torch.zeros_like(m1[:, 1:])], dim=1))
    assert (zeroed[:, 1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_in_same_dtype_out(dtype):
    images, masks = rand(1, 3, 14, 15, dtype=dtype), rand(1, 3, 7, 8, dtype=dtype, seed=10)
    out = par_refine(images, masks, backend="torch")
    assert out.dtype == dtype and par_affinity(images, backend="torch").dtype == dtype
    assert par_propagate(par_affinity(images, backend="torch"), masks, backend="torch").dtype == dtype
    # same rounded inputs, computed in fp32: only the output rounding differs
    want = par_refine(images.float(), masks.float(), backend="torch")
    torch.testing.assert_close(out.float(), want.to(dtype).float(), rtol=0, atol=0)


@pytest.mark.parametrize("op, args", [
    (par_refine, lambda: (rand(1, 3, 4, 4), rand(1, 1, 4, 4))),
    (par_affinity, lambda: (rand(1, 3, 4, 4),)),
    (par_propagate, lambda: (rand(1, 48, 4, 4), rand(1, 1, 4, 4))),
])
def test_backend_dispatch(op, args):
    # float64 is the reference's exact mode: auto falls back to it silently; explicit triton lists the reasons
    torch.testing.assert_close(op(*args(), backend="torch"), op(*args(), backend="auto"), rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"{op.__name__}: the Triton backend cannot take these inputs: dtype "
                                         "torch.float64"):
        op(*args(), backend="triton")
    with pytest.raises(ValueError, match="backend='cuda' is not one of"):
        op(*args(), backend="cuda")


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match="affinity has 48 channels"):
        par_propagate(rand(1, 48, 4, 4), rand(1, 1, 4, 4), dilations=(1, 2))
    with pytest.raises(ValueError, match="batch sizes differ"):
        par_refine(rand(2, 3, 4, 4), rand(1, 1, 4, 4))
    with pytest.raises(ValueError, match="must be \\[B, C, h, w\\]"):
        par_refine(rand(3, 4, 4), rand(1, 1, 4, 4))
    with pytest.raises(ValueError, match="dilations"):
        par_refine(rand(1, 3, 4, 4), rand(1, 1, 4, 4), dilations=())
    with pytest.raises(ValueError, match="num_iter"):
        par_refine(rand(1, 3, 4, 4), rand(1, 1, 4, 4), num_iter=-1)


def test_gradcheck_float64():
    images = rand(1, 3, 4, 5, seed=11).requires_grad_()
    masks = rand(1, 2, 3, 3, seed=12).requires_grad_()  # low-res: the gradient goes through the upsampling too
    assert torch.autograd.gradcheck(lambda m: par_refine(images.detach(), m, dilations=(1, 2), num_iter=2), (masks,))
    # the image path (std, softmax) is costlier to check element by element: a random projection suffices
    assert torch.autograd.gradcheck(lambda i: par_refine(i, masks.detach(), dilations=(1, 2), num_iter=2), (images,),
                                    fast_mode=True)


# ------------------------------------------------------------------------------------- Triton kernels vs reference
# Under TRITON_INTERPRET=1 (tests/conftest.py) these run the kernels on CPU; on a GPU, with real Triton. Kernels and
# reference compute in fp32 from the same (possibly rounded) inputs, so the tolerances cover fp32 summation order
# (values are O(1)) and, for half dtypes, one ulp of the output rounding: (rtol, atol) per dtype.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


@pytest.fixture
def kernels(monkeypatch):
    """The Triton module, with fresh outputs (ping-pong buffers included) NaN-filled: an unwritten element fails."""
    pytest.importorskip("triton")
    return nan_filled(monkeypatch, "par")


def case(B, K, h, w, mask_hw=None, dtype=torch.float32, seed=0):
    """images [B, 3, h, w] in [0, 1] (a smooth gradient plus noise: varied σ_I), masks [B, K, mask_hw] in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, w).expand(B, 3, h, w)
    images = (0.6 * ramp + 0.4 * torch.rand(B, 3, h, w, generator=g)).clamp(0, 1)
    masks = torch.rand(B, K, *(mask_hw or (h, w)), generator=g)
    return images.to(DEVICE, dtype), masks.to(DEVICE, dtype)


def par_parity(images, masks, dilations=DEFAULT_DILATIONS, num_iter=10, equal_nan=False):
    rtol, atol = TOL[masks.dtype]
    out = par_refine(images, masks, dilations, num_iter, backend="triton")
    ref = par_refine(images, masks, dilations, num_iter, backend="torch")
    assert out.dtype == masks.dtype and out.device == masks.device
    assert_close(out, ref, what="par_refine", rtol=rtol, atol=atol, scale="one", equal_nan=equal_nan)
    return out


@pytest.mark.parametrize("B, C, h, w, dilations", [
    pytest.param(2, 3, 17, 23, DEFAULT_DILATIONS, id="B2-17x23-d24-all-clamped"),
    pytest.param(1, 3, 5, 6, (1, 2), id="B1-5x6-d2-border-everywhere"),
    pytest.param(1, 1, 12, 9, (1, 3, 5), id="B1-C1-12x9-d5"),
])
def test_triton_affinity_matches_reference(kernels, B, C, h, w, dilations):
    images = case(B, 1, h, w)[0][:, :C].contiguous()
    out = par_affinity(images, dilations, backend="triton")
    assert_close(out, par_affinity(images, dilations, backend="torch"), what="affinity", rtol=1e-5, atol=1e-6,
                 scale="one")
    assert_close(out.sum(1), torch.full((B, h, w), 1.01), what="affinity sums to 1 + w2", rtol=1e-6, atol=1e-6,
                 scale="one")


@pytest.mark.parametrize("B, K, h, w, mask_hw, num_iter", [
    pytest.param(2, 3, 17, 23, (5, 7), 10, id="B2-K3-17x23-lowres-masks-it10"),
    pytest.param(1, 1, 9, 10, None, 10, id="B1-K1-9x10-it10"),
    pytest.param(2, 21, 24, 28, (12, 14), 3, id="B2-K21-24x28-it3"),  # K not a multiple of the channel block
    pytest.param(1, 2, 8, 8, None, 1, id="B1-K2-8x8-it1"),  # odd / even / no rounds: the ping-pong buffers
    pytest.param(1, 2, 8, 8, None, 2, id="B1-K2-8x8-it2"),
    pytest.param(1, 2, 8, 8, (3, 3), 0, id="B1-K2-8x8-it0"),
    pytest.param(1, 2, 224, 224, (14, 14), 2, id="B1-K2-224x224-it2"),  # the real size (2 rounds: interpreter time)
])
def test_triton_par_matches_reference(kernels, B, K, h, w, mask_hw, num_iter):
    par_parity(*case(B, K, h, w, mask_hw, seed=K), num_iter=num_iter)


def test_triton_64bit_index_math(kernels, monkeypatch):
    """Offsets are 32-bit unless a tensor is too large for them; with the limit at 0 every launch takes the INT64
    variant, which must give the same result (tensors over 2^31 elements do not fit a test)."""
    monkeypatch.setattr(kernels, "_INT32_LIMIT", 0)
    images, masks = case(2, 3, 17, 23, (5, 7), seed=4)
    par_parity(images, masks, num_iter=3)
    assert_close(par_affinity(images, backend="triton"), par_affinity(images, backend="torch"), what="affinity",
                 rtol=1e-5, atol=1e-6, scale="one")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_triton_half_inputs(kernels, dtype):
    """Half inputs are read once into fp32 (no half arithmetic: the interpreter is exact); the affinity is never
    rounded inside `par_refine`; `par_affinity` / `par_propagate` keep the reference's dtype contract."""
    images, masks = case(2, 3, 14, 15, (7, 8), dtype=dtype, seed=10)
    par_parity(images, masks, num_iter=4)
    aff = par_affinity(images, backend="triton")
    assert aff.dtype == dtype
    rtol, atol = TOL[dtype]
    assert_close(aff, par_affinity(images, backend="torch"), what="affinity", rtol=rtol, atol=atol, scale="one")
    out = par_propagate(aff, masks, num_iter=4, backend="triton")
    assert_close(out, par_propagate(aff, masks, num_iter=4, backend="torch"), what="propagate", rtol=rtol, atol=atol,
                 scale="one")


def test_triton_skips_zero_channels_per_image(kernels):
    """refine_seg_label zeroes the absent classes of each image: each image has its own valid channels. Zero channels
    stay exactly zero, the others match the reference, and a NaN channel propagates as in the reference."""
    images, masks = case(3, 5, 13, 16, seed=3)
    present = torch.tensor([[1, 0, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.bool, device=DEVICE)
    masks = masks * present[:, :, None, None]
    out = par_parity(images, masks, num_iter=3)
    assert (out[~present] == 0).all()
    masks[1, 2, 4, 5] = float("nan")
    par_parity(images, masks, num_iter=3, equal_nan=True)


def test_triton_constant_image(kernels):
    """σ_I = 0: κ_I = 0 for every neighbour, no NaN; a constant mask c comes out as c·1.01^num_iter."""
    images = torch.full((2, 3, 6, 7), 0.4, device=DEVICE)
    aff = par_affinity(images, backend="triton")
    assert_close(aff, par_affinity(images, backend="torch"), what="affinity", rtol=1e-6, atol=1e-7, scale="one")
    out = par_refine(images, torch.full((2, 2, 6, 7), 2.0, device=DEVICE), num_iter=3, backend="triton")
    assert_close(out, torch.full_like(out, 2.0 * 1.01**3), what="constant mask", rtol=1e-5, atol=0,
                 scale="one")  # 48-term fp32 sums


def test_triton_is_deterministic(kernels):
    images, masks = case(1, 2, 11, 12, seed=4)
    assert torch.equal(par_refine(images, masks, num_iter=3, backend="triton"),
                       par_refine(images, masks, num_iter=3, backend="triton"))


def test_triton_gradients_fall_back(kernels, monkeypatch):
    """The kernels are forward-only: auto takes the (differentiable) reference when a gradient is wanted, under
    no_grad it takes the kernels, which give the reference's values; an explicit triton lists the reason."""
    from fastwsss.kernels import _backend, backends_used

    monkeypatch.setattr(_backend, "_used", {})
    images, masks = case(1, 2, 6, 7, seed=5)
    masks.requires_grad_()
    with pytest.raises(ValueError, match="require grad"):
        par_refine(images, masks, num_iter=2, backend="triton")
    out = par_refine(images, masks, num_iter=2)
    assert backends_used() == {"par_refine": "torch"} and out.requires_grad
    out.sum().backward()
    assert masks.grad is not None and torch.isfinite(masks.grad).all()
    with torch.no_grad():
        fast = par_refine(images, masks, num_iter=2, backend="triton")
        auto = par_refine(images, masks, num_iter=2)
    assert backends_used() == {"par_refine": "torch+triton"} and not fast.requires_grad
    assert torch.equal(auto, fast)  # no_grad: auto takes the kernels too
    rtol, atol = TOL[torch.float32]
    assert_close(fast, out.detach(), what="no_grad kernels vs the reference", rtol=rtol, atol=atol, scale="one")


def test_custom_ops_pass_opcheck_and_compile(kernels):
    from torch.library import opcheck

    images, masks = case(1, 2, 6, 7, seed=6)
    opcheck(torch.ops.fastwsss.par_affinity.default, (images, [1, 2], 0.3, 0.01))
    aff = par_affinity(images, (1, 2), backend="torch")
    opcheck(torch.ops.fastwsss.par_propagate.default, (aff, masks, [1, 2], 2))
    # fullgraph capture through both ops (aot_eager: the graph, without inductor's ~30 s CPU compile)
    fn = torch.compile(lambda i, m: par_refine(i, m, (1, 2), num_iter=2, backend="triton"), fullgraph=True,
                       backend="aot_eager")
    with torch.no_grad():
        assert_close(fn(images, masks), par_refine(images, masks, (1, 2), num_iter=2, backend="torch"), what="compiled",
                     rtol=1e-5, atol=1e-5, scale="one")


@pytest.mark.gpu
@pytest.mark.parametrize("K", [1, 2, 3, 8, 21, 42])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_triton_real_shapes_gpu(K, dtype):
    """PAR at 224² (ToCo's down-scaled 448 crop), batch 4, masks at 28² or full size, 10 rounds."""
    par_parity(*case(4, K, 224, 224, (28, 28), dtype=dtype, seed=K))
    par_parity(*case(4, K, 224, 224, dtype=dtype, seed=K + 100))


def test_the_package_is_not_shadowed_by_the_function():
    """``fastwsss.kernels.par`` is the subpackage (before: the public function ``par`` hid it as an attribute, while
    ``import fastwsss.kernels.par`` gave the package); the function is ``par_refine``."""
    import importlib
    import types

    import fastwsss.kernels as k

    assert isinstance(k.par, types.ModuleType) and k.par is importlib.import_module("fastwsss.kernels.par")
    assert k.par_refine is k.par.par_refine and k.par_refine.__name__ == "par_refine"
    assert "par" not in k.__all__ and "par" not in k.par.__all__

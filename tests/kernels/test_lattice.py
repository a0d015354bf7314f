"""kernels.lattice: the PyTorch permutohedral lattice against Krähenbühl's densecrf (pydensecrf2) and the maths; the
Triton lattice (under the interpreter on CPU) against the PyTorch one and pydensecrf2."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastwsss.kernels.lattice import PermutohedralLattice as Lattice
from fastwsss.kernels.lattice import bilateral_features, permutohedral_filter, position_features
from fastwsss.kernels.lattice.reference import PermutohedralLattice, _scale_factors
from fastwsss.kernels.testing import DEVICE, assert_close, natural_image

from parity import nan_filled

# The README's figure for the lattice against densecrf (pydensecrf2), both backends: |ours − densecrf| <= TOL·max
# and <= TOL·|ref| wherever |ref| > 1e-3·max (assert_matches). Worst seen 1.32e-6 (224² natural, K = 21: float32
# accumulation in densecrf, 21 channels of ~3000-pixel vertex rows); 2e-6 keeps a 1.5x margin for other builds.
TOL = 2e-6


# ----------------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def dcrf():
    return pytest.importorskip("pydensecrf.densecrf")


def _eigen():
    from pydensecrf.eigen import matrixXf

    return matrixXf


def _step(crf, q: np.ndarray) -> np.ndarray:
    """Zero unary, Potts compat 1: after one stepInference, tmp1 = 0 - unary - (-filter(Q)) = filter(Q)."""
    matrixXf = _eigen()
    Q, a, b = matrixXf(q), matrixXf(np.zeros_like(q)), matrixXf(np.zeros_like(q))
    crf.stepInference(Q, a, b)
    return np.array(a)


def oracle_bilateral(dcrf, img: np.ndarray, q: np.ndarray, sxy: float, srgb: float) -> np.ndarray:
    """densecrf's unnormalised bilateral filter of q [K, H*W] on the uint8 image img [H, W, 3]."""
    H, W, _ = img.shape
    K = q.shape[0]
    crf = dcrf.DenseCRF2D(W, H, K)
    crf.setUnaryEnergy(np.zeros((K, H * W), np.float32))
    crf.addPairwiseBilateral(sxy=sxy, srgb=srgb, rgbim=np.ascontiguousarray(img), compat=1,
                             kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NO_NORMALIZATION)
    return _step(crf, np.ascontiguousarray(q, dtype=np.float32))


def oracle_features(dcrf, feats: np.ndarray, q: np.ndarray) -> np.ndarray:
    """densecrf's unnormalised filter of q [K, N] with arbitrary float32 features [F, N]."""
    K, N = q.shape
    crf = dcrf.DenseCRF(N, K)
    crf.setUnaryEnergy(np.zeros((K, N), np.float32))
    crf.addPairwiseEnergy(np.ascontiguousarray(feats, dtype=np.float32), compat=1, kernel=dcrf.DIAG_KERNEL,
                          normalization=dcrf.NO_NORMALIZATION)
    return _step(crf, np.ascontiguousarray(q, dtype=np.float32))


def image_features(img: np.ndarray, sxy: float, srgb: float) -> torch.Tensor:
    """densecrf's DenseCRF2D::addPairwiseBilateral features of one uint8 image [H, W, 3] (its layout): [1, 5, H, W]."""
    return bilateral_features(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None], srgb, sxy)


def make_image(kind: str, H: int, W: int, seed: int) -> np.ndarray:
    r = np.random.RandomState(seed)
    if kind == "noise":
        return r.randint(0, 256, (H, W, 3)).astype(np.uint8)
    if kind == "blocks":  # piecewise constant, few levels: many exactly equal features (rank ties)
        cells = (r.randint(0, 4, (H // 5 + 1, W // 5 + 1, 3)) * 85).astype(np.uint8)
        return np.ascontiguousarray(cells.repeat(5, 0).repeat(5, 1)[:H, :W])
    if kind == "gradient":
        yy, xx = np.mgrid[:H, :W]
        img = np.stack([xx * 255 // max(W - 1, 1), yy * 255 // max(H - 1, 1), (xx + 2 * yy) % 256], -1)
        return img.astype(np.uint8)
    if kind == "natural":
        return natural_image(H, W, seed)
    raise ValueError(kind)


def assert_matches(ours: np.ndarray, ref: np.ndarray, tol: float = TOL, what: str = "") -> None:
    """|ours - ref| <= tol·max |ref| everywhere, and <= tol·|ref| where |ref| is not tiny (> 1e-3 max |ref|)."""
    ref64 = torch.as_tensor(ref).double()
    assert_close(ours, ref, tol, what, rtol=0, scale="max")
    assert_close(ours, ref, what=what, rtol=tol, atol=0, where=ref64.abs() > 1e-3 * ref64.abs().max())


def _ours(img: np.ndarray, q: np.ndarray, sxy: float, srgb: float, **kw) -> np.ndarray:
    H, W, _ = img.shape
    K = q.shape[0]
    lat = PermutohedralLattice(image_features(img, sxy, srgb), **kw)
    return lat.filter(torch.from_numpy(q).reshape(1, K, H, W)).reshape(K, H * W).numpy()


# ------------------------------------------------------------------------------------------- against densecrf

CASES = [  # (H, W, image, sxy, srgb, K)
    *[(17, 23, kind, sxy, srgb, K) for kind in ("noise", "blocks", "gradient")
      for sxy, srgb in ((50, 15), (80, 13)) for K in (1, 3)],
    (17, 23, "noise", 3, 10, 2), (17, 23, "blocks", 1, 1, 4), (17, 23, "gradient", 2, 5, 21),
    (64, 64, "noise", 50, 15, 21), (64, 64, "blocks", 80, 13, 5), (64, 64, "gradient", 50, 15, 3),
    (64, 64, "natural", 80, 13, 21), (64, 64, "blocks", 5, 3, 2), (31, 45, "natural", 10, 20, 7),
]


@pytest.mark.parametrize("H,W,kind,sxy,srgb,K", CASES)
def test_matches_densecrf(dcrf, H, W, kind, sxy, srgb, K):
    img = make_image(kind, H, W, seed=H * W + K)
    q = np.random.RandomState(K).rand(K, H * W).astype(np.float32)
    assert_matches(_ours(img, q, sxy, srgb), oracle_bilateral(dcrf, img, q, sxy, srgb),
                   what=f"{H}x{W} {kind} sxy={sxy} srgb={srgb} K={K}")


@pytest.mark.parametrize("sxy,srgb", [(50, 15), (80, 13)])
def test_matches_densecrf_224_k21(dcrf, sxy, srgb):
    """The training loss's setting: 224x224, 21 classes, softmax-like values."""
    img = make_image("natural", 224, 224, seed=sxy)
    logits = np.random.RandomState(srgb).randn(21, 224 * 224).astype(np.float32) * 3
    q = np.exp(logits - logits.max(0))
    q = (q / q.sum(0)).astype(np.float32)
    assert_matches(_ours(img, q, sxy, srgb), oracle_bilateral(dcrf, img, q, sxy, srgb),
                   what=f"224x224 natural sxy={sxy} srgb={srgb} K=21")


def test_rounding_ties_half_to_even(dcrf):
    """Features crafted so that elevated/(d+1) lands exactly on k + 1/2: densecrf's x86 build rounds with SSE
    cvtps2dq (round half to EVEN), not C's round (half away from zero). Getting this wrong moves whole simplices
    (~20% error here)."""
    d = 5
    sf = _scale_factors(d).numpy()
    hits = []  # (coordinate, float32 value a) with float32(a * sf[i]) == 3 * m exactly -> elevated = 3m
    for i in range(d):
        for target in (3.0, 9.0, -3.0, 15.0, -9.0):
            a = np.float32(target / sf[i])
            for _ in range(8):
                p = np.float32(a * sf[i])
                if p == target:
                    hits.append((i, a))
                    break
                a = np.nextafter(a, np.float32(np.inf if p < target else -np.inf), dtype=np.float32)
    assert len(hits) >= 10, hits
    r = np.random.RandomState(0)
    N = 64
    feats = np.zeros((d, N), np.float32)
    for n in range(N):
        for _ in range(r.randint(1, 3)):
            i, a = hits[r.randint(len(hits))]
            feats[i, n] = a
    # the ties really are there: 1.0f/6 * 3.0f == 0.5f exactly
    assert np.float32(np.float32(1.0) / np.float32(6)) * np.float32(3.0) == np.float32(0.5)
    K = 3
    q = r.rand(K, N).astype(np.float32)
    lat = PermutohedralLattice(torch.from_numpy(feats).reshape(1, d, 8, 8))
    ours = lat.filter(torch.from_numpy(q).reshape(1, K, 8, 8)).reshape(K, N).numpy()
    assert_matches(ours, oracle_features(dcrf, feats, q), what="rounding ties")


def test_generic_features_match_densecrf(dcrf):
    """Arbitrary (non-image) float features and d != 5: d = 2 and d = 7."""
    r = np.random.RandomState(3)
    for d, N in ((2, 96), (7, 60)):
        feats = (r.randn(d, N) * 2).astype(np.float32)
        q = r.rand(4, N).astype(np.float32)
        ours = PermutohedralLattice(torch.from_numpy(feats).reshape(1, d, 1, N)).filter(
            torch.from_numpy(q).reshape(1, 4, 1, N)).reshape(4, N).numpy()
        assert_matches(ours, oracle_features(dcrf, feats, q), what=f"generic d={d}")


def test_densecrf_block_padding(dcrf):
    """densecrf's SSE init processes points 4 at a time and also hashes the all-zero features that pad the last
    block (H*W = 391 here, 1 pad point): their vertices carry blurred mass. densecrf_padding=True (default)
    reproduces that; False gives the clean lattice, visibly different here."""
    img = make_image("noise", 17, 23, seed=0)
    q = np.random.RandomState(0).rand(3, 17 * 23).astype(np.float32)
    ref = oracle_bilateral(dcrf, img, q, 50, 15)
    assert_matches(_ours(img, q, 50, 15), ref, what="padded")
    clean = _ours(img, q, 50, 15, densecrf_padding=False)
    assert np.abs(clean - ref).max() / np.abs(ref).max() > 1e-3


def test_batched_equals_per_image(dcrf):
    """B=3 images, each with its own lattice (image index in the hash key), equal one-image results & oracle."""
    H, W, K = 17, 23, 4
    imgs = [make_image(k, H, W, seed=s) for s, k in enumerate(("noise", "blocks", "natural"))]
    feats = torch.cat([image_features(im, 50, 15) for im in imgs])
    q = np.random.RandomState(1).rand(3, K, H * W).astype(np.float32)
    v = torch.from_numpy(q).reshape(3, K, H, W)
    batched = PermutohedralLattice(feats).filter(v)
    for b in range(3):
        single = PermutohedralLattice(feats[b : b + 1]).filter(v[b : b + 1])
        torch.testing.assert_close(batched[b], single[0], rtol=0, atol=1e-12)
        assert_matches(batched[b].reshape(K, -1).numpy(), oracle_bilateral(dcrf, imgs[b], q[b], 50, 15),
                       what=f"batch item {b}")


# ---------------------------------------------------------------------------------------- against the maths


def test_ones_vs_exact_gaussian_sum():
    """The lattice's output is ~0.5-0.55x the exact sum_j exp(-|f_i - f_j|^2 / 2) on image features (see README),
    and highly correlated with it."""
    H = W = 64
    img = make_image("natural", H, W, seed=7)
    f = image_features(img, 14, 15)
    out = PermutohedralLattice(f).filter(torch.ones(1, 1, H, W, dtype=torch.float64)).reshape(-1)
    ff = f.reshape(5, -1).T.double()
    exact = torch.exp(-0.5 * torch.cdist(ff, ff) ** 2).sum(1)
    ratio = (out / exact).numpy()
    corr = np.corrcoef(out.numpy(), exact.numpy())[0, 1]
    assert 0.4 < ratio.mean() < 0.7, ratio.mean()
    lo, hi = np.percentile(ratio, [1, 99])
    assert 0.3 < lo and hi < 0.75, (lo, hi)
    assert corr > 0.99, corr


@pytest.mark.parametrize("d,side", [(1, 400.0), (2, 40.0)])
def test_mass_ratio_full_dimensional(d, side):
    """For a dense, full-dimensional cloud the lattice kernel's mass relative to the unit Gaussian's (2 pi)^(d/2)
    is (3/2)^(d/2) 2^(d+1) / (sqrt(d+1) (1 + 2^-d) (2 pi)^(d/2)) (README); 0.706 at d = 5."""
    g = torch.Generator().manual_seed(d)
    N = 40000
    f = torch.rand(N, d, generator=g, dtype=torch.float64) * side
    out = PermutohedralLattice(f.T.float().reshape(1, d, 200, 200)).filter(
        torch.ones(1, 1, 200, 200, dtype=torch.float64)).reshape(-1)
    inner = ((f > 5) & (f < side - 5)).all(1)
    measured = out[inner].mean().item() / (N / side**d * (2 * math.pi) ** (d / 2))
    predicted = 1.5 ** (d / 2) * 2 ** (d + 1) / (math.sqrt(d + 1) * (1 + 2.0**-d) * (2 * math.pi) ** (d / 2))
    assert abs(measured / predicted - 1) < 0.02, (measured, predicted)


# ------------------------------------------------------------------------------------------------- gradients


def test_gradient_is_reverse_filter():
    """filter is linear in the values; its transpose is the reverse-order blur, so d/dv sum(w * filter(v)) =
    filter(w, reverse=True)."""
    H, W = 17, 23
    feats = torch.cat([image_features(make_image(k, H, W, seed=3), 20, 10) for k in ("natural", "blocks")])
    lat = PermutohedralLattice(feats)
    g = torch.Generator().manual_seed(0)
    v = torch.rand(2, 3, H, W, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, H, W, generator=g, dtype=torch.float64)
    (lat.filter(v) * w).sum().backward()
    expected = lat.filter(w, reverse=True)
    torch.testing.assert_close(v.grad, expected, rtol=1e-10, atol=1e-12)
    # and the forward and reverse filters differ (the blur passes do not commute exactly)
    assert (lat.filter(w) - expected).abs().max() > 1e-8


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    feats = torch.rand(2, 3, 2, 3, generator=g) * 3
    lat = PermutohedralLattice(feats)
    v = torch.rand(2, 1, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: lat.filter(x), (v,))
    assert torch.autograd.gradgradcheck(lambda x: lat.filter(x) ** 2, (v,), fast_mode=True)
    f2 = feats.clone().requires_grad_()
    out = permutohedral_filter(v, f2)
    out.sum().backward()
    assert f2.grad is None  # features get no gradient


# ------------------------------------------------------------------------------------------ dtypes, backends


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2), (torch.float64, 1e-6)])
def test_dtypes(dtype, tol):
    H, W = 17, 23
    lat = PermutohedralLattice(image_features(make_image("natural", H, W, seed=5), 30, 15))
    v = torch.rand(1, 4, H, W, generator=torch.Generator().manual_seed(0))
    ref = lat.filter(v)
    out = lat.filter(v.to(dtype))
    assert out.dtype == dtype and out.shape == v.shape
    err = ((out.double() - ref.double()).abs().max() / ref.abs().max()).item()
    assert err < tol, err


def test_backends():
    """backend="torch" is the reference exactly; "auto" picks Triton where ``kernels._backend`` allows it (CUDA, or
    the interpreter on CPU), else the reference; float64 values and too many features are reasons against it."""
    from fastwsss.kernels._backend import INTERPRET

    H, W = 9, 11
    feats = image_features(make_image("noise", H, W, seed=2), 5, 20)
    v = torch.rand(1, 3, H, W)
    ref = PermutohedralLattice(feats).filter(v)
    torch.testing.assert_close(permutohedral_filter(v, feats, backend="torch"), ref, rtol=0, atol=0)
    assert Lattice(feats, backend="torch").backend == "torch"
    assert Lattice(feats).backend == ("triton" if INTERPRET else "torch")
    torch.testing.assert_close(permutohedral_filter(v, feats), ref, rtol=1e-5, atol=1e-6)
    # float64 values: "auto" filters them on the same lattice in float64, "triton" says why it cannot
    v64 = v.double()
    torch.testing.assert_close(permutohedral_filter(v64, feats), PermutohedralLattice(feats).filter(v64),
                               rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="torch.float64"):
        permutohedral_filter(v64, feats, backend="triton")
    with pytest.raises(ValueError, match="at most 14"):
        Lattice(torch.rand(1, 15, 2, 3), backend="triton")
    assert Lattice(torch.rand(1, 15, 2, 3)).backend == "torch"
    with pytest.raises(ValueError, match="not one of"):
        permutohedral_filter(v, feats, backend="cuda")


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_bad_inputs(backend):
    lat = Lattice(torch.rand(2, 5, 4, 4), backend=backend)
    with pytest.raises(ValueError):
        lat.filter(torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError):
        lat.filter(torch.rand(2, 3, 4, 5))
    with pytest.raises(ValueError):
        lat.filter(torch.ones(2, 3, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError):
        Lattice(torch.rand(5, 4, 4), backend=backend)
    with pytest.raises(ValueError):
        PermutohedralLattice(torch.rand(5, 4, 4))
    if backend == "auto":
        with pytest.raises(ValueError, match="finite"):
            Lattice(torch.full((1, 5, 4, 4), float("nan")), backend="triton")


# ------------------------------------------------------------------------------------------------- features


def test_feature_builders():
    """densecrf's features: x (the column) then y, over sigma_xy; then r, g, b over sigma_rgb; float32 from uint8 or
    float images; the position part alone is the Gaussian kernel's."""
    images = torch.tensor([[0, 10, 255], [7, 8, 9]], dtype=torch.uint8).expand(2, 3, 2, 3)
    f = bilateral_features(images, 5.0, 2.0)
    assert f.shape == (2, 5, 2, 3) and f.dtype == torch.float32
    assert torch.equal(f[0, 0], torch.tensor([[0.0, 0.5, 1.0]] * 2))
    assert torch.equal(f[0, 1], torch.tensor([[0.0] * 3, [0.5] * 3]))
    assert torch.equal(f[1, 2:], images[1].float() / 5)
    assert torch.equal(bilateral_features(images.double(), 5.0, 2.0), f)
    assert torch.equal(position_features(2, 2, 3, 2.0), f[:, :2])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        bilateral_features(images[:, :2], 5.0, 2.0)


# ----------------------------------------------------------------------------------------------- internals


def test_row_hash_fallback_and_sparse_invariants():
    """The general (torch.unique over key rows) hash equals the int64-code hash; the CSR operators satisfy
    torch's sparse invariants; every blur matrix is symmetric; huge key ranges take the fallback."""
    g = torch.Generator().manual_seed(4)
    feats = torch.rand(2, 5, 9, 11, generator=g) * 4
    v = torch.rand(2, 3, 9, 11, generator=g, dtype=torch.float64)
    with torch.sparse.check_sparse_tensor_invariants():
        a = PermutohedralLattice(feats)
        b = PermutohedralLattice(feats, _force_row_hash=True)
    assert a.num_vertices == b.num_vertices
    torch.testing.assert_close(a.filter(v), b.filter(v), rtol=0, atol=1e-12)
    for blur in a._blur:
        dense = blur.to_dense()
        assert torch.equal(dense, dense.T)
    huge = PermutohedralLattice(feats * 5000)  # key span ~1e5 per coordinate: codes would overflow int64
    forced = PermutohedralLattice(feats * 5000, _force_row_hash=True)
    torch.testing.assert_close(huge.filter(v), forced.filter(v), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 1e30], ids=["nan", "inf", "-inf", "1e30"])
def test_bad_features_are_clear_errors(backend, value):
    """Before: `index 9223372036854775807 is out of bounds` from deep in the build (NaN, ±inf and 1e30 on the
    reference; 1e30 on the Triton path too, whose key range sends it to the reference's row hash)."""
    feats = image_features(make_image("natural", 6, 7, seed=1), 30, 15)
    feats[0, 3, 2, 4] = value
    match = "too large for the lattice's integer keys" if value == 1e30 else r"must be finite, got NaN or ±inf in channel 3 of 5"
    with pytest.raises(ValueError, match=match):
        Lattice(feats.to(DEVICE), backend=backend)
    with pytest.raises(ValueError, match=match):
        permutohedral_filter(torch.rand(1, 2, 6, 7, device=DEVICE), feats.to(DEVICE), backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_feature_limit_is_the_float32_range_of_the_keys(backend):
    """The stated limit, d = 5: features within ±1.89e6 build a lattice (elevated coordinates < 2^24, the keys
    exact) and filter to finite, positive values; ±1.9e6 is refused (its elevated coordinates may reach 2^24)."""
    g = torch.Generator().manual_seed(3)
    sign = torch.rand(1, 5, 6, 7, generator=g) * 2 - 1
    sign[..., 0, 0] = 1.0  # every channel reaches the limit (the check bounds the elevation per channel)
    feats = sign / sign.abs().amax() * 1.89e6
    lat = Lattice(feats.to(DEVICE), backend=backend)
    out = lat.filter(torch.ones(1, 1, 6, 7, device=DEVICE))
    assert torch.isfinite(out).all() and (out > 0).all()
    with pytest.raises(ValueError, match=r"may reach 1\.68e\+07.*below 2\^24 = 16777216.*below 1\.89e\+06"):
        Lattice((feats * 1.9e6 / 1.89e6).to(DEVICE), backend=backend)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    """On a GPU, "auto" builds and filters with real Triton: same output as the CPU reference, and the gradient
    (the custom op's backward) is the reverse filter."""
    H, W = 64, 64
    feats = torch.cat([image_features(make_image(k, H, W, seed=1), 50, 15) for k in ("natural", "blocks")])
    v = torch.rand(2, 21, H, W)
    cpu_lat = PermutohedralLattice(feats)
    cpu = cpu_lat.filter(v)
    lat = Lattice(feats.cuda())
    assert lat.backend == "triton" and lat.num_vertices == cpu_lat.num_vertices
    gpu = lat.filter(v.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)
    vv = v.cuda().requires_grad_()
    w = torch.rand_like(vv)
    (lat.filter(vv) * w).sum().backward()
    torch.testing.assert_close(vv.grad, lat.filter(w, reverse=True))
    torch.testing.assert_close(vv.grad.cpu(), cpu_lat.filter(w.cpu(), reverse=True), rtol=1e-5, atol=1e-6)
    vd = v.cuda().double().requires_grad_()  # float64: the same lattice, float64 sparse products
    lat.filter(vd).sum().backward()
    torch.testing.assert_close(vd.grad.cpu(), cpu_lat.filter(torch.ones_like(v).double(), reverse=True))


# ------------------------------------------------------------------------------ Triton lattice (interpreter on CPU)
# Tolerances: the Triton filter accumulates in float32 (the reference in float64; densecrf in float32, <= 1.32e-6 from
# the reference): 1e-5 of the max and of every element above 1e-3 of it, for non-negative values (no cancellation).
# float16 / bfloat16 values: the output is rounded to them (2^-11 / 2^-8 relative), hence 2e-3 / 1e-2.

TRITON_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _nan_fill(monkeypatch):
    """Every buffer a Triton kernel must write starts as NaN, so an unwritten element cannot pass."""
    from fastwsss.kernels._backend import HAS_TRITON

    if HAS_TRITON:
        nan_filled(monkeypatch, "lattice")


def triton_lattice(features: torch.Tensor, **kw) -> Lattice:
    lat = Lattice(features.to(DEVICE), backend="triton", **kw)
    assert lat.backend == "triton"
    return lat


def _compare(lat: Lattice, ref: PermutohedralLattice, v: torch.Tensor, what: str, reverse: bool = False) -> None:
    out = lat.filter(v.to(DEVICE), reverse=reverse)
    assert out.dtype == v.dtype and out.shape == v.shape
    expected = ref.filter(v.double(), reverse=reverse)
    B, C = v.shape[:2]
    assert_matches(out.cpu().double().reshape(B * C, -1).numpy(), expected.reshape(B * C, -1).numpy(),
                   tol=TRITON_TOL[v.dtype], what=what)


def test_triton_coordinates_are_the_references():
    """The fused coordinate kernel reproduces densecrf's float32 elevation, half-to-even rounding, rank and
    barycentric weights bit for bit, and finds the same vertices (rounding ties, rank ties, block padding)."""
    from fastwsss.kernels.lattice._triton import TritonLattice

    cases = [image_features(make_image(k, 17, 23, seed=1), sxy, srgb)
             for k, sxy, srgb in (("noise", 50, 15), ("blocks", 1, 1), ("gradient", 2, 5))]
    cases.append(torch.rand(2, 3, 5, 6, generator=torch.Generator().manual_seed(0)) * 5 - 2.5)
    for feats in cases:
        for padding in (True, False):
            ref = PermutohedralLattice(feats, densecrf_padding=padding)
            tri = TritonLattice(feats.to(DEVICE), densecrf_padding=padding)
            B, d, H, W = feats.shape
            N = H * W
            offsets, bary = tri.tensors[:2]
            Np = offsets.shape[0] // B
            assert tri.num_vertices == ref.num_vertices
            bary = bary.cpu().reshape(B, Np, d + 1)[:, :N].reshape(B * N, d + 1).double()
            assert torch.equal(bary, ref.weights)
            # the same partition of the pixels' simplex corners into vertices (numbered differently)
            ours = offsets.cpu().long().reshape(B, Np, d + 1)[:, :N].reshape(-1)
            theirs = ref.offsets.reshape(-1)
            pairs = torch.unique(torch.stack([ours, theirs], 1), dim=0)
            assert pairs.shape[0] == torch.unique(ours).numel() == torch.unique(theirs).numel()


TRITON_CASES = [  # (id, B, H, W, kind, sxy, srgb, C)
    ("tiny-8x8-C3", 1, 8, 8, "noise", 5, 20, 3),
    ("ragged-17x23-C21", 1, 17, 23, "natural", 50, 15, 21),
    ("ragged-blocks-ties-C2", 2, 13, 7, "blocks", 1, 1, 2),
    ("gradient-B3-C70", 3, 9, 11, "gradient", 2, 5, 70),  # more channels than one channel block
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=[c[0] for c in TRITON_CASES])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "reverse"])
def test_triton_matches_reference(case, reverse):
    _, B, H, W, kind, sxy, srgb, C = case
    feats = torch.cat([image_features(make_image(kind, H, W, seed=b), sxy, srgb) for b in range(B)])
    v = torch.rand(B, C, H, W, generator=torch.Generator().manual_seed(C))
    _compare(triton_lattice(feats), PermutohedralLattice(feats), v, f"{case[0]} reverse={reverse}", reverse)


def test_triton_64bit_index_math(monkeypatch):
    """Offsets are 32-bit unless a tensor is too large for them; with the limit at 0 every launch takes the INT64
    variant, which must give the same result (tensors over 2^31 elements do not fit a test)."""
    import fastwsss.kernels.lattice._triton as kernels

    monkeypatch.setattr(kernels, "_INT32_LIMIT", 0)
    _, B, H, W, kind, sxy, srgb, C = TRITON_CASES[3]
    feats = torch.cat([image_features(make_image(kind, H, W, seed=b), sxy, srgb) for b in range(B)])
    v = torch.rand(B, C, H, W, generator=torch.Generator().manual_seed(C))
    for reverse in (False, True):
        _compare(triton_lattice(feats), PermutohedralLattice(feats), v, f"INT64 reverse={reverse}", reverse)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)],
                         ids=["fp16", "bf16"])
def test_triton_low_precision_values(dtype):
    """Low-precision values are read, upcast and accumulated in float32, written back in their dtype; compared to
    the reference on the same (rounded) inputs."""
    H, W = 17, 23
    feats = image_features(make_image("natural", H, W, seed=5), 30, 15)
    v = torch.rand(2, 5, H, W, generator=torch.Generator().manual_seed(0)).to(dtype)
    feats = torch.cat([feats, feats.flip(-1)])
    _compare(triton_lattice(feats), PermutohedralLattice(feats), v, str(dtype))


def test_triton_matches_densecrf(dcrf):
    """pydensecrf2 (densecrf's own float32 lattice) as the external oracle: ragged sizes with its block padding,
    rank ties on piecewise-constant images, small sigmas (many vertices) and the crafted rounding ties."""
    for H, W, kind, sxy, srgb, K in ((17, 23, "noise", 50, 15, 3), (17, 23, "blocks", 1, 1, 4),
                                     (17, 23, "gradient", 2, 5, 21), (31, 45, "natural", 10, 20, 7)):
        img = make_image(kind, H, W, seed=H * W + K)
        q = np.random.RandomState(K).rand(K, H * W).astype(np.float32)
        lat = triton_lattice(image_features(img, sxy, srgb))
        ours = lat.filter(torch.from_numpy(q).reshape(1, K, H, W).to(DEVICE)).cpu().reshape(K, -1).numpy()
        assert_matches(ours, oracle_bilateral(dcrf, img, q, sxy, srgb), what=f"triton {H}x{W} {kind} K={K}")
    r = np.random.RandomState(3)
    for d, N in ((2, 96), (7, 60)):
        feats = (r.randn(d, N) * 2).astype(np.float32)
        q = r.rand(4, N).astype(np.float32)
        lat = triton_lattice(torch.from_numpy(feats).reshape(1, d, 1, N))
        ours = lat.filter(torch.from_numpy(q).reshape(1, 4, 1, N).to(DEVICE)).cpu().reshape(4, N).numpy()
        assert_matches(ours, oracle_features(dcrf, feats, q), what=f"triton generic d={d}")


def test_triton_224_c21_matches_reference_and_densecrf(dcrf):
    """The regularisation loss's setting: 224x224, 21 softmax channels, sigma_xy 50, sigma_rgb 15 (~5 s under the
    interpreter: vertex rows of up to ~3000 pixels, a three-level splat)."""
    img = make_image("natural", 224, 224, seed=50)
    logits = np.random.RandomState(15).randn(21, 224 * 224).astype(np.float32) * 3
    q = np.exp(logits - logits.max(0))
    q = (q / q.sum(0)).astype(np.float32)
    feats = image_features(img, 50, 15)
    lat = triton_lattice(feats)
    assert len(lat._impl.tensors[5]) >= 2  # long vertex rows were split
    v = torch.from_numpy(q).reshape(1, 21, 224, 224)
    out = lat.filter(v.to(DEVICE)).cpu()
    ref = PermutohedralLattice(feats).filter(v.double())
    assert_matches(out.reshape(21, -1).numpy(), ref.reshape(21, -1).numpy(), tol=1e-5, what="224 vs reference")
    assert_matches(out.reshape(21, -1).numpy(), oracle_bilateral(dcrf, img, q, 50, 15), what="224 vs densecrf")


def test_triton_constant_image_and_constant_features():
    """A constant image (colour features all equal) and fully constant features (every pixel in one simplex: the
    d+1 vertices each hold all N pixels, so the splat's long-row levels are deep)."""
    H, W = 24, 20
    img = np.full((H, W, 3), 77, np.uint8)
    v = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(2))
    feats = torch.cat([image_features(img, 50, 15), image_features(img, 3, 15)])
    _compare(triton_lattice(feats), PermutohedralLattice(feats), v, "constant image")
    H, W = 40, 30
    flat = torch.full((2, 5, H, W), 0.3)
    lat = triton_lattice(flat)
    assert lat.num_vertices == 2 * 6 and len(lat._impl.tensors[5]) == 3  # 1200 pixels: 38 pieces, 2, 1
    v = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(2))
    _compare(lat, PermutohedralLattice(flat), v, "constant features")
    out = lat.filter(torch.ones(2, 1, H, W, device=DEVICE))
    assert torch.allclose(out, out.flatten()[0])  # every pixel sees the same lattice mass


def test_triton_short_segments_and_huge_keys():
    """Splitting rows into pieces of 2 (many levels) gives the same result as pieces of 32; features so large that
    the vertex codes would overflow int64 take the reference's row hash and still filter with Triton."""
    from fastwsss.kernels.lattice._triton import TritonLattice, lattice_filter

    g = torch.Generator().manual_seed(4)
    feats = (torch.rand(2, 5, 9, 11, generator=g) * 4).to(DEVICE)
    v = torch.rand(2, 3, 9, 11, generator=g).to(DEVICE)
    a, b = TritonLattice(feats), TritonLattice(feats, seg=2)
    assert len(b.tensors[5]) > len(a.tensors[5])
    fa, fb = lattice_filter(v, *a.tensors, False), lattice_filter(v, *b.tensors, False)
    torch.testing.assert_close(fa, fb, rtol=1e-6, atol=1e-7)
    huge = triton_lattice(feats * 5000)
    assert huge._impl._ref is not None  # built by the reference's row hash
    _compare(huge, PermutohedralLattice(feats.cpu() * 5000), v.cpu(), "huge keys")


def test_triton_gradients():
    """The custom op's backward is the reverse filter (the filter's transpose): equal to the reference's autograd;
    differentiable twice; filtering with reverse=True has the forward filter as its gradient."""
    H, W = 17, 23
    feats = torch.cat([image_features(make_image(k, H, W, seed=3), 20, 10) for k in ("natural", "blocks")])
    lat, ref = triton_lattice(feats), PermutohedralLattice(feats)
    g = torch.Generator().manual_seed(0)
    v = torch.rand(2, 3, H, W, generator=g)
    w = torch.rand(2, 3, H, W, generator=g)
    for reverse in (False, True):
        vt = v.to(DEVICE).detach().requires_grad_()
        (lat.filter(vt, reverse=reverse) * w.to(DEVICE)).sum().backward()
        vr = v.double().requires_grad_()
        (ref.filter(vr, reverse=reverse) * w.double()).sum().backward()
        assert_matches(vt.grad.cpu().double().reshape(6, -1).numpy(), vr.grad.reshape(6, -1).numpy(),
                       tol=1e-5, what=f"grad reverse={reverse}")
    vt = v.to(DEVICE).detach().requires_grad_()
    (gv,) = torch.autograd.grad((lat.filter(vt) ** 2).sum(), vt, create_graph=True)
    (ggv,) = torch.autograd.grad((gv * w.to(DEVICE)).sum(), vt)
    vr = v.double().requires_grad_()
    (gr,) = torch.autograd.grad((ref.filter(vr) ** 2).sum(), vr, create_graph=True)
    (ggr,) = torch.autograd.grad((gr * w.double()).sum(), vr)
    assert_matches(ggv.cpu().double().reshape(6, -1).numpy(), ggr.reshape(6, -1).numpy(), tol=1e-5,
                   what="double backward")


def test_triton_custom_op_opcheck():
    """torch.library.opcheck: schema, fake tensor, autograd registration of fastwsss::lattice_filter."""
    from fastwsss.kernels.lattice.api import _lattice_filter

    lat = triton_lattice(image_features(make_image("noise", 4, 5, seed=0), 5, 20))
    v = torch.rand(1, 2, 4, 5, device=DEVICE, requires_grad=True)
    torch.library.opcheck(_lattice_filter, (v, *lat._impl.tensors, False),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))

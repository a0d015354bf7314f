"""Permutohedral-lattice bilateral filter: lattice build and one filter of C channels, timed separately.

Shapes come from the two users of the lattice: the regularisation loss (docs/methods/toco-mcc.md §7.6: 224², σ_xy 50, σ_rgb 15, one
lattice per image of the batch, C = 21 VOC classes or C = 2, batch 1 and the paper's 4) and dense-CRF inference
(docs/methods/toco-mcc.md §10: a VOC-size 500×375 image, 21 classes; bilateral σ_xy 121, σ_rgb 5, and the Gaussian σ_xy 1 kernel, d = 2,
whose lattice has ~one vertex per pixel). Images are smooth synthetic "natural" ones with flat objects and noise.
On a CPU one tiny case per kernel as a smoke test (`--benchmark-disable`, Triton under the interpreter).

Providers: reference (the PyTorch lattice, float64 sparse CSR products); compile (`torch.compile` of the reference
filter: it compiles, but the sparse products stay library calls; skipped in CPU smoke runs, where a cold compile
takes 30-50 s); pydensecrf (pydensecrf2, densecrf's C++ lattice on one CPU core, the external baseline: build =
`DenseCRF2D` + `addPairwise*`, filter = one `stepInference` with a zero unary, per image of the batch); triton.
Every filter is checked against the float64 reference first (1e-5 of the max; pydensecrf 1e-4), every build by
filtering once with it.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fastwsss.kernels.lattice import PermutohedralLattice, bilateral_features, position_features
from fastwsss.kernels.lattice.reference import PermutohedralLattice as ReferenceLattice
from fastwsss.kernels.testing import DEVICE, GPU, assert_close, natural_image

CASES = {  # name: (B, H, W, C, kernel, sxy, srgb)
    "reg224-B1-C21": (1, 224, 224, 21, "bilateral", 50.0, 15.0),
    "reg224-B4-C21": (4, 224, 224, 21, "bilateral", 50.0, 15.0),
    "reg224-B4-C2": (4, 224, 224, 2, "bilateral", 50.0, 15.0),
    "crf500x375-bilateral-C21": (1, 375, 500, 21, "bilateral", 121.0, 5.0),
    "crf500x375-gaussian-C21": (1, 375, 500, 21, "gaussian", 1.0, 0.0),
} if GPU else {
    "cpu-reg24x20-B2-C3": (2, 24, 20, 3, "bilateral", 5.0, 15.0),
    "cpu-crf19x25-gaussian-C3": (1, 19, 25, 3, "gaussian", 1.0, 0.0),
}
PROVIDERS = ["reference", "compile", "pydensecrf", "triton"]


def _features(imgs: list[np.ndarray], kernel: str, sxy: float, srgb: float) -> torch.Tensor:
    """densecrf's features of the uint8 [H, W, 3] images: (x, y)/sxy [, (r, g, b)/srgb]."""
    H, W, _ = imgs[0].shape
    if kernel == "gaussian":
        return position_features(len(imgs), H, W, sxy)
    return bilateral_features(torch.stack([torch.from_numpy(img).permute(2, 0, 1) for img in imgs]), srgb, sxy)


_DATA: dict = {}


def _case(name: str):
    """(images, features on DEVICE, values [B, C, H, W] float32 on DEVICE (softmax-like), float64 reference)."""
    if name not in _DATA:
        B, H, W, C, kernel, sxy, srgb = CASES[name]
        imgs = [natural_image(H, W, seed) for seed in range(B)]
        feats = _features(imgs, kernel, sxy, srgb)
        logits = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(0)) * 3
        values = logits.softmax(1)
        ref = ReferenceLattice(feats).filter(values.double())
        _DATA[name] = (imgs, feats.to(DEVICE), values.to(DEVICE), ref)
    return _DATA[name]


# ---- pydensecrf: build = DenseCRF2D + addPairwise*, filter = one stepInference (zero unary) per image


class _DenseCRFs:
    def __init__(self, imgs, C: int, kernel: str, sxy: float, srgb: float):
        import pydensecrf.densecrf as dcrf

        self.crfs = []
        for img in imgs:
            H, W, _ = img.shape
            crf = dcrf.DenseCRF2D(W, H, C)
            crf.setUnaryEnergy(np.zeros((C, H * W), np.float32))
            if kernel == "bilateral":
                crf.addPairwiseBilateral(sxy=sxy, srgb=srgb, rgbim=np.ascontiguousarray(img), compat=1,
                                         kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NO_NORMALIZATION)
            else:
                crf.addPairwiseGaussian(sxy=sxy, compat=1, kernel=dcrf.DIAG_KERNEL,
                                        normalization=dcrf.NO_NORMALIZATION)
            self.crfs.append(crf)

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        from pydensecrf.eigen import matrixXf

        B, C, H, W = values.shape
        q = values.detach().float().cpu().reshape(B, C, H * W).numpy()
        out = []
        for crf, qb in zip(self.crfs, q):
            a, b = matrixXf(np.zeros_like(qb)), matrixXf(np.zeros_like(qb))
            crf.stepInference(matrixXf(np.ascontiguousarray(qb)), a, b)  # a = 0 - unary + filter(q)
            out.append(np.array(a))
        return torch.from_numpy(np.stack(out)).reshape(B, C, H, W)


def _provider(provider: str, name: str):
    """(build(), filter(lattice)) for this provider, or pytest.skip with the reason."""
    imgs, feats, values, _ = _case(name)
    C, kernel, sxy, srgb = CASES[name][3:]
    if provider == "reference":
        return (lambda: ReferenceLattice(feats)), (lambda lat: lat.filter(values))
    if provider == "compile":
        if not GPU and not os.environ.get("FASTWSSS_BENCH_COMPILE"):
            pytest.skip("torch.compile takes 30-50 s cold on a CPU; FASTWSSS_BENCH_COMPILE=1 runs it")
        compiled = {}

        def filt(lat):
            if id(lat) not in compiled:
                compiled.clear()
                compiled[id(lat)] = torch.compile(lat.filter)
            return compiled[id(lat)](values)
        return (lambda: ReferenceLattice(feats)), filt
    if provider == "pydensecrf":
        pytest.importorskip("pydensecrf.densecrf")
        return (lambda: _DenseCRFs(imgs, C, kernel, sxy, srgb)), (lambda lat: lat.filter(values))
    if provider == "triton":
        from fastwsss.kernels._backend import device_reasons

        if device_reasons(feats):
            pytest.skip("; ".join(device_reasons(feats)))
        return (lambda: PermutohedralLattice(feats, backend="triton")), (lambda lat: lat.filter(values))
    raise ValueError(provider)


def _checker(provider: str, name: str):
    """Against the float64 reference: within 1e-5 of its max (pydensecrf, which filters in float32: 1e-4)."""
    ref = _case(name)[3]
    tol = 1e-4 if provider == "pydensecrf" else 1e-5
    return lambda out: assert_close(out, ref, tol, f"{provider} {name}", rtol=0, scale="max")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name", list(CASES))
def test_lattice_build(run_case, name, provider):
    build, filt = _provider(provider, name)
    check = _checker(provider, name)
    B, H, W, _, kernel, *_ = CASES[name]
    run_case(build, lambda lat: check(filt(lat)), case=name, phase="build", provider=provider, pixels=B * H * W,
             kernel=kernel)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name", list(CASES))
def test_lattice_filter(run_case, name, provider):
    build, filt = _provider(provider, name)
    lat = build()
    C, kernel = CASES[name][3:5]
    vertices = getattr(lat, "num_vertices", None)
    run_case(lambda: filt(lat), _checker(provider, name), case=name, phase="filter", provider=provider, channels=C,
             vertices=vertices, kernel=kernel)

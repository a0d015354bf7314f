"""PAR (docs/methods/toco-mcc.md §8): the 48-neighbour affinity and 10 propagation rounds, as the pseudo label uses it.

Shapes: 224² (ToCo / MCC's 448 crop down-scaled by 2), batch 4, default dilations (1, 2, 4, 8, 12, 24), 10 rounds;
K = 2, 3, 8, 21 dense channels, and the training call itself: K = 42 (background + 20 VOC classes, for both
background thresholds at once) of which only background + 2 present classes per set are non-zero, as
`refine_seg_label` passes them (absent classes are zero channels; the Triton path skips them). fp32 (the pseudo label
runs PAR on fp32 CAMs) and bf16 masks. On a CPU one tiny case as a smoke test (`--benchmark-disable`, Triton under
the interpreter).

Providers: reference (no 48-deep stack, 48 shifted views accumulated one at a time); compile (`torch.compile` of the
reference; skipped in CPU smoke runs, where a cold compile takes ~30 s or more — FASTWSSS_BENCH_COMPILE=1 runs it);
triton. Every result is checked against the fp32 reference on the same inputs first.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastwsss.kernels.par import par_refine, par_refine_reference
from fastwsss.kernels.testing import DEVICE, GPU, assert_close

CASES = {  # name: (B, K, h, w, present channels per image or None = all, dtype)
    **{f"224-B4-K{k}-fp32": (4, k, 224, 224, None, torch.float32) for k in (2, 3, 8, 21)},
    "224-B4-K21-bf16": (4, 21, 224, 224, None, torch.bfloat16),
    "224-B4-K42-voc-train-3-present": (4, 42, 224, 224, 3, torch.float32),
} if GPU else {
    "cpu-B2-K3-16x20": (2, 3, 16, 20, None, torch.float32),
}
PROVIDERS = ["reference", "compile", "triton"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}  # relative to the max |ref|
_DATA: dict = {}


def _case(name: str):
    """(images [B, 3, h, w], masks [B, K, h, w], fp32 reference) on DEVICE."""
    if name not in _DATA:
        B, K, h, w, present, dtype = CASES[name]
        g = torch.Generator().manual_seed(0)
        ramp = torch.linspace(0, 1, w).expand(B, 3, h, w)
        images = (0.6 * ramp + 0.4 * torch.rand(B, 3, h, w, generator=g)).to(DEVICE)
        masks = torch.rand(B, K, h, w, generator=g).softmax(1)
        if present is not None:  # two channel sets of K/2; per image: background + (present - 1) random classes
            keep = torch.zeros(B, K // 2, dtype=torch.bool)
            keep[:, 0] = True
            for b in range(B):
                keep[b, 1 + torch.randperm(K // 2 - 1, generator=g)[:present - 1]] = True
            masks = masks * keep.repeat(1, 2)[:, :, None, None]
        masks = masks.to(DEVICE, dtype)
        _DATA[name] = (images, masks, par_refine_reference(images, masks.float()))
    return _DATA[name]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name", list(CASES))
def test_par(run_case, name, provider):
    images, masks, ref = _case(name)
    B, K, h, w, present, dtype = CASES[name]
    if provider == "reference":
        fn = par_refine_reference
    elif provider == "compile":
        if not GPU and not os.environ.get("FASTWSSS_BENCH_COMPILE"):
            pytest.skip("torch.compile takes ~30 s or more cold on a CPU; FASTWSSS_BENCH_COMPILE=1 runs it")
        fn = torch.compile(par_refine_reference)
    else:
        from fastwsss.kernels._backend import device_reasons

        if device_reasons(images):
            pytest.skip("; ".join(device_reasons(images)))
        fn = lambda i, m: par_refine(i, m, backend="triton")
    with torch.no_grad():
        run_case(lambda: fn(images, masks),
                 lambda out: assert_close(out, ref, TOL[dtype], f"{provider} {name}", rtol=0, scale="max"),
                 case=name, provider=provider, dtype=dtype, channels=K, present=present or K, pixels=B * h * w)

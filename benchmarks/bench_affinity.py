"""Token affinity loss (ToCo PTC / MCC aff, docs/methods/toco-mcc.md §7.3): forward, and forward + backward as in training.

Shapes: ViT-B/16 patch tokens (D 768) of the training crop, 448² -> 28² = 784 tokens, and of a 672² crop -> 42² =
1764 tokens, batch 4, bf16 (training's autocast dtype) and fp32; labels from 5 classes with ~1/6 ignored. On a CPU
one tiny case as a smoke test (`--benchmark-disable`, Triton under the interpreter).

Providers: reference (materialises [B, N, N] similarities and masks); compile (`torch.compile` of the reference;
skipped in CPU smoke runs, where a cold compile takes ~30 s — FASTWSSS_BENCH_COMPILE=1 runs it); triton. Every
result is checked against the reference computed in fp32 on the same inputs first.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastwsss.kernels.affinity import token_affinity_loss
from fastwsss.kernels.affinity.reference import token_affinity_loss_reference
from fastwsss.kernels.testing import DEVICE, GPU, assert_close

CASES = {  # name: (B, N, D, dtype)
    "vit448-B4-N784-D768-bf16": (4, 784, 768, torch.bfloat16),
    "vit448-B4-N784-D768-fp32": (4, 784, 768, torch.float32),
    "vit672-B4-N1764-D768-bf16": (4, 1764, 768, torch.bfloat16),
    "vit672-B4-N1764-D768-fp32": (4, 1764, 768, torch.float32),
} if GPU else {
    "cpu-B2-N64-D32-fp32": (2, 64, 32, torch.float32),
}
PROVIDERS = ["reference", "compile", "triton"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}  # relative to the max |ref| (loss and gradient)
_DATA: dict = {}


def _case(name: str):
    """(feats, labels, fp32 reference loss, fp32 reference gradient) on DEVICE."""
    if name not in _DATA:
        B, N, D, dtype = CASES[name]
        g = torch.Generator().manual_seed(0)
        # a shared component, as real tokens have: cosines away from 0, where |·|'s subgradient flips on rounding
        feats = (torch.randn(B, N, D, generator=g) + torch.randn(D, generator=g)).to(DEVICE, dtype)
        labels = torch.randint(0, 6, (B, N), generator=g).to(DEVICE)
        labels[labels == 5] = 255
        f = feats.float().requires_grad_()
        loss = token_affinity_loss_reference(f, labels)
        (grad,) = torch.autograd.grad(loss, f)
        _DATA[name] = (feats, labels, loss.detach(), grad)
    return _DATA[name]


def _loss_fn(provider: str):
    if provider == "reference":
        return token_affinity_loss_reference
    if provider == "compile":
        if not GPU and not os.environ.get("FASTWSSS_BENCH_COMPILE"):
            pytest.skip("torch.compile takes ~30 s cold on a CPU; FASTWSSS_BENCH_COMPILE=1 runs it")
        return torch.compile(token_affinity_loss_reference)
    if provider == "triton":
        from fastwsss.kernels._backend import device_reasons

        if device_reasons(torch.empty(0, device=DEVICE)):
            pytest.skip("; ".join(device_reasons(torch.empty(0, device=DEVICE))))
        return lambda f, y: token_affinity_loss(f, y, backend="triton")
    raise ValueError(provider)


@pytest.mark.parametrize("phase", ["forward", "forward+backward"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name", list(CASES))
def test_affinity(run_case, name, provider, phase):
    """The loss alone (no autograd), or the loss and its gradient as in training."""
    fn = _loss_fn(provider)
    feats, labels, ref, ref_grad = _case(name)
    B, N, _, dtype = CASES[name]
    backward = phase == "forward+backward"
    f = feats.detach().requires_grad_(backward)

    def step():
        with torch.set_grad_enabled(backward):
            loss = fn(f, labels)
        return (loss, torch.autograd.grad(loss, f)[0]) if backward else (loss,)

    def check(out):
        for o, r, what in zip(out, (ref, ref_grad), ("loss", "grad")):
            assert_close(o, r, TOL[dtype], f"{provider} {name} {what}", rtol=0, scale="max")

    run_case(step, check, case=name, phase=phase, provider=provider, dtype=dtype, tokens=B * N)

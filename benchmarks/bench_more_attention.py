"""MoRe's attention: what the official backbone computes in every block against what fastwsss runs, one block's
attention at MoRe's shapes, forward (the CAM passes, no gradient) and forward + backward (the main forward).

MoRe's sequence is 4 register + K class tokens + the patches: T = 24 + 28² = 808 at 448² on VOC (B = 4 images, 12
heads of 64), 84 + 28² = 868 on COCO, 24 + 42² = 1788 at the 1.5x CAM scale and 24 + 56² = 3160 at the 2.0x LAM
scale (each image batched with its flip). No loss, label or reported number of MoRe reads an attention entry
(docs/methods/more.md §11), so fastwsss runs the fused kernel in every block.

Providers:

- ``official``: the official ``Attention.forward``: logits = q k^T * scale, the raw-logits copy ``weights = logits /
  scale`` kept (the block returns it), an explicit softmax, probs @ v; both [B, H, T, T] tensors materialised;
- ``sdpa-weights``: attention that returns its weights (timm's non-fused path): explicit matmul, softmax, matmul,
  the [B, H, T, T] probabilities returned;
- ``fused``: ``F.scaled_dot_product_attention`` (flash / memory-efficient on a GPU), what fastwsss's blocks run.

Every provider's output (and gradients) is checked against the fp32 official before it is timed; peak memory above
the inputs in ``extra_info`` on a GPU. On a CPU the suite runs one small case per provider once
(``--benchmark-disable``); ``python benchmarks/bench_more_attention.py`` measures the real shape on a CPU (each
provider in its own process: time, and peak resident memory above the inputs).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import pytest
import torch
import torch.nn.functional as F

from fastwsss.kernels.testing import DEVICE, GPU, assert_close

DTYPE = torch.bfloat16 if GPU else torch.float32
TOL = {torch.bfloat16: (1.6e-2, 8e-2), torch.float32: (1e-4, 1e-3)}  # (out, grads), bench_attention.py's criterion
CASES = {  # name: (B, T, H, D, direction)
    "voc448-main-B4-T808-H12-D64": (4, 808, 12, 64, "fwd+bwd"),
    "coco448-main-B4-T868-H12-D64": (4, 868, 12, 64, "fwd+bwd"),
    "voc448-cam1.0-B8-T808-H12-D64": (8, 808, 12, 64, "fwd"),
    "voc448-cam1.5-B8-T1788-H12-D64": (8, 1788, 12, 64, "fwd"),
    "voc448-lam2.0-B2-T3160-H12-D64": (2, 3160, 12, 64, "fwd"),
} if GPU else {"cpu-B1-T88-H2-D32-fwd+bwd": (1, 88, 2, 32, "fwd+bwd"), "cpu-B2-T88-H2-D32-fwd": (2, 88, 2, 32, "fwd")}
PROVIDERS = ["official", "sdpa-weights", "fused"]


def official(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official block's attention: the output and the raw logits it returns ([B, H, T, T])."""
    scale = q.shape[-1] ** -0.5
    logits = (q @ k.transpose(-2, -1)) * scale
    weights = logits / scale
    return logits.softmax(dim=-1) @ v, weights


def sdpa_weights(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention that returns its probabilities: explicit matmul, softmax, matmul."""
    probs = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    return probs @ v, probs


def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor]:
    return (F.scaled_dot_product_attention(q, k, v),)


FNS = {"official": official, "sdpa-weights": sdpa_weights, "fused": fused}


def make_inputs(B: int, T: int, H: int, D: int, dtype=DTYPE, device=DEVICE) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, T, D, generator=g).to(device, dtype) for _ in range(3)]


def runner(fn, inputs: list[torch.Tensor], direction: str):
    """fwd: no autograd, every returned tensor kept until the next call (as the official block keeps its weights);
    fwd+bwd: the output's backward under a fixed upstream gradient -> (out, dq, dk, dv)."""
    if direction == "fwd":
        def run():
            with torch.no_grad():
                return fn(*inputs)
        return run
    leaves = [x.detach().requires_grad_() for x in inputs]
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1)).to(inputs[0])

    def run():
        result = fn(*leaves)
        return (result[0].detach(), *torch.autograd.grad(result[0], leaves, grad_out)) + tuple(
            r.detach() for r in result[1:])
    return run


_REFS: dict = {}


def reference(case: str, inputs: list[torch.Tensor], direction: str) -> tuple[torch.Tensor, ...]:
    """The fp32 official on the same inputs: (out,) or (out, dq, dk, dv)."""
    if case not in _REFS:
        result = runner(official, [x.float() for x in inputs], direction)()
        _REFS[case] = tuple(r.detach() for r in result[: 1 if direction == "fwd" else 4])
    return _REFS[case]


def check(outs, refs, what: str) -> None:
    tol_out, tol_grad = TOL[outs[0].dtype]
    for i, (out, ref) in enumerate(zip(outs[:len(refs)], refs, strict=True)):
        assert_close(out, ref, tol_out if i == 0 else tol_grad, f"{what} {'output' if i == 0 else f'grad {i}'}",
                     floor=0.1)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_more_attention(run_case, case, provider):
    B, T, H, D, direction = CASES[case]
    inputs = make_inputs(B, T, H, D)
    refs = reference(case, inputs, direction)
    matrix_mib = B * H * T * T * torch.finfo(DTYPE).bits / 8 / 2**20
    run_case(runner(FNS[provider], inputs, direction), lambda outs: check(outs, refs, provider), provider=provider,
             direction=direction, dtype=DTYPE, shape=f"B{B} T{T} H{H} D{D}", one_TxT_matrix_mib=round(matrix_mib, 1),
             blocks_per_forward=12)


# ---- CPU figures at the real shape: one process per provider, so each one's peak memory is its own


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _measure(provider: str, B: int, T: int, H: int, D: int, direction: str, repeat: int, refs_file: str) -> dict:
    """In a fresh process: the inputs and the reference (computed by another process) loaded, then the provider run
    once and checked, then timed; its peak resident memory above what was loaded."""
    inputs = make_inputs(B, T, H, D, torch.float32, torch.device("cpu"))
    refs = torch.load(refs_file)
    run = runner(FNS[provider], inputs, direction)
    base = _maxrss_mib()
    kept = [run()]
    peak = _maxrss_mib() - base  # the provider's own high-water mark (before the check's float64 copies)
    check(kept[0], refs, provider)  # no time for a wrong result
    times = []
    for _ in range(repeat):
        kept[0] = None  # the previous call's tensors are freed first, as one step follows another
        t0 = time.perf_counter()
        kept[0] = run()
        times.append(time.perf_counter() - t0)
    return {"provider": provider, "direction": direction, "shape": f"B{B} T{T} H{H} D{D}",
            "ms": round(1e3 * statistics.median(times), 1), "peak_rss_above_inputs_mib": round(peak),
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="MoRe's attention on a CPU at the real shape (one process per "
                                             "provider): median time and peak resident memory above the inputs")
    ap.add_argument("--shape", default="4,808,12,64", help="B,T,H,D (default: VOC's main forward)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--one", nargs=3, metavar=("PROVIDER", "DIRECTION", "REFS"), help=argparse.SUPPRESS)
    ap.add_argument("--reference", nargs=2, metavar=("DIRECTION", "REFS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    B, T, H, D = (int(v) for v in args.shape.split(","))
    if args.reference:
        direction, path = args.reference
        result = runner(official, make_inputs(B, T, H, D, torch.float32, torch.device("cpu")), direction)()
        torch.save(tuple(result[: 1 if direction == "fwd" else 4]), path)
        return 0
    if args.one:
        print(json.dumps(_measure(args.one[0], B, T, H, D, args.one[1], args.repeat, args.one[2])))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for direction in ("fwd", "fwd+bwd"):
            refs = f"{tmp}/{direction}.pt"
            common = [sys.executable, __file__, "--shape", args.shape, "--repeat", str(args.repeat)]
            subprocess.run([*common, "--reference", direction, refs], check=True)
            for provider in PROVIDERS:
                out = subprocess.run([*common, "--one", provider, direction, refs], capture_output=True, text=True,
                                     check=True)
                print(out.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

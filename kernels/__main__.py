"""``python -m fastwsss.kernels``: what runs on this machine, and does it compute the right thing.

Run it before training, as ``python -m xformers.info`` or ``python -m torch.utils.collect_env``: versions, the
device and its capability, the backend each op resolves to here and why, then a forward + backward check of each
op on the current device against its PyTorch reference, at a small and at a real shape (seconds on a GPU). Exit
status 1 if any check fails.

On a CPU the ops resolve to the references and there is nothing to compare; with ``TRITON_INTERPRET=1`` the Triton
kernels run under the interpreter and are checked at the small shapes (the real ones take minutes there: ``--full``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from . import (
    PermutohedralLattice,
    masked_key_attention,
    masked_key_attention_reasons,
    par_reasons,
    par_refine,
    permutohedral_reasons,
    token_affinity_loss,
    token_affinity_reasons,
    varlen_attention,
    varlen_attention_reasons,
)
from ._backend import HAS_TRITON, INTERPRET
from .testing import DEVICE, error


@dataclass
class Check:
    op: str
    shape: str
    dtype: str
    backend: str
    errors: dict[str, float] = field(default_factory=dict)  # output / gradient name -> worst relative error
    tol: float = 0.0
    seconds: float = 0.0
    status: str = "ok"  # ok | FAIL | skipped
    note: str = ""


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
           "fastwsss": _version("fastwsss"), "numpy": _version("numpy"), "cuda": str(torch.version.cuda),
           "device": str(device), "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "")}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(name=p.name, capability=f"sm_{p.major}{p.minor}", sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1))
    else:
        env.update(name=platform.processor() or platform.machine(), cpu_threads=torch.get_num_threads())
    return env


# ---- inputs: small (ragged, quick) and real (the training shapes: ViT-B/16 at 448, MCC's 8 views, 224^2 PAR)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def attention_inputs(real: bool, dtype: torch.dtype, device: torch.device):
    B, M, H, N, D = (4, 8, 12, 785, 64) if real else (2, 3, 2, 37, 32)
    g = _gen(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(device, dtype) for _ in range(3))
    keep = torch.rand(B, M, N, generator=g) < (0.05 if real else 0.5)
    keep[..., 0] = True  # the class token
    if not real:
        keep[0, 1] = False  # a mask that sees nothing
    return (q, k, v, keep.to(device)), f"B={B} M={M} H={H} N={N} D={D}"


def varlen_inputs(real: bool, dtype: torch.dtype, device: torch.device):
    lengths = [40 + (7 * i) % 30 for i in range(32)] if real else [1, 7, 0, 20, 13]
    H, D = (12, 64) if real else (2, 32)
    T = sum(lengths)
    g = _gen(1)
    q, k, v = (torch.randn(T, H, D, generator=g).to(device, dtype) for _ in range(3))
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(device, torch.int32)
    return (q, k, v, cu), f"{len(lengths)} sequences T={T} H={H} D={D}"


def affinity_inputs(real: bool, dtype: torch.dtype, device: torch.device):
    B, N, D = (4, 784, 768) if real else (2, 50, 32)
    g = _gen(2)
    feats = torch.randn(B, N, D, generator=g) + torch.randn(D, generator=g)  # a shared direction, as ViT tokens
    labels = torch.randint(0, 5, (B, N), generator=g)
    labels[labels == 4] = 255
    return (feats.to(device, dtype), labels.to(device)), f"B={B} N={N} D={D}"


def par_inputs(real: bool, dtype: torch.dtype, device: torch.device):
    B, K, h, w = (4, 21, 224, 224) if real else (2, 3, 20, 24)
    g = _gen(3)
    images = (0.6 * torch.linspace(0, 1, w).expand(B, 3, h, w) + 0.4 * torch.rand(B, 3, h, w, generator=g))
    masks = torch.rand(B, K, h // 2, w // 2, generator=g).softmax(1)
    return (images.to(device, dtype), masks.to(device, dtype)), f"B={B} K={K} {h}x{w}"


def lattice_inputs(real: bool, dtype: torch.dtype, device: torch.device):
    B, C, h, w = (4, 21, 224, 224) if real else (1, 3, 16, 20)
    g = _gen(4)
    rgb = (torch.rand(B, 3, h // 4 + 1, w // 4 + 1, generator=g) * 255)
    rgb = F.interpolate(rgb, size=(h, w), mode="bilinear", align_corners=False).round()  # smooth, photograph-like
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    feats = torch.cat([torch.stack([xs, ys]).expand(B, 2, h, w) / 50.0, rgb / 15.0], dim=1)  # the reg loss's sigmas
    values = torch.rand(B, C, h, w, generator=g)
    return (feats.to(device), values.to(device, dtype)), f"B={B} C={C} {h}x{w}"


# ---- one check per op: the op with backend "auto" (what a caller gets here) against backend "torch", fwd + bwd


def _grads(out: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    g = torch.randn(out.shape, generator=_gen(5)).to(out.device, out.dtype)
    return list(torch.autograd.grad(out, inputs, g))


def _leaves(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in ts]


def run_attention(inputs, backend):
    q, k, v, keep = inputs
    leaves = _leaves(q, k, v)
    out = masked_key_attention(*leaves, keep, backend=backend)
    return {"out": out, **dict(zip(("dq", "dk", "dv"), _grads(out, leaves)))}


def run_varlen(inputs, backend):
    q, k, v, cu = inputs
    leaves = _leaves(q, k, v)
    out = varlen_attention(*leaves, cu, backend=backend)
    return {"out": out, **dict(zip(("dq", "dk", "dv"), _grads(out, leaves)))}


def run_affinity(inputs, backend):
    feats, labels = inputs
    (leaf,) = _leaves(feats)
    loss = token_affinity_loss(leaf, labels, backend=backend)
    (grad,) = torch.autograd.grad(loss, [leaf])
    return {"loss": loss, "dfeats": grad}


def run_par(inputs, backend):
    images, masks = inputs
    with torch.no_grad():  # the Triton PAR is forward-only: training runs it without grad
        return {"refined": par_refine(images, masks, backend=backend)}


def run_lattice(inputs, backend):
    feats, values = inputs
    (leaf,) = _leaves(values)
    out = PermutohedralLattice(feats, backend=backend).filter(leaf)
    return {"out": out, **dict(zip(("dvalues",), _grads(out, [leaf])))}


# op -> (inputs, run, reasons(inputs) -> why Triton cannot, {dtype at the real shape: tol})
OPS: dict[str, tuple[Callable, Callable, Callable, dict]] = {
    "masked_key_attention": (attention_inputs, run_attention, lambda a: masked_key_attention_reasons(*a),
                             {torch.float32: 2e-4, torch.bfloat16: 8e-2}),
    "varlen_attention": (varlen_inputs, run_varlen, lambda a: varlen_attention_reasons(*a),
                         {torch.float32: 2e-4, torch.bfloat16: 8e-2}),
    "token_affinity_loss": (affinity_inputs, run_affinity, lambda a: token_affinity_reasons(*a),
                            {torch.float32: 2e-4}),
    "par_refine": (par_inputs, run_par, lambda a: par_reasons(*a), {torch.float32: 2e-4}),
    "PermutohedralLattice": (lattice_inputs, run_lattice, lambda a: permutohedral_reasons(a[0], values=a[1]),
                             {torch.float32: 2e-4}),
}
SMALL_TOL = 2e-4  # fp32 at the small shapes: IEEE dots, only the summation order differs from the reference


def _training_dtype(tols: dict) -> torch.dtype:
    """The dtype an op sees in training: bf16 where checked (attention under autocast), else fp32."""
    return torch.bfloat16 if torch.bfloat16 in tols else torch.float32


def check_op(op: str, device: torch.device, real: bool, dtype: torch.dtype, tol: float, full: bool = False) -> Check:
    """The op as a caller gets it here against its reference; skipped where the reference is what runs, and for
    real shapes under the interpreter unless ``full``."""
    make, run, reasons, _ = OPS[op]
    inputs, shape = make(real, dtype, device)
    why = reasons(inputs)
    c = Check(op, ("real " if real else "small ") + shape, str(dtype).removeprefix("torch."),
              "torch" if why else "triton", tol=tol)
    if why:
        c.status, c.note = "skipped", "the reference is what runs here: nothing to compare"
        return c
    if INTERPRET and real and not full:
        c.status, c.note = "skipped", "interpreter: real shapes take minutes (--full)"
        return c
    t0 = time.perf_counter()
    try:
        ours = run(inputs, "triton")
        if device.type == "cuda":
            torch.cuda.synchronize()
        c.seconds = round(time.perf_counter() - t0, 3)
        ref = run(tuple(t.float() if t.is_floating_point() else t for t in inputs), "torch")  # fp32 reference
        c.errors = {k: error(ours[k], ref[k]) for k in ref}
    except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported with the others
        c.status, c.note = "FAIL", f"{type(e).__name__}: {e}"[:500]
        return c
    if max(c.errors.values()) > tol:
        c.status = "FAIL"
    return c


def backends(device: torch.device) -> dict[str, str]:
    """The backend each op resolves to here for its training dtype, with the reasons when it is the reference."""
    out = {}
    for op, (make, _, reasons, tols) in OPS.items():
        why = reasons(make(False, _training_dtype(tols), device)[0])
        out[op] = "triton" if not why else "torch (" + "; ".join(why) + ")"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastwsss.kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--full", action="store_true", help="real shapes under the interpreter too (minutes)")
    ap.add_argument("--json", help="also write the report to this file")
    args = ap.parse_args(argv)
    device = torch.device(args.device) if args.device else DEVICE
    env = environment(device)
    print("fastwsss.kernels self-check")
    print("  " + ", ".join(f"{k} {env[k]}" for k in ("python", "torch", "triton", "fastwsss", "cuda")))
    print(f"  device: {env['device']} ({env['name']}" + (f", {env['capability']}, {env['sms']} SMs, "
                                                          f"{env['memory_gib']} GiB" if device.type == "cuda" else
                                                          f", {env['cpu_threads']} threads") + ")")
    if not HAS_TRITON:
        print("  triton is not installed: every op runs its PyTorch reference")
    elif INTERPRET:
        print("  TRITON_INTERPRET=1: the Triton kernels run on CPU tensors under the interpreter (slow, exact)")
    print("\n  backend per op (for its training dtype, on this device):")
    resolved = backends(device)
    for op, b in resolved.items():
        print(f"    {op:22s} {b}")
    print("\n  checks (forward + backward against the fp32 reference; error = worst |out - ref| / (|ref| + rms ref)):")
    checks = []
    for op, (_, _, _, tols) in OPS.items():
        checks.append(check_op(op, device, False, torch.float32, SMALL_TOL, args.full))
        for dtype, tol in tols.items():
            checks.append(check_op(op, device, True, dtype, tol, args.full))
    for c in checks:
        errs = ", ".join(f"{k} {v:.1e}" for k, v in c.errors.items())
        print(f"    {c.status:7s} {c.op:22s} {c.shape:38s} {c.dtype:9s} "
              + (f"{errs} (tol {c.tol:g}) {c.seconds:.2f} s" if c.errors else c.note))
    failed = [c for c in checks if c.status == "FAIL"]
    checked = [c for c in checks if c.status == "ok"]
    print(f"\n  {len(checked)} passed, {len(failed)} failed, {len(checks) - len(checked) - len(failed)} skipped")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "backends": resolved, "checks": [asdict(c) for c in checks]}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Which implementation runs: decided in one place.

CUDA tensors -> Triton; CPU tensors -> the PyTorch reference, unless ``TRITON_INTERPRET=1`` (read once, at
import, so torch.compile sees a constant), which runs the Triton kernels on CPU under the interpreter: that is how
CI tests them. ``backend="auto"`` falls back to the reference silently; ``backend="triton"`` raises with every
reason the Triton path cannot take the inputs.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch

BACKENDS = ("auto", "triton", "torch")
# the input dtypes every Triton path takes (the affinity, PAR and lattice kernels compute in fp32 whatever they read)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NAN_FILL = False  # tests set this: every buffer a kernel must write starts as NaN, so an unwritten element cannot pass
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None

Backend = Literal["auto", "triton", "torch"]


def device_reasons(*tensors: torch.Tensor) -> list[str]:
    """Reasons the Triton path cannot run on these tensors' device ([] = it can)."""
    reasons = []
    if not HAS_TRITON:
        reasons.append("triton is not installed")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        reasons.append(f"tensors on several devices: {sorted(map(str, devices))}")
    for d in devices:
        if d.type != "cuda" and not (d.type == "cpu" and INTERPRET):
            reasons.append(f"tensors on {d} (Triton needs CUDA, or TRITON_INTERPRET=1 for CPU)")
    return reasons


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a launcher hands to a kernel to write (NaN-filled under ``NAN_FILL``)."""
    if NAN_FILL and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, for grid sizing; an H100's 132 for any other device (the
    interpreter, the compile check), so those see the launches an H100 gets."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def resolve_backend(backend: str, op: str, reasons: list[str]) -> Literal["triton", "torch"]:
    """``reasons``: why the Triton path cannot take these inputs ([] = it can)."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is not one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    if not reasons:
        return "triton"
    if backend == "triton":
        raise ValueError(f"{op}: the Triton backend cannot take these inputs: " + "; ".join(reasons))
    return "torch"

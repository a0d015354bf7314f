"""Which implementation runs: decided in one place.

CUDA tensors -> Triton; CPU tensors -> the PyTorch reference, unless ``TRITON_INTERPRET=1`` (read once, at
import, so torch.compile sees a constant), which runs the Triton kernels on CPU under the interpreter: that is how
CI tests them. ``backend="triton"`` raises with every reason the Triton path cannot take the inputs;
``backend="auto"`` falls back to the reference, quietly for CPU tensors, with a warning (logger
``fastwsss.kernels``, once per op and set of reasons) when a CUDA tensor falls back. ``backends_used()`` says which
backend each op has resolved to. Invalid inputs (shapes, dtypes, tensors on two devices: ``check_devices``) are
errors on every backend, never a reason to fall back.
"""

from __future__ import annotations

import importlib.util
import logging
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

log = logging.getLogger("fastwsss.kernels")
_used: dict[str, set[str]] = {}  # op -> the backends it has resolved to
_warned: set[tuple[str, tuple[str, ...]]] = set()  # (op, reasons) of the CUDA fallbacks already logged


def on_cuda(t: torch.Tensor) -> bool:
    """Whether a tensor lives on a CUDA device: what makes a fallback under "auto" worth a warning."""
    return t.device.type == "cuda"


def check_devices(**tensors: torch.Tensor | None) -> list[str]:
    """[] when the given tensors (None = absent) share one device; else the error naming each tensor's device."""
    named = {name: t for name, t in tensors.items() if t is not None}
    if len({t.device for t in named.values()}) <= 1:
        return []
    where = ", ".join(f"{name} on {t.device}" for name, t in named.items())
    return [f"{', '.join(named)} must be on one device, got {where}"]


def device_reasons(*tensors: torch.Tensor) -> list[str]:
    """Reasons the Triton path cannot run on these tensors' device ([] = it can). The tensors share one device
    (``check_devices`` makes two devices an error before this is asked)."""
    reasons = []
    if not HAS_TRITON:
        reasons.append("triton is not installed")
    for d in dict.fromkeys(t.device for t in tensors):
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


def resolve_backend(backend: str, op: str, reasons: list[str], *inputs: torch.Tensor
                    ) -> Literal["triton", "torch"]:
    """``reasons``: why the Triton path cannot take these inputs ([] = it can); ``inputs``: the op's tensors, for
    the warning when a CUDA tensor falls back under "auto" (logged once per op and set of reasons)."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is not one of {BACKENDS}")
    if backend == "torch":
        chosen = "torch"
    elif not reasons:
        chosen = "triton"
    elif backend == "triton":
        raise ValueError(f"{op}: the Triton backend cannot take these inputs: " + "; ".join(reasons))
    else:
        chosen = "torch"
        key = (op, tuple(reasons))
        if key not in _warned and any(on_cuda(t) for t in inputs):
            _warned.add(key)
            log.warning("%s: CUDA tensors fall back to the PyTorch reference (slow): %s", op, "; ".join(reasons))
    _used.setdefault(op, set()).add(chosen)
    return chosen


def backends_used(reset: bool = False) -> dict[str, str]:
    """The backend each op has resolved to since import (or the last reset), by op name: "triton", "torch", or
    "torch+triton" for an op that has run with both (e.g. PAR takes the reference where a gradient is wanted).
    For a training log. ``reset=True`` starts a new record after returning this one."""
    used = {op: "+".join(sorted(b)) for op, b in sorted(_used.items())}
    if reset:
        _used.clear()
    return used

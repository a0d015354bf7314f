"""Where and in what precision things run: the device, the autocast context of ``train.precision``, and the fp32
islands inside it. Training and the commands call these; nothing here reads a config object."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; an explicit ``cuda`` without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but CUDA is not available")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None = plain fp32. ``auto``: bf16 on CUDA where supported, fp32 on CPU."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def make_autocast(precision: str, device: torch.device) -> Callable[[], object]:
    """A factory of the autocast context for ``precision`` on ``device`` (a no-op context for fp32)."""
    amp = autocast_dtype(precision, device)
    return (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext


@contextmanager
def fp32_arithmetic() -> Iterator[None]:
    """Autocast off (CPU and CUDA), as a context or a decorator: inside, fp32 inputs are computed in fp32 even when
    the caller runs under autocast. Everything cut by a CAM threshold or fed to PAR runs in it, as the authors' fp32
    runs did: a bf16 CAM moves pixels across the 0.25 / 0.5 / 0.7 cuts (README, "Precision")."""
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        yield

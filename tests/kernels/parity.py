"""What every kernel parity test shares: the device the kernels run on and a comparison that says what differs."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from fastwsss.kernels import _backend

# CUDA: real Triton. CPU: the kernels run under TRITON_INTERPRET=1, set by tests/conftest.py.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check(out: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float, what: str, equal_nan: bool = False) -> None:
    """assert_close with a message naming the count of bad elements, the worst index, ref and out there.
    A NaN fails (kernel outputs start NaN-filled in the tests: an unwritten element cannot pass), unless
    ``equal_nan`` and the reference has a NaN at the same place (a test of NaN propagation)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    bad = ~torch.isclose(out, ref, rtol=rtol, atol=atol, equal_nan=equal_nan)
    if bad.any():
        err = ((out - ref).abs() - rtol * ref.abs()).nan_to_num(float("inf"))
        worst = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape)) if err.ndim else ()
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements differ; worst at {worst}: "
                             f"ref {ref[worst].item():.8g}, out {out[worst].item():.8g} (rtol {rtol}, atol {atol})")


def nan_filled(monkeypatch, op: str) -> ModuleType:
    """Every buffer a Triton launcher hands to a kernel starts as NaN (``kernels._backend.NAN_FILL``), so an
    unwritten element fails :func:`check`. Returns ``fastwsss.kernels.<op>._triton``."""
    monkeypatch.setattr(_backend, "NAN_FILL", True)
    return importlib.import_module(f"fastwsss.kernels.{op}._triton")

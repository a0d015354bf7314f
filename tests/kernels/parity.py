"""What every kernel parity test shares besides ``fastwsss.kernels.testing`` (the device and the comparison):
NaN-filled kernel outputs."""

from __future__ import annotations

import importlib
from types import ModuleType

from fastwsss.kernels import _backend


def nan_filled(monkeypatch, op: str) -> ModuleType:
    """Every buffer a Triton launcher hands to a kernel starts as NaN (``kernels._backend.NAN_FILL``), so an
    unwritten element fails ``fastwsss.kernels.testing.assert_close``. Returns ``fastwsss.kernels.<op>._triton``."""
    monkeypatch.setattr(_backend, "NAN_FILL", True)
    return importlib.import_module(f"fastwsss.kernels.{op}._triton")

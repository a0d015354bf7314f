"""Comparing a kernel's output with its reference: the one measure the self-check, the tests and the benchmarks use.

``error(out, ref)`` is the worst |out − ref| / (|ref| + rms(ref)): relative, with a floor at the tensor's own scale,
so sums that cancel are judged against the size of their terms. A NaN or inf where the reference is finite (or the
reverse) is an infinite error; a non-finite value equal to the reference's is no error.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _errors(out: Tensor, ref: Tensor) -> Tensor:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(out.shape)} vs reference {tuple(ref.shape)}")
    finite = torch.isfinite(ref)
    scale = float(ref[finite].pow(2).mean().sqrt()) if finite.any() else 0.0
    err = (out - ref).abs() / (ref.abs() + max(scale, 1e-30))
    same = (out == ref) | (out.isnan() & ref.isnan())  # equal non-finite values (and exact matches) are no error
    return torch.where(same, torch.zeros_like(err), err.nan_to_num(math.inf, math.inf, math.inf))


def error(out: Tensor, ref: Tensor) -> float:
    """Worst relative error of ``out`` against ``ref`` (0 for empty tensors)."""
    err = _errors(out, ref)
    return float(err.max()) if err.numel() else 0.0


def assert_close(out: Tensor, ref: Tensor, tol: float, what: str) -> None:
    """Raise when some element's error exceeds ``tol``, naming the count, the worst index, ref and out there."""
    err = _errors(out, ref)
    bad = err > tol
    if bad.any():
        worst = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape)) if err.ndim else ()
        o, r = out.detach().double().cpu(), ref.detach().double().cpu()
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements beyond tol {tol}; worst at "
                             f"{worst}: ref {r[worst].item():.7g}, out {o[worst].item():.7g}")

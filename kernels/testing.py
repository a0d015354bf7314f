"""Comparing a kernel's output with its reference: the one module the self-check (``python -m fastwsss.kernels``),
the kernel tests and the benchmarks use, shipped with the kernels as ``torch.testing`` ships with torch.

Every criterion is elementwise, ``|out − ref| <= rtol·|ref| + atol·S``, where S is one of

- ``scale="rms"`` (the default): max(rms(ref), floor). With ``rtol = atol = tol``: relative, with an absolute floor
  at the tensor's own size, so sums that cancel are judged against the size of their terms. ``error`` reports the
  worst |out − ref| / (|ref| + rms(ref)), the smallest such tol that passes.
- ``scale="max"``: max(max |ref|, floor). With ``rtol=0``: an error budget relative to the largest value.
- ``scale="one"``: 1, so that rtol and atol are ``torch.isclose``'s.

S is taken over the reference's finite elements; everything is computed in float64 on the CPU. An element equal to
the reference passes (±inf included); a NaN passes only with ``equal_nan`` where the reference holds one; any other
non-finite value on either side fails (kernel outputs start NaN-filled in the tests, so an unwritten element fails).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    import numpy as np

Scale = Literal["rms", "max", "one"]

# CUDA (real Triton) where there is one; else the CPU, where the kernels run under TRITON_INTERPRET=1
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"


def _float64(x) -> Tensor:
    """A tensor or an array (numpy's: the densecrf oracles) as a float64 CPU tensor."""
    return torch.as_tensor(x).detach().to("cpu", torch.float64)


def _scale(ref: Tensor, scale: Scale, floor: float) -> float:
    if scale == "one":
        return 1.0
    finite = ref[torch.isfinite(ref)].abs()
    if scale == "rms":
        s = float(finite.pow(2).mean().sqrt()) if finite.numel() else 0.0
    elif scale == "max":
        s = float(finite.max()) if finite.numel() else 0.0
    else:
        raise ValueError(f"scale must be 'rms', 'max' or 'one', got {scale!r}")
    return max(s, floor)


def _mismatch(out: Tensor, ref: Tensor, equal_nan: bool) -> Tensor:
    """Elements that differ at all: equal values (±inf too) and, with ``equal_nan``, NaN against NaN do not."""
    same = out == ref
    if equal_nan:
        same |= out.isnan() & ref.isnan()
    return ~same


def error(out: Tensor, ref: Tensor) -> float:
    """Worst |out − ref| / (|ref| + rms(ref)) (0 for empty tensors; inf where a non-finite value differs; NaN
    against NaN is no error): the smallest ``tol`` with which ``assert_close(out, ref, tol, equal_nan=True)``
    passes."""
    out, ref = _float64(out), _float64(ref)
    if out.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(out.shape)} vs reference {tuple(ref.shape)}")
    err = (out - ref).abs() / (ref.abs() + max(_scale(ref, "rms", 0.0), 1e-30))
    err = torch.where(_mismatch(out, ref, equal_nan=True), err.nan_to_num(math.inf, math.inf), 0.0)
    return float(err.max()) if err.numel() else 0.0


def assert_close(out: Tensor, ref: Tensor, tol: float = 0.0, what: str = "output", *, rtol: float | None = None,
                 atol: float | None = None, scale: Scale = "rms", floor: float = 0.0, equal_nan: bool = False,
                 where: Tensor | None = None) -> None:
    """Raise unless |out − ref| <= rtol·|ref| + atol·S at every element (of ``where``, a bool mask, if given).

    ``rtol`` and ``atol`` default to ``tol``; S is set by ``scale`` and ``floor`` (see the module's docstring).
    The message names the count of failing elements, the worst index, ref and out there.
    """
    rtol = tol if rtol is None else rtol
    atol = tol if atol is None else atol
    out, ref = _float64(out), _float64(ref)
    if out.shape != ref.shape:
        raise AssertionError(f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    s = _scale(ref, scale, floor)
    excess = (out - ref).abs() - (rtol * ref.abs() + atol * s)  # > 0: beyond the tolerance; NaN: non-finite
    excess = torch.where(_mismatch(out, ref, equal_nan), excess.nan_to_num(math.inf, math.inf), 0.0)
    checked = torch.ones_like(excess, dtype=torch.bool) if where is None else torch.as_tensor(where).cpu()
    checked = checked.expand(excess.shape)
    bad = checked & (excess > 0)
    if bad.any():
        excess = excess.masked_fill(~checked, -math.inf)
        worst = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape)) if excess.ndim else ()
        bound = f"{rtol:g}·|ref| + {atol:g}" + ("" if scale == "one" else f"·{s:.4g} ({scale}, floor {floor:g})")
        raise AssertionError(f"{what}: {int(bad.sum())} of {int(checked.sum())} elements beyond |out − ref| <= "
                             f"{bound}; worst at {worst}: ref {ref[worst].item():.8g}, out {out[worst].item():.8g}")


def natural_image(height: int, width: int, seed: int) -> np.ndarray:
    """A synthetic photograph, uint8 [H, W, 3] (densecrf's layout): smooth colour waves, a few flat discs, mild noise.
    Its lattice is as large as a real image's (a noise image's is far larger, a flat one's far smaller)."""
    import numpy as np

    r = np.random.RandomState(seed)
    yy, xx = np.mgrid[:height, :width] / max(height, width)
    img = np.zeros((height, width, 3))
    for c in range(3):
        img[..., c] = 128 + 60 * np.sin(2 * np.pi * (xx * r.uniform(0.5, 2) + yy * r.uniform(0.5, 2)) + r.uniform(0, 6))
    for _ in range(4):
        cy, cx, rad = r.uniform(0.2, 0.8), r.uniform(0.2, 0.8), r.uniform(0.08, 0.2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < rad**2] = r.uniform(0, 255, 3)
    return np.clip(img + r.randn(height, width, 3) * 3, 0, 255).round().astype(np.uint8)

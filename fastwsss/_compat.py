"""Make ``import timm`` work on CPU-only torch.

The registry's torchvision wheels are CUDA builds. On a CPU build of torch their compiled
library cannot load, and torchvision's import then fails while registering fake kernels for
``torchvision::nms`` / ``qnms`` ("operator torchvision::nms does not exist"). timm imports
torchvision eagerly, so timm fails too. We declare the two schemas ourselves and import again:
the pure-Python parts (transforms, timm) work; compiled ops (nms, image decoding) still raise.
Inert wherever torchvision imports normally.
"""

from __future__ import annotations

import sys

import torch

_LIB: torch.library.Library | None = None  # keep the schema definitions alive


def ensure_torchvision() -> None:
    global _LIB
    try:
        import torchvision

        return
    except RuntimeError as err:
        if "torchvision::nms" not in str(err) or _LIB is not None:
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _LIB = torch.library.Library("torchvision", "FRAGMENT")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define(
        "qnms(Tensor qdets, Tensor qscores, float iou_threshold, float scale, int zero_point) -> Tensor"
    )
    import torchvision  # noqa: F401

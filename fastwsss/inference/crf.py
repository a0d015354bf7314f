"""Dense CRF post-processing (docs/methods/toco-mcc.md §10): two implementations of Krähenbühl's fully connected CRF behind one function.

- ``impl="pydensecrf"``: the CPU reference, ``pydensecrf2`` (the C++ densecrf); parallel over images through a
  process pool (:class:`CRFRunner`).
- ``impl="lattice"``: the same mean field in PyTorch on ``fastwsss.kernels.PermutohedralLattice`` (the same lattice
  as densecrf's), batched over images of one size, on CPU or CUDA (:func:`dense_crf_torch`).

The mean field is densecrf's ``DenseCRF::inference`` as pydensecrf calls it (``densecrf/src/densecrf.cpp``,
``pairwise.cpp``, ``labelcompatibility.cpp``)::

    U = -log(clip(p, 1e-5, 1))                      # pydensecrf.utils.unary_from_softmax
    Q = softmax(-U)
    repeat n:  Q = softmax(-U + sum_k w_k * n_k * K_k(n_k * Q))

with Potts compatibility (``PottsCompatibility::apply`` is ``-w Q``, subtracted), ``K_k`` the lattice filter
(self included: densecrf subtracts no self-contribution), and NORMALIZE_SYMMETRIC, the default of pydensecrf's
``addPairwiseGaussian`` / ``addPairwiseBilateral``: ``n_k = 1 / sqrt(K_k(1) + 1e-20)``. Kernels: Gaussian on
(x/sxy, y/sxy), bilateral on (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb), x = column, y = row.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Hashable
from concurrent import futures
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..kernels import PermutohedralLattice, bilateral_features, position_features

if TYPE_CHECKING:
    from typing_extensions import Self

CRF_IMPLS = ("pydensecrf", "lattice")


@dataclass(frozen=True)
class CRFParams:
    """docs/methods/toco-mcc.md §10 defaults (the reference's ``DenseCRF(iter_max=10, pos_w=1, pos_xy_std=1, bi_w=4, bi_xy_std=121,
    bi_rgb_std=5)``)."""

    iterations: int = 10
    gauss_sxy: float = 1.0
    gauss_compat: float = 1.0
    bi_sxy: float = 121.0
    bi_srgb: float = 5.0
    bi_compat: float = 4.0
    clip: float = 1e-5  # pydensecrf.utils.unary_from_softmax clips probabilities before the log


def _check_inputs(image: np.ndarray | torch.Tensor, probs: np.ndarray | torch.Tensor) -> None:
    """One image uint8 [H, W, 3] and its probabilities [C, H, W] (numpy arrays or tensors)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype not in (np.uint8, torch.uint8):
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {tuple(image.shape)}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs must be [C, H, W] with (H, W) = {image.shape[:2]}, got {tuple(probs.shape)}")


def dense_crf_pydensecrf(image: np.ndarray, probs: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """The reference: image uint8 [H, W, 3], probs [C, H, W] -> marginals Q float32 [C, H, W] (pydensecrf2)."""
    dcrf = _pydensecrf()
    _check_inputs(image, probs)
    C, H, W = probs.shape
    crf = dcrf.DenseCRF2D(W, H, C)
    unary = -np.log(np.clip(probs.astype(np.float32, copy=False), params.clip, 1.0)).reshape(C, -1)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    rgb = np.require(image, requirements=["C", "W"])  # pydensecrf needs a writable buffer
    crf.addPairwiseBilateral(sxy=params.bi_sxy, srgb=params.bi_srgb, rgbim=rgb,
                             compat=params.bi_compat)
    return np.array(crf.inference(params.iterations), dtype=np.float32).reshape(C, H, W)


@torch.no_grad()
def dense_crf_torch(images: torch.Tensor, probs: torch.Tensor, params: CRFParams = CRFParams(),
                    backend: str = "auto") -> torch.Tensor:
    """Our mean field on the permutohedral lattice, batched: images [B, 3, H, W] (uint8, or float holding uint8
    values) and probs [B, C, H, W] on one device (CPU or CUDA) -> marginals Q float32 [B, C, H, W].

    ``backend`` is the lattice's ("auto" | "torch" | "triton"). One lattice per kernel serves every iteration.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    if probs.dim() != 4 or probs.shape[0] != images.shape[0] or probs.shape[2:] != images.shape[2:]:
        raise ValueError(f"probs must be [B, C, H, W] matching images {tuple(images.shape)}, got {tuple(probs.shape)}")
    if probs.device != images.device:
        raise ValueError(f"probs are on {probs.device}, images on {images.device}")
    B, _, H, W = probs.shape
    unary = -probs.to(torch.float32).clamp(params.clip, 1.0).log()
    gauss = position_features(B, H, W, params.gauss_sxy, images.device)  # densecrf's two kernels' features
    bilateral = bilateral_features(images, params.bi_srgb, params.bi_sxy)
    kernels = []
    for feats, compat in ((gauss, params.gauss_compat), (bilateral, params.bi_compat)):
        lat = PermutohedralLattice(feats, backend=backend)
        ones = probs.new_ones(B, 1, H, W, dtype=torch.float32)
        norm = (lat.filter(ones) + 1e-20).rsqrt()  # NORMALIZE_SYMMETRIC
        kernels.append((lat, norm, compat))
    q = (-unary).softmax(dim=1)
    for _ in range(params.iterations):
        energy = -unary
        for lat, norm, compat in kernels:
            energy = energy + compat * norm * lat.filter(norm * q)
        q = energy.softmax(dim=1)
    return q


def _pydensecrf():
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as err:
        raise ImportError("impl='pydensecrf' needs pydensecrf2: pip install 'fastwsss[crf]' (or use impl 'lattice', "
                          "ours)") from err
    return dcrf


def require_crf_impl(impl: str) -> None:
    """Fail now, with the reason, where ``impl`` is unknown or cannot run here (pydensecrf not installed)."""
    if impl not in CRF_IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {CRF_IMPLS}")
    if impl == "pydensecrf":
        _pydensecrf()


def dense_crf(image: np.ndarray | torch.Tensor, probs: np.ndarray | torch.Tensor, params: CRFParams = CRFParams(), *,
              impl: str = "lattice", device: str | torch.device | None = None, backend: str = "auto") -> np.ndarray:
    """One image: uint8 [H, W, 3] and probabilities [C, H, W] -> marginals float32 [C, H, W] (labels: argmax(0)).

    ``impl``: "pydensecrf" (the C++ reference) or "lattice" (ours, on ``device``: default the probs' device)."""
    require_crf_impl(impl)
    if impl == "pydensecrf":
        image = image.cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
        probs = probs.float().cpu().numpy() if torch.is_tensor(probs) else np.asarray(probs, dtype=np.float32)
        return dense_crf_pydensecrf(image, probs, params)
    p = probs if torch.is_tensor(probs) else torch.from_numpy(np.asarray(probs, dtype=np.float32))
    device = torch.device(device) if device is not None else p.device
    im = image if torch.is_tensor(image) else torch.from_numpy(np.ascontiguousarray(image))
    _check_inputs(im, p)
    q = dense_crf_torch(im.to(device).permute(2, 0, 1)[None], p.to(device)[None], params, backend)
    return q[0].cpu().numpy()


def _labels(q: np.ndarray) -> np.ndarray:
    return q.argmax(0).astype(np.uint8 if q.shape[0] <= 256 else np.int32)


def _pydensecrf_labels(image: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    return _labels(dense_crf_pydensecrf(image, probs, params))


def _pool_context():
    # fork: workers start at once and only run numpy + the C++ CRF (no torch / OpenMP in the child)
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


class CRFRunner:
    """Dense CRF over a stream of images, giving class labels: ``submit(tag, image, probs)`` hands one image in and
    returns the ``(tag, labels)`` pairs finished so far; ``finish()`` returns the rest. Results may come back in any
    order; ``labels`` is uint8 [H, W] (int32 above 256 classes).

    ``impl="pydensecrf"`` runs a process pool of ``workers`` (0 = one per CPU core) with at most 2 x workers images
    in flight, so memory stays bounded on any split size. ``impl="lattice"`` runs in this process on ``device``,
    batching up to ``batch_size`` consecutive images of one size.
    """

    def __init__(self, params: CRFParams = CRFParams(), impl: str = "pydensecrf", *, workers: int = 0,
                 device: str | torch.device = "cpu", batch_size: int = 1, backend: str = "auto"):
        require_crf_impl(impl)  # pydensecrf: fail here, not inside a worker
        self.params, self.impl, self.backend = params, impl, backend
        self.device, self.batch_size = torch.device(device), max(1, batch_size)
        self.workers = workers if workers > 0 else (os.cpu_count() or 1)
        self._pool: futures.ProcessPoolExecutor | None = None
        self._pending: dict[futures.Future, Hashable] = {}
        self._buffer: list[tuple[Hashable, torch.Tensor, torch.Tensor]] = []
        if impl == "pydensecrf":
            self._pool = futures.ProcessPoolExecutor(self.workers, mp_context=_pool_context())

    def submit(self, tag: Hashable, image: np.ndarray | torch.Tensor, probs: np.ndarray | torch.Tensor
               ) -> list[tuple[Hashable, np.ndarray]]:
        """image uint8 [H, W, 3]; probs [C, H, W] (already at the image size)."""
        if self.impl == "pydensecrf":
            image = image.cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
            probs = probs.float().cpu().numpy() if torch.is_tensor(probs) else np.asarray(probs, dtype=np.float32)
            _check_inputs(image, probs)
            self._pending[self._pool.submit(_pydensecrf_labels, image, probs, self.params)] = tag
            return self._collect(block=len(self._pending) >= 2 * self.workers)
        im = image if torch.is_tensor(image) else torch.from_numpy(np.ascontiguousarray(image))
        p = probs if torch.is_tensor(probs) else torch.from_numpy(np.asarray(probs, dtype=np.float32))
        _check_inputs(im, p)
        done = []
        if self._buffer and self._buffer[0][1].shape != im.shape:
            done = self._flush()
        self._buffer.append((tag, im.to(self.device), p.to(self.device, torch.float32)))
        if len(self._buffer) >= self.batch_size:
            done += self._flush()
        return done

    def finish(self) -> list[tuple[Hashable, np.ndarray]]:
        """Wait for every image still in flight."""
        if self.impl == "pydensecrf":
            return self._collect(block=True, everything=True)
        return self._flush()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _collect(self, block: bool, everything: bool = False) -> list[tuple[Hashable, np.ndarray]]:
        if not self._pending:
            return []
        if block:
            done, _ = futures.wait(self._pending, return_when=futures.ALL_COMPLETED if everything
                                   else futures.FIRST_COMPLETED)
        else:
            done = [f for f in self._pending if f.done()]
        return [(self._pending.pop(f), f.result()) for f in done]

    def _flush(self) -> list[tuple[Hashable, np.ndarray]]:
        if not self._buffer:
            return []
        tags = [t for t, _, _ in self._buffer]
        images = torch.stack([im.permute(2, 0, 1) for _, im, _ in self._buffer])
        probs = torch.stack([p for _, _, p in self._buffer])
        self._buffer = []
        q = dense_crf_torch(images, probs, self.params, self.backend)
        labels = q.argmax(1).to(torch.uint8 if q.shape[1] <= 256 else torch.int32).cpu().numpy()
        return list(zip(tags, labels))

"""Public entry points of the permutohedral-lattice bilateral filter, dispatched through ``kernels._backend``."""

from __future__ import annotations

import torch

from .._backend import TRITON_DTYPES, check_devices, device_reasons, resolve_backend
from .reference import PermutohedralLattice as ReferenceLattice
from .reference import check_values

__all__ = ["PermutohedralLattice", "permutohedral_filter", "permutohedral_reasons"]

_MAX_FEATURES = 14  # = _triton.MAX_FEATURES (not imported: importing _triton imports triton)


def _feature_count_reasons(features: torch.Tensor) -> list[str]:
    if features.shape[1] <= _MAX_FEATURES:
        return []
    return [f"{features.shape[1]} feature channels (the Triton lattice takes at most {_MAX_FEATURES})"]


def permutohedral_reasons(features: torch.Tensor, *, values: torch.Tensor | None = None) -> list[str]:
    """Why the Triton lattice (``PermutohedralLattice``, ``permutohedral_filter``) cannot be built on these features,
    or, given ``values``, filter them ([] = it can). ``values`` is keyword-only: ``permutohedral_filter`` takes
    (values, features), the lattice (features) then values, and a swapped pair would be judged without an error."""
    if values is None:
        return device_reasons(features) + _feature_count_reasons(features)
    return device_reasons(features, values) + _feature_count_reasons(features) + _value_reasons(values)


def _value_reasons(values: torch.Tensor) -> list[str]:
    if values.dtype in TRITON_DTYPES:
        return []
    return [f"values are {values.dtype} (the Triton lattice filters float16, bfloat16 and float32 in float32)"]


@torch.library.custom_op("fastwsss::lattice_filter", mutates_args=())
def _lattice_filter(values: torch.Tensor, offsets: torch.Tensor, bary: torch.Tensor, neighbors: torch.Tensor,
                    splat_pix: torch.Tensor, splat_w: torch.Tensor, splat_ptrs: list[torch.Tensor],
                    reverse: bool) -> torch.Tensor:
    from ._triton import lattice_filter

    return lattice_filter(values, offsets, bary, neighbors, splat_pix, splat_w, splat_ptrs, reverse)


@_lattice_filter.register_fake
def _(values, offsets, bary, neighbors, splat_pix, splat_w, splat_ptrs, reverse):
    return values.new_empty(values.shape)


def _setup_context(ctx, inputs, output):
    ctx.lattice, ctx.reverse = inputs[1:7], inputs[7]


def _backward(ctx, grad):
    # the filter is linear with transpose = the same filter, blur axes reversed (README.md)
    grad_values = _lattice_filter(grad, *ctx.lattice, not ctx.reverse)
    return grad_values, None, None, None, None, None, [None] * len(ctx.lattice[5]), None


_lattice_filter.register_autograd(_backward, setup_context=_setup_context)


class PermutohedralLattice:
    """One permutohedral lattice per image of a batch, built once and reused for many filters (the regularisation
    loss filters its channels and, with the exact gradient, the reverse; a dense CRF filters 10 times).

    ``features`` [B, F, H, W], already divided by their sigmas (densecrf's bilateral kernel: x/sxy, y/sxy, r/srgb,
    g/srgb, b/srgb). ``backend``: "auto" (Triton where ``kernels._backend`` allows, else the PyTorch reference),
    "triton" (raises with every reason it cannot) or "torch". ``densecrf_padding``: see the reference class.

    ``filter(values, reverse=False)`` [B, C, H, W] -> [B, C, H, W] in values.dtype, differentiable w.r.t. values.
    On a Triton lattice, float64 values go through the same lattice as float64 sparse products (with "auto"; an
    explicit "triton" raises).
    """

    def __init__(self, features: torch.Tensor, densecrf_padding: bool = True, backend: str = "auto"):
        if features.dim() != 4:
            raise ValueError(f"features must be [B, F, H, W], got shape {tuple(features.shape)}")
        if features.shape[1] < 1:
            raise ValueError("features need at least one channel")
        self.requested_backend = backend
        self.backend = resolve_backend(backend, "PermutohedralLattice", permutohedral_reasons(features), features)
        if self.backend == "triton":
            from ._triton import TritonLattice

            self._impl = TritonLattice(features, densecrf_padding)
        else:
            self._impl = ReferenceLattice(features, densecrf_padding)
        impl = self._impl
        self.batch, self.d, self.height, self.width = impl.batch, impl.d, impl.height, impl.width
        self.num_pixels, self.num_vertices, self.device = impl.num_pixels, impl.num_vertices, impl.device

    def filter(self, values: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """[B, C, H, W] -> [B, C, H, W]: splat, blur along the d+1 lattice axes (reverse: the opposite order, the
        transpose of the forward filter), slice, times alpha = 1/(1+2^-d)."""
        B, H, W = self.batch, self.height, self.width
        check_values(values, B, H, W, self.device)
        if self.backend == "torch":
            return self._impl.filter(values, reverse)
        reasons = _value_reasons(values)
        if resolve_backend(self.requested_backend, "PermutohedralLattice.filter", reasons, values) == "torch":
            return self._impl.reference().filter(values, reverse)
        return _lattice_filter(values, *self._impl.tensors, reverse)


def permutohedral_filter(values: torch.Tensor, features: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Krähenbühl's permutohedral approximation of ``out_i = sum_j exp(-||f_i - f_j||^2 / 2) v_j`` per image.

    ``values`` [B, C, H, W] (any float dtype; returned in it), ``features`` [B, F, H, W] already divided by their
    sigmas. Self included, no normalisation; the lattice's output is ~0.5-0.6x the exact Gaussian sum (README.md).
    Builds a lattice and filters once: to filter many times with the same features, build a
    ``PermutohedralLattice`` and call its ``filter``. Differentiable w.r.t. ``values`` (the features get no
    gradient).

    ``backend``: "auto" (Triton where possible, else the PyTorch reference), "torch", or "triton" (raises with
    every reason it cannot take the inputs).
    """
    if values.dim() != 4 or features.dim() != 4:
        raise ValueError(f"values and features must be 4-d, got {tuple(values.shape)} and {tuple(features.shape)}")
    if errors := check_devices(values=values, features=features):
        raise ValueError("permutohedral_filter: " + "; ".join(errors))
    backend = resolve_backend(backend, "permutohedral_filter", permutohedral_reasons(features, values=values), features,
                              values)
    return PermutohedralLattice(features, backend=backend).filter(values)

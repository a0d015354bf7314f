"""Public entry point of the permutohedral-lattice bilateral filter, dispatched through ``kernels._backend``."""

from __future__ import annotations

import torch

from .._backend import resolve_backend
from .reference import PermutohedralLattice

__all__ = ["PermutohedralLattice", "permutohedral_filter"]

_NO_TRITON = ["no Triton kernel for permutohedral_filter yet"]


def permutohedral_filter(values: torch.Tensor, features: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Krähenbühl's permutohedral approximation of ``out_i = sum_j exp(-||f_i - f_j||^2 / 2) v_j`` per image.

    ``values`` [B, C, H, W] (any float dtype; returned in it), ``features`` [B, F, H, W] already divided by their
    sigmas. Self included, no normalisation; the lattice's output is ~0.5-0.6x the exact Gaussian sum (README.md).
    Builds a lattice and filters once: to filter many times with the same features, build a
    ``PermutohedralLattice`` and call its ``filter``.

    ``backend``: "auto" (the PyTorch reference: there is no Triton kernel yet), "torch", or "triton" (raises).
    """
    resolve_backend(backend, "permutohedral_filter", list(_NO_TRITON))
    return PermutohedralLattice(features).filter(values)

"""Public token affinity loss: validate, pick the backend, run."""

from __future__ import annotations

import torch
from torch import Tensor

from .._backend import resolve_backend
from .reference import token_affinity_loss_reference


def token_affinity_loss(feats: Tensor, labels: Tensor, absolute: bool = True, ignore_index: int = 255,
                        backend: str = "auto") -> Tensor:
    """Token affinity loss (ToCo PTC / MCC aff) over the token pairs of each image.

    feats [B, N, D] (any float dtype), labels [B, N] int (ignore_index = no pair) -> scalar in the feats' dtype:
    L = 0.5·(1 − Σ_P s / (|P| + 1)) + 0.5·Σ_Nn s / (|Nn| + 1), s_ij = |cos(x_i, x_j)| (plain cosine if not
    `absolute`); P / Nn = ordered same- / different-label pairs i ≠ j of the same image, counted over the batch.
    """
    op = "token_affinity_loss"
    if feats.ndim != 3:
        raise ValueError(f"{op}: feats must be [B, N, D], got shape {tuple(feats.shape)}")
    if not feats.is_floating_point():
        raise TypeError(f"{op}: feats must be floating point, got {feats.dtype}")
    if labels.shape != feats.shape[:2]:
        raise ValueError(f"{op}: labels must be [B, N] = {tuple(feats.shape[:2])}, got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{op}: labels must be an integer tensor, got {labels.dtype}")
    resolve_backend(backend, op, [f"no Triton kernel for {op} yet"])
    return token_affinity_loss_reference(feats, labels, absolute, ignore_index)

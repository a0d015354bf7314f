"""The lattice features of densecrf's two pairwise kernels, as float32 divisions in its order
(``DenseCRF2D::addPairwiseGaussian`` / ``addPairwiseBilateral``): pixel position, and position + colour."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["bilateral_features", "position_features"]


def position_features(batch: int, height: int, width: int, sigma_xy: float,
                      device: torch.device | str | None = None) -> Tensor:
    """[B, 2, H, W] float32 (x/σ_xy, y/σ_xy), x the column: densecrf's Gaussian (smoothness) kernel."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=device),
                            torch.arange(width, dtype=torch.float32, device=device), indexing="ij")
    return torch.stack([xs, ys]).expand(batch, 2, height, width) / torch.tensor(sigma_xy, dtype=torch.float32)


def bilateral_features(images: Tensor, sigma_rgb: float, sigma_xy: float) -> Tensor:
    """images [B, 3, H, W] holding 0..255 values (uint8, or any float dtype; converted to float32 first) ->
    [B, 5, H, W] float32 (x/σ_xy, y/σ_xy, r/σ_rgb, g/σ_rgb, b/σ_rgb), x the column: densecrf's bilateral
    (appearance) kernel, in its order (the lattice is not symmetric in its feature order)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    B, _, H, W = images.shape
    rgb = images.to(torch.float32) / torch.tensor(sigma_rgb, dtype=torch.float32)
    return torch.cat([position_features(B, H, W, sigma_xy, images.device), rgb], dim=1)

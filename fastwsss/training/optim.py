"""The optimiser and its schedule (docs/methods/toco-mcc.md §9): AdamW over the method's parameter groups (by default the encoder and
the heads), linear warm-up then poly decay on the global step."""

from __future__ import annotations

import torch

from ..config import Config
from ..methods import Method
from ..models import WSSSNet


def lr_multiplier(step: int, *, max_iters: int, warmup_iters: int, warmup_ratio: float, power: float) -> float:
    """Linear warm-up from ``warmup_ratio`` to 1 over ``warmup_iters``, then poly decay on the global step."""
    if step < warmup_iters:
        return 1.0 - (1.0 - step / warmup_iters) * (1.0 - warmup_ratio)
    return (1.0 - step / max_iters) ** power


def build_optimizer(model: WSSSNet, method: Method, cfg: Config) -> torch.optim.AdamW:
    """AdamW over ``method.param_groups(model)`` (each group's ``initial_lr`` is scaled by the schedule)."""
    o = cfg.optim
    return torch.optim.AdamW(method.param_groups(model), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             weight_decay=o.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: Config) -> float:
    o = cfg.optim
    mult = lr_multiplier(step, max_iters=cfg.train.max_iters, warmup_iters=o.warmup_iters,
                         warmup_ratio=o.warmup_ratio, power=o.power)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * mult
    return optimizer.param_groups[0]["lr"]

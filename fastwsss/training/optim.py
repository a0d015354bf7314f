"""The optimiser and its schedule (SPEC §9): AdamW with the encoder and the heads in two groups, linear warm-up
then poly decay on the global step."""

from __future__ import annotations

import torch

from ..config import Config
from ..models import WSSSNet


def lr_multiplier(step: int, *, max_iters: int, warmup_iters: int, warmup_ratio: float, power: float) -> float:
    """Linear warm-up from ``warmup_ratio`` to 1 over ``warmup_iters``, then poly decay on the global step."""
    if step < warmup_iters:
        return 1.0 - (1.0 - step / warmup_iters) * (1.0 - warmup_ratio)
    return (1.0 - step / max_iters) ** power


def build_optimizer(model: WSSSNet, cfg: Config) -> torch.optim.AdamW:
    """AdamW, two groups: encoder at ``optim.lr``, heads at ``optim.lr * optim.head_lr_mult``."""
    o = cfg.optim
    heads = [p for m in model.head_modules() for p in m.parameters() if p.requires_grad]
    encoder = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [{"params": encoder, "initial_lr": o.lr}, {"params": heads, "initial_lr": o.lr * o.head_lr_mult}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: Config) -> float:
    o = cfg.optim
    mult = lr_multiplier(step, max_iters=cfg.train.max_iters, warmup_iters=o.warmup_iters,
                         warmup_ratio=o.warmup_ratio, power=o.power)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * mult
    return optimizer.param_groups[0]["lr"]

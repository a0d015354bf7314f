"""One optimizer step's forwards and backwards over its micro-batches, for any method (``fastwsss.methods``), and the
module DistributedDataParallel wraps. No host sync: what the loop must decide on comes back as tensors."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..methods import Iteration, Method, Term
from ..models import WSSSNet
from ..runtime import ONE_PROCESS, Dist, all_reduce_sum


def reduce_counts(counts: dict[str, torch.Tensor], dist: Dist) -> dict[str, torch.Tensor]:
    """Named denominators summed over the processes (one all-reduce; names in one order on every process)."""
    names = sorted(counts)
    total = all_reduce_sum(torch.stack([counts[k] for k in names]), dist)
    return dict(zip(names, total.unbind()))


class StepModule(nn.Module):
    """One part of a step's batch -> its loss terms: the module DistributedDataParallel wraps. Every trainable
    parameter of the model takes part in every call (the methods' ``terms``), so DDP runs without
    find_unused_parameters."""

    def __init__(self, method: Method, model: WSSSNet, dist: Dist = ONE_PROCESS, parts: int = 1):
        """``parts``: into how many parts each step's batch is split (processes x micro-batches)."""
        super().__init__()
        self.method, self.model, self.dist, self.parts = method, model, dist, parts

    @torch.no_grad()
    def targets(self, batch: dict, it: Iteration, out: Any = None) -> tuple[Any, dict[str, torch.Tensor]]:
        """The one place a part's targets are made: its targets and its share of the step's denominators. ``out``:
        the part's own forward, when the targets can reuse it."""
        targets = self.method.targets(self.model, batch, it, out)
        return targets, self.method.counts(targets, batch)

    def forward(self, batch: dict, it: Iteration, targets: Any = None, norm: dict[str, torch.Tensor] | None = None
                ) -> dict[str, Term]:
        """Without ``norm`` (one part per process and step) the targets are made from this forward's outputs and the
        denominators summed over the processes here; with it, ``targets`` were made beforehand and ``norm`` is the
        whole step's denominators."""
        out = self.method.forward(self.model, batch, it)
        if norm is None:
            targets, counts = self.targets(batch, it, out)
            norm = reduce_counts(counts, self.dist)
        return self.method.terms(self.model, batch, it, targets, norm, self.parts, out)


def forward_backward(step: StepModule, ddp: DistributedDataParallel | None, parts: list[dict], it: Iteration,
                     scaler: torch.amp.GradScaler, autocast: Callable[[], Any]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, float], torch.Tensor]:
    """Forward and backward of each micro-batch of one step (gradients synchronised at the last one).

    With several micro-batches, every micro-batch's targets are made first: the terms' denominators are the whole
    step's. Returns each term's [unweighted, weighted] value summed over the micro-batches, each term's weight, and
    the number of micro-batches whose loss is not finite (a tensor: no host sync). A non-finite loss is still
    backpropagated: its gradients are not finite either, on every process (DDP averages them), and the step is
    skipped by the caller."""
    K = len(parts)
    targets, norm = [None] * K, None
    if K > 1:
        with autocast():
            made = [step.targets(b, it) for b in parts]
        targets = [t for t, _ in made]
        norm = reduce_counts({k: sum(c[k] for _, c in made) for k in made[0][1]}, step.dist)
    forward = ddp or step
    sums: dict[str, torch.Tensor] = {}
    weights: dict[str, float] = {}
    bad = torch.zeros((), device=parts[0]["img"].device)
    for i, (batch, target) in enumerate(zip(parts, targets)):
        with ddp.no_sync() if ddp is not None and i < K - 1 else nullcontext():
            with autocast():
                terms = forward(batch, it, target, norm)
            loss = sum(t.weighted for t in terms.values())
            bad = bad + (~torch.isfinite(loss.detach())).float()
            scaler.scale(loss * step.dist.world_size).backward()  # DDP averages over the processes: x N sums
        for k, t in terms.items():
            weights[k] = t.weight
            v = torch.stack([t.value.detach().float(), t.weighted.detach().float()])
            sums[k] = sums[k] + v if k in sums else v
    return sums, weights, bad

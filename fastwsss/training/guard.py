"""The step guard: whether a step's update may be applied, decided before the optimizer step and without a copy of
the weights or the optimizer state, so that nothing non-finite ever reaches the weights, the optimizer or a
checkpoint."""

from __future__ import annotations

import math

import torch
from torch import nn


def _max_abs(tensors: list[torch.Tensor]) -> torch.Tensor:
    """0-d: the largest |element| of the tensors (NaN if any is NaN); cannot overflow as a 2-norm can."""
    return torch.stack(torch._foreach_norm([t.detach() for t in tensors], math.inf)).amax()


def adam_step_bound(beta1: float, beta2: float, t: int) -> float:
    """An upper bound of |m̂_t| / sqrt(v̂_t), elementwise, for Adam's bias-corrected moments after t steps, whatever
    the gradients: by Cauchy-Schwarz, |Σ β1^k g_k| <= sqrt(Σ β2^k g_k²) · sqrt(Σ (β1²/β2)^k), so the ratio is at most
    sqrt(Σ_{k<t} β2^k) / Σ_{k<t} β1^k / sqrt(1 - β1²/β2) (needs β1² < β2; ``optim.betas`` is checked for it)."""
    a = (1 - beta1**t) / (1 - beta1)
    b = (1 - beta2**t) / (1 - beta2)
    return math.sqrt(b) / a / math.sqrt(1 - beta1**2 / beta2)


class StepGuard:
    """Before each optimizer step (no host sync; the loop reads the flags with its one sync per step):

    - the gradients must be finite (with fp16 the GradScaler checks them itself and skips such steps);
    - the AdamW update must be unable to overflow a weight. Per parameter group, every weight after the update is at
      most max|w|·|1 - lr·wd| + lr·B in magnitude (decoupled decay, then a step of at most B = ``adam_step_bound``
      per element); the step is refused when that bound is not below half the dtype's largest value. A huge learning
      rate then skips steps instead of writing infinities: the weights and the optimizer state stay as they were.

    A skipped step changes nothing the optimizer holds; what a method moved before the step (an EMA teacher, from
    finite weights) stays moved."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.AdamW, check_grads: bool = True):
        self.model, self.optimizer, self.check_grads = model, optimizer, check_grads

    def grads_bad(self) -> torch.Tensor:
        """0-d bool: some gradient is not finite."""
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not self.check_grads or not grads:
            return torch.zeros((), dtype=torch.bool)
        return ~_max_abs(grads).isfinite()

    def _bounds(self) -> list[tuple[dict, torch.Tensor, float]]:
        """(group, largest |weight|, bound of every weight's magnitude after the update) per group that steps."""
        out = []
        for group in self.optimizer.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, wd = group["lr"], group["weight_decay"]
            state = self.optimizer.state
            steps = {int(state[p]["step"]) if "step" in state[p] else 0 for p in params}
            step_bound = max(adam_step_bound(*group["betas"], t + 1) for t in steps)
            largest = _max_abs(params).float()
            out.append((group, largest, largest * abs(1 - lr * wd) + lr * step_bound))
        return out

    def update_bad(self) -> torch.Tensor:
        """0-d bool: the update could make a weight overflow (or a weight already is not finite)."""
        bad = [~(bound < torch.finfo(g["params"][0].dtype).max / 2) for g, _, bound in self._bounds()]  # NaN too
        return torch.stack(bad).any() if bad else torch.zeros((), dtype=torch.bool)

    def flags(self) -> torch.Tensor:
        """[gradients not finite, update could overflow] as floats (summed over processes by the caller)."""
        grads = self.grads_bad()
        return torch.stack([grads, self.update_bad().to(grads.device)]).float()

    def explain(self, grads_bad: bool) -> str:
        """Why the step was refused, for the log (host syncs: only when a step is skipped)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if grads_bad:
            bad = next((p for p in params if p.grad is not None and not torch.isfinite(p.grad).all()), None)
            return "non-finite gradients" + (f" (first: {names.get(id(bad), '?')})" if bad is not None else "")
        for group, largest, bound in self._bounds():
            if not bound < torch.finfo(group["params"][0].dtype).max / 2:
                return (f"the update could overflow the weights: |weight| up to {float(largest):.3g} now, up to "
                        f"{float(bound):.3g} after a step at lr {group['lr']:.3g} with weight decay "
                        f"{group['weight_decay']:g}")
        return "the update could overflow the weights in another process"

    def check_finite(self) -> str | None:
        """The first parameter that is not finite, or None (one host sync; before a checkpoint is written)."""
        if bool(_max_abs(list(self.model.parameters())).isfinite()):
            return None
        return next(n for n, p in self.model.named_parameters() if not torch.isfinite(p).all())

"""Training: the loop (``train``), the optimiser and its schedule, and what a run logs."""

from .loop import Evaluator, StepGuard, TrainingInterrupted, train
from .optim import build_optimizer, lr_multiplier, set_lr

__all__ = ["Evaluator", "StepGuard", "TrainingInterrupted", "build_optimizer", "lr_multiplier", "set_lr", "train"]

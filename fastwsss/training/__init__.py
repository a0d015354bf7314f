"""Training: the loop (``train``), one step's forwards and backwards (``step``), the step guard, the optimiser and
its schedule, the periodic evaluation, and what a run logs."""

from .evaluator import Evaluator
from .guard import StepGuard
from .loop import NothingToTrain, TrainingInterrupted, train, without_pretrained
from .optim import build_optimizer, lr_multiplier, set_lr
from .step import StepModule, forward_backward

__all__ = ["Evaluator", "NothingToTrain", "StepGuard", "StepModule", "TrainingInterrupted", "build_optimizer", "forward_backward",
           "lr_multiplier", "set_lr", "train", "without_pretrained"]

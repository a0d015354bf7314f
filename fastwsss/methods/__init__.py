"""The methods (SPEC §5-§7): one training step's loss terms (``TrainStep``, ``compute_losses``), the local views that set ToCo and
MCC apart (``LOCAL_VIEWS``) and the loss functions. A third method adds its views function to ``LOCAL_VIEWS``."""

from .losses import contrast_loss, reg_loss, seg_loss
from .step import LOG_NAMES, Term, TrainStep, compute_losses, counts, ema_step, make_targets, term_weights
from .views import LOCAL_VIEWS, mcc_local_views, toco_local_views

__all__ = ["LOCAL_VIEWS", "LOG_NAMES", "Term", "TrainStep", "compute_losses", "contrast_loss", "counts", "ema_step",
           "make_targets", "mcc_local_views", "reg_loss", "seg_loss", "term_weights", "toco_local_views"]

"""Inference and evaluation: from a checkpoint to predictions (``predict``), the dense CRF (``crf``), scores
(``metrics``), whole-split evaluation (``evaluation``) and predictions written for many images (``export``)."""

from .crf import CRFParams, CRFRunner, dense_crf, dense_crf_pydensecrf, dense_crf_torch
from .evaluation import CRF_MODE, EVAL_MODES, evaluate_model, evaluate_predictions
from .metrics import ConfusionMatrix, class_pixel_prior, format_table, results_json, trivial_baselines
from .predict import (
           check_kernel_backend,
           config_from_checkpoint,
           crf_params,
           load_model,
           make_crf_runner,
           multiscale_seg_logits,
)

__all__ = [
           "CRF_MODE",
           "EVAL_MODES",
           "CRFParams",
           "CRFRunner",
           "ConfusionMatrix",
           "check_kernel_backend",
           "class_pixel_prior",
           "config_from_checkpoint",
           "crf_params",
           "dense_crf",
           "dense_crf_pydensecrf",
           "dense_crf_torch",
           "evaluate_model",
           "evaluate_predictions",
           "format_table",
           "load_model",
           "make_crf_runner",
           "multiscale_seg_logits",
           "results_json",
           "trivial_baselines",
]

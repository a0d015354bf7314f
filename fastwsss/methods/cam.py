"""The classification baseline: a ViT trained with the image labels only (classification and auxiliary
classification), evaluated by its CAMs; the decoder is never trained. What every method of the lineage starts
from, and the number its segmentation is compared with."""

from __future__ import annotations

from typing import ClassVar

from ..models import Outputs, WSSSNet
from .base import Iteration, Method, Term
from .common import classification_terms


class CAM(Method):
    name = "cam"
    log_names: ClassVar[dict[str, str]] = {"cls": "cls_loss", "cls_aux": "cls_loss_aux"}
    eval_modes = ("cam", "aux-cam", "pseudo")  # pseudo: the labels a two-stage pipeline would train on
    trains_segmentation = False

    def forward(self, model: WSSSNet, batch: dict, it: Iteration) -> Outputs:
        return model(batch["img"], with_seg=False)

    def terms(self, model: WSSSNet, batch: dict, it: Iteration, targets: None, norm: dict, parts: int,
              out: Outputs) -> dict[str, Term]:
        return classification_terms(model, out, batch["cls_label"], norm["images"], self.cfg.loss.w_cls_aux)

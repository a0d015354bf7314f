"""The periodic evaluation of a training run: the val split scored beside the trivial baselines, a PNG grid saved."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import Config
from ..data import EvalDataset, class_names
from ..inference import CRF_MODE, evaluate_model, format_table, trivial_baselines
from ..inference.crf import require_crf_impl
from ..inference.predict import make_crf_runner, protocol_seg_fn
from ..methods import Method
from ..models import WSSSNet
from ..runtime import ONE_PROCESS, Dist


class Evaluator:
    """Scores a model on the val split in the method's evaluation modes; prints them beside the trivial baselines."""

    def __init__(self, cfg: Config, method: Method, val_items, prior: np.ndarray, run_dir: Path,
                 device: torch.device, autocast: Callable[[], object], min_side: int = 1, dist: Dist = ONE_PROCESS):
        """``min_side``: the smallest image side the model can evaluate (its patch at the smallest CAM scale); every
        val image is checked now, not at the first evaluation. Under torchrun the images are shared out."""
        self.cfg, self.method, self.run_dir, self.device, self.autocast, self.dist = (
            cfg, method, run_dir, device, autocast, dist)
        self.dataset = EvalDataset(val_items, cfg.eval.max_images)
        val_items.check_images(val_items.names[:len(self.dataset)], min_side)
        self.names = class_names(cfg.data)
        self.baselines = trivial_baselines(self.dataset, prior) if dist.main else {}
        self.labeller = method.pseudo_labeller()
        self.final_infer = cfg.eval.final_infer and "seg" in method.eval_modes
        if self.final_infer:  # its CRF runs at the end of training: fail at the start if it cannot
            require_crf_impl(cfg.infer.crf_impl)

    def __call__(self, model: WSSSNet, step: int) -> dict:
        """The method's evaluation modes; at the last step with ``eval.final_infer`` (and a method that trains a
        segmentation) also ``seg-ms`` and ``seg-crf``: the segmentation as ``python -m fastwsss.evaluate --crf``
        scores it (``infer.*``: multi-scale + flip, then the dense CRF)."""
        t0 = time.time()
        c = self.cfg.cam
        predictor = self.method.predictor(model)
        results = evaluate_model(
            predictor, self.dataset, scales=tuple(c.scales), bkg_thresh=c.bkg_thresh,
            modes=self.method.eval_modes, labeller=self.labeller, device=self.device, autocast=self.autocast,
            num_vis=self.cfg.eval.num_vis, vis_path=self.run_dir / "vis" / f"val_{step:06d}.png",
            num_workers=min(self.cfg.data.num_workers, 2), batch_size=self.cfg.eval.batch_size, dist=self.dist)
        if self.final_infer and step == self.cfg.train.max_iters:
            results.update(self.inference_protocol(predictor))
        columns = {**results, **self.baselines}
        if not self.dist.main:
            return {}
        tqdm.write(f"\n[eval @ {step}] {len(self.dataset)} val images, {time.time() - t0:.1f} s; IoU %:\n"
                   + format_table(self.names, columns) + "\n")
        return {"step": step, "num_images": len(self.dataset),
                **{f"{k}_miou": cm.miou() for k, cm in columns.items()},
                "per_class": {k: dict(zip(self.names, np.nan_to_num(cm.iou(), nan=-1).round(4).tolist()))
                              for k, cm in columns.items()}}

    def inference_protocol(self, predictor: torch.nn.Module) -> dict:
        """``seg-ms`` (the segmentation by ``infer.fusion`` / ``infer.scales``) and ``seg-crf`` (that, then the dense
        CRF by ``infer.crf_*``): what ``python -m fastwsss.evaluate --crf`` gives the checkpoint."""
        i = self.cfg.infer
        with make_crf_runner(self.cfg, self.device) as crf:
            results = evaluate_model(
                predictor, self.dataset, scales=tuple(self.cfg.cam.scales), bkg_thresh=self.cfg.cam.bkg_thresh,
                modes=("seg", CRF_MODE), device=self.device, autocast=self.autocast, crf=crf,
                num_workers=min(self.cfg.data.num_workers, 2), batch_size=self.cfg.eval.batch_size, dist=self.dist,
                seg_fn=protocol_seg_fn(predictor, i), mask_absent_classes=i.mask_absent_classes)
        return {"seg-ms": results["seg"], CRF_MODE: results[CRF_MODE]}

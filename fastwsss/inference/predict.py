"""From a checkpoint to predictions: the network of a checkpoint (its method's predictor) with its own config,
multi-scale + flip segmentation logits with the VOC, COCO, CoSA and MoRe fusion rules (docs/methods/toco-mcc.md §10), and the dense-CRF
runner configured by ``infer.*``. Used by ``fastwsss.infer`` and ``fastwsss.evaluate``."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..checkpoint import CheckpointError, load_checkpoint, load_weights
from ..config import Config, ConfigError, InferConfig, ModelConfig, load_config
from ..kernels import device_reasons
from ..methods import build_method
from ..models import LoadReport, WSSSNet, create_vit, load_pretrained
from .crf import CRFParams, CRFRunner

log = logging.getLogger("fastwsss")


class FusionRule(NamedTuple):
    resize_first: bool  # resize the image to a fixed square before the scales (COCO: 448)
    flip: str  # how an image's and its flip's logits are fused: "sum" | "max"
    scales: str  # how the scales are fused: "sum" | "max"
    square: bool = False  # each scale s resizes the image straight to a square int(s * coco_size) (MoRe's VOC tool)


FUSION_RULES = {
    "voc": FusionRule(resize_first=False, flip="sum", scales="max"),
    "coco": FusionRule(resize_first=True, flip="max", scales="sum"),
    "cosa": FusionRule(resize_first=True, flip="sum", scales="sum"),
    "more": FusionRule(resize_first=False, flip="sum", scales="max", square=True),
}


def _fuse(a: torch.Tensor, b: torch.Tensor, how: str) -> torch.Tensor:
    return a + b if how == "sum" else torch.maximum(a, b)


def protocol_seg_fn(model: torch.nn.Module, i: InferConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """Images -> segmentation logits by the test protocol ``i`` names (``infer.fusion`` / ``scales`` /
    ``coco_size``): the ``seg_fn`` of ``python -m fastwsss.evaluate`` and of a run's final ``eval.final_infer``."""
    return lambda x: multiscale_seg_logits(model, x, scales=tuple(i.scales), fusion=i.fusion, coco_size=i.coco_size)


@torch.no_grad()
def multiscale_seg_logits(model: torch.nn.Module, x: torch.Tensor, *, scales: Sequence[float], fusion: str = "voc",
                          coco_size: int = 448) -> torch.Tensor:
    """Normalised images [B, 3, H, W] -> fused segmentation logits [B, C, H, W] (float32, at the image size).

    Per scale s: the image (``coco``: first resized to coco_size x coco_size) is resized to int(s*h) x int(s*w) and
    batched with its horizontal flip; the decoder's logits are resized (bilinear) to (H, W), the flip's are
    un-flipped, and the pair is fused (``voc``: sum, ``coco``: max); the scales are then fused (``voc``: max,
    ``coco``: sum). Scale 1.0 is used as is, without a resize. ``more``: each scale resizes the image to a square
    int(s * coco_size) x int(s * coco_size) (the aspect ratio is not kept, as MoRe's tool does, Q13), scale 1.0 too.
    """
    if fusion not in FUSION_RULES:
        raise ValueError(f"fusion={fusion!r} is not one of {tuple(FUSION_RULES)}")
    if not scales:
        raise ValueError("scales must name at least one scale")
    rule = FUSION_RULES[fusion]
    B, _, H, W = x.shape
    if rule.resize_first:
        x = F.interpolate(x, size=(coco_size, coco_size), mode="bilinear", align_corners=False)
    h, w = x.shape[-2:]
    fused = None
    for s in scales:
        if rule.square:
            xs = F.interpolate(x, size=(int(s * coco_size),) * 2, mode="bilinear", align_corners=False)
        else:
            xs = x if s == 1.0 else F.interpolate(x, size=(int(s * h), int(s * w)), mode="bilinear",
                                                  align_corners=False)
        seg = model(torch.cat([xs, xs.flip(-1)])).seg_logits
        seg = F.interpolate(seg.float(), size=(H, W), mode="bilinear", align_corners=False)
        pair = _fuse(seg[:B], seg[B:].flip(-1), rule.flip)
        fused = pair if fused is None else _fuse(fused, pair, rule.scales)
    return fused


def check_model(model: ModelConfig) -> None:
    """What building the network ``model.*`` needs, checked at start without building it or reading the weights:
    timm knows the backbone and builds it with these sizes (on the meta device: no memory, no download), and
    ``model.pretrained`` names a readable weights file, not a training checkpoint, whose tensors fit the backbone
    (their names and shapes, read without their data)."""
    vit = create_vit(model.backbone, img_size=model.img_size, patch_size=model.patch_size, embed_dim=model.embed_dim,
                     depth=model.depth, num_heads=model.num_heads, device="meta")
    if model.pretrained in ("", "none", "timm"):
        return
    path = Path(model.pretrained)
    try:
        with path.open("rb") as f:
            f.read(1)
    except FileNotFoundError:
        raise FileNotFoundError(f"pretrained weights not found: {path} (model.pretrained)") from None
    except OSError as err:
        raise CheckpointError(f"cannot read pretrained weights {path} (model.pretrained): {err.strerror}") from None
    load_pretrained(vit, path, strict=model.pretrained_strict)  # meta: names and shapes against the backbone


def check_kernel_backend(backend: str, device: torch.device) -> None:
    """``kernels.backend=triton`` where the Triton kernels cannot run is a mistake known at start, not at the first
    kernel call (``auto`` picks what can run)."""
    reasons = device_reasons(torch.empty(0, device=device)) if backend == "triton" else []
    if reasons:
        raise ConfigError(f"kernels.backend=triton cannot run on {device}: {'; '.join(reasons)} (kernels.backend=auto "
                          "takes the kernels where they run and the PyTorch reference elsewhere)")


def check_weights(model: ModelConfig) -> LoadReport:
    """How the file ``model.pretrained`` maps onto the backbone ``model.*`` describes: loaded, missing, unexpected
    and resampled tensors (missing ones are reported, not raised: that is what the report is for)."""
    if model.pretrained in ("", "none", "timm"):
        raise ConfigError(f"--check-weights reads a weights file: model.pretrained={model.pretrained!r} names none")
    vit = create_vit(model.backbone, img_size=model.img_size, patch_size=model.patch_size, embed_dim=model.embed_dim,
                     depth=model.depth, num_heads=model.num_heads, freeze_pos_embed=model.freeze_pos_embed)
    return load_pretrained(vit, model.pretrained, strict=False)


def config_from_checkpoint(state: dict, overrides: Sequence[str] = ()) -> Config:
    """The checkpoint's own config (its YAML text), then ``key=value`` overrides."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(state["config"])
        f.flush()
        try:
            return load_config(f.name, list(overrides))
        except ConfigError as err:
            raise ConfigError(f"config stored in checkpoint {state['path']}: {err}") from None


def load_model(checkpoint: str | Path, overrides: Sequence[str] = (), device: torch.device | str = "cpu"
               ) -> tuple[WSSSNet, Config, int]:
    """Checkpoint file (or run directory) -> (the network its method predicts with, in eval mode on ``device``; its
    config; its iteration).

    The method's whole network is built from the checkpoint's config with no pretrained-weight loading (every
    weight comes from the checkpoint, checked tensor by tensor), then ``method.predictor`` picks what predicts."""
    state = load_checkpoint(checkpoint)
    cfg = config_from_checkpoint(state, overrides)
    cfg.model.pretrained = "none"
    method = build_method(cfg)
    model = method.build_model()
    load_weights(model, state["model"], state["path"])
    if not method.trains_segmentation:
        log.warning("%s was trained with train.method=%s, which never trains the segmentation head: 'seg' "
                    "predictions are meaningless (CAM modes and --pseudo are fine)", state["path"], method.name)
    return method.predictor(model).to(device).eval(), cfg, int(state["iteration"])


def crf_params(cfg: InferConfig) -> CRFParams:
    return CRFParams(iterations=cfg.crf_iterations, gauss_sxy=cfg.crf_gauss_sxy, gauss_compat=cfg.crf_gauss_compat,
                     bi_sxy=cfg.crf_bi_sxy, bi_srgb=cfg.crf_bi_srgb, bi_compat=cfg.crf_bi_compat)


def make_crf_runner(cfg: Config, device: torch.device) -> CRFRunner:
    i = cfg.infer
    return CRFRunner(crf_params(i), i.crf_impl, workers=i.crf_workers, device=device, batch_size=i.crf_batch_size,
                     backend=cfg.kernels.backend)

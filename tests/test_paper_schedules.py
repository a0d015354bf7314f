"""The paper configs' schedules, pinned to the comparisons in the authors' training scripts. Both count iterations as
``for n_iter in range(max_iters)`` (0-based, the first optimizer step is 0) as fastwsss counts ``step``; a weight
kept at 0 ``if n_iter <= K`` is on from ``K + 1``, a CAM used ``if n_iter <= K`` is used at ``K`` too."""

from __future__ import annotations

import pytest
import torch

from fastwsss.config import load_config
from fastwsss.methods import build_method

SIZES = ["model.pretrained=none", "model.backbone=deit_tiny_patch16_224", "model.embed_dim=32", "model.depth=2",
         "model.num_heads=2", "model.aux_layer=-1", "model.decoder_channels=8", "contrast.proj_hidden=16",
         "contrast.proj_bottleneck=8", "contrast.proj_dim=8"]


def method(config: str):
    return build_method(load_config(config, SIZES))


def on(m, step: int) -> set[str]:
    return {k for k, w in m.weights(step).items() if w}


def test_voc_toco():
    # rulixiang/ToCo scripts/dist_train_voc_seg_neg.py, train(): seg and reg weights 0.0 `if n_iter <= 2000`;
    # PTC and CTC weighted in both branches; the segmentation labels always from the final CAM
    m = method("voc_toco")
    assert on(m, 0) == on(m, 2000) == {"aff", "con"}
    assert on(m, 2001) == {"aff", "con", "seg", "reg"}
    assert m.weights(2001) == {"aff": 0.2, "con": 0.5, "seg": 0.1, "reg": 0.05}
    assert m.seg_label_source(0) == m.seg_label_source(19999) == "cam"


def test_voc_mcc():
    # fwu11/MCC scripts/dist_train_voc_seg_neg.py, train(): seg and reg weights 0.0 `if n_iter <= 2000`; the masked
    # views' flags from `cams` `if n_iter > 12000`, else from `cams_aux`; the segmentation labels from the final CAM
    m = method("voc_mcc")
    assert on(m, 2000) == {"aff", "con"} and on(m, 2001) == {"aff", "con", "seg", "reg"}
    assert m.flag_source(12000) == "aux" and m.flag_source(12001) == "cam"
    assert m.seg_label_source(0) == "cam"


def test_coco_toco():
    # rulixiang/ToCo scripts/dist_train_coco_seg_neg.py, train(): every weight but cls / cls_aux 0.0 `if n_iter <=
    # 8000`; PTC and CTC still 0.0 `if n_iter <= 12000`; the segmentation labels refine `valid_cam_aux`
    # `if n_iter <= 12000`, else `valid_cam`; CTCLoss_neg(temp=1.0)
    m = method("coco_toco")
    assert on(m, 0) == on(m, 8000) == set()
    assert on(m, 8001) == on(m, 12000) == {"seg", "reg"}
    assert on(m, 12001) == {"aff", "con", "seg", "reg"}
    assert m.seg_label_source(12000) == "aux" and m.seg_label_source(12001) == "cam"
    assert m.cfg.loss.temperature == 1.0


def test_coco_mcc():
    # fwu11/MCC scripts/dist_train_coco_seg_neg.py, train(): seg and reg weights 0.0 `if n_iter <= 8000`; aff and
    # contrast weighted from iteration 0; the segmentation labels from `valid_cam_aux` `if n_iter <= 12000`; the
    # views' flags always from `cams_aux`
    m = method("coco_mcc")
    assert on(m, 8000) == {"aff", "con"} and on(m, 8001) == {"aff", "con", "seg", "reg"}
    assert m.seg_label_source(12000) == "aux" and m.seg_label_source(12001) == "cam"
    assert m.flag_source(0) == m.flag_source(m.cfg.train.max_iters - 1) == "aux"


def test_voc_more():
    # zwyang6/MoRe scripts/train_voc.py, train(): seg and reg 0.0 `if n_iter <= 2000`; PTC, CLE, UNE weighted in both
    # branches; `mask_cle` / `mask_une` from the aux CAM `if n_iter <= 10000` (a literal; --cam2mask is unused)
    m = method("voc_more")
    assert on(m, 0) == on(m, 2000) == {"aff", "cle", "une"}
    assert m.weights(2001) == {"aff": 0.3, "cle": 0.2, "une": 0.1, "seg": 0.12, "reg": 0.05}
    assert m.token_labels_from_aux(10000) and not m.token_labels_from_aux(10001)
    c = m.cfg.more
    assert (c.w_mct, c.cle_temperature, m.cfg.cam.scales) == (1.0, 0.5, (1.0, 0.5, 0.75, 1.5))


def test_coco_more():
    # zwyang6/MoRe scripts/train_coco.py, train(): everything but cls / cls_aux / the separation term 0.0 `if n_iter
    # <= 8000`; PTC from the `elif n_iter <= 12000` branch; CLE and UNE from the `elif n_iter <= 16000` branch; seg and
    # reg after it; the token labels from the aux CAM `if n_iter <= args.cam2mask` (50000); the log's w_cle 0.05,
    # w_une 0.0; CRELoss_neg(temp=0.1)
    m = method("coco_more")
    assert on(m, 0) == on(m, 8000) == set()
    assert on(m, 8001) == on(m, 12000) == {"aff"}
    assert on(m, 12001) == on(m, 16000) == {"aff", "cle"}
    assert m.weights(16001) == {"aff": 0.3, "cle": 0.05, "une": 0.0, "seg": 0.12, "reg": 0.05}
    assert m.token_labels_from_aux(50000) and not m.token_labels_from_aux(50001)
    assert m.cfg.more.cle_temperature == 0.1 and m.cfg.train.batch_size == 8


@pytest.mark.parametrize("config", ["coco_toco", "voc_mcc"])
def test_the_projector_teacher_follows_while_the_contrast_term_is_off(config):
    """The authors' ``forward_proj`` EMA-updates ``proj_head_t`` on every iteration, also while the contrast weight
    is 0 (ToCo on COCO: up to 12000)."""
    m = method(config)
    step = 0 if config == "coco_toco" else 5
    torch.manual_seed(0)
    model = m.build_model()
    with torch.no_grad():
        for p in model.proj_head.parameters():
            p.add_(1.0)  # the student moved away from its teacher
    before = [t.clone() for t in model.proj_head_t.parameters()]
    assert config != "coco_toco" or not m.weights(step)["con"]
    m.before_step(model, step)
    k = m.cfg.contrast.ema_momentum
    for t, t0, s in zip(model.proj_head_t.parameters(), before, model.proj_head.parameters(), strict=True):
        torch.testing.assert_close(t, k * t0 + (1 - k) * s)

"""Under autocast the CAM / pseudo-label pipeline keeps the authors' fp32 arithmetic: given the same (bf16-rounded)
features, everything cut by a threshold or fed to PAR equals an fp32 run bit for bit."""

import numpy as np
import pytest
import torch

from fastwsss.methods import MCC, ToCo, build_method
from fastwsss.methods.mcc import random_key_masks
from fastwsss.methods.toco import ToCoTargets
from fastwsss.models import network
from fastwsss.pseudo import affinity_label, cam_to_label, multiscale_cams, roi_map


def bf16_features(autocast_dtype: torch.dtype):
    """A forward_features that computes in fp32 whatever the autocast state and rounds its outputs to bf16: the fp32
    and the autocast run see the same feature values, as float32 outside autocast and as ``autocast_dtype`` under it
    (on CUDA the final-norm features come out of autocast in fp32, other backbones may give bf16)."""
    real = network.forward_features

    def patched(backbone, x, aux_layer=-3):
        with torch.autocast("cpu", enabled=False):
            cls, patches, aux, grid = real(backbone, x.float(), aux_layer)
        dtype = autocast_dtype if torch.is_autocast_enabled("cpu") else torch.float32
        return (*(t.to(torch.bfloat16).to(dtype) for t in (cls, patches, aux)), grid)

    return patched


def label_pipeline(model, batch, cfg) -> dict[str, torch.Tensor]:
    """What one training step derives from the CAMs, as the step computes it (the methods' targets and views)."""
    x, cls_label, img_box = batch["img"], batch["cls_label"], batch["img_box"]
    c = cfg.cam
    out = model(x)
    cams, cams_aux = multiscale_cams(model, x, tuple(c.scales), outputs=out)
    targets = ToCoTargets(cams=cams, cams_aux=cams_aux)
    _, toco_flags = ToCo(cfg).local_views(model, batch, targets, 0)
    _, mcc_flags = MCC(cfg).local_views(model, batch, targets, 0)
    return {
        "cams": cams, "cams_aux": cams_aux,
        "cam_label": cam_to_label(cams, cls_label, bkg_thresh=c.bkg_thresh),
        "seg_label": build_method(cfg).pseudo_labeller()(cams, cls_label, x, img_box),
        "aff_label": affinity_label(cams_aux, cls_label, img_box, out.feat.shape[-2:], high_thresh=c.high_thresh,
                                    low_thresh=c.low_thresh),
        "roi": roi_map(cams_aux, cls_label, c.low_thresh, c.high_thresh),
        "toco_flags": toco_flags, "mcc_flags": mcc_flags,
    }


@pytest.mark.parametrize("feature_dtype", [torch.bfloat16, torch.float32], ids=["bf16-features", "fp32-features"])
def test_label_pipeline_is_fp32_under_autocast(tiny_config, monkeypatch, feature_dtype):
    cfg = tiny_config("toco.crop_size=8", "contrast.num_local=3", "cam.high_thresh=0.55",
                      "cam.low_thresh=0.3", "cam.bkg_thresh=0.45", "contrast.neg_thresh=0.9", "cam.par_dilations=[1,2]", "cam.par_num_iter=3")
    torch.manual_seed(0)
    model = build_method(cfg).build_model().train()
    monkeypatch.setattr(network, "forward_features", bf16_features(feature_dtype))
    g = torch.Generator().manual_seed(1)
    B, S = 3, cfg.data.crop_size
    grid = S // cfg.model.patch_size
    batch = {
        "img": torch.randn(B, 3, S, S, generator=g), "local": torch.randn(B, 3, S, S, generator=g),
        "cls_label": torch.tensor([[1.0, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 1]]),
        "img_box": torch.tensor([[0, S, 0, S], [2, S - 3, 0, S], [0, S, 5, S - 1]]),
        "position": torch.arange(B),
        "key_keep": torch.from_numpy(random_key_masks(np.random.default_rng(0), B * 3, (grid, grid), 0.5, 1)
                                     ).view(B, 3, -1),
    }
    with torch.no_grad():
        ref = label_pipeline(model, batch, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = label_pipeline(model, batch, cfg)
    for key in ("cams", "cams_aux", "roi"):
        assert ref[key].dtype == got[key].dtype == torch.float32, key
    # the case must exercise every cut: labels of each kind, flags of both signs
    assert {0, 255} < set(ref["seg_label"].unique().tolist()) and {0, 255} < set(ref["aff_label"].unique().tolist())
    assert set(ref["roi"].unique().tolist()) == {0.0, 1.0, 2.0}
    assert 0 < ref["mcc_flags"].mean() < 1 and 0 < ref["toco_flags"].mean() < 1
    for key, want in ref.items():
        differ = (got[key] != want).sum().item()
        assert differ == 0, f"{key}: {differ} of {want.numel()} values differ from the fp32 run under bf16 autocast"

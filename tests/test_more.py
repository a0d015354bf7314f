"""MoRe against a plain reading of its official code (``benchmarks/official_more.py``, docs/methods/more.md): the
prefix-token backbone (the reload transform, the position interpolation, its outputs against the explicit
attention), GCR in both readings of its einsum, the LAM, the token losses (CLE where the official exp overflows and
underflows too), UNE's token search against the literal loop given the same permutation, the token-label switch, one
whole step (terms and gradients); the views, the parameter groups, the inference fusion, checkpoints and an exact
resume. A tiny ViT (3 blocks, 64-px crops, 8-px patches: an 8 x 8 grid, the smallest UNE takes)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastwsss.checkpoint import load_checkpoint
from fastwsss.data import EvalDataset, SegmentationList, TrainDataset
from fastwsss.data.transforms import normalize
from fastwsss.inference import evaluate_model, load_model
from fastwsss.inference.predict import multiscale_seg_logits
from fastwsss.methods import Iteration, build_method
from fastwsss.methods.more import (
    GraphClassRefiner,
    MoReNet,
    MoReViews,
    cle_loss,
    expand_prefix,
    mct_loss,
    multiscale_lams,
    prefix_pos_embed,
    une_loss,
    une_roi,
    une_search,
)
from fastwsss.models import create_vit
from fastwsss.pseudo import affinity_label, multiscale_cams
from fastwsss.training import StepModule, train

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import official_more as official

MORE = ["train.method=more", "data.crop_size=64", "model.img_size=32",
        "kernels.backend=torch", "loss.seg_start=0", "loss.reg_start=0", "cam.high_thresh=0.6", "cam.low_thresh=0.3"]


@pytest.fixture
def setup(tiny_config, synthetic_root):
    cfg = tiny_config(*MORE)
    method = build_method(cfg)
    torch.manual_seed(0)
    model = method.build_model()
    with torch.no_grad():  # class tokens apart, as after training (from one pretrained CLS they start identical)
        model.backbone.cls_token.add_(0.5 * torch.randn_like(model.backbone.cls_token))
    items = SegmentationList(synthetic_root, "train_aug", num_classes=7)
    ds = TrainDataset(items, method.sample_views(model), seed=0)
    batch = torch.utils.data.default_collate([ds[(i, i)] for i in range(4)])
    return cfg, method, model, batch


def tiny_vit():
    return create_vit("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                      freeze_pos_embed=False)


# ---- the backbone


def test_prefix_tokens_are_the_official_reload_of_a_timm_state_dict(tmp_path, tiny_config):
    torch.manual_seed(1)
    timm_sd = tiny_vit().state_dict()
    P = 4 + 6
    torch.manual_seed(7)
    want = official.reload_state_dict(timm_sd, P, num_patches=16)
    vit = tiny_vit()
    vit.load_state_dict(timm_sd)
    torch.manual_seed(7)
    expand_prefix(vit, P, 4)
    assert torch.equal(vit.cls_token, want["cls_token"]) and torch.equal(vit.pos_embed, want["pos_embed"])
    assert vit.pos_embed.shape == (1, P + 16, 32) and vit.pos_embed.requires_grad
    # the official std-1 draws of the 4 register entries (Q3); the class entries are the CLS entry
    registers = vit.pos_embed[0, :4].detach()
    assert 0.5 < float(registers.std()) < 1.5 and float(registers.abs().max()) <= 2.0
    assert torch.equal(vit.pos_embed[0, 4:P], timm_sd["pos_embed"][0, :1].expand(6, -1))
    # a local timm file gets the same transform (not the official local-file branch, Q17)
    torch.save(timm_sd, tmp_path / "vit.pth")
    cfg = tiny_config(*MORE, f"model.pretrained={tmp_path / 'vit.pth'}")
    model = build_method(cfg).build_model()
    assert torch.equal(model.backbone.cls_token, want["cls_token"])
    assert torch.equal(model.backbone.pos_embed[:, 4:], want["pos_embed"][:, 4:])
    assert torch.equal(model.backbone.blocks[1].mlp.fc2.weight, timm_sd["blocks.1.mlp.fc2.weight"])
    assert {n for n, _ in model.backbone.named_parameters()} == set(timm_sd) - {"head.weight", "head.bias"}


@pytest.mark.parametrize("size", [(32, 32), (32, 39), (64, 64), (48, 64), (40, 40), (32, 40), (72, 56)])
def test_position_interpolation_equals_the_official(size):
    g = torch.Generator().manual_seed(0)
    P, D, patch = 10, 8, 8
    table = torch.randn(1, P + 16, D, generator=g)
    x = torch.zeros(1, 3, *size)
    grid = (size[0] // patch, size[1] // patch)
    tokens = torch.zeros(1, P + grid[0] * grid[1], D)
    want = official.interpolate_pos_encoding(table, P, tokens, size[0], size[1], patch)
    got = prefix_pos_embed(table, P, x.shape[-2:], grid, "scale_factor")
    assert torch.equal(got, want), size
    resized = prefix_pos_embed(table, P, x.shape[-2:], grid, "size")  # ToCo's size-based resampling (switch)
    assert resized.shape == want.shape and torch.equal(resized[:, :P], table[:, :P])
    if size != (32, 32):  # the table as is only for a square input of its own grid; (32, 39) is resampled
        assert not torch.allclose(resized if grid != (4, 4) else table, want, atol=1e-6)


def test_backbone_and_network_equal_the_official_forward(setup):
    _, _, model, batch = setup
    x = batch["img"]
    with torch.no_grad():
        _, tokens, patches, aux, _ = model.features(x)
        want = official.forward_features(model.backbone, x, model.num_prefix, model.aux_layer)
        for got, ref in zip((tokens, patches, aux), want[:3], strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert want[3].shape == (4, 2, 6 + 64, 6 + 64)  # the official's last raw logits, never read (§11)
        out = model(x)
        cls, seg, x4, cls_aux, refined, _ = official.network(model, x)
        for got, ref in ((out.cls_logits, cls), (out.seg_logits, seg), (out.feat, x4), (out.aux_logits, cls_aux),
                         (model.refine(out), refined)):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert out.class_tokens.shape == (4, 6, 32) and out.cls_token.shape == (4, 32)
        # the register tokens are keys of every block: another register value changes every patch token
        model.backbone.cls_token[:, 0] += 1.0
        assert not torch.allclose(model.features(x)[2], patches)


@pytest.mark.parametrize("sum_product", [True, False])
def test_gcr_equals_the_official_in_both_readings(sum_product):
    torch.manual_seed(0)
    layer = GraphClassRefiner(16, 0.5, sum_product)
    tokens = torch.randn(3, 6, 16, requires_grad=True)
    patches = torch.randn(3, 20, 16, requires_grad=True)
    got = layer(tokens, patches)
    want = official.gcr(layer, tokens, patches, dot=not sum_product)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, [tokens, *layer.parameters()], g)
    wants = torch.autograd.grad(want, [tokens, *layer.parameters()], g)
    for a, b in zip(grads, wants, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.autograd.grad(got.sum(), patches, allow_unused=True)[0] is None  # patches are detached
    other = GraphClassRefiner(16, 0.5, not sum_product)
    other.load_state_dict(layer.state_dict())
    assert not torch.allclose(other(tokens, patches), got)  # Q1 matters


def test_lam_equals_the_official_multi_scale_lam2(setup):
    _, _, model, batch = setup
    x = batch["img"]
    with torch.no_grad():
        out = model(x)
        lam = model.lam_from(out)
        _, _, x4, _, tokens, _ = official.network(model, x)
        torch.testing.assert_close(lam, torch.einsum("bchw,bkc->bkhw", x4, tokens), rtol=1e-5, atol=1e-5)
        got = multiscale_lams(model, x, (0.5, 1.0, 1.5))
        want = official.multi_scale_lam2(model, x, (1.0, 0.5, 1.5))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert got.shape == (4, 6, 64, 64) and float(got.amin()) == 0.0
        torch.testing.assert_close(model.lams(x), official.multi_scale_lam2(model, x, (1.0,)), rtol=1e-5, atol=1e-5)


# ---- the token losses


def test_mct_loss_equals_the_official():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 6, 16, generator=g)
    torch.testing.assert_close(mct_loss(tokens) / 3, official.multi_cls_loss(tokens), rtol=1e-5, atol=1e-6)
    same = torch.randn(1, 16, generator=g).expand(2, 20, 16)  # identical class tokens: ln K
    assert float(mct_loss(same) / 2) == pytest.approx(math.log(20), rel=1e-6)


def _cle_case(seed: int, B=3, K=6, D=16, h=5, w=6):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, K, D, generator=g, requires_grad=True)
    feat = torch.randn(B, D, h, w, generator=g)
    label = torch.randint(0, K + 1, (B, h * w), generator=g)
    label[torch.rand(B, h * w, generator=g) < 0.3] = 255
    cls_label = (torch.rand(B, K, generator=g) < 0.5).float()
    cls_label[:, 0] = 1
    return tokens, feat, label, cls_label


@pytest.mark.parametrize("temperature", [0.5, 0.1])
def test_cle_loss_equals_the_official(temperature):
    tokens, feat, label, cls_label = _cle_case(0)
    label[0][label[0] == 1] = 0  # a present class without confident tokens: 0
    got = cle_loss(tokens, feat, label, cls_label, temperature) / 3
    want = official.cle_loss(tokens, feat, label.view(3, 5, 6), cls_label, temperature)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    g1, = torch.autograd.grad(got, tokens)
    g2, = torch.autograd.grad(want, tokens)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_cle_loss_in_log_space_where_the_official_exp_overflows_or_underflows():
    tokens, feat, label, cls_label = _cle_case(1)
    unit = F.normalize(tokens.detach(), dim=-1)
    feat[0] = feat[0] * 400  # z up to ~ +-400 / 0.1: the official exp overflows (its value is not finite)
    feat[1] = -unit[1, 0][:, None, None] * 20 + 0.01 * feat[1]  # class 0 of image 1: every z < -150, the sum is 0
    cls_label[1] = torch.tensor([1.0, 0, 0, 0, 0, 0])  # (the others' z would overflow there)
    per_image = []
    for i in range(3):
        args = (tokens[i:i + 1], feat[i:i + 1], label[i:i + 1], cls_label[i:i + 1])
        got = cle_loss(*args, 0.1)
        want = official.cle_loss(*args[:2], args[2].view(1, 5, 6), args[3], 0.1)
        assert torch.isfinite(got), i
        per_image.append((got, want))
    assert not torch.isfinite(per_image[0][1])
    for got, want in per_image[1:]:
        assert torch.isfinite(want)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    z = unit[1, 0] @ feat[1].flatten(1) / 0.1
    assert float(torch.exp(z).sum()) == 0.0  # the underflow branch was taken


def _roi_case(seed: int, h: int, w: int, B: int = 6):
    g = torch.Generator().manual_seed(seed)
    probs = [(0.2, 0.5, 0.3), (0.1, 0.3, 0.6), (0.6, 0.4, 0.0), (0.0, 0.9, 0.1), (0.3, 0.2, 0.5), (0.0, 0.0, 1.0)]
    rois = []
    for b in range(B):
        p = torch.tensor(probs[b % len(probs)])
        rois.append(torch.multinomial(p, h * w, replacement=True, generator=g).view(h, w))
    return torch.stack(rois)


@pytest.mark.parametrize("grid", [(8, 8), (12, 14), (28, 28)])
@pytest.mark.parametrize("displaced", [True, False])
def test_une_search_selects_what_the_literal_loop_selects(grid, displaced):
    h, w = grid
    roi = _roi_case(sum(grid), h, w)
    B = roi.shape[0]
    keys = torch.rand(B, (h - 6) * (w - 6), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    index, valid = une_search(roi, keys, displaced=displaced)
    positions: list = []
    feat = torch.zeros(B, 1, h, w)
    official.uncertain_kernel_search(feat, roi.to(torch.int16), randperm=official.permutation_by_keys(keys),
                                     positions=positions)
    shift = 0 if displaced else 3
    counts = []
    for b in range(B):
        want = sorted((r + shift) * w + (c + shift) for r, c in positions[b])
        got = sorted(index[b][valid[b]].tolist())
        assert got == want, (b, got, want)
        counts.append(len(want))
    assert min(counts) >= 2 and max(counts) <= 8  # the official 2 .. 8 tokens per image
    if grid == (28, 28):
        assert 8 in counts and any(2 <= n < 8 for n in counts)  # both branches


def test_une_loss_equals_the_official():
    g = torch.Generator().manual_seed(0)
    B, K, D, h, w = 4, 6, 16, 10, 9
    feat = torch.randn(B, D, h, w, generator=g, requires_grad=True)
    tokens = torch.randn(B, K, D, generator=g)
    label = torch.randint(1, K + 1, (B, h, w), generator=g)
    label[torch.rand(B, h, w, generator=g) < 0.45] = 255
    label[torch.rand(B, h, w, generator=g) < 0.15] = 0
    cls_label = (torch.rand(B, K, generator=g) < 0.4).float()
    keys = torch.rand(B, (h - 6) * (w - 6), dtype=torch.float64, generator=g)
    index, valid = une_search(une_roi(label), keys)
    got = une_loss(tokens, feat, index, valid, cls_label) / valid.sum()
    want = official.une_loss(tokens, feat, label, cls_label, official.permutation_by_keys(keys))
    torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-6)
    g1, = torch.autograd.grad(got, feat)
    g2, = torch.autograd.grad(want, feat)
    torch.testing.assert_close(g1.float(), g2, rtol=1e-4, atol=1e-7)


# ---- labels, the step, the schedule


def test_token_labels_switch_from_the_aux_to_the_main_cam(setup):
    cfg, method, model, batch = setup
    x, y = batch["img"], batch["cls_label"]
    with torch.no_grad():
        cams, cams_aux = multiscale_cams(model, x, tuple(cfg.cam.scales))
        want_cams, want_aux = official.multi_scale_cam2(model, x, cfg.cam.scales)
    torch.testing.assert_close(cams, want_cams, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cams_aux, want_aux, rtol=1e-5, atol=1e-6)
    grid = (8, 8)

    def label(source, high, low):
        return official.cam_to_label(F.interpolate(source, size=grid, mode="bilinear", align_corners=False), y,
                                     high, low).flatten(1)

    weights = {"aff": 0.3, "cle": 0.2, "une": 0.1, "seg": 0.0, "reg": 0.0}
    early = method.targets(model, batch, Iteration(10000, weights))
    late = method.targets(model, batch, Iteration(10001, weights))
    assert torch.equal(early.cle_label, label(cams_aux, 0.5, 0.3))
    assert torch.equal(late.cle_label, label(cams, 0.6, 0.35))
    assert torch.equal(early.aff_label, label(cams_aux, 0.6, 0.3)) and torch.equal(late.aff_label, early.aff_label)
    assert torch.equal(early.aff_label, affinity_label(cams_aux, y, None, grid, high_thresh=0.6, low_thresh=0.3))
    assert not torch.equal(early.cle_label, late.cle_label)
    assert torch.equal(early.une_index, une_search(une_roi(label(cams_aux, 0.6, 0.3)).view(4, 8, 8),
                                                   batch["une_keys"])[0])


def test_one_step_equals_the_official_step(setup):
    """The terms of fastwsss's step (targets, counts, terms) equal the plain reading's, and so do the gradients."""
    cfg, method, model, batch = setup
    step = StepModule(method, model)
    it = method.iteration(0)
    assert set(it.weights) == {"aff", "cle", "une", "seg", "reg"} and all(it.weights.values())
    terms = step(batch, it)
    model.zero_grad()
    sum(t.weighted for t in terms.values()).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    want = official.step_terms(model, batch, cfg, 0)
    assert set(terms) == set(want) - {"total"}
    for k in terms:
        torch.testing.assert_close(terms[k].value.float(), want[k].float(), rtol=1e-5, atol=1e-7, msg=k)
    model.zero_grad()
    want["total"].backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert set(ours) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_views(synthetic_root):
    items = SegmentationList(synthetic_root, "train_aug", num_classes=7)
    image = Image.open(items.image_path(items.names[0])).convert("RGB")
    for crop, keep in (("resized", False), ("rescale_pad", False), ("rescale_pad", True)):
        v = MoReViews(64, (0.32, 1.0), 0.5, crop, keep, num_keys=4)(image, np.random.default_rng([0, 1]))
        assert v["img"].shape == (3, 64, 64) and v["une_keys"].shape == (4,) and v["une_keys"].dtype == torch.float64
        assert keep or v["img_box"].tolist() == [0, 64, 0, 64]  # the box dropped (Q9) / nothing padded
    assert v["img_box"].tolist() != [0, 64, 0, 64]  # 48-px images rescaled <= 1 are padded: the box kept
    # RandomResizedCrop's fallback after 10 rejected draws is torchvision's: the central crop at the ratio bound
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 1000, 3), dtype=np.uint8))
    v = MoReViews(16, (0.9, 1.0), 0.0, "resized")(wide, np.random.default_rng(0))
    rng = np.random.default_rng(0)
    for _ in range(20):
        rng.uniform()
    flip = bool(rng.random() < 0.5)
    want = wide.resize((16, 16), Image.BICUBIC, box=(493, 0, 506, 10))
    want = want.transpose(Image.FLIP_LEFT_RIGHT) if flip else want
    assert torch.equal(v["img"], torch.from_numpy(normalize(np.asarray(want))))


def test_param_groups_give_the_graph_module_its_learning_rate(setup):
    _, method, model, _ = setup
    groups = method.param_groups(model)
    assert [g["initial_lr"] for g in groups] == pytest.approx([1e-3, 1e-2, 1e-2])
    assert {id(p) for p in groups[2]["params"]} == {id(p) for p in model.graph_layer.parameters()}
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(p.requires_grad for p in model.parameters())
    backbone = {id(p) for p in groups[0]["params"]}
    assert id(model.backbone.cls_token) in backbone and id(model.backbone.pos_embed) in backbone


def test_inference_fusion_equals_the_official_tool(setup):
    _, _, model, batch = setup
    model.eval()
    x = batch["img"][:1, :, :, :56]  # not square: the tool resizes each scale to a square
    got = multiscale_seg_logits(model, x, scales=(1.0, 1.25, 1.5), fusion="more", coco_size=64)
    want = official.infer_seg(model, x, (1.0, 1.25, 1.5), size=64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_checkpoint_predicts_evaluates_the_lam_and_resumes_exactly(tiny_config, tmp_path):
    common = [*MORE, "train.max_iters=4", "train.eval_interval=100", "train.ckpt_interval=2",
              "more.token_label_aux_until=1", "loss.seg_start=2", "loss.reg_start=2", "more.une_start=1"]
    train(tiny_config(*common, f"run.dir={tmp_path / 'full'}"))
    train(tiny_config(*common, "train.stop_at=2", f"run.dir={tmp_path / 'half'}"))
    train(tiny_config(*common, f"run.resume={tmp_path / 'half'}"))
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "half")
    assert a["model"]["backbone.cls_token"].shape == (1, 10, 32) and "graph_layer.norm.weight" in a["model"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    model, cfg, _ = load_model(tmp_path / "full")
    assert isinstance(model, MoReNet) and all(torch.equal(v, a["model"][k]) for k, v in model.state_dict().items())
    items = SegmentationList(cfg.data.root, "val", num_classes=7)
    results = evaluate_model(model, EvalDataset(items, 2), scales=(1.0, 0.5), bkg_thresh=0.5,
                             modes=("cam", "lam", "seg"), device=torch.device("cpu"))
    assert set(results) == {"cam", "lam", "seg"} and results["lam"].mat.sum() > 0


@pytest.mark.parametrize("name", ["voc_more", "coco_more"])
def test_paper_configs_refuse_to_start_without_the_jx_weights(name):
    from fastwsss.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"fine-tunes pretrained weights.*vit_base_patch16_224\.orig_in21k_ft_in1k"):
        load_config(name)
    cfg = load_config(name, ["model.pretrained=/w/jx_vit_base_p16_224-80ecf9dd.pth"])
    assert cfg.model.backbone == "vit_base_patch16_224" and not cfg.model.freeze_pos_embed
    assert cfg.data.rescale_range == (0.32, 1.0) and cfg.data.grayscale_p == cfg.data.blur_p == 0.0

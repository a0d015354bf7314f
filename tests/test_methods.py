"""ToCo / MCC pieces on cases small enough to check by hand, and the equalities the fast paths rely on."""

import math

import numpy as np
import pytest
import torch

from fastwsss.data.transforms import contrast_sample, denormalize
from fastwsss.methods import build_method
from fastwsss.methods.losses import contrast_loss, seg_loss
from fastwsss.methods.mcc import dropped_class_tokens, masked_class_tokens, random_key_masks
from fastwsss.models import (
    ProjectionHead,
    WSSSNet,
    create_vit,
    ema_update,
    forward_features,
)
from fastwsss.pseudo import affinity_label, multiscale_cams, refine_seg_label, roi_map, scale_box


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return create_vit("deit_tiny_patch16_224", img_size=64, patch_size=16, embed_dim=48, depth=3, num_heads=3).eval()


def test_token_dropping_equals_masked_forward(vit):
    x = torch.randn(2, 3, 64, 80)  # 4x5 grid
    keep = torch.rand(2, 6, 20) > 0.6
    keep[0, 0] = False  # nothing visible: the class token attends to itself only
    keep[0, 1] = True
    keep[1, 2] = False
    keep[1, 2, 7] = True  # one visible key
    keep[1, 3] = keep[1, 4]  # identical masks
    ref = masked_class_tokens(vit, x, keep)
    fast = dropped_class_tokens(vit, x, keep)
    assert ref.shape == (2, 6, 48)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    full = forward_features(vit, x)[0]
    torch.testing.assert_close(ref[0, 1], full[0], rtol=1e-5, atol=1e-5)  # all visible == the plain forward
    assert not torch.allclose(ref[0, 0], ref[0, 1])


def test_token_dropping_gradients_match(vit):
    x = torch.randn(1, 3, 64, 64)
    keep = torch.rand(1, 4, 16) > 0.5
    grads = []
    for fn in (masked_class_tokens, dropped_class_tokens):
        vit.zero_grad()
        fn(vit, x, keep).square().sum().backward()
        grads.append(vit.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


def test_reused_teacher_equals_recomputed(vit):
    """The step feeds the teacher the student's detached class tokens: equal to a separate no-grad forward."""
    head = ProjectionHead(48, out_dim=32, hidden_dim=64, bottleneck_dim=16)
    teacher = ProjectionHead(48, out_dim=32, hidden_dim=64, bottleneck_dim=16)
    x = torch.randn(2, 3, 64, 64)
    student_cls = forward_features(vit.train(), x)[0]
    reused = teacher(student_cls.detach())
    with torch.no_grad():
        recomputed = teacher(forward_features(vit, x)[0])
    torch.testing.assert_close(reused, recomputed, rtol=0, atol=0)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, head, 0.9)
    for b, t, s in zip(before, teacher.parameters(), head.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)


def test_step_cams_reuse_the_training_forward(vit):
    """The step's multi-scale CAM takes its unflipped scale-1 pass from the training forward (in train mode, with
    grad): the same CAMs as running that pass again."""
    model = WSSSNet(vit.train(), num_classes=4, decoder_channels=8)
    x = torch.randn(2, 3, 64, 80)
    out = model(x)
    for scales in ((1.0, 0.5), (0.5, 1.0, 1.5), (0.5,)):
        reused = multiscale_cams(model, x, scales, outputs=out)
        recomputed = multiscale_cams(model, x, scales)
        for a, b in zip(reused, recomputed):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert out.cls_logits.requires_grad  # the reuse does not detach the training forward


def test_projector_output_is_weight_normalised():
    head = ProjectionHead(8, out_dim=5, hidden_dim=16, bottleneck_dim=4)
    y = head(torch.randn(3, 8))
    assert y.shape == (3, 5) and (y.norm(dim=-1) <= 5**0.5 + 1e-5).all()
    assert all(m.bias.abs().max() == 0 for m in head.mlp if isinstance(m, torch.nn.Linear))


def _contrast_by_hand(t, s, flags, tau, extra):
    """docs/methods/toco-mcc.md §7.4 literally, in float64 with plain exponentials (safe for small logits)."""
    B, A, _ = t.shape
    total = 0.0
    for i in range(B):
        pos = [j for j in range(s.shape[1]) if flags[i, j] == 1]
        neg = [j for j in range(s.shape[1]) if flags[i, j] == 0]
        li = 0.0
        for a in range(A):
            ell = [math.exp(float(t[i, a] @ s[i, j]) / tau) for j in range(s.shape[1])]
            n = sum(ell[k] for k in neg)
            li += sum(-math.log(ell[j] / (ell[j] + n + 1e-4)) for j in pos)
            if extra:
                li += math.log(1 + n + 1e-4)
        total += li / (2 * (len(pos) + 1e-4))
    return total / B


@pytest.mark.parametrize("extra", [True, False])
def test_contrast_loss_matches_the_formula(extra):
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 2, 6, generator=g, dtype=torch.float64), torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    flags = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]])  # second image: no negative at all
    got = contrast_loss(t, s, flags, temperature=0.5, extra_term=extra)
    assert got.item() == pytest.approx(_contrast_by_hand(t, s, flags, 0.5, extra), rel=1e-6)


def test_contrast_loss_finite_for_huge_logits():
    t = torch.full((1, 2, 4), 100.0)
    s = torch.full((1, 10, 4), 25.0, requires_grad=True)  # raw dot products of 1e4: exp overflows any float
    flags = torch.tensor([[1, 1, 0, 0, 1, 0, 1, 0, 0, 0]])
    loss = contrast_loss(t, s, flags, temperature=0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_seg_loss_finite_on_all_background_batch():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    label = torch.zeros(2, 4, 4, dtype=torch.long)
    loss = seg_loss(logits, label)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    expected = 0.5 * torch.nn.functional.cross_entropy(logits, label)  # the empty foreground half adds nothing
    torch.testing.assert_close(loss, expected)
    label[0, 0, 0] = 2
    label[1] = 255
    both = seg_loss(logits, label)
    fg = torch.where(label > 0, label, 255).masked_fill(label == 255, 255)
    bg = torch.where(label == 0, label, 255)
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(both, 0.5 * (ce(logits, fg, ignore_index=255) + ce(logits, bg, ignore_index=255)))


def test_term_weights_follow_the_schedule(tiny_config):
    cfg = tiny_config("train.method=mcc")
    weights = build_method(cfg).weights
    assert weights(0) == {"aff": 0.2, "con": 0.5, "seg": 0.0, "reg": 0.0}
    assert weights(2000)["seg"] == 0.0 and weights(2001) == {"aff": 0.2, "con": 0.5, "seg": 0.1, "reg": 0.05}


def test_roi_map_thresholds():
    cams = torch.tensor([[[[0.1, 0.25, 0.5, 0.7, 0.9]], [[0.0, 0.0, 0.0, 0.0, 0.95]]]])
    assert roi_map(cams, torch.tensor([[1.0, 0.0]]), 0.25, 0.7).tolist() == [[[0, 0, 1, 2, 2]]]


def test_affinity_label_and_the_img_box_quirk():
    cams = torch.zeros(1, 2, 8, 8)
    cams[0, 0, :4] = 0.9  # top half class 1 (fg), bottom half background
    box = torch.tensor([[2, 8, 0, 8]])  # image pixels 2..8: a crop padded at the top
    faithful = affinity_label(cams, torch.tensor([[1.0, 1.0]]), box, (4, 4))
    assert faithful.shape == (1, 16)
    # the 8-px box applied to the 4x4 grid as is: rows 2..3 kept, rows 0..1 ignored
    assert faithful.view(4, 4)[:2].eq(255).all() and faithful.view(4, 4)[2:].eq(0).all()
    fixed = affinity_label(cams, torch.tensor([[1.0, 1.0]]), box, (4, 4), scale_box_to_grid=True)
    assert fixed.view(4, 4)[0].eq(255).all() and fixed.view(4, 4)[1].eq(1).all()
    assert scale_box(torch.tensor([[100, 448, 0, 448]]), (448, 448), (28, 28)).tolist() == [[6, 28, 0, 28]]


def test_seg_label_fusion_rule_and_box():
    """Spatially constant CAMs are fixed points of PAR (its weights sum to 1.01 for every channel alike), so each
    image's label is the fusion of the two background thresholds, which can be worked out by hand."""
    cams = torch.zeros(4, 2, 8, 8)
    cams[0, 0] = 0.9  # above high: both thresholds say class 1 -> 1
    cams[1, 0] = 0.5  # between: high says background, low says class 1 -> ignore
    cams[2, 0] = 0.1  # below low: both say background -> 0
    cams[3, 1] = 0.9  # confident, but class 2 is absent from the image label -> background
    cls_label = torch.tensor([[1.0, 0.0]] * 4)
    box = torch.tensor([[0, 8, 0, 8]] * 3 + [[0, 8, 0, 6]])
    label = refine_seg_label(cams, cls_label, torch.zeros(4, 3, 8, 8), box)
    assert label[0].eq(1).all() and label[1].eq(255).all() and label[2].eq(0).all()
    assert label[3, :, :6].eq(0).all() and label[3, :, 6:].eq(255).all()  # outside img_box -> ignore


def test_seg_label_batch_equals_per_image_channel_selection():
    """The batched label (present channels gathered into K slots) equals the reference's way: per image, keep
    background + that image's classes, softmax, PAR, argmax, map back to class indices."""
    from fastwsss.kernels import par_refine

    g = torch.Generator().manual_seed(0)
    B, C1, H, W = 5, 6, 16, 20
    cams = torch.rand(B, C1, H, W, generator=g)
    cls_label = torch.zeros(B, C1)
    for b, classes in enumerate([[0], [1, 4], [0, 2, 5], [3], [1, 2, 3, 4, 5]]):
        cls_label[b, classes] = 1.0
    images = torch.randn(B, 3, H, W, generator=g)
    kw = {"high_thresh": 0.6, "low_thresh": 0.3, "par_dilations": (1, 2), "par_num_iter": 3}
    label = refine_seg_label(cams, cls_label, images, None, **kw)

    img = denormalize(images).clamp(0, 255).to(torch.uint8).float() / 255
    img = torch.nn.functional.interpolate(img, size=(H // 2, W // 2), mode="bilinear", align_corners=False)
    for b in range(B):
        keep = torch.cat([torch.tensor([0]), cls_label[b].nonzero().squeeze(1) + 1])  # channel -> class index
        labels = []
        for bkg in (kw["high_thresh"], kw["low_thresh"]):
            chans = torch.cat([torch.full((1, 1, H, W), bkg), cams[b:b + 1, keep[1:] - 1]], dim=1)
            chans = torch.nn.functional.interpolate(chans, size=(H // 2, W // 2), mode="bilinear",
                                                    align_corners=False).softmax(1)
            r = par_refine(img[b:b + 1], chans, dilations=(1, 2), num_iter=3, backend="torch")
            r = torch.nn.functional.interpolate(r, size=(H, W), mode="bilinear", align_corners=False)
            labels.append(keep[r[0].argmax(0)])
        expected = labels[0].clone()
        expected[labels[0] == 0] = 255
        expected[(labels[0] == 0) & (labels[1] == 0)] = 0
        assert torch.equal(label[b], expected), b
    assert set(label.unique().tolist()) >= {0, 255} and label.max() == 255 and (label[4] > 0).any()


def test_mcc_key_masks():
    keep = random_key_masks(np.random.default_rng(0), 2000, (28, 28), mask_prob=0.95, cell=4)
    assert keep.shape == (2000, 784) and keep.dtype == bool
    cells = keep.reshape(2000, 7, 4, 7, 4)
    assert (cells == cells[:, :, :1, :, :1]).all()  # constant on each 4x4 cell
    assert keep.sum(1).mean() == pytest.approx(0.05 * 784, rel=0.1)  # ~39 visible tokens
    assert (keep.sum(1) == 0).mean() == pytest.approx(0.95**49, abs=0.03)  # ~8 % see nothing


@pytest.mark.parametrize("share_flip, flip_box", [(False, False), (True, True)])
def test_contrast_views_and_flip_quirks(share_flip, flip_box):
    from PIL import Image

    img = np.zeros((40, 60, 3), np.uint8)
    img[:, :10] = 255  # a white band on the left edge tells flips apart

    def band_column(view):
        weight = view.mean(axis=(0, 2))
        return (weight * np.arange(view.shape[1])).sum() / weight.sum()

    differ = 0
    for seed in range(12):
        v = contrast_sample(Image.fromarray(img), np.random.default_rng(seed), 64, (1.0, 1.0), 0.0, 0.0, 0.0,
                            share_flip=share_flip, flip_box=flip_box)
        assert v["img"].shape == v["local"].shape == v["global2"].shape == (64, 64, 3)
        h0, h1, w0, w1 = v["img_box"]
        inside = v["img"][h0:h1, w0:w1]
        if flip_box:  # the box follows the flipped image: exactly the non-black region
            assert inside.shape[:2] == (40, 60) and (v["img"].sum() == inside.sum())
        gap = abs(band_column(v["img"]) - band_column(v["local"]))  # the local view's blur moves it < 1 px
        if share_flip:
            assert gap < 1.0
        differ += gap > 10
    assert (differ == 0) == share_flip  # independent flips disagree on some seeds


def _reg_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 16, 20, generator=g, dtype=torch.float64).float().requires_grad_()
    images = torch.randint(0, 256, (2, 3, 16, 20), generator=g).float()
    box = torch.tensor([[0, 16, 0, 20], [2, 14, 4, 20]])
    label = torch.randint(0, 3, (2, 16, 20), generator=g)
    label[:, :3] = 255
    return logits, images, box, label


def test_reg_loss_value_and_reference_gradient():
    from fastwsss.kernels import PermutohedralLattice
    from fastwsss.methods.losses import bilateral_features, reg_loss

    logits, images, box, label = _reg_inputs()
    size = (8, 10)
    probs = torch.nn.functional.interpolate(logits.softmax(1), size=size, mode="bilinear", align_corners=False)
    probs.retain_grad()
    roi = torch.zeros(2, 1, 16, 20)
    roi[0] = 1
    roi[1, :, 2:14, 4:20] = 1
    roi = torch.nn.functional.interpolate(roi, size=size, mode="nearest")
    lab = torch.nn.functional.interpolate(label[:, None].float(), size=size, mode="nearest")
    gate = (roi - probs.amax(1, keepdim=True)).masked_fill(lab == 255, 1.0).clamp_min(0).detach()
    img = torch.nn.functional.interpolate(images, size=size, mode="nearest")
    lattice = PermutohedralLattice(bilateral_features(img, 15.0, 50.0))
    S = probs * roi
    AS = gate * lattice.filter(S.detach())
    expected = -1e-7 * (S.detach() * AS).sum() / 2
    loss = reg_loss(logits, images, box, label, sigma_rgb=15.0, sigma_xy=100.0, scale=0.5)
    torch.testing.assert_close(loss, expected.float(), rtol=1e-5, atol=0)
    # the reference's gradient w.r.t. the downscaled probabilities: -2 AS / B * ROI (times the 1e-7 weight)
    probs_ref = probs.detach().requires_grad_()
    from fastwsss.methods.losses import _GatedCRFLoss

    (1e-7 * _GatedCRFLoss.apply(probs_ref, bilateral_features(img, 15.0, 50.0), roi, gate, False)).backward()
    torch.testing.assert_close(probs_ref.grad, -2e-7 * AS / 2 * roi, rtol=1e-5, atol=1e-12)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_reg_loss_exact_gradient_switch():
    from fastwsss.kernels import PermutohedralLattice
    from fastwsss.methods.losses import _GatedCRFLoss, bilateral_features

    g = torch.Generator().manual_seed(1)
    probs = torch.rand(1, 2, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    img = torch.randint(0, 256, (1, 3, 6, 7), generator=g).double()
    feats = bilateral_features(img, 15.0, 5.0)
    roi = torch.ones(1, 1, 6, 7, dtype=torch.float64)
    gate = torch.rand(1, 1, 6, 7, generator=g, dtype=torch.float64)
    _GatedCRFLoss.apply(probs, feats, roi, gate, True).backward()
    lattice = PermutohedralLattice(feats)
    p2 = probs.detach().requires_grad_()
    (-(p2 * roi * gate * lattice.filter(p2 * roi)).sum()).backward()  # gate held constant, as in the reference
    torch.testing.assert_close(probs.grad, p2.grad, rtol=1e-6, atol=1e-9)


def official_crops(images, roi, crop_index, size):
    """The authors' crop_from_roi_neg for given centres: per image and crop, the window whose top-left corner is the
    centre's index in the inner slice roi[margin:H-margin, margin:W-margin]; negative iff sum(roi) / size^2 <= 0.2."""
    B, M = crop_index.shape[:2]
    crops = torch.zeros(B, M, images.shape[1], size, size)
    flags = torch.ones(B, M)
    for i in range(B):
        for j in range(M):
            h0, w0 = crop_index[i, j].tolist()
            crops[i, j] = images[i, :, h0:h0 + size, w0:w0 + size]
            if roi[i, h0:h0 + size, w0:w0 + size].sum() / (size * size) <= 0.2:
                flags[i, j] = 0
    return crops, flags


@pytest.mark.parametrize("size", [8, 9])
def test_toco_crops_equal_the_official_crops(size):
    from fastwsss.methods.toco import crops_at

    g = torch.Generator().manual_seed(0)
    B, M, H, W = 2, 5, 20, 24
    images = torch.randn(B, 3, H, W, generator=g)
    roi = torch.randint(0, 3, (B, H, W), generator=g).float()
    margin = size // 2
    inner = torch.stack([torch.randint(0, H - 2 * margin, (B, M), generator=g),
                         torch.randint(0, W - 2 * margin, (B, M), generator=g)], dim=-1)  # inner-slice indices
    centres = (inner[..., 0] + margin) * W + inner[..., 1] + margin  # the same positions, flat in the image
    crops, flags = crops_at(images, roi, centres, size, 0.2)
    want_crops, want_flags = official_crops(images, roi, inner, size)
    assert torch.equal(crops, want_crops) and torch.equal(flags, want_flags)


def test_a_toco_crop_that_cannot_fit_is_an_error_at_start(tiny_config):
    from fastwsss.config import ConfigError

    with pytest.raises(ConfigError, match=r"toco.crop_size=32 leaves 0 possible crop centres in a data.crop_size=32"):
        tiny_config("train.method=toco", "toco.crop_size=32")
    with pytest.raises(ConfigError, match=r"leaves 4 possible crop centres .* contrast.num_local=8"):
        tiny_config("train.method=toco", "toco.crop_size=30")  # 32 - 2 * 15 = 2: 2 x 2 centres for 8 crops
    assert tiny_config("train.method=toco", "toco.crop_size=30", "contrast.num_local=4").toco.crop_size == 30

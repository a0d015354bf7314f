"""CoSA against a plain reading of its official code (``benchmarks/official_cosa.py``, docs/methods/cosa.md): each
piece on random inputs (labels exact, losses <= 1e-5), one whole step on a tiny ViT, the teacher's EMA, its place
in checkpoints and inference, an exact resume."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastwsss.checkpoint import load_checkpoint
from fastwsss.data import SegmentationList, TrainDataset
from fastwsss.inference import load_model
from fastwsss.methods import build_method
from fastwsss.methods.cosa import STRONG_OPS, CoSAViews, cam_loss, fg_weighted_seg_loss, seg_to_cam_target, strong_op
from fastwsss.pseudo import PseudoLabeller, multiscale_cams
from fastwsss.training import StepModule, train

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import official_cosa as official

COSA = ["train.method=cosa", "loss.seg_start=0", "loss.reg_start=0", "cosa.cam_start=0", "kernels.backend=torch"]


@pytest.fixture
def setup(tiny_config, synthetic_root):
    cfg = tiny_config(*COSA, "cam.scales=[1.0,0.5,1.5]")
    method = build_method(cfg)
    torch.manual_seed(0)
    model = method.build_model()
    items = SegmentationList(synthetic_root, "train_aug", num_classes=7)
    ds = TrainDataset(items, method.sample_views(model), seed=0)
    batch = torch.utils.data.default_collate([ds[(i, i)] for i in range(4)])
    return cfg, method, model, batch


def test_strong_ops_and_their_magnitudes():
    img = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16).repeat(3).reshape(16, 16, 3))
    levels = np.asarray(img)[..., 0].ravel()
    # solarize at m inverts the levels >= int(25.6 m) (25, 51, ..., 230); posterize keeps 4 - int(0.4 m) bits
    for m, (thr, bits) in enumerate(zip((25, 51, 76, 102, 128, 153, 179, 204, 230), (4, 4, 3, 3, 2, 2, 2, 1, 1)),
                                    start=1):
        sol = np.asarray(strong_op(img, "solarize", m))[..., 0].ravel()
        assert np.array_equal(sol, np.where(levels >= thr, 255 - levels, levels)), m
        post = np.asarray(strong_op(img, "posterize", m))[..., 0].ravel()
        assert np.array_equal(post, levels & (0xFF << (8 - bits) & 0xFF)), m
    # the enhancers' factor 0.18 m + 0.1: brightness scales the levels by it (1.0 at m = 5)
    for m, f in ((1, 0.28), (5, 1.0), (9, 1.72)):
        got = np.asarray(strong_op(img, "brightness", m))[..., 0].ravel().astype(float)
        assert np.abs(got - np.clip(np.round(levels * f), 0, 255)).max() <= 1, m
    assert np.array_equal(np.asarray(strong_op(img, "identity", 3)), np.asarray(img))
    assert len(STRONG_OPS) == 9


def test_weak_and_strong_views_share_the_crop(synthetic_root):
    items = SegmentationList(synthetic_root, "train_aug", num_classes=7)
    image = Image.open(items.image_path(items.names[0])).convert("RGB")
    views = CoSAViews(64, (0.5, 1.0), 0.0, 0.0, 0.5)
    same = differ = 0
    for pos in range(40):
        s = views(image, np.random.default_rng([0, pos]))
        plain = CoSAViews(64, (0.5, 1.0), 0.0, 0.0, 0.5, strong=False)(image, np.random.default_rng([0, pos]))
        assert torch.equal(s["weak"], plain["weak"]) and torch.equal(s["img_box"], plain["img_box"])
        assert torch.equal(plain["img"], plain["weak"])
        same += torch.equal(s["img"], s["weak"])
        differ += not torch.equal(s["img"], s["weak"])
    assert same and differ  # identity (1 in 9) and the other ops


def test_teacher_pass_equals_the_official_multi_scale(setup):
    _, _, model, batch = setup
    with torch.no_grad():
        got = multiscale_cams(model.teacher, batch["weak"], (1.0, 0.5, 1.5), with_seg=True, aux_last_scale=True)
        want = official.teacher_camseg(model.teacher, batch["weak"], (1.0, 0.5, 1.5))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    summed = multiscale_cams(model.teacher, batch["weak"], (1.0, 0.5, 1.5))[1]  # cosa.aux_cam_last_scale=false
    assert not torch.allclose(summed, got[1])


@pytest.mark.parametrize("seed", range(3))
def test_labels_equal_the_official_cam2mask(seed):
    g = torch.Generator().manual_seed(seed)
    B, K, H, W = 3, 6, 32, 40
    cams = torch.rand(B, K, H, W, generator=g) ** 2
    cls_label = (torch.rand(B, K, generator=g) > 0.5).float()
    cls_label[0] = 0  # an image without foreground labels
    cls_label[1, 2] = 1
    box = torch.tensor([[0, H, 0, W], [3, 29, 5, 40], [0, 20, 7, 33]])
    for high, low in ((0.7, 0.2), (0.7, 0.25), (0.65, 0.25)):
        got = PseudoLabeller(high, low, par_num_iter=0)(cams, cls_label, torch.zeros(B, 3, H, W), box)
        want = official.cam2mask(cls_label[:, :, None, None] * cams, box, cls_label, high, low)
        assert torch.equal(got, want), (high, low)


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_seg_loss_equals_the_official(alpha):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 8, 8, generator=g)
    label = torch.randint(0, 5, (2, 8, 8), generator=g)
    label[0, :2] = 255
    for lab in (label, torch.zeros_like(label), torch.full_like(label, 3)):  # both halves, no foreground, no bg
        counts = [((lab > 0) & (lab != 255)).sum().double(), (lab == 0).sum().double()]
        got = fg_weighted_seg_loss(logits, lab, *counts, alpha)
        torch.testing.assert_close(got, official.seg_loss(logits, lab, alpha), rtol=1e-5, atol=1e-6)


def test_seg_to_cam_loss_equals_the_official():
    g = torch.Generator().manual_seed(1)
    B, K = 2, 6
    seg = torch.randn(B, K + 1, 32, 32, generator=g) * 3
    cam = torch.randn(B, K, 4, 4, generator=g)
    cls_label = torch.tensor([[1.0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1]])
    target = seg_to_cam_target(seg, cls_label, 0.01, (4, 4))
    assert target.shape == (B, K, 4, 4) and (target[0, [1, 2, 4, 5]] == 0).all()  # absent classes get exactly 0
    got = cam_loss(cam, target, torch.tensor(B * 16.0, dtype=torch.float64))
    torch.testing.assert_close(got.float(), official.cam_loss_v1(cam, seg, cls_label, 0.01), rtol=1e-5, atol=1e-6)


def test_one_step_equals_the_official_step(setup):
    """The terms of fastwsss's step (targets, counts, terms) equal the plain reading's, and so do the gradients."""
    cfg, method, model, batch = setup
    step = StepModule(method, model)
    terms = step(batch, method.iteration(0))
    model.zero_grad()
    sum(t.weighted for t in terms.values()).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    want = official.step_terms(model, model.teacher, batch, cfg, 0)
    for k in ("cls", "cls_aux", "seg", "cam", "reg"):
        torch.testing.assert_close(terms[k].value.float(), want[k].float(), rtol=1e-5, atol=1e-7, msg=k)
    model.zero_grad()
    want["total"].backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert not any(n.startswith("teacher.") for n in ours)  # the teacher never trains


def test_teacher_ema_equals_the_official_update(setup):
    cfg, method, model, _ = setup
    student = method.student_parameters(model)
    with torch.no_grad():
        for p in student:
            p.add_(torch.randn_like(p))
    before = [t.clone() for t in model.teacher.parameters()]
    reference = build_method(cfg).build_model().teacher  # a copy of the teacher, updated the official way
    reference.load_state_dict(model.teacher.state_dict())
    method.after_step(model, 0)
    official.ema_update(reference, student, cfg.cosa.momentum)
    for got, want in zip(model.teacher.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(model.teacher.parameters(), before))


def test_teacher_is_checkpointed_predicts_and_resumes_exactly(tiny_config, tmp_path):
    common = [*COSA, "train.max_iters=4", "train.eval_interval=100", "train.ckpt_interval=2", "loss.seg_start=2",
              "loss.reg_start=2", "cosa.cam_start=2"]
    train(tiny_config(*common, f"run.dir={tmp_path / 'full'}"))
    train(tiny_config(*common, "train.stop_at=2", f"run.dir={tmp_path / 'half'}"))
    train(tiny_config(*common, f"run.resume={tmp_path / 'half'}"))
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "half")
    assert any(k.startswith("teacher.") for k in a["model"])
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    model, _, _ = load_model(tmp_path / "full")
    teacher = {k.removeprefix("teacher."): v for k, v in a["model"].items() if k.startswith("teacher.")}
    assert all(torch.equal(v, teacher[k]) for k, v in model.state_dict().items())  # the teacher predicts
    assert not all(torch.equal(v, a["model"][k]) for k, v in model.state_dict().items())  # not the student

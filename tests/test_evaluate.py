import math

import numpy as np
import pytest
import torch

from fastwsss.inference.metrics import ConfusionMatrix, format_table
from fastwsss.pseudo import cam_to_label, minmax_normalize, multiscale_cams


def test_miou_against_hand_computed_confusion_matrix():
    gt = np.array([[0, 0, 1, 1], [0, 2, 2, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 2, 0, 1]])
    cm = ConfusionMatrix(4)
    cm.update(pred, gt)
    # rows = gt, cols = pred; the 255 pixel is skipped; class 3 never occurs
    expected = np.array([[1, 1, 1, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert np.array_equal(cm.mat, expected)
    iou = cm.iou()
    # bg: TP 1, FN 2, FP 1 -> 1/4; c1: TP 2, FN 0, FP 1 -> 2/3; c2: TP 1, FN 1, FP 1 -> 1/3; c3 absent -> NaN
    np.testing.assert_allclose(iou[:3], [1 / 4, 2 / 3, 1 / 3])
    assert math.isnan(iou[3])
    assert cm.miou() == pytest.approx((1 / 4 + 2 / 3 + 1 / 3) / 3)
    cm.update(torch.from_numpy(pred), torch.from_numpy(gt))  # accumulates over the set
    assert np.array_equal(cm.mat, 2 * expected)
    table = format_table(["bg", "a", "b", "c"], {"x": cm})
    assert "41.7" in table.splitlines()[-1] and " - " in table.splitlines()[4] + " "


def test_confusion_matrix_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels outside"):
        ConfusionMatrix(3).update(np.array([3]), np.array([0]))
    with pytest.raises(ValueError, match="pixels"):
        ConfusionMatrix(3).update(np.zeros(3), np.zeros(4))


def test_cam_to_label_hand_case():
    cam = torch.tensor([[[[0.9, 0.6, 0.3, 0.1]], [[0.2, 0.8, 0.1, 0.0]], [[1.0, 1.0, 1.0, 1.0]]]])  # [1, 3, 1, 4]
    cls_label = torch.tensor([[1.0, 1.0, 0.0]])  # class 3 absent: its CAM is ignored
    assert cam_to_label(cam, cls_label, bkg_thresh=0.5).tolist() == [[[1, 2, 0, 0]]]
    mid = cam_to_label(cam, cls_label, ignore_mid=True, high_thresh=0.7, low_thresh=0.25)
    assert mid.tolist() == [[[1, 2, 255, 0]]]
    boxed = cam_to_label(cam, cls_label, torch.tensor([[0, 1, 1, 3]]), bkg_thresh=0.5)
    assert boxed.tolist() == [[[255, 2, 0, 255]]]


class _RampModel:
    """cams() = input channels + a left-to-right ramp: not flip-equivariant, so the un-flip is visible."""

    def cams(self, x):
        ramp = torch.linspace(0, 1, x.shape[-1])
        return x[:, :2] + ramp, -x[:, :2]


def test_multiscale_cams_fusion_by_hand():
    x = torch.zeros(1, 3, 1, 8)
    x[0, 1] = -5.0  # class 2 negative everywhere: ReLU -> 0
    cams, aux = multiscale_cams(_RampModel(), x, scales=(1.0,))
    r = torch.linspace(0, 1, 8)
    fused = torch.maximum(r, r.flip(0))  # image pass + un-flipped flip pass, element-wise max
    expected = (fused - fused.min()) / (fused.max() - fused.min() + 1e-5)
    torch.testing.assert_close(cams[0, 0, 0], expected)
    assert cams[0, 1].abs().max() == 0
    assert aux[0, 1].max() == 0 and aux[0, 0].max() == 0  # aux = -x: constant maps normalise to 0
    two, _ = multiscale_cams(_RampModel(), torch.randn(2, 3, 16, 12), scales=(1.0, 0.5, 1.5))
    assert two.shape == (2, 2, 16, 12) and two.amax() <= 1 and two.amin() == 0


def test_minmax_normalize():
    c = torch.tensor([[[[2.0, 4.0], [6.0, 10.0]]]])
    torch.testing.assert_close(minmax_normalize(c), (c - 2) / (8 + 1e-5))

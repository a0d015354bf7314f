"""Checks that the reference's arithmetic and parameters are reproduced exactly: the de-normalised image
PAR and the regularisation loss see (docs/methods/toco-mcc.md §4.2, §7.6), and the decoder's parameters (docs/methods/toco-mcc.md §2)."""

import numpy as np
import pytest
import torch
from torch import nn

from fastwsss.checkpoint import load_checkpoint, save_checkpoint
from fastwsss.data.transforms import denormalize, denormalize_uint8, normalize
from fastwsss.inference.predict import load_model
from fastwsss.models import WSSSNet, create_vit
from fastwsss.training import train

LEVELS = np.arange(256, dtype=np.uint8)


def every_level_normalised() -> torch.Tensor:
    """[1, 3, 1, 256]: each channel takes all 256 levels, normalised as the data pipeline does."""
    img = np.stack([LEVELS] * 3, axis=-1)[None]  # [1, 256, 3] uint8
    return torch.from_numpy(normalize(img))[None]


def denormalize_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's arithmetic, written out: per channel, a float32 tensor times a Python-float literal plus a
    Python-float literal, then ``.type(torch.uint8)``. Returns (float image, uint8 image)."""
    std, mean = [58.395, 57.12, 57.375], [123.675, 116.28, 103.53]
    out = torch.zeros_like(x)
    for c in range(3):
        out[:, c] = x[:, c] * std[c] + mean[c]
    return out, out.type(torch.uint8)


def test_denormalised_image_equals_the_reference_at_every_level():
    """All 256 levels of each channel, normalised by the pipeline: the float image and its uint8 quantisation equal
    the reference's bit for bit (IMAGENET_STD * 255 in float32 gives 57.120003 for green and moves 26 levels)."""
    x = every_level_normalised()
    ref_float, ref_uint8 = denormalize_ref(x)
    assert torch.equal(denormalize(x), ref_float)
    ours = denormalize_uint8(x)
    assert ours.dtype == torch.uint8
    for c in range(3):
        differ = (ours[0, c, 0] != ref_uint8[0, c, 0]).nonzero().flatten().tolist()
        assert not differ, f"channel {c}: levels {differ} differ from the reference's uint8 image"


def test_quantisation_truncates_as_the_reference_and_the_switch_rounds():
    """Faithful (truncation): a level comes back as itself or one lower (19 / 7 / 6 of the 256 R / G / B levels
    one lower with the pipeline's float32 normalisation). ``round_levels`` (quirks.round_denorm): every level of
    every channel comes back as itself."""
    x = every_level_normalised()
    levels = torch.from_numpy(LEVELS).int()
    back = denormalize_uint8(x)[0, :, 0].int()  # [3, 256]
    assert ((back == levels) | (back == levels - 1)).all()
    assert (back != levels).sum(1).tolist() == [19, 7, 6]
    rounded = denormalize_uint8(x, round_levels=True)[0, :, 0].int()
    for c in range(3):
        differ = (rounded[c] != levels).nonzero().flatten().tolist()
        assert not differ, f"channel {c}: levels {differ} do not round-trip"


def test_quantisation_is_defined_outside_the_pixel_range():
    x = torch.tensor([-10.0, -2.2, 2.7, 10.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    assert denormalize_uint8(x)[0, :, 0].tolist() == [[0, 0, 255, 255]] * 3


def test_no_conv_of_the_decoder_has_a_bias():
    """docs/methods/toco-mcc.md §2: the LargeFOV decoder's three convs (3x3 dil, 3x3 dil, 1x1) have no bias; its parameters are
    exactly the three conv weights."""
    torch.manual_seed(0)
    vit = create_vit("deit_tiny_patch16_224", img_size=32, patch_size=16, embed_dim=24, depth=3, num_heads=2)
    net = WSSSNet(vit, num_classes=5, decoder_channels=8, decoder_dilation=5)
    convs = [m for m in net.decoder.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3
    for i, conv in enumerate(convs):
        assert conv.bias is None, f"decoder conv {i} has a bias"
    assert [(c.kernel_size, c.dilation) for c in convs] == [((3, 3), (5, 5)), ((3, 3), (5, 5)), ((1, 1), (1, 1))]
    assert {k: tuple(v.shape) for k, v in net.decoder.state_dict().items()} == {
        "0.weight": (8, 24, 3, 3), "2.weight": (8, 8, 3, 3), "4.weight": (5, 8, 1, 1)}


def test_a_checkpoint_of_the_biased_decoder_is_refused_clearly(tiny_config, tmp_path):
    """A checkpoint written before the decoder lost its middle bias carries `decoder.2.bias`: inference and resuming
    refuse it with a message that names the parameter, instead of a bare state-dict error or a silent drop."""
    cfg = tiny_config("train.max_iters=1", "train.eval_interval=100")
    train(cfg)
    run = tmp_path / "run"
    state = load_checkpoint(run)
    state.pop("path")
    state["model"]["decoder.2.bias"] = torch.zeros(cfg.model.decoder_channels)
    save_checkpoint(run / "checkpoints" / "last.pt", state)
    with pytest.raises(ValueError, match=r"earlier fastwsss.*decoder\.2\.bias.*middle 3x3 conv has a bias"):
        load_model(run)
    with pytest.raises(ValueError, match=r"earlier fastwsss.*decoder\.2\.bias"):
        train(tiny_config("train.max_iters=2", "train.eval_interval=100", f"run.resume={run}",
                          "run.allow_changes=true"))


@pytest.mark.parametrize("round_denorm", [False, True])
def test_par_sees_the_quantised_image(monkeypatch, round_denorm):
    """The image refine_seg_label hands PAR is the reference's uint8 image / 255 (downsampled x2), truncated by
    default, rounded with quirks.round_denorm."""
    import fastwsss.pseudo.labels  # refine_seg_label looks par_refine up here

    seen = []
    real_par = fastwsss.pseudo.labels.par_refine
    monkeypatch.setattr(fastwsss.pseudo.labels, "par_refine",
                        lambda img, masks, **kw: seen.append(img) or real_par(img, masks, **kw))
    from fastwsss.pseudo import refine_seg_label

    x = every_level_normalised().expand(2, 3, 2, 256).contiguous()  # every level, two rows, two images
    refine_seg_label(torch.rand(2, 2, 2, 256), torch.ones(2, 2), x, None, down_scale=1, par_num_iter=1,
                     par_dilations=(1,), round_denorm=round_denorm)
    ref = denormalize_ref(x)[0]
    ref = (ref.round() if round_denorm else ref).type(torch.uint8).float() / 255
    want = torch.nn.functional.interpolate(ref, size=(2, 256), mode="bilinear", align_corners=False)
    assert len(seen) == 1 and torch.equal(seen[0], want)

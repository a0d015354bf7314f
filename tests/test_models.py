import logging

import pytest
import torch
import torch.nn.functional as F

from fastwsss.models import WSSSNet, create_vit, forward_features, load_pretrained, resample_pos_embed

SMALL = {"img_size": 64, "patch_size": 16, "embed_dim": 48, "depth": 4, "num_heads": 3}


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return create_vit("deit_tiny_patch16_224", **SMALL).eval()


def test_forward_features_equals_timm_intermediates(vit):
    x = torch.randn(2, 3, 64, 64)
    cls, patches, aux, grid = forward_features(vit, x, aux_layer=-3)
    final, inter = vit.forward_intermediates(x, indices=[1], norm=False, output_fmt="NLC", return_prefix_tokens=True)
    assert grid == (4, 4) and patches.shape == (2, 16, 48)
    torch.testing.assert_close(aux, inter[0][0], rtol=0, atol=0)  # block index 1 of 4 = aux_layer -3, pre-norm
    torch.testing.assert_close(cls, final[:, 0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(patches, final[:, 1:], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cls, vit.forward_features(x)[:, 0], rtol=1e-6, atol=1e-6)


def test_position_embedding_follows_the_input_size(vit):
    """At 128 px the 4x4 table is resampled bicubically (no antialias, align_corners False) to 8x8: the same as a
    timm model built for 128 px whose table holds that resampled embedding; remainder pixels are dropped."""
    big = create_vit("deit_tiny_patch16_224", **{**SMALL, "img_size": 128}).eval()
    sd = {k: v for k, v in vit.state_dict().items()}
    sd["pos_embed"] = resample_pos_embed(vit.pos_embed, (8, 8))
    big.load_state_dict(sd)
    x = torch.randn(1, 3, 128 + 15, 128 + 7)
    cls, patches, _, grid = forward_features(vit, x)
    ref = big.forward_features(x[..., :128, :128])
    assert grid == (8, 8)
    torch.testing.assert_close(patches, ref[:, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cls, ref[:, 0], rtol=1e-5, atol=1e-5)
    same = resample_pos_embed(vit.pos_embed, (4, 4))
    torch.testing.assert_close(same, vit.pos_embed, rtol=0, atol=1e-6)


def test_pos_embed_frozen_by_default():
    assert not create_vit("deit_tiny_patch16_224", **SMALL).pos_embed.requires_grad
    assert create_vit("deit_tiny_patch16_224", **SMALL, freeze_pos_embed=False).pos_embed.requires_grad


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_round_trip(vit, tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    sd = {k: v.contiguous() for k, v in vit.state_dict().items()}
    sd["head.weight"] = torch.zeros(1000, 48)  # an ImageNet head: reported, not loaded
    if suffix == ".pth":
        torch.save({"model": sd}, path)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path))
    fresh = create_vit("deit_tiny_patch16_224", **SMALL)
    report = load_pretrained(fresh, path)
    assert report.unexpected == ["head.weight"] and not report.missing
    for k, v in vit.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_missing_keys_are_reported_loudly(vit, tmp_path, caplog):
    sd = {k: v for k, v in vit.state_dict().items() if not k.startswith("blocks.3.")}
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"MISSING.*blocks\.3\.attn\.qkv\.weight"):
        load_pretrained(create_vit("deit_tiny_patch16_224", **SMALL), path)
    with caplog.at_level(logging.WARNING):
        report = load_pretrained(create_vit("deit_tiny_patch16_224", **SMALL), path, strict=False)
    assert "blocks.3.mlp.fc2.bias" in report.missing and "MISSING" in caplog.text
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_pretrained(vit, tmp_path / "nothere.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pth"):
        load_pretrained(vit, tmp_path / "junk.pth")


def test_pos_embed_of_another_grid_is_resampled_on_load(vit, tmp_path):
    sd = dict(vit.state_dict())
    sd["pos_embed"] = resample_pos_embed(vit.pos_embed, (14, 14))  # e.g. a 224-px checkpoint
    torch.save(sd, tmp_path / "w.pth")
    report = load_pretrained(create_vit("deit_tiny_patch16_224", **SMALL), tmp_path / "w.pth")
    assert report.resized == ["pos_embed"]


def test_heads(vit):
    net = WSSSNet(vit, num_classes=5, decoder_channels=16)
    x = torch.randn(2, 3, 64, 96)
    out = net(x)
    assert out.cls_logits.shape == (2, 4) and out.seg_logits.shape == (2, 5, 4, 6) and out.feat.shape == (2, 48, 4, 6)
    expected = out.feat.amax((2, 3)) @ net.classifier.weight[:, :, 0, 0].T  # W . maxpool(F)
    torch.testing.assert_close(out.cls_logits, expected, rtol=1e-5, atol=1e-5)
    cam, _ = net.cams(x)
    assert cam.shape == (2, 4, 4, 6) and not cam.requires_grad
    torch.testing.assert_close(cam, F.conv2d(out.feat, net.classifier.weight).detach(), rtol=1e-5, atol=1e-5)
    assert net.classifier.bias is None and net.decoder[0].bias is None and net.decoder[4].bias is None
    assert {id(m) for m in net.head_modules()} == {id(net.classifier), id(net.aux_classifier), id(net.decoder)}

"""Inference and whole-split evaluation from a checkpoint: the docs/methods/toco-mcc.md §10 fusion rules by hand, resumable output,
corrupt images, pseudo-label export, and streaming evaluation == evaluation of the stored predictions."""

from __future__ import annotations

import json
import shutil
from typing import NamedTuple

import numpy as np
import pytest
import torch

from fastwsss.checkpoint import save_checkpoint
from fastwsss.config import ConfigError, to_yaml
from fastwsss.data import EvalDataset, SegmentationList, read_mask
from fastwsss.evaluate import main as evaluate_main
from fastwsss.infer import main as infer_main
from fastwsss.inference.crf import CRFRunner
from fastwsss.inference.evaluation import CRF_MODE, evaluate_model, evaluate_predictions
from fastwsss.inference.export import list_images
from fastwsss.inference.predict import load_model, multiscale_seg_logits
from fastwsss.methods import build_method

FAST = ["kernels.backend=torch", "infer.num_workers=0", "infer.scales=[1.0,0.5]", "infer.crf_workers=2"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: a 2-thread OpenMP pool stalls on busy shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def checkpoint(tiny_config, tmp_path):
    """A checkpoint of the tiny model (random weights, fixed seed) with its config, as training writes it."""
    cfg = tiny_config(*FAST)
    torch.manual_seed(0)
    model = build_method(cfg).build_model()
    return save_checkpoint(tmp_path / "ckpt.pt", {"iteration": 7, "model": model.state_dict(), "config": to_yaml(cfg)})


# --------------------------------------------------------------------------------------------- fusion rules


class _Out(NamedTuple):
    seg_logits: torch.Tensor


class _FlipAndSizeModel:
    """Spatially constant logits [2 classes] that depend on the input width w and on whether the input is flipped
    (read off the marker: the image's left half is 1, its right half 0): unflipped (w, 0), flipped (1, 3)."""

    def __call__(self, x):
        n, _, h, w = x.shape
        flipped = x[:, 0, 0, 0] < 0.5
        c0 = torch.where(flipped, 1.0, float(w))
        c1 = torch.where(flipped, 3.0, 0.0)
        return _Out(torch.stack([c0, c1], 1)[:, :, None, None].expand(n, 2, max(1, h // 2), max(1, w // 2)))


def test_fusion_rules_by_hand():
    x = torch.zeros(1, 3, 4, 4)
    x[..., :2] = 1.0  # left half marked
    m = _FlipAndSizeModel()
    # VOC: native size; width 4 at scale 1, 8 at scale 2. Flip pair by SUM: (4+1, 0+3) = (5, 3) and (9, 3);
    # scales by MAX: (9, 3). (max/max would give (8, 3), sum/sum (14, 6), max/sum (12, 6).)
    voc = multiscale_seg_logits(m, x, scales=(1.0, 2.0), fusion="voc")
    assert voc.shape == (1, 2, 4, 4)
    assert voc[0, :, 0, 0].tolist() == [9.0, 3.0] and (voc == voc[:, :, :1, :1]).all()
    # COCO: resized to 6x6 first, widths 6 and 12. Flip pair by MAX: (6, 3) and (12, 3); scales by SUM: (18, 6).
    # The result comes back at the image's own size.
    coco = multiscale_seg_logits(m, x, scales=(1.0, 2.0), fusion="coco", coco_size=6)
    assert coco.shape == (1, 2, 4, 4)
    assert coco[0, :, 0, 0].tolist() == [18.0, 6.0]
    with pytest.raises(ValueError, match="fusion="):
        multiscale_seg_logits(m, x, scales=(1.0,), fusion="ade")


def test_fusion_unflips_the_flipped_pass():
    """A flip-equivariant model (logits = the first two input channels): the pair's sum is exactly 2x, not
    x + flip(x); COCO's max of the pair is one pass, resized to 7x7 and back."""

    def model(x):
        return _Out(x[:, :2])

    x = torch.randn(2, 3, 5, 7)
    torch.testing.assert_close(multiscale_seg_logits(model, x, scales=(1.0,), fusion="voc"), 2 * x[:, :2])
    resize = torch.nn.functional.interpolate
    there_and_back = resize(resize(x[:, :2], size=(7, 7), mode="bilinear"), size=(5, 7), mode="bilinear")
    torch.testing.assert_close(multiscale_seg_logits(model, x, scales=(1.0,), fusion="coco", coco_size=7),
                               there_and_back)


def test_infer_config_is_validated(tiny_config):
    with pytest.raises(ConfigError, match="infer.fusion") as err:
        tiny_config("infer.fusion=ade", "infer.crf_impl=densecrf", "infer.scales=[]")
    assert "infer.crf_impl" in str(err.value) and "infer.scales" in str(err.value)


# ------------------------------------------------------------------------------------- infer: files and resume


def _image_folder(synthetic_root, dst, n=4):
    dst.mkdir()
    for p in sorted((synthetic_root / "JPEGImages").glob("syn_val_*.jpg"))[:n]:
        shutil.copy(p, dst / p.name)
    return dst


def test_infer_writes_masks_and_resume_skips_finished_images(checkpoint, synthetic_root, tmp_path):
    images = _image_folder(synthetic_root, tmp_path / "images")
    (images / "sub").mkdir()
    shutil.copy(images / "syn_val_000000.jpg", images / "sub" / "again.jpg")
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    s = infer_main(["--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out), "--overlay",
                    "--logits", "npy", "--vis", "2"])
    assert (s["done"], s["skipped_finished"], s["failed"], s["iteration"]) == (5, 0, 0, 7)
    masks = sorted(p.relative_to(out / "masks").as_posix() for p in (out / "masks").rglob("*.png"))
    assert masks == ["sub/again.png"] + [f"syn_val_00000{i}.png" for i in range(4)]
    mask = read_mask(out / "masks" / "syn_val_000001.png")  # a palette PNG of class indices at the image size
    logits = np.load(out / "logits" / "syn_val_000001.npy")
    assert logits.dtype == np.float16 and logits.shape == (7, *mask.shape)
    assert np.array_equal(mask, logits.astype(np.float32).argmax(0))
    assert (out / "overlays" / "sub" / "again.png").is_file() and (out / "grid.png").is_file()
    assert json.loads((out / "summary.json").read_text())["done"] == 5

    (out / "masks" / "syn_val_000002.png").unlink()  # as if interrupted before this image
    stamp = (out / "masks" / "syn_val_000001.png").stat().st_mtime_ns
    again = infer_main(["--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out)])
    assert (again["done"], again["skipped_finished"]) == (1, 4)
    assert (out / "masks" / "syn_val_000002.png").is_file()
    assert (out / "masks" / "syn_val_000001.png").stat().st_mtime_ns == stamp  # untouched
    assert not list(out.rglob("*.tmp"))


def test_corrupt_image_is_reported_and_skipped(checkpoint, synthetic_root, tmp_path, capsys):
    images = _image_folder(synthetic_root, tmp_path / "images", n=2)
    (images / "broken.jpg").write_bytes(b"this is not a JPEG")
    data = (images / "syn_val_000000.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(data[: len(data) // 3])
    from PIL import Image

    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(images / "dot.png")  # smaller than one patch
    out = tmp_path / "out"
    s = infer_main(["--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out), "--crf"])
    assert (s["done"], s["failed"]) == (2, 3)
    failed = {f["image"].rsplit("/", 1)[1]: f["error"] for f in s["failures"]}
    assert set(failed) == {"broken.jpg", "truncated.jpg", "dot.png"}
    assert "truncated" in failed["truncated.jpg"] and "broken.jpg" in failed["broken.jpg"]
    assert sorted(p.name for p in (out / "masks").glob("*.png")) == ["syn_val_000000.png", "syn_val_000001.png"]
    printed = capsys.readouterr()
    assert "3 failed of 5 images" in printed.out and printed.out.count("FAILED") == 3
    assert "broken.jpg" in printed.out.splitlines()[0]  # reported when it happens, not only at the end


def test_list_file_and_name_clashes(synthetic_root, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text(f"# my images\n{synthetic_root}/JPEGImages/syn_val_000000.jpg\n\n")
    assert [(i.name, i.path.is_file()) for i in list_images(lst)] == [("syn_val_000000", True)]
    d = tmp_path / "clash"
    d.mkdir()
    for name in ("a.jpg", "a.png"):
        shutil.copy(synthetic_root / "JPEGImages" / "syn_val_000000.jpg", d / name)
    with pytest.raises(Exception, match="same output name"):
        list_images(d)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        list_images(tmp_path / "missing")


# ------------------------------------------------------------------------------ evaluation and pseudo labels


def test_streaming_evaluation_equals_evaluation_of_stored_predictions(checkpoint, synthetic_root, tmp_path):
    model, cfg, _ = load_model(checkpoint)
    items = SegmentationList(synthetic_root, "val", "voc", 7)
    c, i = cfg.cam, cfg.infer

    def seg_fn(x):
        return multiscale_seg_logits(model, x, scales=tuple(i.scales), fusion=i.fusion)

    modes = ("cam", "seg", "pseudo", CRF_MODE)
    with CRFRunner(impl="pydensecrf", workers=2) as crf:
        streamed = evaluate_model(model, EvalDataset(items), scales=tuple(c.scales), bkg_thresh=c.bkg_thresh,
                                  modes=modes, labeller=build_method(cfg).pseudo_labeller(), device=torch.device("cpu"),
                                  seg_fn=seg_fn,
                                  crf=crf, save_dir=tmp_path / "pred", batch_size=3)
    for m in modes:
        stored = evaluate_predictions(tmp_path / "pred" / m, items)
        assert np.array_equal(stored.mat, streamed[m].mat), m
        assert streamed[m].mat.sum() == 6 * 48 * 48
    # infer on the split writes the same segmentation, and the evaluate CLI reads it back identically
    infer_main(["--checkpoint", str(checkpoint), "--split", "val", "--out", str(tmp_path / "infer")])
    for name in items.names:
        assert np.array_equal(read_mask(tmp_path / "infer" / "masks" / f"{name}.png"),
                              read_mask(tmp_path / "pred" / "seg" / f"{name}.png")), name
    out = evaluate_main(["--checkpoint", str(checkpoint), "--predictions", str(tmp_path / "infer" / "masks"),
                         "--json", str(tmp_path / "stored.json")])
    assert out["predictions"]["confusion_matrix"] == streamed["seg"].mat.tolist()


def test_evaluate_cli_streams_a_split_with_crf(checkpoint, tmp_path, capsys):
    out = evaluate_main(["--checkpoint", str(checkpoint), "--modes", "seg,cam", "--crf", "--max-images", "4",
                         "--json", str(tmp_path / "r.json"), "infer.crf_impl=lattice", "infer.crf_batch_size=2"])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["num_images"] == 4 and saved["iteration"] == 7 and saved["crf_impl"] == "lattice"
    for mode in ("seg", "cam", CRF_MODE):
        assert 0 <= saved[mode]["miou"] <= 1 and set(saved[mode]["per_class"]) >= {"background"}
        assert np.asarray(saved[mode]["confusion_matrix"]).sum() == 4 * 48 * 48
    assert out == saved
    assert "seg-crf" in capsys.readouterr().out


def test_pseudo_label_export(checkpoint, synthetic_root, tmp_path):
    out = tmp_path / "pseudo"
    s = infer_main(["--checkpoint", str(checkpoint), "--split", "val", "--pseudo", "--out", str(out), "--vis", "2"])
    assert (s["mode"], s["done"], s["failed"]) == ("pseudo", 6, 0)
    items = SegmentationList(synthetic_root, "val", "voc", 7)
    values = set()
    for n in items.names:
        label = read_mask(out / "masks" / f"{n}.png")
        values |= set(np.unique(label).tolist())
        present = {0, 255, *(np.nonzero(items.cls_labels[items.names.index(n)])[0] + 1).tolist()}
        assert set(np.unique(label).tolist()) <= present  # only background, uncertain and the image's classes
    assert values <= set(range(7)) | {255}
    # the exported labels are what the evaluation's pseudo mode scores (uncertain counted as background)
    model, cfg, _ = load_model(checkpoint)
    c = cfg.cam
    streamed = evaluate_model(model, EvalDataset(items), scales=tuple(c.scales), bkg_thresh=c.bkg_thresh,
                              modes=("pseudo",), labeller=build_method(cfg).pseudo_labeller(), device=torch.device("cpu"))
    assert np.array_equal(evaluate_predictions(out / "masks", items).mat, streamed["pseudo"].mat)
    with pytest.raises(SystemExit):
        infer_main(["--checkpoint", str(checkpoint), "--images", str(tmp_path), "--pseudo", "--out", str(out)])

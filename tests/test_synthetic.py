"""Tests for the synthetic WSSS dataset generator (fastwsss.data.synthetic)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from fastwsss.data.synthetic import CLASS_NAMES, generate_dataset
from fastwsss.visualize import voc_palette as _palette


def voc_palette() -> list[int]:
    return _palette().ravel().tolist()

NUM_TRAIN, NUM_VAL, SIZE = 24, 8, 64


def _voc_files(root: pathlib.Path, split: str) -> list[tuple[pathlib.Path, pathlib.Path]]:
    list_name = "train_aug.txt" if split == "train" else "val.txt"
    names = (root / "ImageSets" / "Segmentation" / list_name).read_text().split()
    return [(root / "JPEGImages" / f"{n}.jpg", root / "SegmentationClassAug" / f"{n}.png") for n in names]


def _all_voc_files(root: pathlib.Path) -> list[pathlib.Path]:
    return [p for split in ("train", "val") for pair in _voc_files(root, split) for p in pair]


def _masks(root: pathlib.Path, split: str = "train") -> list[np.ndarray]:
    return [np.asarray(Image.open(mask)) for _, mask in _voc_files(root, split)]


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("voc")
    return generate_dataset(root, num_train=NUM_TRAIN, num_val=NUM_VAL, image_size=SIZE, seed=0)


@pytest.fixture(scope="module")
def big_root(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """150 training images: enough for class-coverage and colour statistics."""
    root = tmp_path_factory.mktemp("big")
    return generate_dataset(root, num_train=150, num_val=0, image_size=SIZE, seed=7)


def test_class_names_and_palette() -> None:
    assert len(CLASS_NAMES) == 7 and CLASS_NAMES[0] == "background"
    assert len(set(CLASS_NAMES)) == 7
    pal = voc_palette()
    assert len(pal) == 768 and all(isinstance(x, int) and 0 <= x <= 255 for x in pal)
    assert pal[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
    assert pal[255 * 3 : 256 * 3] == [224, 224, 192]


def test_voc_layout(voc_root: pathlib.Path) -> None:
    train = (voc_root / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()
    val = (voc_root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert train == [f"syn_train_{i:06d}" for i in range(NUM_TRAIN)]
    assert val == [f"syn_val_{i:06d}" for i in range(NUM_VAL)]
    assert (voc_root / "classes.txt").read_text().split() == list(CLASS_NAMES)
    for image_path, mask_path in _voc_files(voc_root, "train") + _voc_files(voc_root, "val"):
        with Image.open(image_path) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (SIZE, SIZE)
        with Image.open(mask_path) as mask:
            assert mask.format == "PNG" and mask.mode == "P" and mask.size == (SIZE, SIZE)
            assert mask.getpalette()[:30] == voc_palette()[:30]
    marker = json.loads((voc_root / ".fastwsss_synthetic.json").read_text())
    assert marker["num_train"] == NUM_TRAIN and marker["num_val"] == NUM_VAL and marker["seed"] == 0
    assert marker["layout"] == "voc" and marker["image_size"] == [SIZE, SIZE] and "format_version" in marker


def test_coco_layout(tmp_path: pathlib.Path) -> None:
    root = generate_dataset(tmp_path, num_train=5, num_val=3, image_size=48, seed=1, layout="coco")
    assert root == tmp_path
    for split, count in (("train", 5), ("val", 3)):
        names = (root / "ImageSets" / f"{split}.txt").read_text().split()
        assert names == [f"COCO_{split}2014_{i:012d}" for i in range(count)]
        for name in names:
            with Image.open(root / "JPEGImages" / f"{split}2014" / f"{name}.jpg") as image:
                assert image.mode == "RGB" and image.size == (48, 48)
            with Image.open(root / "SegmentationClass" / f"{split}2014" / f"{name}.png") as mask:
                assert mask.mode == "P"
                assert set(np.unique(np.asarray(mask)).tolist()) <= set(range(7)) | {255}
    assert (root / "classes.txt").read_text().split() == list(CLASS_NAMES)
    assert json.loads((root / ".fastwsss_synthetic.json").read_text())["layout"] == "coco"


def test_masks_values_and_labels(voc_root: pathlib.Path) -> None:
    fractions = []
    for mask in _masks(voc_root, "train") + _masks(voc_root, "val"):
        values = set(np.unique(mask).tolist())
        assert values <= set(range(7)) | {255}
        assert 1 <= len(values - {0, 255}) <= 3
        assert 0 in values  # there is always some background
        fractions.append(float(np.isin(mask, range(1, 7)).mean()))
    assert min(fractions) > 0.005 and max(fractions) < 0.7
    assert 0.05 < float(np.mean(fractions)) < 0.4


def test_class_coverage_and_multilabel(big_root: pathlib.Path) -> None:
    masks = _masks(big_root)[:60]
    present = [set(np.unique(m).tolist()) - {0, 255} for m in masks]
    assert set().union(*present) == set(range(1, 7))
    counts = np.bincount([len(p) for p in present], minlength=4)
    assert counts[0] == 0 and counts[1] > 0 and counts[2] + counts[3] >= len(masks) // 2  # multi-label is common


def test_colour_is_not_a_class_cue(big_root: pathlib.Path) -> None:
    per_class: dict[int, list[np.ndarray]] = {c: [] for c in range(1, 7)}
    for image_path, mask_path in _voc_files(big_root, "train"):
        image = np.asarray(Image.open(image_path), dtype=np.float64)
        mask = np.asarray(Image.open(mask_path))
        for c in set(np.unique(mask).tolist()) - {0, 255}:
            per_class[c].append(image[mask == c].mean(axis=0))  # one mean colour per (image, class)
    assert all(len(v) >= 20 for v in per_class.values())
    class_means = np.stack([np.mean(v, axis=0) for v in per_class.values()])
    global_mean = np.concatenate([np.stack(v) for v in per_class.values()]).mean(axis=0)
    # With ~40 objects per class the standard error of a class mean is ~7 grey levels per channel.
    assert np.abs(class_means - global_mean).max() < 30.0
    # Within a class, object colours vary widely (light and dark colours each span 105 levels per channel, and an
    # object's mean mixes the two, so its spread is about half of a uniform channel's ~30).
    for values in per_class.values():
        assert np.stack(values).std(axis=0).min() > 15.0


def test_deterministic(voc_root: pathlib.Path, tmp_path: pathlib.Path) -> None:
    again = generate_dataset(tmp_path / "a", num_train=NUM_TRAIN, num_val=NUM_VAL, image_size=SIZE, seed=0)
    for first, second in zip(_all_voc_files(voc_root), _all_voc_files(again), strict=True):
        assert first.read_bytes() == second.read_bytes(), first.name
    other = generate_dataset(tmp_path / "b", num_train=NUM_TRAIN, num_val=NUM_VAL, image_size=SIZE, seed=1)
    differing = sum(
        a.read_bytes() != b.read_bytes() for a, b in zip(_all_voc_files(voc_root), _all_voc_files(other), strict=True)
    )
    assert differing == 2 * (NUM_TRAIN + NUM_VAL)


def test_samples_do_not_depend_on_split_sizes(voc_root: pathlib.Path, tmp_path: pathlib.Path) -> None:
    small = generate_dataset(tmp_path, num_train=3, num_val=2, image_size=SIZE, seed=0)
    for name in ("syn_train_000002", "syn_val_000001"):
        for sub, ext in (("JPEGImages", "jpg"), ("SegmentationClassAug", "png")):
            assert (small / sub / f"{name}.{ext}").read_bytes() == (voc_root / sub / f"{name}.{ext}").read_bytes()


def test_num_workers_identical(voc_root: pathlib.Path, tmp_path: pathlib.Path) -> None:
    pooled = generate_dataset(tmp_path, num_train=NUM_TRAIN, num_val=NUM_VAL, image_size=SIZE, seed=0, num_workers=2)
    for first, second in zip(_all_voc_files(voc_root), _all_voc_files(pooled), strict=True):
        assert first.read_bytes() == second.read_bytes(), first.name


def test_idempotent(tmp_path: pathlib.Path) -> None:
    kwargs = {"num_train": 4, "num_val": 2, "image_size": 40, "seed": 3}
    root = generate_dataset(tmp_path, **kwargs)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert root / ".fastwsss_synthetic.json" in files
    stamps = {p: p.stat().st_mtime_ns for p in files}
    marker_stamp = stamps[root / ".fastwsss_synthetic.json"]
    assert marker_stamp == max(stamps.values())  # the marker is written last

    assert generate_dataset(tmp_path, **kwargs, num_workers=2) == root  # num_workers does not change the output
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == files
    assert {p: p.stat().st_mtime_ns for p in files} == stamps

    first_mask = root / "SegmentationClassAug" / "syn_train_000000.png"
    old_bytes = first_mask.read_bytes()
    generate_dataset(tmp_path, **{**kwargs, "seed": 4})  # different parameters: regenerated
    assert first_mask.read_bytes() != old_bytes
    assert json.loads((root / ".fastwsss_synthetic.json").read_text())["seed"] == 4

    (root / ".fastwsss_synthetic.json").unlink()  # a missing marker (interrupted run) also regenerates
    generate_dataset(tmp_path, **{**kwargs, "seed": 4})
    assert (root / ".fastwsss_synthetic.json").exists()


def test_non_square_size(tmp_path: pathlib.Path) -> None:
    root = generate_dataset(tmp_path, num_train=4, num_val=2, image_size=(75, 100), seed=0)
    for image_path, mask_path in _voc_files(root, "train") + _voc_files(root, "val"):
        with Image.open(image_path) as image, Image.open(mask_path) as mask:
            assert image.size == (100, 75) and mask.size == (100, 75)  # PIL sizes are (W, H)
            assert np.asarray(image).shape == (75, 100, 3) and np.asarray(mask).shape == (75, 100)
    assert json.loads((root / ".fastwsss_synthetic.json").read_text())["image_size"] == [75, 100]


def test_objects_are_localisable(big_root: pathlib.Path) -> None:
    """Objects stand out from clutter locally: texture contrast inside objects exceeds the background's."""
    inside, outside = [], []
    for image_path, mask_path in _voc_files(big_root, "train")[:40]:
        gray = np.asarray(Image.open(image_path).convert("L"), dtype=np.float64)
        mask = np.asarray(Image.open(mask_path))
        grad = np.abs(np.diff(gray, axis=1))[:-1, :] + np.abs(np.diff(gray, axis=0))[:, :-1]
        fg = mask[:-1, :-1] > 0
        inside.append(grad[fg].mean())
        outside.append(grad[~fg].mean())
    assert np.median(inside) > 1.5 * np.median(outside)


def test_invalid_arguments(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError):
        generate_dataset(tmp_path, num_train=1, num_val=1, layout="ade")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        generate_dataset(tmp_path, num_train=-1, num_val=1)
    with pytest.raises(ValueError):
        generate_dataset(tmp_path, num_train=1, num_val=1, image_size=8)


def test_clutter_scales_the_background_only(tmp_path):
    """data.synthetic.clutter: fewer background blobs and lines, the same objects and masks; 1 is the default data."""
    roots = {c: generate_dataset(tmp_path / str(c), num_train=6, num_val=0, image_size=64, clutter=c)
             for c in (1.0, 0.0)}
    default = generate_dataset(tmp_path / "default", num_train=6, num_val=0, image_size=64)
    names = (default / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()
    for name in names:
        assert (roots[1.0] / "JPEGImages" / f"{name}.jpg").read_bytes() == \
            (default / "JPEGImages" / f"{name}.jpg").read_bytes()
        masks = [np.asarray(Image.open(r / "SegmentationClassAug" / f"{name}.png")) for r in roots.values()]
        np.testing.assert_array_equal(*masks)
    images = [np.stack([np.asarray(Image.open(r / "JPEGImages" / f"{n}.jpg"), dtype=np.float32) for n in names])
              for r in roots.values()]
    assert np.abs(images[0] - images[1]).max() > 100  # blobs and lines gone
    with pytest.raises(ValueError, match="clutter"):
        generate_dataset(tmp_path / "bad", num_train=1, num_val=0, image_size=32, clutter=-1)


def test_colour_cue_paints_each_class_in_its_colour(tmp_path):
    """data.synthetic.colour_cue=1: every object's light colour is its class's (jittered): in each object's light
    pixels the class colour's bright channels stand above its dim ones. Out of [0, 1] is refused."""
    from fastwsss.data.synthetic import _CUE_COLOURS

    root = generate_dataset(tmp_path / "cue", num_train=10, num_val=0, image_size=64, colour_cue=1.0)
    seen = set()
    for name in (root / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split():
        image = np.asarray(Image.open(root / "JPEGImages" / f"{name}.jpg"), dtype=np.float32)
        mask = np.asarray(Image.open(root / "SegmentationClassAug" / f"{name}.png"))
        for c in np.unique(mask[mask > 0]):
            pixels = image[mask == c]
            light = np.median(pixels[pixels.max(1) > 170], axis=0)
            bright = _CUE_COLOURS[c - 1] > 200
            assert light[bright].min() - light[~bright].max() > 40, (name, c, light)
            seen.add(int(c))
    assert len(seen) >= 4
    with pytest.raises(ValueError, match="colour_cue"):
        generate_dataset(tmp_path / "bad", num_train=1, num_val=0, image_size=32, colour_cue=1.5)

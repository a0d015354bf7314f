import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from fastwsss.data import DataError, EvalDataset, ResumableSampler, SegmentationList, TrainDataset
from fastwsss.data.synthetic import generate_dataset
from fastwsss.data.transforms import CropViews, augment, random_pad_crop


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("coco"), num_train=10, num_val=4, image_size=(40, 56),
                            seed=3, layout="coco")


def _labels_from_masks(items):
    out = []
    for name in items.names:
        m = np.asarray(Image.open(items.mask_path(name)))
        out.append([c for c in range(1, items.num_classes) if (m == c).any()])
    return out


@pytest.mark.parametrize("layout", ["voc", "coco"])
def test_labels_are_derived_from_masks_and_cached(layout, synthetic_root, coco_root):
    root, split = (synthetic_root, "train_aug") if layout == "voc" else (coco_root, "train")
    items = SegmentationList(root, split, layout, num_classes=7)
    assert [list(np.nonzero(row)[0] + 1) for row in items.cls_labels] == _labels_from_masks(items)
    assert items.cls_labels.any(1).all()
    cache = list((root / ".fastwsss_cache").glob(f"labels_{layout}_{split}_*.npy"))
    assert len(cache) == 1
    np.save(cache[0], items.pixel_counts * 0 + 1)  # a cached answer is used as is: proves the cache is read
    assert SegmentationList(root, split, layout, num_classes=7).cls_labels.all()
    cache[0].unlink()


def test_coco_paths_use_subset_folders(coco_root):
    items = SegmentationList(coco_root, "val", "coco", num_classes=7)
    assert items.image_path(items.names[0]).parent.name == "val2014"
    sample = EvalDataset(items)[0]
    assert sample["img"].shape == (3, 40, 56) and sample["mask"].shape == (40, 56)


def test_missing_paths_are_named(synthetic_root, tmp_path):
    with pytest.raises(DataError, match="dataset root not found: .*nowhere"):
        SegmentationList(tmp_path / "nowhere", "train_aug")
    with pytest.raises(DataError, match="split list not found: .*nosplit.txt"):
        SegmentationList(synthetic_root, "nosplit")
    root = tmp_path / "voc"
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "SegmentationClassAug").mkdir()
    (root / "ImageSets/Segmentation/train.txt").write_text("a\nb\n")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "JPEGImages/a.jpg")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "JPEGImages/b.jpg")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "SegmentationClassAug/a.png")
    with pytest.raises(DataError, match="mask.*not found: .*SegmentationClassAug/b.png"):
        SegmentationList(root, "train")
    Image.fromarray(np.full((8, 8), 30, np.uint8)).save(root / "SegmentationClassAug/b.png")
    with pytest.raises(DataError, match=r"b.png holds class values \[30\]"):
        SegmentationList(root, "train")
    Image.fromarray(np.full((8, 8), 1, np.uint8)).save(root / "SegmentationClassAug/b.png")
    items = SegmentationList(root, "train")
    (root / "JPEGImages/b.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="corrupt or unreadable image .*b.jpg"):
        TrainDataset(items, CropViews(8, (1, 1)), seed=0)[(1, 0)]


def test_train_sample_and_img_box_of_padded_crop(synthetic_root):
    items = SegmentationList(synthetic_root, "train_aug", num_classes=7)
    ds = TrainDataset(items, CropViews(64, (0.5, 0.5)), seed=0)  # 48 px -> 24 px: always padded
    s = ds[(0, 5)]
    assert s["img"].shape == (3, 64, 64) and s["img"].dtype == torch.float32
    h0, h1, w0, w1 = s["img_box"].tolist()
    assert (h1 - h0, w1 - w0) == (24, 24)
    assert torch.equal(s["cls_label"], torch.from_numpy(items.cls_labels[0].astype(np.float32)))
    assert torch.equal(ds[(0, 5)]["img"], s["img"]) and not torch.equal(ds[(0, 6)]["img"], s["img"])


def test_random_pad_crop_box_marks_exactly_the_image_pixels():
    rng = np.random.default_rng(0)
    for h, w in [(10, 30), (40, 40), (5, 5), (64, 20)]:
        img = np.ones((h, w, 3), np.uint8)
        crop, (h0, h1, w0, w1) = random_pad_crop(img, rng, 32)
        inside = np.zeros((32, 32), bool)
        inside[h0:h1, w0:w1] = True
        assert crop.shape == (32, 32, 3)
        assert np.array_equal(crop[..., 0] == 1, inside)


def test_augment_is_deterministic_given_the_rng():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    a = augment(img, np.random.default_rng(7), 32, (0.5, 2.0))
    b = augment(img, np.random.default_rng(7), 32, (0.5, 2.0))
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]


def test_sampler_resumes_the_same_stream():
    full = list(itertools.islice(iter(ResumableSampler(7, seed=3)), 30))
    tail = list(itertools.islice(iter(ResumableSampler(7, seed=3, start=12)), 18))
    assert full[12:] == tail
    assert sorted(i for i, _ in full[:7]) == list(range(7))  # each epoch is a permutation
    assert [p for _, p in full] == list(range(30))

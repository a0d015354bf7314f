"""Dense CRF: our mean field on the permutohedral lattice against pydensecrf2 (the reference), on real photographs
and on synthetic val images; the streaming runner (process pool / batched lattice)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastwsss.config import InferConfig
from fastwsss.data import SegmentationList, read_image, read_mask
from fastwsss.inference.crf import CRFParams, CRFRunner, dense_crf, dense_crf_torch
from fastwsss.inference.predict import crf_params

pytest.importorskip("pydensecrf.densecrf")
AGREE = 0.999  # the bar: >= 99.9 % of pixels get the same label


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on shared 2-core machines a 2-thread OpenMP pool stalls on busy cores (measured: these
    tests take 100 s instead of 13 s under load) and the lattice's sparse products gain little from it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic_probs(height: int, width: int, num_classes: int, seed: int, cell: int = 12) -> np.ndarray:
    """Blurred random logits -> softmax [C, H, W] float32: smooth blobs whose borders ignore the image, so the
    CRF has edges to snap them to."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, num_classes, height // cell + 2, width // cell + 2, generator=g) * 3
    logits = F.interpolate(logits, size=(height, width), mode="bicubic", align_corners=False)
    return logits.softmax(1)[0].numpy()


def mask_probs(mask: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """A noisy, blurred one-hot of a ground-truth mask -> softmax [C, H, W]: a plausible network output."""
    g = torch.Generator().manual_seed(seed)
    onehot = F.one_hot(torch.from_numpy(mask.astype(np.int64)), num_classes).permute(2, 0, 1)[None].float()
    blurred = F.avg_pool2d(onehot, 7, stride=1, padding=3, count_include_pad=False)
    logits = 4 * blurred + torch.randn(blurred.shape, generator=g)
    return logits.softmax(1)[0].numpy()


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).mean())


def photographs() -> list[tuple[str, np.ndarray]]:
    data = pytest.importorskip("skimage.data")
    # a quarter of the size keeps the test fast (75x113 to 128x128); still real photographs: edges, texture, shading
    return [(name, np.ascontiguousarray(getattr(data, name)()[::4, ::4])) for name in ("astronaut", "chelsea", "coffee")]


@pytest.mark.parametrize("name,image", photographs(), ids=lambda v: v if isinstance(v, str) else "")
def test_lattice_crf_agrees_with_pydensecrf_on_photographs(name, image):
    H, W, _ = image.shape
    probs = synthetic_probs(H, W, 5, seed=len(name), cell=8)
    ref = dense_crf(image, probs, impl="pydensecrf")
    ours = dense_crf(image, probs, impl="lattice", backend="torch")
    assert ref.shape == ours.shape == (5, H, W)
    before, a, b = probs.argmax(0), ref.argmax(0), ours.argmax(0)
    assert agreement(a, before) < 0.95, "the CRF must change the labels, or agreement says nothing"
    assert agreement(a, b) == 1.0, f"{name}: {100 * agreement(a, b):.3f}% of pixels agree"  # docs/inference.md: 100 %
    diff = np.abs(ref - ours)
    assert diff.max() < 1e-5, f"{name}: marginals differ by up to {diff.max():.2e} at {np.unravel_index(diff.argmax(), diff.shape)}"


def test_batched_lattice_crf_agrees_with_pydensecrf_pool_on_synthetic_val(synthetic_root):
    items = SegmentationList(synthetic_root, "val", "voc", 7)
    images = [np.array(read_image(items.image_path(n))) for n in items.names]
    masks = [read_mask(items.mask_path(n)) for n in items.names]
    probs = [mask_probs(m, 7, seed=i) for i, m in enumerate(masks)]
    # ours: every val image in one batch
    q = dense_crf_torch(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), torch.from_numpy(np.stack(probs)),
                        backend="torch")
    ours = q.argmax(1).numpy()
    # the reference through the process pool; results come back in any order
    with CRFRunner(impl="pydensecrf", workers=2) as runner:
        got = []
        for i, (im, p) in enumerate(zip(images, probs)):
            got += runner.submit(i, im, p)
        got += runner.finish()
    assert sorted(t for t, _ in got) == list(range(len(images)))
    ref = np.stack([label for _, label in sorted(got, key=lambda r: r[0])])
    assert ref.dtype == np.uint8 and ref.shape == ours.shape
    assert agreement(ref, ours) >= AGREE, f"{100 * agreement(ref, ours):.3f}% of pixels agree"
    assert agreement(ref, np.stack(probs).argmax(1)) < 1.0


def test_lattice_runner_batches_by_size_and_returns_every_image():
    rng = np.random.default_rng(0)
    shapes = [(20, 24), (20, 24), (20, 24), (16, 18), (20, 24)]
    inputs = [(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), synthetic_probs(h, w, 3, seed=i, cell=6))
              for i, (h, w) in enumerate(shapes)]
    runner = CRFRunner(impl="lattice", batch_size=2, backend="torch")
    got = []
    for i, (im, p) in enumerate(inputs):
        got += runner.submit(f"img{i}", im, p)
    # img0+img1: a full batch; img2 and img3 each flushed alone when the next image has another size
    assert [t for t, _ in got] == ["img0", "img1", "img2", "img3"]
    got += runner.finish()
    assert [t for t, _ in got] == [f"img{i}" for i in range(5)]
    for (_, label), (im, p) in zip(got, inputs):
        single = dense_crf(im, p, impl="lattice", backend="torch").argmax(0)
        assert np.array_equal(label, single)  # batching never changes a result


def test_crf_rejects_bad_inputs():
    image = np.zeros((8, 9, 3), np.uint8)
    with pytest.raises(ValueError, match=r"probs must be \[C, H, W\]"):
        dense_crf(image, np.ones((2, 8, 8), np.float32) / 2, impl="pydensecrf")
    with pytest.raises(ValueError, match="image must be uint8"):
        dense_crf(image.astype(np.float32), np.ones((2, 8, 9), np.float32) / 2, impl="pydensecrf")
    with pytest.raises(ValueError, match="impl="):
        dense_crf(image, np.ones((2, 8, 9), np.float32) / 2, impl="densecrf")
    with pytest.raises(ValueError, match="matching images"):
        dense_crf_torch(torch.zeros(1, 3, 8, 9), torch.zeros(1, 2, 8, 8))


def test_params_are_spec_defaults():
    p = CRFParams()
    assert (p.iterations, p.gauss_sxy, p.gauss_compat, p.bi_sxy, p.bi_srgb, p.bi_compat) == (10, 1, 1, 121, 5, 4)
    assert crf_params(InferConfig()) == p  # the config's infer.crf_* defaults are the same numbers

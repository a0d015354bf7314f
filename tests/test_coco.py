"""The COCO converter (``python -m fastwsss.data.coco``) on a small annotation file written here: polygons, both kinds
of RLE, a crowd region, overlapping instances, an image without annotation, non-contiguous category ids. Every
expected mask is drawn here with numpy from the same geometry, never through the converter's code path."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils  # the test extra has it: only to write the compressed RLE input

from fastwsss.config import ConfigError, load_config
from fastwsss.data import SegmentationList
from fastwsss.data.coco import CocoError, convert, main
from fastwsss.evaluate import main as evaluate_main
from fastwsss.training import train

from conftest import TINY_OVERRIDES

# pycocotools' decode under numpy 2 (its own code, harmless: the array is copied)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

# category ids out of order and with gaps: ascending id -> 1..4 (3 -> 1, 17 -> 2, 44 -> 3, 90 -> 4)
CATEGORIES = [{"id": 90, "name": "toothbrush"}, {"id": 3, "name": "car"}, {"id": 44, "name": "bottle"},
              {"id": 17, "name": "cat"}]
VALUE = {3: 1, 17: 2, 44: 3, 90: 4}
CLASSES = ["background", "car", "cat", "bottle", "toothbrush"]
H, W = 40, 56


def rect(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    """A polygon along the pixel edges of columns x0..x1-1, rows y0..y1-1."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def rect_mask(x0: int, y0: int, x1: int, y1: int, h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def disk(cx: float, cy: float, r: float, h: int = H, w: int = W) -> np.ndarray:
    y, x = np.mgrid[:h, :w]
    return (x - cx) ** 2 + (y - cy) ** 2 <= r * r


def uncompressed_rle(m: np.ndarray) -> dict:
    """COCO's uncompressed RLE, written here: column-major run lengths, the first run counting zeros."""
    flat = m.ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"counts": counts, "size": list(m.shape)}


def compressed_rle(m: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"counts": rle["counts"].decode("ascii"), "size": list(rle["size"])}


def paint(h: int, w: int, layers: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """Class-index mask: each pixel takes the first layer covering it."""
    out = np.zeros((h, w), np.uint8)
    for value, m in layers:
        out[m & (out == 0)] = value
    return out


TRIANGLE = [(6.0, 4.0), (50.0, 12.0), (20.0, 36.0)]


def triangle_inside_and_margin(h: int = H, w: int = W) -> tuple[np.ndarray, np.ndarray]:
    """Which pixel centres lie inside TRIANGLE, and their distance to its nearest edge."""
    y, x = np.mgrid[:h, :w] + 0.5
    inside = np.ones((h, w), bool)
    dist = np.full((h, w), np.inf)
    for (ax, ay), (bx, by) in zip(TRIANGLE, TRIANGLE[1:] + TRIANGLE[:1]):
        cross = (bx - ax) * (y - ay) - (by - ay) * (x - ax)
        inside &= cross >= 0 if (TRIANGLE[1][0] - TRIANGLE[0][0]) * (TRIANGLE[2][1] - TRIANGLE[0][1]) - \
            (TRIANGLE[1][1] - TRIANGLE[0][1]) * (TRIANGLE[2][0] - TRIANGLE[0][0]) > 0 else cross <= 0
        t = np.clip(((x - ax) * (bx - ax) + (y - ay) * (by - ay)) / ((bx - ax) ** 2 + (by - ay) ** 2), 0, 1)
        dist = np.minimum(dist, np.hypot(x - (ax + t * (bx - ax)), y - (ay + t * (by - ay))))
    return inside, dist


def make_dataset(year: str = "2014") -> dict:
    """Two annotation files (train, val) and what each image's mask must be, per crowd mode."""
    blob = disk(14, 26, 9)
    ring = disk(40, 20, 12) & ~disk(40, 20, 5)
    crowd = rect_mask(4, 4, 40, 30)
    # (image, [(category id, iscrowd, segmentation)] in JSON order, expected mask by crowd mode)
    l_shape = [rect(30, 2, 54, 8), rect(30, 8, 36, 30)]  # one instance in two parts
    train = {
        "overlap": ([(17, 0, [rect(4, 4, 30, 20)]), (3, 0, [rect(20, 10, 50, 30)])],
                    paint(H, W, [(2, rect_mask(4, 4, 30, 20)), (1, rect_mask(20, 10, 50, 30))])),
        "overlap_reversed": ([(3, 0, [rect(20, 10, 50, 30)]), (17, 0, [rect(4, 4, 30, 20)])],
                             paint(H, W, [(1, rect_mask(20, 10, 50, 30)), (2, rect_mask(4, 4, 30, 20))])),
        "rle": ([(44, 0, uncompressed_rle(blob)), (90, 0, compressed_rle(ring)), (3, 0, l_shape)],
                paint(H, W, [(3, blob), (4, ring), (1, rect_mask(30, 2, 54, 8) | rect_mask(30, 8, 36, 30))])),
        "crowd": ([(3, 1, uncompressed_rle(crowd)), (17, 0, [rect(30, 20, 50, 36)])], None),
        "empty": ([], np.zeros((H, W), np.uint8)),
        "triangle": ([(90, 0, [[c for p in TRIANGLE for c in p]])], None),
        # parts of under 3 points cover nothing (pycocotools would read a first one of 2 points as a box and fail)
        "tiny_parts": ([(17, 0, [[5, 5, 9, 9]]), (44, 0, [rect(2, 2, 10, 10), [20, 20, 30, 30], [40, 4]])],
                       paint(H, W, [(3, rect_mask(2, 2, 10, 10))])),
    }
    crowd_cat = paint(H, W, [(1, crowd), (2, rect_mask(30, 20, 50, 36))])
    crowd_ign = paint(H, W, [(2, rect_mask(30, 20, 50, 36)), (255, crowd)])
    val = {f"v{i}": ([(c, 0, [rect(2 + 3 * i, 3, 20 + 3 * i, 25)])], paint(H, W, [(VALUE[c], rect_mask(
        2 + 3 * i, 3, 20 + 3 * i, 25))])) for i, c in enumerate([3, 17, 44, 90, 3])}
    val["v_empty"] = ([], np.zeros((H, W), np.uint8))
    files = {}
    for subset, content in ((f"train{year}", train), (f"val{year}", val)):
        images, per_image, expected = [], [], {}
        for k, (key, (anns_of_image, mask)) in enumerate(content.items()):
            iid = 1000 * (subset.startswith("val")) + 7 * k + 5
            file_name = f"COCO_{subset}_{iid:012d}.jpg" if year == "2014" else f"{iid:012d}.jpg"
            images.append({"id": iid, "file_name": file_name, "height": H, "width": W})
            per_image.append([{"image_id": iid, "category_id": cid, "iscrowd": iscrowd, "segmentation": seg,
                               "area": 1.0, "bbox": [0, 0, 1, 1]} for cid, iscrowd, seg in anns_of_image])
            expected[Path(file_name).stem] = (key, mask)
        images.reverse()  # the lists are sorted by name, whatever the JSON's order
        # the annotations of different images interleaved (each image's first, then each one's second, ...): only
        # the order within an image counts
        anns = [a for row in itertools.zip_longest(*per_image) for a in row if a is not None]
        for i, a in enumerate(anns):
            a["id"] = 100 + i
        files[subset] = ({"images": images, "annotations": anns, "categories": CATEGORIES}, expected)
    files["crowd"] = {"category": crowd_cat, "ignore": crowd_ign}
    return files


def write_files(folder: Path, year: str = "2014", jpegs: Path | None = None) -> tuple[list[Path], dict]:
    data = make_dataset(year)
    paths = []
    for subset in (f"train{year}", f"val{year}"):
        content, _ = data[subset]
        path = folder / f"instances_{subset}.json"
        path.write_text(json.dumps(content))
        paths.append(path)
        if jpegs is not None:
            rng = np.random.default_rng(len(subset))
            for im in content["images"]:
                out = jpegs / "JPEGImages" / subset / im["file_name"]
                out.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(out, quality=90)
    return paths, data


def expected_mask(data: dict, subset: str, name: str, crowd: str) -> np.ndarray:
    key, mask = data[subset][1][name]
    if key == "crowd":
        return data["crowd"][crowd]
    return mask


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "P", path
        return np.asarray(im).copy()


@pytest.mark.parametrize("crowd", ["category", "ignore"])
def test_masks_lists_and_classes(tmp_path, crowd):
    root = tmp_path / "coco"
    paths, data = write_files(tmp_path, jpegs=root)
    summary = convert(paths, root, val_part=3, crowd=crowd, progress=False)
    for subset in ("train2014", "val2014"):
        for name, (key, _) in data[subset][1].items():
            got = read_png(root / "SegmentationClass" / subset / f"{name}.png")
            if key == "triangle":
                inside, margin = triangle_inside_and_margin()
                clear = margin > 1.0  # pixels whose centre is over a pixel from an edge: no rasterisation doubt
                assert np.array_equal(got[clear], np.where(inside, 4, 0)[clear])
                assert set(np.unique(got)) == {0, 4}
                continue
            want = expected_mask(data, subset, name, crowd)
            assert np.array_equal(got, want), (subset, key, np.argwhere(got != want)[:5])
    assert (root / "classes.txt").read_text().splitlines() == CLASSES
    train_names = sorted(n for n, (key, _) in data["train2014"][1].items() if key != "empty")
    empty = [n for n, (key, _) in data["train2014"][1].items() if key == "empty"]
    assert (root / "ImageSets/train.txt").read_text().splitlines() == train_names
    assert (root / "ImageSets/train_unannotated.txt").read_text().splitlines() == empty
    val = (root / "ImageSets/val.txt").read_text().splitlines()
    assert len(val) == 5 and val == sorted(val)
    assert (root / "ImageSets/val_part.txt").read_text().splitlines() == val[:3]
    s = summary["subsets"]["train2014"]
    assert (s["images"], s["listed"], s["unannotated"], s["written"], s["kept"]) == (7, 6, 1, 7, 0)
    assert (s["crowd_annotations"], s["empty_segmentations"], s["missing_images"]) == (1, 1, 0)
    assert summary["num_classes"] == 5
    # read back through the coco layout: the image-level labels of the crowd image (car = 1 is its crowd region)
    items = SegmentationList(root, "train", "coco", num_classes=5)
    crowd_name = next(n for n, (key, _) in data["train2014"][1].items() if key == "crowd")
    labels = items.cls_labels[items.names.index(crowd_name)]
    assert labels.tolist() == ([True, True, False, False] if crowd == "category" else [False, True, False, False])


def test_unannotated_images_can_be_listed(tmp_path):
    paths, data = write_files(tmp_path)
    convert(paths, tmp_path / "coco", keep_unannotated=True, val_part=0, progress=False)
    train = (tmp_path / "coco/ImageSets/train.txt").read_text().splitlines()
    assert train == sorted(data["train2014"][1]) and len(train) == 7
    assert not (tmp_path / "coco/ImageSets/val_part.txt").exists()


def test_resumable_and_parallel(tmp_path):
    paths, data = write_files(tmp_path)
    root = tmp_path / "coco"
    first = convert(paths, root, workers=2, val_part=2, progress=False)
    assert first["subsets"]["train2014"]["written"] == 7 and first["subsets"]["val2014"]["written"] == 6
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != ".fastwsss.lock")
    stamps = {p: p.stat().st_mtime_ns for p in files}
    second = convert(paths, root, workers=2, val_part=2, progress=False)
    assert [s["written"] for s in second["subsets"].values()] == [0, 0]
    assert {p: p.stat().st_mtime_ns for p in files} == stamps, "a second run rewrites nothing"
    assert not list(root.rglob("*.tmp"))
    gone = root / "SegmentationClass/train2014" / f"{sorted(data['train2014'][1])[2]}.png"
    before = read_png(gone)
    gone.unlink()
    (gone.parent / f".{gone.name}.abc123.tmp").write_bytes(b"half a png")  # left by a killed run
    third = convert(paths, root, val_part=2, progress=False)
    assert third["subsets"]["train2014"]["written"] == 1 and third["subsets"]["val2014"]["written"] == 0
    assert np.array_equal(read_png(gone), before)
    assert {p: p.stat().st_mtime_ns for p in files if p != gone} == {p: s for p, s in stamps.items() if p != gone}
    assert not list(root.rglob("*.tmp"))
    # other settings into the same root are refused, --overwrite remakes everything
    with pytest.raises(CocoError, match="--crowd category.*--overwrite"):
        convert(paths, root, crowd="ignore", progress=False)
    redo = convert(paths, root, crowd="ignore", overwrite=True, val_part=2, progress=False)
    assert [s["written"] for s in redo["subsets"].values()] == [7, 6]
    crowd_name = next(n for n, (key, _) in data["train2014"][1].items() if key == "crowd")
    assert (read_png(root / "SegmentationClass/train2014" / f"{crowd_name}.png") == 255).any()


def test_val_part_is_the_first_of_the_sorted_val_list(tmp_path):
    paths, _ = write_files(tmp_path)
    convert(paths[1:], tmp_path / "a", val_part=4, progress=False)
    convert(paths[1:], tmp_path / "b", val_part=100, progress=False)
    val = (tmp_path / "a/ImageSets/val.txt").read_text().splitlines()
    assert (tmp_path / "a/ImageSets/val_part.txt").read_text().splitlines() == val[:4]
    assert (tmp_path / "b/ImageSets/val_part.txt").read_text().splitlines() == val
    assert not (tmp_path / "a/ImageSets/train.txt").exists()


def test_coco_2017_names_and_folders(tmp_path):
    """2017's files: images ``<id>.jpg`` in train2017 / val2017; the lists say the folder, the layout reads it."""
    paths, data = write_files(tmp_path, year="2017", jpegs=tmp_path / "coco")
    root = tmp_path / "coco"
    summary = convert(paths, root, val_part=2, progress=False)
    assert summary["subsets"]["val2017"]["missing_images"] == 0
    lines = (root / "ImageSets/val.txt").read_text().splitlines()
    assert lines and all(ln.startswith("val2017/") and ln[8:].isdigit() for ln in lines)
    assert (root / "ImageSets/val_part.txt").read_text().splitlines() == lines[:2]
    items = SegmentationList(root, "train", "coco", num_classes=5)
    name = items.names[0]
    assert items.image_path(name) == root / "JPEGImages/train2017" / f"{name}.jpg"
    assert items.mask_path(name) == root / "SegmentationClass/train2017" / f"{name}.png"
    for i, name in enumerate(items.names):
        want = expected_mask(data, "train2017", name, "category")
        if want is not None:
            assert np.array_equal(items.pixel_counts[i], np.bincount(want.ravel(), minlength=256)[:5])
    # 2014 into the same root would mix two train lists: refused
    (tmp_path / "y").mkdir()
    with pytest.raises(CocoError, match="its train list holds train2017, not train2014"):
        convert(write_files(tmp_path / "y")[0], root, progress=False)


def test_other_category_sets_are_mapped_in_ascending_order(tmp_path, caplog):
    paths, _ = write_files(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fastwsss"):
        summary = convert(paths[:1], tmp_path / "coco", progress=False)
    assert "4 categories, not COCO's 80" in caplog.text and "data.num_classes=5" in caplog.text
    assert summary["num_classes"] == 5


def _bad(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_bad_inputs_are_named(tmp_path):
    good, _ = make_dataset()["train2014"]
    with pytest.raises(CocoError, match="not found"):
        convert([tmp_path / "nope.json"], tmp_path / "out")
    with pytest.raises(CocoError, match=r"not valid JSON: .*line 1 column"):
        convert([_bad(tmp_path, "instances_train2014.json", json.dumps(good)[:300])], tmp_path / "out")
    with pytest.raises(CocoError, match="not a COCO instances file: no list 'annotations'"):
        convert([_bad(tmp_path, "instances_train2014.json", {"images": [], "categories": []})], tmp_path / "out")

    def variant(change) -> Path:
        content = json.loads(json.dumps(good))
        change(content)
        return _bad(tmp_path, "instances_train2014.json", content)

    def two_unknown_images(c):
        c["annotations"][0]["image_id"] = 999999
        c["annotations"][3]["image_id"] = 888888

    with pytest.raises(CocoError, match=r"2 annotation\(s\) of images not in 'images':\n.*999999\n.*888888"):
        convert([variant(two_unknown_images)], tmp_path / "out")
    with pytest.raises(CocoError, match=r"categories not in 'categories' \(\[3, 17, 44, 90\]\):\n.*category_id 5"):
        convert([variant(lambda c: c["annotations"][1].update(category_id=5))], tmp_path / "out")
    with pytest.raises(CocoError, match=r"RLE size \[10, 10\] is not the image's"):
        convert([variant(lambda c: c["annotations"][0].update(segmentation={"counts": [100], "size": [10, 10]}))],
                tmp_path / "out")
    with pytest.raises(CocoError, match="counts must be non-negative ints summing to height"):
        convert([variant(lambda c: c["annotations"][0].update(segmentation={"counts": [5, 3], "size": [H, W]}))],
                tmp_path / "out")
    with pytest.raises(CocoError, match="a polygon must be a list of"):
        convert([variant(lambda c: c["annotations"][0].update(segmentation=[[1, 2, 3, 4, 5]]))], tmp_path / "out")
    with pytest.raises(CocoError, match="id .* appears twice"):
        convert([variant(lambda c: c["images"].append(dict(c["images"][0])))], tmp_path / "out")
    with pytest.raises(CocoError, match="positive int 'height'"):
        convert([variant(lambda c: c["images"][0].update(height=0))], tmp_path / "out")
    with pytest.raises(CocoError, match=r"categories\[2\] = .*needs an int 'id' and a 'name'"):
        convert([variant(lambda c: c["categories"][2].update(name=""))], tmp_path / "out")
    with pytest.raises(CocoError, match="300 categories; 1..254 fit"):
        convert([variant(lambda c: c.update(categories=[{"id": i, "name": f"c{i}"} for i in range(300)]))],
                tmp_path / "out")
    with pytest.raises(CocoError, match="cannot tell which subset .*--annotations <subset>="):
        content = json.loads(json.dumps(good))
        for im in content["images"]:
            im["file_name"] = im["file_name"].replace("COCO_train2014_", "")
        convert([_bad(tmp_path, "mine.json", content)], tmp_path / "out")
    (tmp_path / "x").mkdir()
    train, val = write_files(tmp_path / "x")[0]
    with pytest.raises(CocoError, match="different categories"):
        content = json.loads(val.read_text())
        content["categories"][0]["name"] = "brush"
        convert([train, _bad(tmp_path, "instances_val2014.json", content)], tmp_path / "out")
    with pytest.raises(CocoError, match="both go to subset"):
        convert([train, ("train2017", train)], tmp_path / "out")
    assert not (tmp_path / "out" / "SegmentationClass").exists(), "nothing is written before the input is checked"


def test_image_sizes_are_checked_against_the_json(tmp_path):
    """An image whose size is not the JSON's width x height (another folder's, or a resized copy) is refused before
    anything is written, with its size and the JSON's; a missing image is no error (it is counted)."""
    (paths, _) = write_files(tmp_path, jpegs=tmp_path / "out")
    train_dir = tmp_path / "out" / "JPEGImages" / "train2014"
    images = sorted(train_dir.iterdir())
    Image.new("RGB", (H, W)).save(images[0])  # transposed
    Image.new("RGB", (W, H + 1)).save(images[1])
    images[2].unlink()
    with pytest.raises(CocoError) as err:
        convert(paths, tmp_path / "out", progress=False)
    msg = str(err.value)
    assert "2 image(s) whose size is not the annotation file's" in msg and str(paths[0]) in msg
    assert f"{images[0]} is {H}x{W}, the JSON says width x height = {W}x{H}" in msg
    assert f"{images[1]} is {W}x{H + 1}" in msg and images[2].name not in msg
    assert not (tmp_path / "out" / "SegmentationClass").exists()


def test_command_line(tmp_path, capsys):
    paths, _ = write_files(tmp_path)
    main(["--annotations", str(paths[0]), "--annotations", f"val2014={paths[1]}", "--root", str(tmp_path / "c"),
          "--workers", "0", "--val-part", "2", "--quiet"])
    out = capsys.readouterr().out
    assert "train2014: 7 images (7 masks written, 0 kept), train.txt: 6, train_unannotated.txt: 1" in out
    assert "val_part.txt: 2" in out and "data.num_classes=5" in out and "ln -s" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["--annotations", str(tmp_path / "missing.json"), "--root", str(tmp_path / "c")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: annotation file not found") and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("fastwsss ")


def test_coco_configs_train_on_val_part_and_evaluate_on_val():
    for name in ("coco_toco", "coco_mcc"):
        cfg = load_config(name, ["model.pretrained=none"])
        assert (cfg.data.train_split, cfg.data.val_split, cfg.data.eval_split) == ("train", "val_part", "val")
    # evaluate falls back to data.val_split
    assert load_config("voc_mcc", ["model.pretrained=none"]).data.eval_split is None
    with pytest.raises(ConfigError, match=r"data.val_split='' must name a split list[\s\S]*data.eval_split=' val' must"):
        load_config("coco_mcc", ['data.eval_split=" val"', 'data.val_split=""', "model.pretrained=none"])


def test_training_on_converted_masks(tmp_path):
    """A few iterations of a tiny MCC on the converted data with the coco_mcc config: training evaluates val_part,
    ``fastwsss.evaluate`` the whole val split."""
    paths, _ = write_files(tmp_path, jpegs=tmp_path / "coco")
    root = tmp_path / "coco"
    convert(paths, root, val_part=3, progress=False)
    tiny = [o for o in TINY_OVERRIDES if not o.startswith(("data.dataset=", "data.num_classes=", "data.synthetic"))]
    cfg = load_config("coco_mcc", [
        *tiny, f"data.root={root}", "data.num_classes=5", f"run.dir={tmp_path / 'run'}", "train.max_iters=2",
        "train.eval_interval=2", "train.ckpt_interval=2",
        "contrast.proj_hidden=64", "contrast.proj_bottleneck=16", "contrast.proj_dim=32", "contrast.num_local=3",
        "infer.scales=[1.0]", "infer.coco_size=48", "model.pretrained=none"])
    assert cfg.data.dataset == "coco" and cfg.train.method == "mcc"
    result = train(cfg)
    assert result["num_images"] == 3
    assert list(result["per_class"]["cam"]) == CLASSES
    out = evaluate_main(["--checkpoint", str(tmp_path / "run")])
    assert out["split"] == "val" and out["num_images"] == 5

"""Your own data: training, inference, evaluation and pseudo-label export from image-level labels in a file (a CSV or
the reference's cls_labels_onehot.npy), with masks only where something is evaluated; every kind of bad label file
is one error naming each offending row."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from PIL import Image

from fastwsss.data import LabelFileError, SegmentationList, read_class_names, read_label_file
from fastwsss.data.synthetic import CLASS_NAMES
from fastwsss.evaluate import main as evaluate_main
from fastwsss.infer import main as infer_main
from fastwsss.training import train

FAST = ["train.max_iters=2", "train.eval_interval=2", "train.ckpt_interval=2", "kernels.backend=torch",
        "infer.num_workers=0", "infer.scales=[1.0]"]


def photographs_with_labels(synthetic_root, tmp_path):
    """The synthetic images as 'my photos' in nested folders (PNG and JPEG), a CSV of their classes (by name and by
    index, one row with no header), class names without the background line, masks for the val images only."""
    train = SegmentationList(synthetic_root, "train_aug", "voc", 7)
    val = SegmentationList(synthetic_root, "val", "voc", 7)
    photos = tmp_path / "photos"
    rows = {"train": [], "val": []}
    for split, items in (("train", train), ("val", val)):
        for i, name in enumerate(items.names):
            rel = f"{split}/{'indoor' if i % 2 else 'outdoor'}/img{i:02d}{'.png' if i % 3 else '.jpg'}"
            (photos / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.open(items.image_path(name)).save(photos / rel)
            classes = [CLASS_NAMES[c + 1] if c % 2 else str(c + 1) for c in np.nonzero(items.cls_labels[i])[0]]
            rows[split].append([rel, *classes])
            if split == "val":
                mask = photos / "masks" / rel
                mask.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(items.mask_path(name), mask.with_suffix(".png"))
    for split, split_rows in rows.items():
        with open(tmp_path / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([["image", "classes"], *split_rows] if split == "train" else split_rows)
    (tmp_path / "classes.txt").write_text("\n".join(CLASS_NAMES[1:]) + "\n")
    return photos, train, val


def test_a_folder_of_photographs_with_a_csv(tiny_config, synthetic_root, tmp_path, capsys):
    photos, train_items, val_items = photographs_with_labels(synthetic_root, tmp_path)
    data = ["data.dataset=folder", f"data.root={photos}", f"data.labels={tmp_path / 'train.csv'}",
            f"data.class_names={tmp_path / 'classes.txt'}"]
    # labels only: trains, no evaluation (no val split)
    result = train(tiny_config(*FAST, *data, f"run.dir={tmp_path / 'run1'}"))
    assert result == {} and (tmp_path / "run1" / "checkpoints" / "last.pt").is_file()
    # with val labels and val masks: trains and evaluates where masks exist
    result = train(tiny_config(*FAST, *data, f"data.val_labels={tmp_path / 'val.csv'}", "data.train_split=train",
                               f"run.dir={tmp_path / 'run2'}"))
    assert result["num_images"] == len(val_items.names) and "cam_miou" in result
    items = SegmentationList(photos, "train", "folder", 7, labels=tmp_path / "train.csv",
                             class_names=read_class_names(tmp_path / "classes.txt", 7))
    assert np.array_equal(items.cls_labels, train_items.cls_labels) and not items.has_masks
    # inference on the folder, pseudo labels of the training split, evaluation against the val masks
    run = tmp_path / "run2"
    s = infer_main(["--checkpoint", str(run), "--images", str(photos / "val"), "--out", str(tmp_path / "pred")])
    assert s["done"] == len(val_items.names) and s["failed"] == 0
    assert (tmp_path / "pred" / "masks" / "indoor" / "img01.png").is_file()
    s = infer_main(["--checkpoint", str(run), "--split", "train", "--pseudo", "--out", str(tmp_path / "pseudo")])
    assert s["done"] == len(train_items.names)
    out = evaluate_main(["--checkpoint", str(run), "--modes", "cam", "--split", "val"])
    assert out["num_images"] == len(val_items.names) and 0 <= out["cam"]["miou"] <= 1
    capsys.readouterr()
    with pytest.raises(SystemExit):  # the train split has no masks: nothing to evaluate against, said so in one line
        evaluate_main(["--checkpoint", str(run), "--modes", "cam", "--split", "train"])
    printed = capsys.readouterr().err
    assert "evaluate:" not in printed  # found before the loader (and its progress bar) started
    err = printed[printed.index("error: "):]
    assert err.startswith("error: split 'train' cannot be evaluated: ") and len(err.strip().splitlines()) == 1, err
    assert f"images have no mask, e.g. {photos / 'masks'}/train/" in err and "data.masks" in err


def test_voc_layout_with_the_reference_onehot_npy(tiny_config, synthetic_root, tmp_path):
    """cls_labels_onehot.npy (name -> multi-hot over the foreground classes) replaces the training masks."""
    root = tmp_path / "voc"
    shutil.copytree(synthetic_root, root)
    items = SegmentationList(root, "train_aug", "voc", 7)
    table = {n: items.cls_labels[i].astype(np.float32) for i, n in enumerate(items.names)}
    table["not_in_the_split"] = np.eye(6, dtype=np.float32)[0]  # the reference's file covers every split
    np.save(tmp_path / "cls_labels_onehot.npy", table)
    for name in items.names:  # no training mask at all
        items.mask_path(name).unlink()
    result = train(tiny_config(*FAST, f"data.root={root}", f"data.labels={tmp_path / 'cls_labels_onehot.npy'}"))
    assert "cam_miou" in result  # val still evaluated from its masks
    listed = SegmentationList(root, "train_aug", "voc", 7, labels=tmp_path / "cls_labels_onehot.npy",
                              class_names=list(CLASS_NAMES))
    assert np.array_equal(listed.cls_labels, items.cls_labels) and listed.pixel_counts is None
    s = infer_main(["--checkpoint", str(tmp_path / "run"), "--split", "train_aug", "--pseudo", "--out",
                    str(tmp_path / "pseudo")])  # the pseudo labels of the mask-less training split
    assert s["done"] == len(items.names) and s["failed"] == 0


def test_every_bad_row_is_named_at_once(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b.jpg").write_bytes(b"")
    (tmp_path / "c.jpg").write_bytes(b"")
    bad = tmp_path / "bad.csv"
    bad.write_text("image,classes\n"
                   "a.jpg,disk\n"          # fine
                   "b.jpg,dsik,square\n"   # line 3: unknown class
                   "missing.jpg,star\n"    # line 4: no such image
                   "a.jpg,ring\n"          # line 5: listed again
                   "c.jpg\n"               # line 6: no foreground class
                   ",disk\n"               # line 7: malformed (no image)
                   "c.jpg,0\n")            # line 8: background only (and c listed again? no: line 6 was rejected)
    with pytest.raises(LabelFileError) as err:
        read_label_file(bad, list(CLASS_NAMES), images=tmp_path)
    msg = str(err.value)
    for expect in ("line 3: unknown class(es) dsik", "line 4: image missing.jpg not found",
                   "line 5: image a.jpg is listed again (first at line 2)", "line 6: image c.jpg has no foreground",
                   "line 7: no image in the first column", "line 8: image c.jpg is listed again"):
        assert expect in msg, (expect, msg)
    assert "6 bad row(s)" in msg


COCO_LIKE = ["background", "person", "traffic light", "hot dog", "dog"]  # COCO's names, as the converter writes them


@pytest.mark.parametrize("rows", [
    ['a.jpg,traffic light,dog', 'b.jpg,hot dog'],  # one class per cell: a name with spaces as it is
    ['a.jpg,"traffic light",dog', 'b.jpg,"hot dog"'],  # quoted
    ['a.jpg,"dog ""traffic light"""', 'b.jpg,"""hot dog"""'],  # several in a cell: the spaced one in quotes
    ['a.jpg,dog "traffic light"', 'b.jpg,3'],  # a writer that did not quote, and an index
], ids=["cells", "quoted-cells", "quoted-in-a-cell", "unquoted-in-a-cell"])
def test_class_names_with_spaces(tmp_path, rows):
    (tmp_path / "labels.csv").write_text("image,classes\n" + "\n".join(rows) + "\n")
    names, labels, _ = read_label_file(tmp_path / "labels.csv", COCO_LIKE)
    assert names == ["a", "b"] and labels.tolist() == [[False, True, False, True], [False, False, True, False]]


def test_old_space_separated_cells_still_work(tmp_path):
    (tmp_path / "labels.csv").write_text("a.jpg,person dog\nb.jpg,1 4\n")
    assert read_label_file(tmp_path / "labels.csv", COCO_LIKE)[1].tolist() == [[True, False, False, True]] * 2
    (tmp_path / "bad.csv").write_text("a.jpg,dog traffic light\n")  # unquoted among others: named, with the fix
    with pytest.raises(LabelFileError, match=r"unknown class\(es\) traffic, light .*a name with spaces \('traffic "
                       r"light'\) is a cell of its own or in double quotes"):
        read_label_file(tmp_path / "bad.csv", COCO_LIKE)


@pytest.mark.parametrize("delimiter", [";", "\t", ","], ids=["semicolon", "tab", "comma"])
@pytest.mark.parametrize("bom", [False, True], ids=["plain", "bom"])
def test_delimiter_and_byte_order_mark(tmp_path, delimiter, bom):
    """A spreadsheet's export: ';' (European locales) or tabs, often with a UTF-8 byte-order mark before the header."""
    text = "\n".join(delimiter.join(r) for r in [["image", "classes"], ["a.jpg", "traffic light", "dog"],
                                                  ["b.jpg", "hot dog"]]) + "\n"
    (tmp_path / "labels.csv").write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    names, labels, _ = read_label_file(tmp_path / "labels.csv", COCO_LIKE)
    assert names == ["a", "b"] and labels.sum() == 3
    (tmp_path / "bad.csv").write_text(text.replace("hot dog", "hot dgo"))
    shown = "tab" if delimiter == "\t" else repr(delimiter)
    with pytest.raises(LabelFileError, match=f"1 bad row\\(s\\) \\(read as {shown}-separated\\)"):
        read_label_file(tmp_path / "bad.csv", COCO_LIKE)


def test_bad_npy_files(tmp_path):
    np.save(tmp_path / "list.npy", np.zeros(3))
    with pytest.raises(LabelFileError, match="not a dict"):
        read_label_file(tmp_path / "list.npy", list(CLASS_NAMES))
    np.save(tmp_path / "shape.npy", {"a": np.zeros(4), "b": np.zeros(6), "c": np.full(6, 2.0)})
    with pytest.raises(LabelFileError) as err:
        read_label_file(tmp_path / "shape.npy", list(CLASS_NAMES))
    msg = str(err.value)
    assert "entry 'a': multi-hot of shape (4,)" in msg and "entry 'b': image b has no foreground" in msg
    assert "entry 'c'" in msg and "3 bad row(s)" in msg


def test_class_names_file(tmp_path):
    (tmp_path / "names.txt").write_text("# my classes\ncat\ndog\n")
    assert read_class_names(tmp_path / "names.txt", 3) == ["background", "cat", "dog"]
    with pytest.raises(LabelFileError, match="data.num_classes is 4"):
        read_class_names(tmp_path / "names.txt", 4)
    (tmp_path / "dup.txt").write_text("cat\ncat\n")
    with pytest.raises(LabelFileError, match="listed twice: cat"):
        read_class_names(tmp_path / "dup.txt")

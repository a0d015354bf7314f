"""Training logs under the authors' term names (unweighted beside weighted), the curves command, TensorBoard."""

import json
import sys
import types

import pytest
from PIL import Image

from fastwsss.methods import METHODS
from fastwsss.plot import main as plot_main
from fastwsss.plot import parse_log, plot_curves, run_series
from fastwsss.training import train

ALL_TERMS = ["loss.seg_start=0", "loss.reg_start=0", "toco.crop_size=16", "contrast.proj_hidden=64",
             "contrast.proj_bottleneck=16", "contrast.proj_dim=32", "contrast.num_local=3", "train.max_iters=4",
             "train.eval_interval=4", "kernels.backend=torch"]
WEIGHTS = {"cls": 1.0, "cls_aux": 1.0, "aff": 0.2, "con": 0.5, "seg": 0.1, "reg": 0.05}  # the defaults

# the authors' format (time prefix, a trailing "...", an evaluation line between) with one term fastwsss lacks
OFFICIAL = """\
2023-03-01 10:00:00 - train.py - INFO: Iter: 2; Elasped: 0:00:10; ETA: 1 day, 2:00:00; LR: 1.200e-06; \
cls_loss: 0.6931, cls_loss_aux: 0.6930, ptc_loss: 0.5000, ctc_loss: 1.2500, seg_loss: 2.0000...
2023-03-01 10:00:01 - train.py - INFO: cams score: {'miou': 12.5}
2023-03-01 10:00:20 - train.py - INFO: Iter: 4; Elasped: 0:00:20; ETA: 1 day, 1:59:50; LR: 2.400e-06; \
cls_loss: 0.6000, cls_loss_aux: 0.6100, ptc_loss: 0.4500, ctc_loss: 1.2000, seg_loss: 1.5000, mask_loss: 3.0...
"""


@pytest.fixture
def toco_run(tiny_config, tmp_path):
    train(tiny_config("train.method=toco", *ALL_TERMS))
    return tmp_path / "run"


def records(run):
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "step" in x], [x["eval"] for x in lines if "eval" in x]


def test_log_names_unweighted_beside_weighted(toco_run):
    steps, evals = records(toco_run)
    assert [x["step"] for x in steps] == [2, 4] and [x["step"] for x in evals] == [4]
    names = METHODS["toco"].log_names
    for record in steps:
        for term, name in names.items():
            assert record[term] == pytest.approx(WEIGHTS[term] * record[name], rel=1e-6), (term, record)
        assert record["loss"] == pytest.approx(sum(record[t] for t in names), rel=1e-6)
    lines = [ln for ln in (toco_run / "train.log").read_text().splitlines() if "Iter: " in ln]
    assert len(lines) == 2
    line = lines[1].split("Iter: ", 1)[1]
    assert line.startswith("4; Elasped: 0:00:") and "; ETA: 0:00:00; LR: " in line
    order = [line.index(f" {n}: ") for n in ("cls_loss", "cls_loss_aux", "ptc_loss", "ctc_loss", "seg_loss",
                                               "reg_loss")]
    assert order == sorted(order)
    assert f"ptc_loss: {steps[1]['ptc_loss']:.4f} (x0.2 = {steps[1]['aff']:.4f})" in line
    parsed = parse_log(toco_run / "train.log")  # the official-log parser reads our log too
    assert set(parsed) == {*names.values(), "LR", "loss"}
    for name in names.values():
        assert parsed[name][0] == [2, 4]
        assert parsed[name][1] == pytest.approx([x[name] for x in steps], abs=6e-5)


def test_mcc_log_names(tiny_config, tmp_path):
    train(tiny_config("train.method=mcc", *ALL_TERMS, "train.max_iters=2", "train.eval_interval=100"))
    (record,), _ = records(tmp_path / "run")
    for term, name in METHODS["mcc"].log_names.items():
        assert record[term] == pytest.approx(WEIGHTS[term] * record[name], rel=1e-6), (term, record)
    assert {"aff_loss", "con_loss"} <= set(record) and "ptc_loss" not in record


def test_parse_official_log(tmp_path):
    path = tmp_path / "official.log"
    path.write_text(OFFICIAL)
    series = parse_log(path)
    assert set(series) == {"LR", "cls_loss", "cls_loss_aux", "ptc_loss", "ctc_loss", "seg_loss", "mask_loss"}
    assert series["LR"] == ([2, 4], [1.2e-6, 2.4e-6])
    assert series["seg_loss"] == ([2, 4], [2.0, 1.5])
    assert series["mask_loss"] == ([4], [3.0])


def test_curves_png(toco_run, tmp_path, capsys):
    train_series, evals, names = run_series(toco_run)
    assert names == list(METHODS["toco"].log_names.values()) and set(train_series) == {*names, "LR"}
    assert set(evals) == {"seg_miou", "cam_miou", "aux-cam_miou", "pseudo_miou"}
    assert all(0 <= v <= 100 for _, values in evals.values() for v in values)
    # 6 terms + LR + mIoU = 8 panels: 3 columns x 3 rows of 500 x 320 px
    plot_main([str(toco_run)])
    assert capsys.readouterr().out.strip() == str(toco_run / "curves.png")
    assert Image.open(toco_run / "curves.png").size == (1500, 960)
    official = tmp_path / "official.log"
    official.write_text(OFFICIAL)
    out = plot_curves(toco_run, tmp_path / "vs.png", official)  # + mask_loss: 9 panels, still 3 x 3
    assert Image.open(out).size == (1500, 960)
    official.write_text(OFFICIAL.replace("mask_loss", "mask_loss: 1.0, dice_loss"))  # 10 panels: 4 rows
    assert Image.open(plot_curves(toco_run, tmp_path / "vs2.png", official)).size == (1500, 1280)
    official.write_text("no iterations here\n")
    with pytest.raises(ValueError, match="no 'Iter: N"):
        plot_curves(toco_run, tmp_path / "x.png", official)


def test_curves_without_matplotlib_name_the_extra(toco_run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'fastwsss\[plot\]'"):
        plot_curves(toco_run, toco_run / "c.png")
    with pytest.raises(SystemExit) as exit_info:
        plot_main([str(toco_run)])
    assert exit_info.value.code == 2 and "fastwsss[plot]" in capsys.readouterr().err


def test_tensorboard_logs_the_same_values(tiny_config, tmp_path, monkeypatch):
    scalars = {}

    class FakeWriter:
        def __init__(self, log_dir):
            scalars["log_dir"] = log_dir

        def add_scalar(self, tag, value, step):
            scalars[(tag, step)] = value

        def flush(self):
            pass

        def close(self):
            scalars["closed"] = True

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    train(tiny_config("train.method=toco", *ALL_TERMS, "run.tensorboard=true"))
    run = tmp_path / "run"
    steps, evals = records(run)
    assert scalars.pop("log_dir") == str(run / "tensorboard") and scalars.pop("closed")
    expected = {}
    for record in steps:
        for term, name in METHODS["toco"].log_names.items():
            expected[(f"loss/{name}", record["step"])] = record[name]
            expected[(f"loss_weighted/{name}", record["step"])] = record[term]
        for key in ("loss", "lr", "it_per_s"):
            expected[(f"train/{key}", record["step"])] = record[key]
    for ev in evals:
        for key, value in ev.items():
            if key.endswith("_miou"):
                expected[(f"eval/{key}", ev["step"])] = value
    assert scalars.keys() == expected.keys()
    for key, value in expected.items():
        assert scalars[key] == pytest.approx(value, rel=1e-12), key


def test_tensorboard_asked_for_but_missing(tiny_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"run.tensorboard=true needs the tensorboard package.*fastwsss\[tensorboard\]"):
        train(tiny_config("train.max_iters=1", "run.tensorboard=true"))

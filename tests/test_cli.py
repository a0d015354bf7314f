"""The commands explain themselves: --help lists the packaged configs, --print-config, --version."""

from importlib.metadata import version

import numpy as np
import pytest
import torch
from PIL import Image

from fastwsss.config import config_purpose, load_config, packaged_configs
from fastwsss.data import read_mask
from fastwsss.evaluate import main as evaluate_main
from fastwsss.infer import main as infer_main
from fastwsss.train import main as train_main


def _exit_output(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_lists_every_packaged_config_with_its_purpose(capsys):
    out = _exit_output(train_main, ["--help"], capsys)
    listed = out.split("packaged configs", 1)[1].splitlines()[1:]
    assert [line.split()[0] for line in listed] == list(packaged_configs())
    for line, path in zip(listed, packaged_configs().values()):
        assert line.split(None, 1)[1] == config_purpose(path)
    assert "--print-config" in out and "--version" in out


@pytest.mark.parametrize("main", [train_main, infer_main, evaluate_main], ids=["train", "infer", "evaluate"])
def test_version_comes_from_the_package_metadata(main, capsys):
    out = _exit_output(main, ["--version"], capsys)
    assert out.startswith(f"fastwsss {version('fastwsss')} (torch {torch.__version__}, Python ")


def test_print_config_prints_the_resolved_config_and_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train_main(["--config", "voc_mcc", "--print-config", "train.max_iters=3", "data.root=/x",
                       "model.pretrained=none"]) is None
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert load_config(printed) == load_config("voc_mcc", ["train.max_iters=3", "data.root=/x", "model.pretrained=none"])
    assert list(tmp_path.iterdir()) == [printed]  # no data generated, no run directory
    train_main(["--print-config"])  # no --config: the demo
    assert capsys.readouterr().out.startswith("name: demo\n")


def test_evaluate_takes_a_packaged_config_name(synthetic_root, tmp_path, capsys):
    """--predictions with --config NAME: the packaged demo config, pointed at the test data, scores stored PNGs."""
    preds = tmp_path / "preds"
    preds.mkdir()
    names = (synthetic_root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    for name in names:  # the ground truth itself: every class present scores 100 %
        mask = read_mask(synthetic_root / "SegmentationClassAug" / f"{name}.png")
        Image.fromarray(mask.astype(np.uint8)).save(preds / f"{name}.png")
    out = evaluate_main(["--config", "demo", "--predictions", str(preds), f"data.root={synthetic_root}"])
    assert out["predictions"]["miou"] == pytest.approx(1.0)

import json
import math
import re

import numpy as np
import pytest
import torch

from fastwsss.checkpoint import load_checkpoint
from fastwsss.data import EvalDataset, open_splits
from fastwsss.inference import evaluate_model, load_model
from fastwsss.methods import build_method
from fastwsss.train import main
from fastwsss.training import train


def assert_reported_mious_are_the_checkpoints(run, result: dict, modes: tuple[str, ...]) -> None:
    """The mIoU a run reports is what its final checkpoint scores on the val split, evaluated afresh."""
    model, cfg, _ = load_model(run)
    c = cfg.cam
    scores = evaluate_model(model, EvalDataset(open_splits(cfg.data)[1]), scales=tuple(c.scales),
                            bkg_thresh=c.bkg_thresh, modes=modes, labeller=build_method(cfg).pseudo_labeller(),
                            device=torch.device("cpu"))
    for mode in modes:
        assert result[f"{mode}_miou"] == scores[mode].miou(), mode
        assert np.allclose(list(result["per_class"][mode].values()), np.nan_to_num(scores[mode].iou(), nan=-1),
                           atol=5e-5), mode


def test_training_run_writes_a_complete_run_directory(tiny_config, tmp_path, capsys):
    cfg = tiny_config("train.max_iters=4", "train.eval_interval=4", "train.ckpt_interval=2")
    result = train(cfg)
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and (run / "train.log").is_file() and (run / "results.json").is_file()
    assert (run / "vis" / "val_000004.png").is_file()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "step" in x and "cls" in x]
    assert [x["step"] for x in steps] == [2, 4] and all(math.isfinite(x["cls"]) for x in steps)
    assert set(result) >= {"cam_miou", "aux-cam_miou", "all-bg_miou", "likely-cls_miou", "per_class"}
    assert result["num_images"] == 6
    assert_reported_mious_are_the_checkpoints(run, result, ("cam", "aux-cam"))
    ckpt = load_checkpoint(run)
    assert ckpt["iteration"] == 4 and set(ckpt) >= {"model", "optimizer", "scaler", "rng", "config"}
    out = capsys.readouterr()
    assert "all-bg" in out.out + out.err and "mIoU" in out.out + out.err
    with pytest.raises(FileExistsError, match="run.resume"):
        train(tiny_config("train.max_iters=4"))  # never silently overwrite a run


def test_resume_continues_exactly(tiny_config, tmp_path):
    """2k steps straight == k steps, stop, resume, k more steps: identical weights on CPU."""
    k = 3
    common = [f"train.max_iters={2 * k}", "train.eval_interval=100", "train.ckpt_interval=100", "data.num_workers=1"]
    train(tiny_config(*common, f"run.dir={tmp_path / 'a'}"))
    train(tiny_config(*common, f"run.dir={tmp_path / 'b'}", f"train.stop_at={k}"))
    assert load_checkpoint(tmp_path / "b")["iteration"] == k
    main([f"run.resume={tmp_path / 'b'}"])  # the run's own config.yaml is used
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert b["iteration"] == 2 * k
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


METHOD_OVERRIDES = ["loss.seg_start=0", "loss.reg_start=0", "toco.crop_size=16", "contrast.proj_hidden=64",
                    "contrast.proj_bottleneck=16", "contrast.proj_dim=32", "contrast.num_local=3"]


@pytest.mark.parametrize("method", ["toco", "mcc"])
def test_methods_train_every_term(tiny_config, tmp_path, method):
    result = train(tiny_config(f"train.method={method}", "train.max_iters=2", "train.eval_interval=100",
                               *METHOD_OVERRIDES))
    assert_reported_mious_are_the_checkpoints(tmp_path / "run", result, ("cam", "aux-cam", "seg", "pseudo"))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    record = next(x for x in lines if x.get("step") == 2)
    for term in ("cls", "cls_aux", "seg", "reg", "aff", "con"):
        assert math.isfinite(record[term]), (term, record)
    # the backend each op ran with is in the run's log
    used = next(x for x in (tmp_path / "run" / "train.log").read_text().splitlines() if "kernel backends" in x)
    ops = ["par_refine", "PermutohedralLattice.filter", "token_affinity_sums"] + (["varlen_attention"]
                                                                                   if method == "mcc" else [])
    assert all(re.search(rf"[:,] {re.escape(op)} (torch|triton|torch\+triton)(,|$)", used) for op in ops), used


def test_cli_rejects_unknown_flags(capsys):
    with pytest.raises(SystemExit):
        main(["--confg", "x.yaml"])
    assert "unrecognized arguments" in capsys.readouterr().err


def test_a_finished_run_says_what_it_showed_and_how_fast_each_phase_ran(synthetic_root, tmp_path, capsys):
    """The demo's last lines: the segmentation against the trivial baselines, where the overlays and curves are, how to
    compare with the CAM baseline; and iterations per second for each phase (the set of terms on) from results.json."""
    from tests.conftest import TINY_OVERRIDES

    common = [*TINY_OVERRIDES, f"data.root={synthetic_root}", "train.max_iters=8", "train.eval_interval=8",
              "loss.aff_start=4", "loss.con_start=4", "loss.seg_start=4", "loss.reg_start=4"]
    main(["--config", "demo", *common, f"run.dir={tmp_path / 'mcc'}"])
    out = capsys.readouterr().out.splitlines()
    result = json.loads((tmp_path / "mcc" / "results.json").read_text())
    phases = list(result["it_per_s"])
    assert phases == ["cls_loss + cls_loss_aux",
                      "cls_loss + cls_loss_aux + aff_loss + con_loss + seg_loss + reg_loss"], phases
    assert all(rate > 0 for rate in result["it_per_s"].values())
    shown, compare = out[-2:]
    assert shown.startswith(f"Shown: its segmentation (no labels at test time) mIoU {100 * result['seg_miou']:.1f} %")
    assert f"{100 * result['seg-crf_miou']:.1f} % by the papers' test protocol" in shown  # demo: eval.final_infer
    # the final evaluation's seg-ms / seg-crf are what python -m fastwsss.evaluate --crf gives the checkpoint
    from fastwsss.evaluate import main as evaluate_main
    scored = evaluate_main(["--checkpoint", str(tmp_path / "mcc"), "--modes", "seg", "--crf"])
    assert scored["seg"]["miou"] == pytest.approx(result["seg-ms_miou"], abs=1e-9)
    assert scored["seg-crf"]["miou"] == pytest.approx(result["seg-crf_miou"], abs=1e-9)
    assert f"all-background {100 * result['all-bg_miou']:.1f}" in shown
    assert f"overlays {tmp_path / 'mcc' / 'vis' / 'val_000008.png'}" in shown
    assert f"python -m fastwsss.plot {tmp_path / 'mcc'}" in shown
    assert "python -m fastwsss.train --config demo_cam" in compare and "demo_seeds.py" in compare
    assert any(line.startswith("it/s (") and "cls_loss + cls_loss_aux " in line for line in out)

    main(["--config", "demo_cam", *common, f"run.dir={tmp_path / 'cam'}"])
    shown, compare = capsys.readouterr().out.splitlines()[-2:]
    result = json.loads((tmp_path / "cam" / "results.json").read_text())
    assert shown.startswith(f"Shown: its CAM (given the image labels) mIoU {100 * result['cam_miou']:.1f} %")
    assert "pseudo_miou" in result  # the baseline's PAR-refined labels, what the method's are compared with
    assert "seg-crf_miou" not in result and "protocol" not in shown  # no segmentation to score
    assert compare.endswith("python -m fastwsss.train --config demo")


def test_a_final_crf_that_cannot_run_stops_the_run_at_start(synthetic_root, tmp_path, monkeypatch):
    """eval.final_infer runs the dense CRF after the last step: a CRF that cannot run here (pydensecrf missing) is
    named before the first step, not after the training."""
    from fastwsss.config import load_config
    from fastwsss.inference import crf
    from tests.conftest import TINY_OVERRIDES

    def missing():
        raise ImportError("impl='pydensecrf' needs pydensecrf2")

    monkeypatch.setattr(crf, "_pydensecrf", missing)
    cfg = load_config("demo", [*TINY_OVERRIDES, f"data.root={synthetic_root}", f"run.dir={tmp_path / 'run'}",
                               "train.max_iters=4", "infer.crf_impl=pydensecrf"])
    with pytest.raises(ImportError, match="pydensecrf2"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("name", ["demo", "demo_cam", "demo_toco", "demo_cosa", "demo_more"])
def test_every_demo_config_trains_and_evaluates(name, synthetic_root, tmp_path):
    """Each demo config runs end to end with the tiny model (its own schedule shortened so every term is on)."""
    from fastwsss.config import load_config
    from tests.conftest import TINY_OVERRIDES

    starts = [f"{key}=2" for key, value in leaf_starts(load_config(name))]
    cfg = load_config(name, [*TINY_OVERRIDES, f"data.root={synthetic_root}", f"run.dir={tmp_path / 'run'}",
                             "train.max_iters=4", "train.eval_interval=4", "toco.crop_size=16", "more.une_kernel=2",
                             *starts])
    result = train(cfg)
    assert math.isfinite(result["cam_miou"]) and result["it_per_s"]
    if cfg.train.method != "cam":
        assert math.isfinite(result["seg_miou"])


def leaf_starts(cfg):
    """(dotted key, value) of every *_start / cam_start setting of a config, so a test can move them all to 2."""
    from fastwsss.config import leaf_values

    return [(k, v) for k, v in leaf_values(cfg).items() if k.rsplit(".", 1)[-1].endswith("_start")]

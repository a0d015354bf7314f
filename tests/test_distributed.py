"""Many processes: torchrun with two CPU processes (gloo) trains, evaluates and exports exactly what one
process does. Each torchrun launch costs ~15 s of start-up (three interpreters importing torch), so every launch
checks as much as it can.

Tolerance of the training comparisons, fp32: the processes' halves of a batch are summed in another order than one
process sums the whole (the all-reduce adds two partial sums), so gradients differ in their last bits (~1e-7
relative). AdamW divides each gradient by its running RMS: a rounding difference in a near-zero gradient moves that
weight's update by up to a fraction of the learning rate (1e-3 here). Weights agree to ``WEIGHT_ATOL`` = lr / 10 after
a few steps (measured: ~2e-5 for MCC, ~2e-7 for CAM, after 3 steps); AdamW's first moments, which a wrongly scaled loss would scale
(Adam's update would not show it), agree to 1 % of their largest entry; the logged losses to 1e-4 relative."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastwsss import evaluate, infer
from fastwsss.checkpoint import load_checkpoint
from fastwsss.config import ConfigError, leaf_values, load_config, to_yaml
from fastwsss.train import main as train_main
from fastwsss.training import train

from conftest import TINY_OVERRIDES

LR = 1e-3  # conftest's optim.lr
WEIGHT_ATOL = LR / 10
METHOD_OVERRIDES = {
    "cam": [],
    "toco": ["loss.seg_start=0", "loss.reg_start=0", "toco.crop_size=16", "contrast.proj_hidden=64",
             "contrast.proj_bottleneck=16", "contrast.proj_dim=32", "contrast.num_local=3"],
}
METHOD_OVERRIDES["mcc"] = METHOD_OVERRIDES["toco"]
METHOD_OVERRIDES["cosa"] = ["loss.seg_start=0", "loss.reg_start=0", "cosa.cam_start=0"]
METHOD_OVERRIDES["more"] = ["loss.seg_start=0", "loss.reg_start=0", "data.crop_size=64", "model.img_size=32"]
COMMON = ["train.eval_interval=100", "train.ckpt_interval=100", "train.log_interval=1", "kernels.backend=torch", "model.pretrained=none"]


def torchrun(*args: str, restarts: int = 0, timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 -m <args>``, one thread per process; asserts it succeeded."""
    result = subprocess.run(_torchrun_cmd(args, restarts), capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def _torchrun_cmd(args, restarts: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            f"--max-restarts={restarts}", "-m", *args]


@pytest.fixture
def config_file(tiny_config, tmp_path):
    """The run's config as a YAML file, so that torchrun's processes and this one train the same config."""
    def make(method: str, *overrides: str) -> Path:
        path = tmp_path / f"{method}.yaml"
        path.write_text(to_yaml(tiny_config(f"train.method={method}", *METHOD_OVERRIDES[method], *COMMON,
                                            *overrides)))
        return path

    return make


def run_here(config: Path, run_dir: Path, *overrides: str) -> None:
    train(load_config(config, [f"run.dir={run_dir}", *overrides]))


def losses(run_dir: Path) -> dict[int, dict]:
    """step -> the logged record, without its timing."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k != "it_per_s"} for r in records if "step" in r}


def assert_same_training(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca["iteration"] == cb["iteration"]
    for name, tensor in ca["model"].items():
        torch.testing.assert_close(cb["model"][name], tensor, rtol=0, atol=WEIGHT_ATOL, msg=name)
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        m = sa[i]["exp_avg"]
        torch.testing.assert_close(sb[i]["exp_avg"], m, rtol=0, atol=0.01 * float(m.abs().max()) + 1e-12)
        assert torch.equal(sa[i]["step"], sb[i]["step"])
    la, lb = losses(a), losses(b)
    common = sorted(la.keys() & lb.keys())
    assert common, "no logged step in common"
    for step in common:
        assert la[step].keys() == lb[step].keys(), step
        for key, value in la[step].items():
            assert lb[step][key] == pytest.approx(value, rel=1e-4, abs=1e-9), (step, key)


def assert_grad_accum_trains_like_one_batch(config: Path, tmp_path: Path) -> None:
    """train.grad_accum=2 ends as the run at tmp_path / "one" (the whole batch at once) does."""
    run_here(config, tmp_path / "accum", "train.grad_accum=2")
    assert_same_training(tmp_path / "one", tmp_path / "accum")


def test_cam_two_processes_then_one(config_file, tmp_path):
    """CAM: 2 processes x 2 images == 1 process x 4; the 2-process checkpoint resumes in 1 process; grad_accum=2."""
    config = config_file("cam", "train.max_iters=4")
    run_here(config, tmp_path / "one")
    run_here(config, tmp_path / "one_half", "train.stop_at=2")
    torchrun("fastwsss.train", "--config", str(config), f"run.dir={tmp_path / 'two'}", "train.stop_at=2")
    assert load_checkpoint(tmp_path / "two")["world_size"] == 2
    assert_same_training(tmp_path / "one_half", tmp_path / "two")
    train_main([f"run.resume={tmp_path / 'two'}"])  # 2 -> 1 process
    assert_same_training(tmp_path / "one", tmp_path / "two")
    assert_grad_accum_trains_like_one_batch(config, tmp_path)


def test_toco_one_process_then_two(config_file, tmp_path):
    """ToCo: a 1-process checkpoint resumes under torchrun and ends as the 1-process run does; grad_accum=2."""
    config = config_file("toco", "train.max_iters=2")
    run_here(config, tmp_path / "one")
    run_here(config, tmp_path / "two", "train.stop_at=1")
    torchrun("fastwsss.train", f"run.resume={tmp_path / 'two'}")  # 1 -> 2 processes
    assert load_checkpoint(tmp_path / "two")["world_size"] == 2
    assert_same_training(tmp_path / "one", tmp_path / "two")
    assert_grad_accum_trains_like_one_batch(config, tmp_path)


def test_mcc_two_processes(config_file, tmp_path):
    config = config_file("mcc", "train.max_iters=2")
    run_here(config, tmp_path / "one")
    torchrun("fastwsss.train", "--config", str(config), f"run.dir={tmp_path / 'two'}")
    assert_same_training(tmp_path / "one", tmp_path / "two")
    assert_grad_accum_trains_like_one_batch(config, tmp_path)


def test_cosa_two_processes(config_file, tmp_path):
    """CoSA: 2 processes x 2 images == 1 process x 4, the whole-network teacher included."""
    config = config_file("cosa", "train.max_iters=2")
    run_here(config, tmp_path / "one")
    torchrun("fastwsss.train", "--config", str(config), f"run.dir={tmp_path / 'two'}")
    assert any(k.startswith("teacher.") for k in load_checkpoint(tmp_path / "two")["model"])
    assert_same_training(tmp_path / "one", tmp_path / "two")


def test_more_two_processes(config_file, tmp_path):
    """MoRe: 2 processes x 2 images == 1 process x 4 == 2 micro-batches of 2: UNE's draws come with each sample, its
    token count and every other denominator are the whole batch's."""
    config = config_file("more", "train.max_iters=2")
    run_here(config, tmp_path / "one")
    torchrun("fastwsss.train", "--config", str(config), f"run.dir={tmp_path / 'two'}")
    assert load_checkpoint(tmp_path / "two")["model"]["backbone.cls_token"].shape[1] == 4 + 6
    assert_same_training(tmp_path / "one", tmp_path / "two")
    assert_grad_accum_trains_like_one_batch(config, tmp_path)


def test_killed_worker_resumes_under_max_restarts(config_file, tmp_path):
    """A worker SIGKILLed mid-run: torchrun restarts the job, which resumes from the last checkpoint and ends with
    the weights of an uninterrupted run."""
    config = config_file("cam", "train.max_iters=20", "train.ckpt_interval=2")
    run_here(config, tmp_path / "one")
    run = tmp_path / "two"
    launcher = subprocess.Popen(_torchrun_cmd(["fastwsss.train", "--config", str(config), f"run.dir={run}"], 1),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    deadline = time.time() + 300
    while not (run / "checkpoints" / "last.pt").exists():
        assert launcher.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
        time.sleep(0.05)
    workers = children(launcher.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    out, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, out[-6000:]
    log = (run / "train.log").read_text()
    assert "torchrun restart 1: resuming from the last checkpoint" in log, log[-3000:]
    resumed = re.search(r"resumed from .*last\.pt at iteration (\d+)", log)
    assert resumed and 2 <= int(resumed.group(1)) < 20, log[-3000:]
    assert_same_training(tmp_path / "one", run)


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_root):
    """A checkpoint of a few CAM steps (its segmentation head untrained: seg scores are still exact comparisons)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(load_config(None, [*TINY_OVERRIDES, f"data.root={synthetic_root}", f"run.dir={run}", "train.max_iters=2",
                             *COMMON]))
    return run


def test_evaluate_and_infer_under_torchrun(trained, tmp_path):
    """Sharded evaluation's confusion matrices are the one-process ones exactly; sharded pseudo-label export writes
    the same PNGs, one summary, and resumes."""
    args = ["--checkpoint", str(trained), "--modes", "cam,aux-cam,seg,pseudo", "infer.scales=[1.0]",
            "infer.num_workers=0"]
    one = evaluate.main([*args, "--json", str(tmp_path / "one.json")])
    torchrun("fastwsss.evaluate", *args, "--json", str(tmp_path / "two.json"))
    two = json.loads((tmp_path / "two.json").read_text())
    assert one["num_images"] == two["num_images"] == 6
    for mode in ("cam", "aux-cam", "seg", "pseudo"):
        assert two[mode]["confusion_matrix"] == one[mode]["confusion_matrix"], mode

    common = ["--checkpoint", str(trained), "--split", "val", "--pseudo", "infer.num_workers=0"]
    infer.main([*common, "--out", str(tmp_path / "one")])
    masks = sorted(p.name for p in (tmp_path / "one" / "masks").iterdir())
    assert len(masks) == 6
    (tmp_path / "two" / "masks").mkdir(parents=True)
    for name in masks[::2]:  # an interrupted export: the missing masks are shared out, the rest kept
        shutil.copy(tmp_path / "one" / "masks" / name, tmp_path / "two" / "masks" / name)
    result = torchrun("fastwsss.infer", *common, "--out", str(tmp_path / "two"))
    assert "3 written, 3 already done, 0 failed of 6 images" in result.stdout
    assert masks == sorted(p.name for p in (tmp_path / "two" / "masks").iterdir())
    for name in masks:
        assert np.array_equal(np.array(Image.open(tmp_path / "one" / "masks" / name)),
                              np.array(Image.open(tmp_path / "two" / "masks" / name))), name
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (summary["done"], summary["skipped_finished"], summary["failed"], summary["processes"]) == (3, 3, 0, 2)


def test_a_job_that_cannot_run_alike_is_refused_at_start(tiny_config, monkeypatch):
    from fastwsss.runtime import Dist
    from fastwsss.training import loop

    cfg = tiny_config("train.batch_size=4")
    with pytest.raises(ValueError, match=r"train.batch_size=4 \(the global batch\) must be a multiple of 3 processes"):
        loop.check_processes(cfg, Dist(rank=0, world_size=3))
    with pytest.raises(ValueError, match="must be a multiple of 2 processes x train.grad_accum=4"):
        loop.check_processes(tiny_config("train.grad_accum=4"), Dist(rank=0, world_size=2))
    other = leaf_values(tiny_config("train.seed=1"))
    monkeypatch.setattr(loop, "all_gather_objects", lambda obj, d: [obj, other])
    with pytest.raises(ConfigError, match=r"process 1 has another config than process 0:\n  train.seed: rank 0 0, "
                                          r"rank 1 1"):  # the key with its section, as a config error (one line)
        loop.check_processes(cfg, Dist(rank=0, world_size=2))
    monkeypatch.setattr(loop, "all_gather_objects", lambda obj, d: [obj, obj])
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    with pytest.raises(ValueError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        loop.check_processes(cfg, Dist(rank=0, world_size=2))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    loop.check_processes(cfg, Dist(rank=0, world_size=2))
    cfg.run.dir = ""
    with pytest.raises(ValueError, match="--max-restarts needs run.dir"):
        loop.check_processes(cfg, Dist(rank=0, world_size=2))

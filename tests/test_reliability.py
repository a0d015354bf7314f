"""Nothing silent, nothing lost: every bad config, file and fault is a clear error at start or is survived.
One test per finding of a hostile-user review; each failed before its fix."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from fastwsss.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fastwsss.config import ConfigError
from fastwsss.data import DataError, SegmentationList, read_image
from fastwsss.files import DirLock, DirLockedError, atomic_write
from fastwsss.inference.export import list_images
from fastwsss.inference.predict import load_model
from fastwsss.train import main as train_main
from fastwsss.training import StepGuard, train
from fastwsss.training import loop as training_loop

QUICK = ["train.max_iters=4", "train.eval_interval=100", "train.ckpt_interval=2"]


# ---- silent wrong answers


def test_huge_lr_never_puts_a_non_finite_value_in_a_checkpoint(tiny_config, tmp_path, caplog):
    """MCC at lr 1e6: AdamW's decay factor (1 - lr·wd) = -9999 grows the weights 1e4-fold a step until they
    overflow while the loss is still finite. Such steps are refused before the update (weights and optimizer state
    untouched); after ten the run stops, and the last checkpoint holds finite weights."""
    cfg = tiny_config("train.method=mcc", "optim.lr=1e6", "train.max_iters=40", "train.eval_interval=100",
                      "kernels.backend=torch",
                      "train.ckpt_interval=1", "contrast.proj_hidden=64", "contrast.proj_bottleneck=16",
                      "contrast.proj_dim=32", "contrast.num_local=2")
    with pytest.raises(FloatingPointError, match="10 steps skipped"):
        train(cfg)
    assert "skipped, weights and optimizer state untouched" in caplog.text
    state = load_checkpoint(tmp_path / "run")
    for name, t in state["model"].items():
        assert torch.isfinite(t).all(), name
    for st in state["optimizer"]["state"].values():
        assert all(torch.isfinite(v).all() for v in st.values() if torch.is_tensor(v))


def test_a_run_stopped_by_non_finite_steps_is_one_line(tiny_config, tmp_path, capsys):
    """The command's view of the run above: one line naming the steps and the last good checkpoint, exit status 1."""
    from fastwsss.config import to_yaml

    cfg = tiny_config("optim.lr=1e6", "train.max_iters=40", "train.ckpt_interval=1", "train.eval_interval=100",
                      "kernels.backend=torch")
    (tmp_path / "cfg.yaml").write_text(to_yaml(cfg))
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--config", str(tmp_path / "cfg.yaml")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: training stopped: 10 steps skipped for non-finite values")


def test_step_guard_refuses_unsafe_steps_without_copying_anything():
    """Non-finite gradients and an update that could overflow a weight are refused before the optimizer step, and
    the guard's bound holds: after each AdamW step every weight is within it (any gradient sequence)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01)
    guard = StepGuard(model, opt)
    for t in range(60):  # adversarial gradients: steady signs (the largest Adam steps), then noise
        grads = [torch.full_like(p, 1.0) if t < 30 else torch.randn_like(p) * 10 ** (t % 7 - 3)
                 for p in model.parameters()]
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        assert guard.flags().tolist() == [0.0, 0.0]
        bounds = [float(b) for _, _, b in guard._bounds()]
        opt.step()
        assert max(float(p.detach().abs().max()) for p in model.parameters()) <= max(bounds) * (1 + 1e-6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.weight.grad[0, 0] = float("nan")
    assert guard.flags().tolist() == [1.0, 0.0] and "weight" in guard.explain(True)
    model.weight.grad[0, 0] = 0.0
    for g in opt.param_groups:
        g["lr"] = 1e38  # decay factor 1 - lr·wd = -1e36: the weights would overflow
    assert guard.flags().tolist() == [0.0, 1.0] and "could overflow" in guard.explain(False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the guard changed nothing


@pytest.mark.parametrize("override, key", [
    ("cam.high_thresh=1.5", "cam.high_thresh"), ("cam.low_thresh=0.8", "cam.low_thresh=0.8 must be <="),
    ("cam.bkg_thresh=7", "cam.bkg_thresh"), ("mcc.mask_prob=1.5", "mcc.mask_prob"),
    ("contrast.neg_thresh=-1", "contrast.neg_thresh"), ("optim.warmup_iters=-5", "optim.warmup_iters"),
    ("optim.head_lr_mult=-10", "optim.head_lr_mult"), ("model.aux_layer=-20", "model.aux_layer"),
    ("train.stop_at=0", "train.stop_at"), ("train.stop_at=-5", "train.stop_at"),
    ("contrast.num_local=0", "contrast.num_local"), ("cam.scales=[0.0]", "cam.scales"),
    ("train.batch_size=0", "train.batch_size"), ("contrast.ema_momentum=5", "contrast.ema_momentum"),
    ("loss.temperature=0", "loss.temperature"), ("eval.batch_size=0", "eval.batch_size"),
])
def test_bad_values_fail_at_start(tiny_config, override, key):
    with pytest.raises(ConfigError) as err:
        tiny_config("train.method=mcc", override)
    assert key in str(err.value)


def _float_keys(node, prefix=""):
    """(dotted key, value) of every float or tuple-of-floats field of the config tree."""
    out = []
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out += _float_keys(value, f"{key}.")
        elif isinstance(value, float) or (isinstance(value, tuple) and value and isinstance(value[0], float)):
            out.append((key, value))
    return out


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_non_finite_floats_fail_at_start_naming_the_key(bad):
    """NaN passes every comparison and inf passes a lower bound: every float setting, each alone, is refused."""
    from fastwsss.config import Config, load_config

    keys = _float_keys(Config())
    assert {"optim.lr", "cam.high_thresh", "contrast.neg_thresh", "optim.betas", "cam.scales"} <= {k for k, _ in keys}
    for key, value in keys:
        text = f"[{','.join([bad, *map(str, value[1:])])}]" if isinstance(value, tuple) else bad
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"{key}={text}"])
        lines = str(err.value).splitlines()
        assert lines[1].strip().startswith(key), (key, str(err.value))  # the first problem named is this key


def test_every_typo_at_once_with_its_source(tmp_path):
    from fastwsss.config import load_config

    with pytest.raises(ConfigError) as err:
        load_config("demo", ["data.roott=/x", "train.max_iterz=3"])
    msg = str(err.value)
    assert "data.roott" in msg and "train.max_iterz" in msg and msg.count("(command line)") == 2
    assert "demo.yaml" not in msg
    own = tmp_path / "mine.yaml"
    own.write_text("base: demo.yaml\nmodel:\n  depht: 3\noptim:\n  lr: fast\n")
    with pytest.raises(ConfigError) as err:
        load_config(own, ["cam.scalez=[1.0]"])
    msg = str(err.value)
    assert "model.depht: " in msg and "optim.lr: " in msg and msg.count(str(own)) == 2
    assert "cam.scalez" in msg and "(command line)" in msg


def test_a_typo_does_not_hide_the_range_errors_of_the_same_command_line(tmp_path):
    from fastwsss.config import load_config

    with pytest.raises(ConfigError) as err:
        load_config("demo", ["train.max_iterz=3", "cam.high_thresh=1.5", "optim.lr=fast", "optim.eps=nan"])
    msg = str(err.value)
    for key in ("train.max_iterz", "optim.lr: ", "cam.high_thresh=1.5", "optim.eps=nan"):
        assert key in msg, (key, msg)
    own = tmp_path / "mine.yaml"
    own.write_text("base: voc_mcc.yaml\nmodel:\n  depht: 3\n")  # a ??? (model.pretrained) left unset as well
    with pytest.raises(ConfigError, match=r"model\.depht[\s\S]*mine\.yaml"):
        load_config(own, ["cam.high_thresh=2"])


def test_num_classes_other_than_the_roots_class_names_fails_at_start(tiny_config, synthetic_root, tmp_path, capsys):
    """data.num_classes=30 on the 7-class synthetic root (its classes.txt names 7) trained 23 phantom classes."""
    from fastwsss.config import to_yaml

    (tmp_path / "cfg.yaml").write_text(to_yaml(tiny_config("data.num_classes=30", *QUICK)))
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--config", str(tmp_path / "cfg.yaml")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.strip().splitlines()[-1] == (f"error: data.num_classes=30 but {synthetic_root}/classes.txt names 7 "
                                            "classes (background included): set data.num_classes=7, or "
                                            "data.class_names to a file of the classes to train")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_edited_masks_give_new_labels(tmp_path):
    from fastwsss.data.synthetic import generate_dataset

    root = generate_dataset(tmp_path / "d", num_train=3, num_val=1, image_size=32, seed=0)
    first = SegmentationList(root, "train_aug", "voc", 7)
    mask_path = first.mask_path(first.names[0])
    mask = np.array(Image.open(mask_path))
    absent = next(c for c in range(1, 7) if not first.cls_labels[0, c - 1])
    mask[:4, :4] = absent
    Image.fromarray(mask).save(mask_path)
    again = SegmentationList(root, "train_aug", "voc", 7)
    assert again.cls_labels[0, absent - 1] and not first.cls_labels[0, absent - 1]


def test_16_bit_images_are_scaled_not_white(tmp_path):
    levels = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(levels).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(read_image(path))
    assert rgb[0, :, 0].tolist() == [0, 100, 255] and (rgb[..., 0] == rgb[..., 2]).all()


def test_an_unreadable_folder_is_reported(tmp_path, monkeypatch):
    (tmp_path / "ok").mkdir()
    (tmp_path / "locked").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "ok" / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "locked" / "b.png")
    real_scandir = os.scandir

    def scandir(path="."):  # as a folder without read permission behaves for a non-root user
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match="locked"):
        list_images(tmp_path)


def test_a_broken_symbolic_link_in_an_infer_folder_is_reported(tiny_config, tmp_path, caplog):
    from fastwsss.inference import export

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (48, 48)).save(images / "a.png")
    (images / "gone.jpg").symlink_to(tmp_path / "moved" / "gone.jpg")
    items = list_images(images)
    assert [it.name for it in items] == ["a", "gone"]
    assert "1 image(s) under" in caplog.text and "gone.jpg -> " in caplog.text
    train(tiny_config(*QUICK, "train.stop_at=2"))
    model, cfg, _ = load_model(tmp_path / "run")
    cfg.infer.num_workers = 0
    summary = export.run(cfg, model, items, tmp_path / "out", device=torch.device("cpu"))
    assert (summary["done"], summary["failed"]) == (1, 1)
    assert summary["failures"][0]["error"] == (f"{images / 'gone.jpg'} is a broken symbolic link (to "
                                               f"{tmp_path / 'moved' / 'gone.jpg'})")


# ---- work lost


def test_a_failed_resume_leaves_the_run_config_alone(tiny_config, tmp_path, capsys):
    train(tiny_config(*QUICK))
    run = tmp_path / "run"
    saved = (run / "config.yaml").read_text()
    missing = tmp_path / "missing"
    for overrides, error in ((["model.embed_dim=64"], "does not fit"),
                             (["data.dataset=voc", f"data.root={missing}"], "root not found")):
        with pytest.raises(SystemExit) as exit_info:
            train_main([f"run.resume={run}", *overrides, "train.max_iters=6", "run.allow_changes=true"])
        assert exit_info.value.code == 2 and error in capsys.readouterr().err
        assert (run / "config.yaml").read_text() == saved
    train_main([f"run.resume={run}", "train.max_iters=6", "run.allow_changes=true"])  # a plain resume still works
    assert load_checkpoint(run)["iteration"] == 6


@pytest.mark.parametrize("bad", ["corrupt", "tiny", "thin"])
def test_bad_val_images_fail_at_start_with_their_name(tiny_config, synthetic_root, tmp_path, bad):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    val = SegmentationList(root, "val", "voc", 7)
    image = val.image_path(val.names[1])
    if bad == "corrupt":
        image.write_bytes(image.read_bytes()[:100])
    else:
        size = (4, 4) if bad == "tiny" else (200, 6)
        Image.new("RGB", size).save(image, format="JPEG")
        Image.new("P", size).save(val.mask_path(val.names[1]))
    with pytest.raises(DataError, match=image.name):
        train(tiny_config(*QUICK, f"data.root={root}"))
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before the first step


def test_a_failing_evaluation_never_loses_the_checkpoint_of_its_step(tiny_config, tmp_path, monkeypatch):
    def broken(self, model, step):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(training_loop.Evaluator, "__call__", broken)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        train(tiny_config("train.max_iters=6", "train.eval_interval=3", "train.ckpt_interval=100"))
    assert load_checkpoint(tmp_path / "run")["iteration"] == 3


def test_a_run_directory_has_one_writer(tiny_config, tmp_path):
    with DirLock(tmp_path / "run", "run directory"), pytest.raises(DirLockedError, match=str(os.getpid())):
        train(tiny_config(*QUICK))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


_LOCK_HOLDER = """
import ctypes, os, sys, time
from fastwsss.files import DirLock
lock = DirLock(sys.argv[1], "run directory").__enter__()
if sys.argv[2] == "os.fork":  # as DataLoader workers and process pools are made
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
else:  # a fork Python does not see (a C extension's): the child keeps the lock's fd
    libc = ctypes.CDLL(None, use_errno=True)
    pid = libc.fork()
    if pid == 0:
        libc.sleep(60)
        libc._exit(0)
print(pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("fork", ["os.fork", "libc-fork"])
def test_a_lock_dies_with_its_owner_whatever_children_it_forked(tmp_path, fork):
    """kill -9 of a process holding a run directory's lock while a child it forked lives on: the folder can be
    locked again at once (the orphan kept the flock for as long as it lived)."""
    folder = tmp_path / "run"
    owner = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(folder), fork], stdout=subprocess.PIPE,
                             text=True)
    grandchild = int(owner.stdout.readline())
    try:
        with pytest.raises(DirLockedError, match=f"in use by process {owner.pid} on "):
            DirLock(folder).__enter__()  # a live owner keeps its lock
        owner.kill()
        owner.wait(timeout=30)
        with DirLock(folder, "run directory"):  # at once, while the grandchild still runs
            assert os.kill(grandchild, 0) is None
            with pytest.raises(DirLockedError, match=str(os.getpid())):
                DirLock(folder).__enter__()
    finally:
        os.kill(grandchild, signal.SIGKILL)
        owner.stdout.close()


def test_temporaries_are_unique_and_stale_ones_are_removed(tiny_config, tmp_path):
    names = []
    for _ in range(2):
        atomic_write(tmp_path / "x.txt", lambda p: names.append(p.name) or p.write_text("x"))
    assert names[0] != names[1] and names[0].startswith(".x.txt.") and names[0].endswith(".tmp")
    train(tiny_config(*QUICK, "train.stop_at=2"))
    stale = tmp_path / "run" / "checkpoints" / ".last.pt.killed.tmp"
    stale.write_bytes(b"half a checkpoint")
    train(tiny_config(*QUICK, f"run.resume={tmp_path / 'run'}"))
    assert not stale.exists()


def test_sigterm_saves_and_exits_non_zero(tiny_config, tmp_path):
    """A real process: SIGTERM mid-run saves a checkpoint and exits 128 + 15."""
    cfg_args = [f"{k}" for k in ("train.max_iters=100000", "train.eval_interval=100000", "train.ckpt_interval=100000",
                                 "train.log_interval=1")]
    cfg = tiny_config(*cfg_args)  # the fixture's overrides, as a command line
    from fastwsss.config import to_yaml

    (tmp_path / "cfg.yaml").write_text(to_yaml(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fastwsss.train", "--config", str(tmp_path / "cfg.yaml")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by signal SIGTERM" in err
    assert load_checkpoint(tmp_path / "run")["iteration"] >= 2


# ---- late or deep crashes


def test_a_checkpoint_of_another_class_count_is_named(tiny_config, tmp_path):
    train(tiny_config(*QUICK, "train.stop_at=2"))
    with pytest.raises(CheckpointError, match=r"classifier\.weight.*data\.num_classes"):
        load_model(tmp_path / "run", ["data.num_classes=5"])


def test_resume_from_a_missing_directory_names_it(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "run"
    with pytest.raises(SystemExit) as exit_info:
        train_main([f"run.resume={missing}"])
    assert exit_info.value.code == 2 and str(missing) in capsys.readouterr().err


def test_user_errors_are_one_line(tmp_path):
    missing = tmp_path / "missing"
    proc = subprocess.run([sys.executable, "-m", "fastwsss.train", "--config", "demo", f"data.root={missing}",
                           "data.dataset=voc"], capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: dataset root not found: {missing}"
    assert "Traceback" not in proc.stderr


def _one_line_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train_main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    return err[err.index("error: "):].strip()  # one line, or the config's list of problems


@pytest.mark.parametrize("override, expected", [
    ("model.embed_dim=33", "model.embed_dim=33 must be a multiple of model.num_heads=2"),
    ("model.backbone=resnet50", "timm cannot build model.backbone='resnet50'"),
    ("model.backbone=deit_tiny_patch16", "model.backbone='deit_tiny_patch16' is not a timm model (did you mean "),
    ("train.device=tpu", "train.device='tpu' is not one of auto, cpu, cuda, cuda:N"),
    ("train.device=cuda:99", "train.device=cuda:99 but"),
    ("model.pretrained={tmp}/missing.pt", "pretrained weights not found: {tmp}/missing.pt (model.pretrained)"),
    ("model.pretrained={tmp}/junk.pt", "cannot read pretrained weights {tmp}/junk.pt (model.pretrained)"),
    ("model.pretrained={tmp}/run0/checkpoints/last.pt", ("model.pretrained={tmp}/run0/checkpoints/last.pt is a "
     "fastwsss training checkpoint, not backbone weights: continue that run with run.resume={tmp}/run0")),
    ("model.pretrained={tmp}/other.pt", "tensor 'cls_token' has shape (1, 1, 8), the model expects (1, 1, 32)"),
])
def test_model_device_and_weights_mistakes_are_one_line_at_start(tiny_config, tmp_path, capsys, override, expected):
    """Each is known before anything is built: one line, exit status 2, the data never opened (its root is missing)
    and no run directory made."""
    from fastwsss.checkpoint import rng_state
    from fastwsss.config import to_yaml
    from fastwsss.models import create_vit

    (tmp_path / "junk.pt").write_text("junk")
    save_checkpoint(tmp_path / "run0" / "checkpoints" / "last.pt",  # as training writes one: numpy RNG state inside
                    {"iteration": 3, "model": {}, "config": "", "rng": rng_state()})
    other = create_vit("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=8, depth=3, num_heads=2)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    (tmp_path / "cfg.yaml").write_text(to_yaml(tiny_config()))
    missing = tmp_path / "no_data"
    line = _one_line_error(["--config", str(tmp_path / "cfg.yaml"), "data.dataset=voc", f"data.root={missing}",
                            override.format(tmp=tmp_path)], capsys)
    assert expected.format(tmp=tmp_path) in line, line
    assert "\n" not in line or line.startswith("error: invalid config:\n"), line
    assert not (tmp_path / "run").exists()


def test_cuda_without_cuda_is_one_line(tiny_config, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _one_line_error(["--config", "demo", "train.device=cuda"], capsys)
    assert line.startswith("error: train.device=cuda but CUDA is not available"), line


def test_infer_does_not_swallow_model_errors(tiny_config, tmp_path, monkeypatch):
    """A CUDA out-of-memory or a compile error is not 'image failed' for every image: it stops the run."""
    from fastwsss.inference import export

    train(tiny_config(*QUICK, "train.stop_at=2"))
    model, cfg, _ = load_model(tmp_path / "run")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (48, 48), (i * 50, 0, 0)).save(images / f"{i}.png")

    def oom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(export, "multiscale_seg_logits", oom)
    with pytest.raises(RuntimeError, match="out of memory"):
        export.run(cfg, model, list_images(images), tmp_path / "out", device=torch.device("cpu"))
    tiny = images / "tiny.png"
    Image.new("RGB", (4, 4)).save(tiny)
    monkeypatch.undo()
    summary = export.run(cfg, model, list_images(images), tmp_path / "out2", device=torch.device("cpu"))
    assert summary["failed"] == 1 and "tiny.png is 4x4" in summary["failures"][0]["error"]


def test_checkpoints_are_written_through_unique_temporaries(tmp_path):
    save_checkpoint(tmp_path / "c.pt", {"iteration": 1, "model": {}, "config": ""})
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    assert json.dumps(load_checkpoint(tmp_path / "c.pt")["iteration"]) == "1"


_Usage = collections.namedtuple("_Usage", "total used free")  # shutil.disk_usage's result
_TORCH_FULL = ("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/3: file "
               "write failed")


@pytest.mark.parametrize("failure", ["torch-writer", "torch-iostream", "ENOSPC"])
def test_a_full_disk_while_checkpointing_says_so_and_names_the_last_good_one(tmp_path, monkeypatch, failure):
    """torch's writer says neither the file nor the cause; the previous checkpoint is intact and named."""
    import errno

    from fastwsss import checkpoint as checkpoint_module
    from fastwsss.files import WriteError

    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, {"iteration": 2, "model": {}, "config": ""})
    before = path.read_bytes()
    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # the temporary takes its space, then the write fails
        if failure == "ENOSPC":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError(_TORCH_FULL if failure == "torch-writer" else "basic_ios::clear: iostream error")

    monkeypatch.setattr(checkpoint_module.torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: _Usage(10 * 2**30, 10 * 2**30 - 4096, 4096))
    with pytest.raises(WriteError) as err:
        save_checkpoint(path, {"iteration": 4, "model": {}, "config": ""})
    msg = str(err.value)
    assert msg.startswith(f"cannot save the checkpoint of iteration 4 to {path}: no space left on device")
    assert msg.endswith(f"the last good checkpoint, iteration 2, is intact in {path}") and "\n" not in msg
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_a_failed_write_with_room_left_is_not_called_a_full_disk(tmp_path, monkeypatch):
    from fastwsss.files import WriteError

    def broken(p):
        raise RuntimeError("basic_ios::clear: iostream error")

    with pytest.raises(WriteError, match=r"cannot write .*x\.pt: the write failed \(basic_ios::clear: iostream error\) "
                       r"\([0-9.]+ MiB free on its filesystem\); nothing was written to"):
        atomic_write(tmp_path / "x.pt", broken)
    with pytest.raises(ZeroDivisionError):  # not a failed write: as it is
        atomic_write(tmp_path / "x.pt", lambda p: 1 / 0)
    assert not list(tmp_path.iterdir())


def test_a_full_disk_is_one_line_from_train_and_infer(tiny_config, tmp_path, monkeypatch, capsys):
    import errno

    from fastwsss import checkpoint as checkpoint_module
    from fastwsss.config import to_yaml
    from fastwsss.infer import main as infer_main
    from fastwsss.inference import export

    (tmp_path / "cfg.yaml").write_text(to_yaml(tiny_config(*QUICK, "train.eval_interval=100")))
    real_save = torch.save

    def full_at_4(obj, f, *args, **kwargs):
        if obj["iteration"] == 4:
            raise RuntimeError(_TORCH_FULL)
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", full_at_4)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: _Usage(1, 1, 0))
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--config", str(tmp_path / "cfg.yaml")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"error: cannot save the checkpoint of iteration 4 to {tmp_path / 'run' / 'checkpoints' / 'last.pt'}: no space "
        f"left on device (0.0 MiB free on its filesystem); the last good checkpoint, iteration 2, is intact in "
        f"{tmp_path / 'run' / 'checkpoints' / 'last.pt'}")
    monkeypatch.undo()
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (48, 48)).save(images / "a.png")

    def no_space(image, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export.Image.Image, "save", lambda self, p, **kw: no_space(self, p))
    with pytest.raises(SystemExit) as exit_info:
        infer_main(["--checkpoint", str(tmp_path / "run"), "--images", str(images), "--out", str(tmp_path / "out"),
                    "infer.num_workers=0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    mask = tmp_path / "out" / "masks" / "a.png"
    assert line.startswith(f"error: cannot write {mask}: no space left on device ("), line


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_written_files_get_the_umask_permissions_as_open_gives_them(tmp_path, umask):
    """mkstemp's 0600 made every checkpoint, config.yaml, results.json and mask private whatever the umask."""
    from fastwsss.data.coco import _png

    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
        atomic_write(tmp_path / "config.yaml", lambda p: p.write_text("x"))
        save_checkpoint(tmp_path / "checkpoints" / "last.pt", {"iteration": 1, "model": {}, "config": ""})
        atomic_write(tmp_path / "mask.png", lambda p: _png(np.zeros((4, 4), np.uint8), p))
        root = tmp_path / "root"
        (root / "ImageSets" / "Segmentation").mkdir(parents=True)
        (root / "ImageSets" / "Segmentation" / "s.txt").write_text("a\n")
        (root / "JPEGImages").mkdir()
        (root / "SegmentationClassAug").mkdir()
        Image.new("RGB", (4, 4)).save(root / "JPEGImages" / "a.jpg")
        Image.fromarray(np.ones((4, 4), np.uint8)).save(root / "SegmentationClassAug" / "a.png")
        SegmentationList(root, "s", "voc", 2)  # writes the label cache under the root
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == expected
    written = [tmp_path / "config.yaml", tmp_path / "checkpoints" / "last.pt", tmp_path / "mask.png",
               *(root / ".fastwsss_cache").iterdir()]
    for path in written:
        assert path.stat().st_mode & 0o777 == expected, (path, oct(path.stat().st_mode))



# ---- resuming, and what is known at start


def test_triton_where_it_cannot_run_is_an_error_at_start(tiny_config, monkeypatch, tmp_path):
    import fastwsss.kernels._backend as backend

    monkeypatch.setattr(backend, "INTERPRET", False)  # a CPU machine without the interpreter
    with pytest.raises(ConfigError, match=r"kernels.backend=triton cannot run on cpu: tensors on cpu"):
        train(tiny_config("kernels.backend=triton", "train.max_iters=2"))
    assert not (tmp_path / "run").exists()  # nothing built, nothing written


def test_a_resume_refuses_changes_to_the_maths_and_says_when_there_is_nothing_to_do(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(*QUICK))
    saved = (run / "config.yaml").read_text()
    for override, line in (("train.max_iters=10", "train.max_iters: 4 -> 10"),
                           ("train.batch_size=2", "train.batch_size: 4 -> 2"), ("optim.lr=0.5", "optim.lr: 0.001 -> 0.5")):
        with pytest.raises(SystemExit) as exit_info:
            train_main([f"run.resume={run}", override])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and line in err and "run.allow_changes=true" in err, err
    assert (run / "config.yaml").read_text() == saved
    # a finished run: said, nothing trained or rewritten, its last results printed, exit 0
    train_main([f"run.resume={run}", "train.log_interval=1"])
    out = capsys.readouterr()
    assert "is at iteration 4 (train.max_iters=4: the run is finished): nothing to train" in out.err
    assert out.out.startswith("mIoU %:") and (run / "config.yaml").read_text() == saved
    # another config named with --config: refused at start, before its data is generated
    with pytest.raises(SystemExit):
        train_main(["--config", "demo", f"run.resume={run}", f"data.root={tmp_path / 'demo_data'}"])
    assert "train.method: cam -> mcc" in capsys.readouterr().err and not (tmp_path / "demo_data").exists()
    # allowed on purpose: a longer schedule
    train_main([f"run.resume={run}", "train.max_iters=6", "run.allow_changes=true"])
    assert load_checkpoint(run)["iteration"] == 6
    assert "resumed with train.max_iters: 4 -> 6 (run.allow_changes)" in (run / "train.log").read_text()
    assert "allow_changes: false" in (run / "config.yaml").read_text()  # the allowance is not kept


def test_metrics_keep_each_step_once_after_a_resume(tiny_config, tmp_path):
    run = tmp_path / "run"
    train(tiny_config("train.max_iters=6", "train.stop_at=4", "train.log_interval=1", "train.eval_interval=100",
                      "train.ckpt_interval=2"))
    with open(run / "metrics.jsonl", "a") as f:  # what a run killed after its checkpoint at 4 had gone on to write
        f.write(json.dumps({"step": 5, "lr": 0.1}) + "\n" + '{"step": 6, "l')
    train(tiny_config("train.max_iters=6", "train.log_interval=1", "train.eval_interval=100",
                      "train.ckpt_interval=2", f"run.resume={run}"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval" not in r] == [1, 2, 3, 4, 5, 6]
    assert [r["eval"]["step"] for r in records if "eval" in r] == [6]

"""The training loop: one function for every method, readable top to bottom: build, then run (autocast, step,
log, evaluate, checkpoint). What a method computes is its own (``fastwsss.methods``); one step's forwards and
backwards are ``step.forward_backward``. ``python -m fastwsss.train`` is the command; under torchrun every process
runs this loop on its share of each step's batch (docs/distributed.md)."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..checkpoint import load_checkpoint, load_weights, rng_state, save_checkpoint, set_rng_state
from ..config import Config, ConfigError, leaf_values, resume_changes, to_yaml
from ..data import ResumableSampler, TrainDataset, open_splits
from ..files import DirLock, atomic_write, remove_stale_temps
from ..inference import check_kernel_backend, class_pixel_prior, config_from_checkpoint
from ..kernels import backends_used
from ..methods import build_method
from ..runtime import (
    Dist,
    all_gather_objects,
    all_reduce_sum,
    autocast_dtype,
    barrier,
    broadcast_object,
    init_distributed,
    make_autocast,
)
from .evaluator import Evaluator
from .guard import StepGuard
from .logs import PhaseSpeed, RunLog, TermMeter, log_line, setup_logging, setup_worker_logging
from .optim import build_optimizer, set_lr
from .step import StepModule, forward_backward

log = logging.getLogger("fastwsss")
MAX_SKIPPED_STEPS = 10


class NothingToTrain(Exception):
    """A resumed run that is already at the iteration it would stop at: nothing trained, nothing rewritten.
    ``results``: its last evaluation (``results.json``), if it has one."""

    def __init__(self, message: str, results: dict):
        super().__init__(message)
        self.results = results


class TrainingInterrupted(Exception):
    """SIGINT / SIGTERM: the run saved a checkpoint at ``step`` and stopped (the command exits 128 + signal)."""

    def __init__(self, signum: int, step: int, run_dir: Path):
        super().__init__(f"stopped by signal {signal.Signals(signum).name} at iteration {step}; checkpoint saved, "
                         f"resume with run.resume={run_dir}")
        self.signum, self.step, self.run_dir = signum, step, run_dir


def train(cfg: Config) -> dict:
    """Run (or resume) one training job; returns the last evaluation (the first process's; {} on the others). The run
    directory is locked for as long as this runs; SIGINT / SIGTERM save a checkpoint and raise
    :class:`TrainingInterrupted`. Under torchrun every process calls this: the first one writes the run directory."""
    dist, device = init_distributed(cfg.train.device)
    check_processes(cfg, dist)
    check_kernel_backend(cfg.kernels.backend, device)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if not cfg.run.resume and restarted and (Path(cfg.run.dir) / "checkpoints" / "last.pt").exists():
        cfg.run.resume = cfg.run.dir  # torchrun --max-restarts: carry on from the last checkpoint
    if cfg.run.resume:
        resume = load_checkpoint(cfg.run.resume)
        run_dir = Path(resume["path"]).parent.parent
        resumed_with = check_resume(cfg, resume, run_dir)
    else:
        resumed_with = []
        resume = None
        run_dir = Path(cfg.run.dir or Path("runs") / cfg.name / time.strftime("%Y%m%d-%H%M%S"))
    run_dir = Path(broadcast_object(str(run_dir), dist))  # the first process's clock names the run
    with DirLock(run_dir, "run directory") if dist.main else nullcontext():
        problem = None
        if dist.main and resume is None and (run_dir / "checkpoints" / "last.pt").exists():
            problem = (f"{run_dir} already holds a run; resume it with run.resume={run_dir} or choose another "
                       "run.dir")
        problem = broadcast_object(problem, dist)
        if problem:
            raise FileExistsError(problem)
        if dist.main:
            remove_stale_temps(run_dir)
            remove_stale_temps(run_dir / "checkpoints")
        return _train(cfg, run_dir, resume, dist, device, resumed_with)


def check_resume(cfg: Config, resume: dict, run_dir: Path) -> list[str]:
    """A resume continues the run it names: settings that change its maths or schedule are refused unless
    ``run.allow_changes`` (``config.resume_changes`` lists which may change), and a run already at the iteration
    it would stop at raises :class:`NothingToTrain` before anything is written. Returns the changes allowed."""
    allowed, refused = resume_changes(config_from_checkpoint(resume), cfg)
    if refused:
        raise ConfigError(f"run.resume={run_dir}: these settings differ from the run's and would change its maths or "
                          "schedule (run.allow_changes=true resumes with them anyway):\n  " + "\n  ".join(refused))
    cfg.run.allow_changes = False  # an allowance for this resume, not a setting the run keeps
    stop = min(cfg.train.stop_at or cfg.train.max_iters, cfg.train.max_iters)
    if resume["iteration"] >= stop:
        results = run_dir / "results.json"
        why = (f"train.max_iters={cfg.train.max_iters}: the run is finished" if resume["iteration"] >= cfg.train.max_iters
               else f"train.stop_at={cfg.train.stop_at}")
        raise NothingToTrain(f"{run_dir} is at iteration {resume['iteration']} ({why}): nothing to train, nothing "
                             "written", json.loads(results.read_text()) if results.is_file() else {})
    return allowed


def without_pretrained(cfg: Config) -> Config:
    """A copy of ``cfg`` whose network is built without reading pretrained weights (a resume loads every weight)."""
    cfg = copy.deepcopy(cfg)
    cfg.model.pretrained = "none"
    return cfg


def check_processes(cfg: Config, dist: Dist) -> None:
    """What must hold across the processes of a torchrun job, checked before anything is built: the batch splits
    evenly, every process has the same config, and a restartable job names its run directory."""
    parts = dist.world_size * cfg.train.grad_accum
    if cfg.train.batch_size % parts:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} (the global batch) must be a multiple of "
                          f"{dist.world_size} processes x train.grad_accum={cfg.train.grad_accum}")
    configs = all_gather_objects(leaf_values(cfg), dist)
    other = next((r for r, c in enumerate(configs) if c != configs[0]), None)
    if other is not None:
        diff = [f"  {key}: rank 0 {value}, rank {other} {configs[other].get(key)}"
                for key, value in configs[0].items() if configs[other].get(key) != value]
        raise ConfigError(f"process {other} has another config than process 0:\n" + "\n".join(diff[:10]))
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        if not (cfg.run.dir or cfg.run.resume):
            raise ConfigError("torchrun --max-restarts needs run.dir=... (a fixed run directory): a restarted job "
                              "resumes from its last checkpoint there")
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            raise ConfigError("torchrun --max-restarts: run torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its "
                              "environment. Otherwise the restarted processes share the failed attempt's store and "
                              "connect to its dead addresses (pytorch/pytorch#135712, #167288; docs/distributed.md)")


def _train(cfg: Config, run_dir: Path, resume: dict | None, dist: Dist, device: torch.device,
           resumed_with: list[str]) -> dict:
    # ---- build
    cfg.run.dir = str(run_dir)
    if dist.main:
        setup_logging(run_dir)
    else:
        setup_worker_logging(dist.rank)
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    amp = autocast_dtype(cfg.train.precision, device)
    autocast = make_autocast(cfg.train.precision, device)
    train_items, val_items = open_splits(cfg.data)
    log.info("data: %s train / %s val images from %s", len(train_items.names),
             len(val_items.names) if val_items is not None else 0, cfg.data.root)

    method = build_method(cfg)
    # a resume takes every weight from its checkpoint: the pretrained weights are not read again
    model = (build_method(without_pretrained(cfg)) if resume is not None else method).build_model().to(device)
    optimizer = build_optimizer(model, method, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    step = 0
    if resume is not None:
        load_weights(model, resume["model"], resume["path"])
        optimizer.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        method.load_state_dict(resume.get("method", {}))
        set_rng_state(resume["rng"])
        step = resume["iteration"]
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if restart != "0":
            log.warning("torchrun restart %s: resuming from the last checkpoint", restart)
        log.info("resumed from %s at iteration %d (written by %s process(es), now %d)", resume["path"], step,
                 resume.get("world_size", 1), dist.world_size)
    K = cfg.train.grad_accum
    micro = cfg.train.batch_size // (dist.world_size * K)  # images per process and micro-batch
    step_module = StepModule(method, model, dist, parts=dist.world_size * K)
    ddp = DistributedDataParallel(step_module, device_ids=[device] if device.type == "cuda" else None,
                                  broadcast_buffers=False) if dist.enabled else None
    guard = StepGuard(model, optimizer, check_grads=not scaler.is_enabled())  # fp16: the scaler checks them

    train_set = TrainDataset(train_items, method.sample_views(model), cfg.train.seed)
    # the global sample stream, cut into micro-batches dealt to the processes in turn: whatever the number of
    # processes and micro-batches, a step trains on the same samples with the same augmentation draws
    sampler = ResumableSampler(len(train_set), cfg.train.seed, step * cfg.train.batch_size, chunk=micro,
                               rank=dist.rank, world_size=dist.world_size)
    loader = DataLoader(train_set, batch_size=micro, sampler=sampler, num_workers=cfg.data.num_workers,
                        drop_last=True, pin_memory=device.type == "cuda", persistent_workers=cfg.data.num_workers > 0)
    if val_items is not None and val_items.has_masks:
        prior = class_pixel_prior(train_items.pixel_counts, train_items.cls_labels)
        patch = model.backbone.patch_embed.patch_size[0]
        evaluator = Evaluator(cfg, method, val_items, prior, run_dir, device, autocast,
                              min_side=math.ceil(patch / min(cfg.cam.scales)), dist=dist)
    else:
        evaluator = None
        log.warning("no masks for the val split (%s): training runs without in-training evaluation",
                    "no data.val_labels" if val_items is None else f"e.g. {val_items.mask_path(val_items.names[0])}")
    runlog = RunLog(run_dir, name=cfg.name, max_iters=cfg.train.max_iters, start=step,
                    tensorboard=cfg.run.tensorboard, main=dist.main)
    # everything is built and the resume has succeeded: only now does the run's config change
    if dist.main:
        atomic_write(run_dir / "config.yaml", lambda p: p.write_text(to_yaml(cfg)))
        log.info("resolved config (saved to %s):\n%s", run_dir / "config.yaml", to_yaml(cfg))
        for change in resumed_with:
            log.info("resumed with %s", change)
    if dist.enabled:
        log.info("%d processes x %d micro-batch(es) of %d images = batch %d", dist.world_size, K, micro,
                 cfg.train.batch_size)

    def checkpoint(it: int) -> None:
        bad = guard.check_finite()  # every process (the same weights): never write a non-finite weight
        if bad is not None:
            raise FloatingPointError(f"parameter {bad} is not finite at iteration {it}; the last checkpoint in "
                                     f"{run_dir} holds finite weights")
        if dist.main:
            save_checkpoint(run_dir / "checkpoints" / "last.pt", {
                "iteration": it, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "method": method.state_dict(), "rng": rng_state(),
                "config": to_yaml(cfg), "world_size": dist.world_size,
            })

    # ---- run
    signals: list[int] = []
    previous_handlers = {s: signal.signal(s, lambda signum, _: signals.append(signum))
                         for s in (signal.SIGINT, signal.SIGTERM)}
    stop = min(cfg.train.stop_at or cfg.train.max_iters, cfg.train.max_iters)
    meter = TermMeter()
    speed = PhaseSpeed()
    skipped = 0
    stopping = 0  # the signal that stops the run (any process's)
    last_eval: dict = {}
    t_log, step_log = time.time(), step
    t_start, step_start = t_log, step
    backends_used(reset=True)  # the kernels' record, from this run's first step
    backends_logged: dict[str, str] = {}
    model.train()
    batches = iter(loader)
    try:
        while step < stop and not stopping:
            parts = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                      for k, v in next(batches).items()} for _ in range(K)]
            lr = set_lr(optimizer, step, cfg)
            it = method.iteration(step)
            method.before_step(model, step)  # once per step, before any forward
            sums, weights, bad_loss = forward_backward(step_module, ddp, parts, it, scaler, autocast)
            # the step's one host sync, the same on every process: a non-finite loss or gradient or an unsafe update
            # anywhere skips the step everywhere, and a signal to any process stops all of them after this step
            local = torch.cat([bad_loss.reshape(1).float(), guard.flags().to(device),
                               torch.tensor([float(bool(signals))], device=device)])
            bad_loss_n, grads_bad, update_bad, signalled = all_reduce_sum(local, dist).tolist()
            stopping = stopping or (signals[0] if signals else signal.SIGTERM if signalled else 0)
            if bad_loss_n or grads_bad or update_bad:
                skipped += 1
                problem = (f"non-finite loss (unweighted terms: "
                           f"{ {method.log_names[k]: round(float(v[0]), 6) for k, v in sums.items()} })"
                           if bad_loss_n else guard.explain(bool(grads_bad)))
                log.warning("step %d skipped, weights and optimizer state untouched: %s", step, problem)
                if skipped >= MAX_SKIPPED_STEPS:
                    raise FloatingPointError(f"{skipped} steps skipped for non-finite values; the last at step {step}"
                                             f" ({problem}); the last checkpoint in {run_dir} holds finite weights")
            else:
                scaler.step(optimizer)
                scaler.update()
                method.after_step(model, step)
                meter.add(sums, weights)  # this process's parts; summed over processes when logged
            optimizer.zero_grad(set_to_none=True)
            step += 1
            runlog.step()

            if step % cfg.train.log_interval == 0 or step == stop:
                now = time.time()
                logged = meter.means(method.log_names, dist)  # log name -> (unweighted, weight, weighted)
                names = {name: k for k, name in method.log_names.items()}
                record = {"step": step, "lr": lr, "it_per_s": (step - step_log) / (now - t_log),
                          **({"loss": sum(wv for _, _, wv in logged.values())} if logged else {}),  # none if all skipped
                          **{names[name]: wv for name, (_, _, wv) in logged.items()},  # weighted, our term names
                          **{name: v for name, (v, _, _) in logged.items()}}  # unweighted, the authors' names
                eta = (now - t_start) / (step - step_start) * (stop - step)
                runlog.interval(record, log_line(step, now - t_start, eta, lr, logged), logged)
                if dist.main and (used := backends_used()) != backends_logged:  # the first interval, any change
                    log.info("kernel backends (kernels.backend=%s): %s", cfg.kernels.backend,
                             ", ".join(f"{op} {b}" for op, b in used.items()))
                    backends_logged = used
                if step_log > step_start:  # the first interval holds the start-up
                    speed.add(logged, step - step_log, now - t_log)
                t_log, step_log = now, step
            evaluate = step % cfg.train.eval_interval == 0 or step == cfg.train.max_iters
            t_pause = time.time()
            if evaluate or step % cfg.train.ckpt_interval == 0 or step == stop:
                checkpoint(step)  # before the evaluation: an evaluation failure never loses the step
            if evaluate and evaluator is not None:
                last_eval = evaluator(model, step)  # {} off the first process
                last_eval = {**last_eval, "it_per_s": speed.rates()} if last_eval else last_eval
                runlog.evaluation(last_eval)
            t_log += time.time() - t_pause  # intervals' it/s count training only
        if stopping:
            checkpoint(step)
            barrier(dist)  # the checkpoint is on disk before any process reports it
            raise TrainingInterrupted(stopping, step, run_dir)
    finally:
        runlog.close()
        for s, h in previous_handlers.items():
            signal.signal(s, h)
    if last_eval and dist.main:
        atomic_write(run_dir / "results.json", lambda p: p.write_text(json.dumps(last_eval, indent=1)))
    log.info("run directory: %s", run_dir)
    barrier(dist)
    return last_eval

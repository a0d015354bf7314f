"""The training loop: one function for every method, readable top to bottom: build -> loop (autocast, step, log,
eval, checkpoint). ``python -m fastwsss.train`` is the command; under torchrun every process runs this loop on its
share of each step's batch (README "Many GPUs")."""

from __future__ import annotations

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
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..checkpoint import load_checkpoint, load_weights, rng_state, save_checkpoint, set_rng_state
from ..config import Config, to_yaml
from ..data import EvalDataset, ResumableSampler, TrainDataset, class_names, open_splits
from ..files import DirLock, atomic_write, remove_stale_temps
from ..inference import (
    EVAL_MODES,
    class_pixel_prior,
    evaluate_model,
    format_table,
    model_from_config,
    trivial_baselines,
)
from ..kernels import backends_used
from ..methods import LOG_NAMES, TrainStep, counts, ema_step, make_targets
from ..models import WSSSNet
from ..runtime import (
    ONE_PROCESS,
    Dist,
    all_gather_objects,
    all_reduce_sum,
    autocast_dtype,
    barrier,
    broadcast_object,
    init_distributed,
    make_autocast,
)
from .logs import log_line, open_tensorboard, setup_logging, setup_worker_logging
from .optim import build_optimizer, set_lr

log = logging.getLogger("fastwsss")


class Evaluator:
    """Periodic evaluation on the val split, printed beside the trivial baselines; saves a PNG grid."""

    def __init__(self, cfg: Config, val_items, prior: np.ndarray, run_dir: Path, device, autocast, min_side: int = 1,
                 dist: Dist = ONE_PROCESS):
        """``min_side``: the smallest image side the model can evaluate (its patch at the smallest CAM scale); every
        val image is checked now, not at the first evaluation. Under torchrun the images are shared out."""
        self.cfg, self.run_dir, self.device, self.autocast, self.dist = cfg, run_dir, device, autocast, dist
        self.dataset = EvalDataset(val_items, cfg.eval.max_images)
        val_items.check_images(val_items.names[:len(self.dataset)], min_side)
        self.names = class_names(cfg.data)
        self.baselines = trivial_baselines(self.dataset, prior) if dist.main else {}

    def __call__(self, model: WSSSNet, step: int) -> dict:
        t0 = time.time()
        c = self.cfg.cam
        modes = ("cam", "aux-cam") if self.cfg.train.method == "cam" else EVAL_MODES
        results = evaluate_model(
            model, self.dataset, scales=tuple(c.scales), bkg_thresh=c.bkg_thresh, modes=modes,
            high_thresh=c.high_thresh, low_thresh=c.low_thresh, device=self.device, autocast=self.autocast,
            num_vis=self.cfg.eval.num_vis, vis_path=self.run_dir / "vis" / f"val_{step:06d}.png",
            num_workers=min(self.cfg.data.num_workers, 2), batch_size=self.cfg.eval.batch_size,
            par_dilations=tuple(c.par_dilations), par_num_iter=c.par_num_iter, par_backend=self.cfg.kernels.backend,
            round_denorm=self.cfg.quirks.round_denorm, dist=self.dist,
        )
        columns = {**results, **self.baselines}
        if not self.dist.main:
            return {}
        tqdm.write(f"\n[eval @ {step}] {len(self.dataset)} val images, {time.time() - t0:.1f} s; IoU %:\n"
                   + format_table(self.names, columns) + "\n")
        return {"step": step, "num_images": len(self.dataset),
                **{f"{k}_miou": cm.miou() for k, cm in columns.items()},
                "per_class": {k: dict(zip(self.names, np.nan_to_num(cm.iou(), nan=-1).round(4).tolist()))
                              for k, cm in columns.items()}}


class TrainingInterrupted(Exception):
    """SIGINT / SIGTERM: the run saved a checkpoint at ``step`` and stopped (the command exits 128 + signal)."""

    def __init__(self, signum: int, step: int, run_dir: Path):
        super().__init__(f"stopped by signal {signal.Signals(signum).name} at iteration {step}; checkpoint saved, "
                         f"resume with run.resume={run_dir}")
        self.signum, self.step, self.run_dir = signum, step, run_dir


class StepGuard:
    """A copy of every parameter (the EMA teacher's too: it moves inside the step) and every optimizer state tensor
    taken before a step, put back when the step's gradients or updated weights turn out non-finite: such a step is
    skipped as a non-finite loss is, and nothing non-finite reaches the weights, the teacher or a checkpoint."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self.params = list(model.parameters())
        self._saved: tuple | None = None

    def save(self) -> None:
        state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
                 for p, st in self.optimizer.state.items()}
        self._saved = ([p.detach().clone() for p in self.params], state)

    def restore(self) -> None:
        params, state = self._saved
        with torch.no_grad():
            for p, saved in zip(self.params, params):
                p.copy_(saved)
        self.optimizer.state.clear()
        self.optimizer.state.update(state)

    def finite(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """A 0-d bool tensor: every element of ``tensors`` is finite (no host sync)."""
        if not tensors:
            return torch.ones((), dtype=torch.bool)
        return torch.stack(torch._foreach_norm([t.detach().float() for t in tensors])).isfinite().all()

    def grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params if p.grad is not None]

    def first_bad(self) -> str:
        """The name of the first parameter (or gradient) that is not finite, for the log."""
        for name, p in self.model.named_parameters():
            if not torch.isfinite(p).all():
                return f"parameter {name}"
            if p.grad is not None and not torch.isfinite(p.grad).all():
                return f"gradient of {name}"
        return "none"


def train(cfg: Config) -> dict:
    """Run (or resume) one training job; returns the last evaluation (the first process's; {} on the others). The run
    directory is locked for as long as this runs; SIGINT / SIGTERM save a checkpoint and raise
    :class:`TrainingInterrupted`. Under torchrun every process calls this: the first one writes the run directory."""
    dist, device = init_distributed(cfg.train.device)
    check_processes(cfg, dist)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if not cfg.run.resume and restarted and (Path(cfg.run.dir) / "checkpoints" / "last.pt").exists():
        cfg.run.resume = cfg.run.dir  # torchrun --max-restarts: carry on from the last checkpoint
    if cfg.run.resume:
        resume = load_checkpoint(cfg.run.resume)
        run_dir = Path(resume["path"]).parent.parent
    else:
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
        return _train(cfg, run_dir, resume, dist, device)


def check_processes(cfg: Config, dist: Dist) -> None:
    """What must hold across the processes of a torchrun job, checked before anything is built: the batch splits
    evenly, every process has the same config, and a restartable job names its run directory."""
    parts = dist.world_size * cfg.train.grad_accum
    if cfg.train.batch_size % parts:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} (the global batch) must be a multiple of "
                         f"{dist.world_size} processes x train.grad_accum={cfg.train.grad_accum}")
    configs = all_gather_objects(to_yaml(cfg), dist)
    other = next((r for r, c in enumerate(configs) if c != configs[0]), None)
    if other is not None:
        diff = [f"  rank 0: {a}\n  rank {other}: {b}" for a, b in zip(configs[0].splitlines(),
                                                                      configs[other].splitlines()) if a != b]
        raise ValueError(f"process {other} has another config than process 0:\n" + "\n".join(diff[:10]))
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        if not (cfg.run.dir or cfg.run.resume):
            raise ValueError("torchrun --max-restarts needs run.dir=... (a fixed run directory): a restarted job "
                             "resumes from its last checkpoint there")
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            raise ValueError("torchrun --max-restarts: run torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its "
                             "environment. Otherwise the restarted processes share the failed attempt's store and "
                             "connect to its dead addresses (pytorch/pytorch#135712, #167288; README 'Many GPUs')")


def _train(cfg: Config, run_dir: Path, resume: dict | None, dist: Dist, device: torch.device) -> dict:
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

    c = cfg.contrast
    projector = None if cfg.train.method == "cam" else {
        "out_dim": c.proj_dim, "hidden_dim": c.proj_hidden, "bottleneck_dim": c.proj_bottleneck}
    model = model_from_config(cfg.model, cfg.data.num_classes, projector).to(device)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    step = 0
    if resume is not None:
        load_weights(model, resume["model"], resume["path"])
        optimizer.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        set_rng_state(resume["rng"])
        step = resume["iteration"]
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if restart != "0":
            log.warning("torchrun restart %s: resuming from the last checkpoint", restart)
        log.info("resumed from %s at iteration %d (written by %s process(es), now %d)", resume["path"], step,
                 resume.get("world_size", 1), dist.world_size)
    step_module = TrainStep(model, cfg, dist)
    ddp = DistributedDataParallel(step_module, device_ids=[device] if device.type == "cuda" else None,
                                  broadcast_buffers=False) if dist.enabled else None
    forward = ddp or step_module

    K = cfg.train.grad_accum
    micro = cfg.train.batch_size // (dist.world_size * K)  # images per process and micro-batch
    d, patch = cfg.data, model.backbone.patch_embed.patch_size[0]
    train_set = TrainDataset(
        train_items, crop_size=d.crop_size, rescale_range=tuple(d.rescale_range), seed=cfg.train.seed,
        jitter_p=d.color_jitter_p, gray_p=d.grayscale_p, blur_p=d.blur_p,
        views="none" if cfg.train.method == "cam" else "contrast",
        num_masks=c.num_local if cfg.train.method == "mcc" else 0, mask_grid=(d.crop_size // patch,) * 2,
        mask_prob=c.mcc_mask_prob, mask_cell=c.mcc_mask_cell, share_flip=cfg.quirks.share_local_flip,
        flip_box=cfg.quirks.flip_box)
    # the global sample stream, cut into micro-batches dealt to the processes in turn: whatever the number of
    # processes and micro-batches, a step trains on the same samples with the same augmentation draws
    sampler = ResumableSampler(len(train_set), cfg.train.seed, step * cfg.train.batch_size, chunk=micro,
                               rank=dist.rank, world_size=dist.world_size)
    loader = DataLoader(train_set, batch_size=micro, sampler=sampler, num_workers=cfg.data.num_workers,
                        drop_last=True, pin_memory=device.type == "cuda", persistent_workers=cfg.data.num_workers > 0)
    if val_items is not None and val_items.has_masks:
        prior = class_pixel_prior(train_items.pixel_counts, train_items.cls_labels)
        evaluator = Evaluator(cfg, val_items, prior, run_dir, device, autocast,
                              min_side=math.ceil(patch / min(cfg.cam.scales)), dist=dist)
    else:
        evaluator = None
        log.warning("no masks for the val split (%s): training runs without in-training evaluation",
                    "no data.val_labels" if val_items is None else f"e.g. {val_items.mask_path(val_items.names[0])}")
    tensorboard = open_tensorboard(run_dir / "tensorboard") if cfg.run.tensorboard and dist.main else None
    log_names = LOG_NAMES[cfg.train.method]
    # everything is built and the resume has succeeded: only now does the run's config change
    if dist.main:
        atomic_write(run_dir / "config.yaml", lambda p: p.write_text(to_yaml(cfg)))
        log.info("resolved config (saved to %s):\n%s", run_dir / "config.yaml", to_yaml(cfg))
    if dist.enabled:
        log.info("%d processes x %d micro-batch(es) of %d images = batch %d", dist.world_size, K, micro,
                 cfg.train.batch_size)

    def checkpoint(it: int) -> None:
        if dist.main:
            save_checkpoint(run_dir / "checkpoints" / "last.pt", {
                "iteration": it, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "rng": rng_state(), "config": to_yaml(cfg),
                "world_size": dist.world_size,
            })

    signals: list[int] = []
    previous_handlers = {s: signal.signal(s, lambda signum, _: signals.append(signum))
                         for s in (signal.SIGINT, signal.SIGTERM)}
    stop = min(cfg.train.stop_at or cfg.train.max_iters, cfg.train.max_iters)
    metrics = open(run_dir / "metrics.jsonl", "a") if dist.main else None  # noqa: SIM115 (closed in the finally)
    sums: dict[str, torch.Tensor] = {}  # term -> (unweighted, weighted) summed over the interval's steps
    steps_with: dict[str, int] = {}  # steps of the interval that computed the term
    weights: dict[str, float] = {}
    guard = StepGuard(model, optimizer)
    skipped = 0
    stopping = 0  # the signal that stops the run (any process's)
    last_eval: dict = {}
    bar = tqdm(total=cfg.train.max_iters, initial=step, desc=cfg.name, dynamic_ncols=True, mininterval=2.0,
               disable=not dist.main)
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
            guard.save()
            optimizer.zero_grad(set_to_none=True)
            ema_step(model, step, cfg)  # once per step, before any teacher forward
            targets, norm = [None] * K, None
            if K > 1:  # every micro-batch's targets first: the terms' denominators are the whole batch's
                with autocast():
                    targets = [make_targets(model, b, step, cfg) for b in parts]
                norm = all_reduce_sum(sum(counts(t, b, cfg) for t, b in zip(targets, parts)), dist)
            step_terms: dict[str, list[torch.Tensor]] = {}
            problem = None
            for i, (batch, target) in enumerate(zip(parts, targets)):
                with ddp.no_sync() if ddp is not None and i < K - 1 else nullcontext():
                    with autocast():
                        terms = forward(batch, step, target, norm)
                    loss = sum(t.weighted for t in terms.values())
                    # one flag for every process: a non-finite loss anywhere skips the step everywhere, and a signal
                    # to any process stops all of them after this step
                    flags = all_reduce_sum(torch.stack([(~torch.isfinite(loss.detach())).float(),
                                                        loss.new_tensor(float(bool(signals)))]), dist).tolist()
                    stopping = stopping or (signals[0] if signals else signal.SIGTERM if flags[1] else 0)
                    if flags[0]:
                        problem = "non-finite loss" + (f" in process(es) other than {dist.rank}" if not
                                                       (~torch.isfinite(loss)).item() else "; unweighted terms " + str(
                                                           {log_names[k]: float(t.value) for k, t in terms.items()}))
                        break
                    scaler.scale(loss * dist.world_size).backward()  # DDP averages over the processes: x N sums
                for k, t in terms.items():
                    weights[k] = t.weight
                    step_terms.setdefault(k, []).append(torch.stack([t.value.detach().float(),
                                                                     t.weighted.detach().float()]))
            if problem is None:
                grads_ok = guard.finite(guard.grads()) if not scaler.is_enabled() else True  # fp16: the scaler's
                scaler.step(optimizer)
                scaler.update()
                if not bool(grads_ok & guard.finite(guard.params)):  # one host sync
                    problem = f"non-finite {guard.first_bad()} after the update"
            if problem is not None:
                guard.restore()
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                log.warning("step %d skipped (weights, optimizer and teacher restored): %s", step, problem)
                if skipped >= 10:
                    raise FloatingPointError(f"{skipped} steps skipped for non-finite values; the last at step {step}"
                                             f" ({problem}); the last checkpoint in {run_dir} holds finite weights")
            else:
                for k, values in step_terms.items():  # this process's parts; summed over processes when logged
                    sums[k] = sums.get(k, 0) + torch.stack(values).sum(0)
                    steps_with[k] = steps_with.get(k, 0) + 1
            step += 1
            bar.update(1)

            if step % cfg.train.log_interval == 0 or step == stop:
                n, now = step - step_log, time.time()
                # one host sync; the same terms were computed in every process
                totals = all_reduce_sum(torch.stack(list(sums.values())), dist).tolist() if sums else []
                means = dict(zip(sums, totals))
                # log name -> (unweighted, weight, weighted), each the mean over the steps that computed it
                logged = {name: (means[k][0] / steps_with[k], weights[k], means[k][1] / steps_with[k])
                          for k, name in log_names.items() if k in means}  # in the authors' order
                record = {"step": step, "lr": lr, "it_per_s": n / (now - t_log),
                          **({"loss": sum(wv for _, _, wv in logged.values())} if logged else {}),  # none if all skipped
                          **{k: wv / steps_with[k] for k, (_, wv) in means.items()},  # weighted, under our term names
                          **{name: v for name, (v, _, _) in logged.items()}}  # unweighted, under the authors' names
                if dist.main:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    eta = (now - t_start) / (step - step_start) * (stop - step)
                    log.info(log_line(step, now - t_start, eta, lr, logged))
                    if (used := backends_used()) != backends_logged:  # the first interval, and any change after
                        log.info("kernel backends (kernels.backend=%s): %s", cfg.kernels.backend,
                                 ", ".join(f"{op} {b}" for op, b in used.items()))
                        backends_logged = used
                    bar.set_postfix({name: f"{v:.4f}" for name, (v, _, _) in logged.items()} | {"lr": f"{lr:.2e}"})
                if tensorboard is not None:
                    for name, (v, _, wv) in logged.items():
                        tensorboard.add_scalar(f"loss/{name}", v, step)
                        tensorboard.add_scalar(f"loss_weighted/{name}", wv, step)
                    for key in ("loss", "lr", "it_per_s"):
                        if key in record:
                            tensorboard.add_scalar(f"train/{key}", record[key], step)
                    tensorboard.flush()
                sums, steps_with, t_log, step_log = {}, {}, now, step
            evaluate = step % cfg.train.eval_interval == 0 or step == cfg.train.max_iters
            if evaluate or step % cfg.train.ckpt_interval == 0 or step == stop:
                checkpoint(step)  # before the evaluation: an evaluation failure never loses the step
            if evaluate and evaluator is not None:
                last_eval = evaluator(model, step)
                if dist.main:
                    metrics.write(json.dumps({"eval": last_eval}) + "\n")
                    metrics.flush()
                if tensorboard is not None:
                    for key, value in last_eval.items():
                        if key.endswith("_miou"):
                            tensorboard.add_scalar(f"eval/{key}", value, step)
                    tensorboard.flush()
        if stopping:
            checkpoint(step)
            barrier(dist)  # the checkpoint is on disk before any process reports it
            raise TrainingInterrupted(stopping, step, run_dir)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
        if tensorboard is not None:
            tensorboard.close()
        for s, h in previous_handlers.items():
            signal.signal(s, h)
    if last_eval and dist.main:
        atomic_write(run_dir / "results.json", lambda p: p.write_text(json.dumps(last_eval, indent=1)))
    log.info("run directory: %s", run_dir)
    barrier(dist)
    return last_eval

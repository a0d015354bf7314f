"""The training loop: one function for every method, readable top to bottom: build -> loop (autocast, step, log,
eval, checkpoint). ``python -m fastwsss.train`` is the command."""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..checkpoint import check_model_layout, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ..config import Config, to_yaml
from ..data import EvalDataset, ResumableSampler, TrainDataset, class_names, open_splits
from ..inference import (
    EVAL_MODES,
    class_pixel_prior,
    evaluate_model,
    format_table,
    model_from_config,
    trivial_baselines,
)
from ..methods import LOG_NAMES, compute_losses
from ..models import WSSSNet
from ..runtime import autocast_dtype, make_autocast, resolve_device
from .logs import log_line, open_tensorboard, setup_logging
from .optim import build_optimizer, set_lr

log = logging.getLogger("fastwsss")


class Evaluator:
    """Periodic evaluation on the val split, printed beside the trivial baselines; saves a PNG grid."""

    def __init__(self, cfg: Config, val_items, prior: np.ndarray, run_dir: Path, device, autocast):
        self.cfg, self.run_dir, self.device, self.autocast = cfg, run_dir, device, autocast
        self.dataset = EvalDataset(val_items, cfg.eval.max_images)
        self.names = class_names(cfg.data)
        self.baselines = trivial_baselines(self.dataset, prior)

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
            round_denorm=self.cfg.quirks.round_denorm,
        )
        columns = {**results, **self.baselines}
        tqdm.write(f"\n[eval @ {step}] {len(self.dataset)} val images, {time.time() - t0:.1f} s; IoU %:\n"
                   + format_table(self.names, columns) + "\n")
        return {"step": step, "num_images": len(self.dataset),
                **{f"{k}_miou": cm.miou() for k, cm in columns.items()},
                "per_class": {k: dict(zip(self.names, np.nan_to_num(cm.iou(), nan=-1).round(4).tolist()))
                              for k, cm in columns.items()}}


def train(cfg: Config) -> dict:
    """Run (or resume) one training job; returns the last evaluation."""
    resume = load_checkpoint(cfg.run.resume) if cfg.run.resume else None
    if resume is not None:
        run_dir = Path(resume["path"]).parent.parent
    else:
        run_dir = Path(cfg.run.dir or Path("runs") / cfg.name / time.strftime("%Y%m%d-%H%M%S"))
        if (run_dir / "checkpoints" / "last.pt").exists():
            raise FileExistsError(f"{run_dir} already holds a run; resume it with run.resume={run_dir} "
                                  "or choose another run.dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.run.dir = str(run_dir)
    setup_logging(run_dir)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    log.info("resolved config (saved to %s):\n%s", run_dir / "config.yaml", to_yaml(cfg))

    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    amp = autocast_dtype(cfg.train.precision, device)
    autocast = make_autocast(cfg.train.precision, device)
    train_items, val_items = open_splits(cfg.data)
    log.info("data: %s train / %s val images from %s", len(train_items.names), len(val_items.names), cfg.data.root)

    c = cfg.contrast
    projector = None if cfg.train.method == "cam" else {
        "out_dim": c.proj_dim, "hidden_dim": c.proj_hidden, "bottleneck_dim": c.proj_bottleneck}
    model = model_from_config(cfg.model, cfg.data.num_classes, projector).to(device)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    step = 0
    if resume is not None:
        check_model_layout(resume["model"], resume["path"])
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        set_rng_state(resume["rng"])
        step = resume["iteration"]
        log.info("resumed from %s at iteration %d", resume["path"], step)

    bs = cfg.train.batch_size
    d, patch = cfg.data, model.backbone.patch_embed.patch_size[0]
    train_set = TrainDataset(
        train_items, crop_size=d.crop_size, rescale_range=tuple(d.rescale_range), seed=cfg.train.seed,
        jitter_p=d.color_jitter_p, gray_p=d.grayscale_p, blur_p=d.blur_p,
        views="none" if cfg.train.method == "cam" else "contrast",
        num_masks=c.num_local if cfg.train.method == "mcc" else 0, mask_grid=(d.crop_size // patch,) * 2,
        mask_prob=c.mcc_mask_prob, mask_cell=c.mcc_mask_cell, share_flip=cfg.quirks.share_local_flip,
        flip_box=cfg.quirks.flip_box)
    loader = DataLoader(train_set, batch_size=bs, sampler=ResumableSampler(len(train_set), cfg.train.seed, step * bs),
                        num_workers=cfg.data.num_workers, drop_last=True, pin_memory=device.type == "cuda",
                        persistent_workers=cfg.data.num_workers > 0)
    evaluator = Evaluator(cfg, val_items, class_pixel_prior(train_items.pixel_counts), run_dir, device, autocast)
    tensorboard = open_tensorboard(run_dir / "tensorboard") if cfg.run.tensorboard else None
    log_names = LOG_NAMES[cfg.train.method]

    def checkpoint(it: int) -> None:
        save_checkpoint(run_dir / "checkpoints" / "last.pt", {
            "iteration": it, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "rng": rng_state(), "config": to_yaml(cfg),
        })

    stop_requested = []
    previous_handlers = {s: signal.signal(s, lambda *_: stop_requested.append(True))
                         for s in (signal.SIGINT, signal.SIGTERM)}
    stop = min(cfg.train.stop_at or cfg.train.max_iters, cfg.train.max_iters)
    metrics = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in the loop's finally)
    sums: dict[str, torch.Tensor] = {}  # term -> (unweighted, weighted) summed over the interval's steps
    counts: dict[str, int] = {}  # steps of the interval that computed the term
    weights: dict[str, float] = {}
    skipped = 0
    last_eval: dict = {}
    bar = tqdm(total=cfg.train.max_iters, initial=step, desc=cfg.name, dynamic_ncols=True, mininterval=2.0)
    t_log, step_log = time.time(), step
    t_start, step_start = t_log, step
    model.train()
    batches = iter(loader)
    try:
        while step < stop and not stop_requested:
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in next(batches).items()}
            lr = set_lr(optimizer, step, cfg)
            with autocast():
                terms = compute_losses(model, batch, step, cfg)
            loss = sum(t.weighted for t in terms.values())
            optimizer.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):  # one scalar sync per step: a NaN must never reach the weights
                skipped += 1
                log.warning("step %d: non-finite loss, step skipped; unweighted terms %s", step,
                            {log_names[k]: float(t.value) for k, t in terms.items()})
                if skipped >= 10:
                    raise FloatingPointError(f"{skipped} non-finite losses; last at step {step}")
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                for k, t in terms.items():
                    sums[k] = sums.get(k, 0) + torch.stack([t.value.detach().float(), t.weighted.detach().float()])
                    counts[k] = counts.get(k, 0) + 1
                    weights[k] = t.weight
            step += 1
            bar.update(1)

            if step % cfg.train.log_interval == 0 or step == stop:
                n, now = step - step_log, time.time()
                means = dict(zip(sums, torch.stack(list(sums.values())).tolist())) if sums else {}  # one host sync
                # log name -> (unweighted, weight, weighted), each the mean over the steps that computed it
                logged = {name: (means[k][0] / counts[k], weights[k], means[k][1] / counts[k])
                          for k, name in log_names.items() if k in means}  # in the authors' order
                record = {"step": step, "lr": lr, "it_per_s": n / (now - t_log),
                          **({"loss": sum(wv for _, _, wv in logged.values())} if logged else {}),  # none if all skipped
                          **{k: wv / counts[k] for k, (_, wv) in means.items()},  # weighted, under our term names
                          **{name: v for name, (v, _, _) in logged.items()}}  # unweighted, under the authors' names
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                eta = (now - t_start) / (step - step_start) * (stop - step)
                log.info(log_line(step, now - t_start, eta, lr, logged))
                bar.set_postfix({name: f"{v:.4f}" for name, (v, _, _) in logged.items()} | {"lr": f"{lr:.2e}"})
                if tensorboard is not None:
                    for name, (v, _, wv) in logged.items():
                        tensorboard.add_scalar(f"loss/{name}", v, step)
                        tensorboard.add_scalar(f"loss_weighted/{name}", wv, step)
                    for key in ("loss", "lr", "it_per_s"):
                        if key in record:
                            tensorboard.add_scalar(f"train/{key}", record[key], step)
                    tensorboard.flush()
                sums, counts, t_log, step_log = {}, {}, now, step
            if step % cfg.train.eval_interval == 0 or step == cfg.train.max_iters:
                last_eval = evaluator(model, step)
                metrics.write(json.dumps({"eval": last_eval}) + "\n")
                metrics.flush()
                if tensorboard is not None:
                    for key, value in last_eval.items():
                        if key.endswith("_miou"):
                            tensorboard.add_scalar(f"eval/{key}", value, step)
                    tensorboard.flush()
            if step % cfg.train.ckpt_interval == 0 or step == stop:
                checkpoint(step)
        if stop_requested:
            checkpoint(step)
            log.warning("stopped by signal at iteration %d; checkpoint saved, resume with run.resume=%s", step, run_dir)
    finally:
        bar.close()
        metrics.close()
        if tensorboard is not None:
            tensorboard.close()
        for s, h in previous_handlers.items():
            signal.signal(s, h)
    if last_eval:
        (run_dir / "results.json").write_text(json.dumps(last_eval, indent=1))
    log.info("run directory: %s", run_dir)
    return last_eval

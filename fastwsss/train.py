"""Training: ``python -m fastwsss.train [--config NAME|FILE] [--print-config] [key=value ...]``.

One loop for every method, readable top to bottom: build -> loop (autocast, step, log, eval, checkpoint).
Without ``--config`` it runs the packaged ``demo`` config (synthetic data generated under ./data, a small ViT,
CPU-sized; the run goes to ./runs). ``run.resume=<run dir>`` continues an interrupted run exactly, from that run's
saved config.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import version_string
from .checkpoint import check_model_layout, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import Config, load_config, packaged_configs_help, to_yaml
from .data import EvalDataset, ResumableSampler, TrainDataset, class_names, open_splits
from .evaluate import EVAL_MODES, class_pixel_prior, evaluate_model, format_table, trivial_baselines
from .methods import LOG_NAMES, compute_losses
from .models import WSSSNet, build_model

log = logging.getLogger("fastwsss")
DEFAULT_CONFIG = "demo"  # a packaged config (fastwsss.configs)
SUMMARY = {"seg_miou": "segmentation", "cam_miou": "CAM", "pseudo_miou": "pseudo labels",  # the last line printed
           "all-bg_miou": "all-background", "likely-cls_miou": "most-likely-present-class"}


def lr_multiplier(step: int, *, max_iters: int, warmup_iters: int, warmup_ratio: float, power: float) -> float:
    """Linear warm-up from ``warmup_ratio`` to 1 over ``warmup_iters``, then poly decay on the global step."""
    if step < warmup_iters:
        return 1.0 - (1.0 - step / warmup_iters) * (1.0 - warmup_ratio)
    return (1.0 - step / max_iters) ** power


def build_optimizer(model: WSSSNet, cfg: Config) -> torch.optim.AdamW:
    """AdamW, two groups: encoder at ``optim.lr``, heads at ``optim.lr * optim.head_lr_mult``."""
    o = cfg.optim
    heads = [p for m in model.head_modules() for p in m.parameters() if p.requires_grad]
    encoder = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [{"params": encoder, "initial_lr": o.lr}, {"params": heads, "initial_lr": o.lr * o.head_lr_mult}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: Config) -> float:
    o = cfg.optim
    mult = lr_multiplier(step, max_iters=cfg.train.max_iters, warmup_iters=o.warmup_iters,
                         warmup_ratio=o.warmup_ratio, power=o.power)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * mult
    return optimizer.param_groups[0]["lr"]


def log_line(step: int, elapsed_s: float, eta_s: float, lr: float, terms: dict[str, tuple[float, float, float]]
             ) -> str:
    """The authors' log line, each term beside its weighted value and the total: ``Iter: 100; Elasped: 0:01:23;
    ETA: 0:20:00; LR: 5.999e-05; cls_loss: 0.1234 (x1 = 0.1234), ptc_loss: 0.5000 (x0.2 = 0.1000); loss: 0.2234``.
    ``terms``: log name -> (unweighted, weight, weighted). "Elasped" is the authors' spelling, kept so that one parser
    (``fastwsss.plot``) reads both logs."""
    def hms(s: float) -> str:
        return str(datetime.timedelta(seconds=int(s)))

    def num(v: float) -> str:  # the authors' %.4f, but small terms (the reg loss, ~1e-5) keep their digits
        return f"{v:.4f}" if v == 0 or abs(v) >= 1e-2 or not math.isfinite(v) else f"{v:.3e}"

    parts = ", ".join(f"{name}: {num(v)} (x{w:g} = {num(wv)})" for name, (v, w, wv) in terms.items())
    total = sum(wv for _, _, wv in terms.values())
    return f"Iter: {step}; Elasped: {hms(elapsed_s)}; ETA: {hms(eta_s)}; LR: {lr:.3e}; {parts}; loss: {num(total)}"


def open_tensorboard(log_dir: Path):
    """A torch.utils.tensorboard SummaryWriter, or an error that says how to install it (``run.tensorboard``)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError(f"run.tensorboard=true needs the tensorboard package ({err}): pip install "
                          "'fastwsss[tensorboard]', or set run.tensorboard=false") from None
    return SummaryWriter(log_dir=str(log_dir))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but CUDA is not available")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None = plain fp32. ``auto``: bf16 on CUDA where supported, fp32 on CPU."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


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
    _setup_logging(run_dir)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    log.info("resolved config (saved to %s):\n%s", run_dir / "config.yaml", to_yaml(cfg))

    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    amp = autocast_dtype(cfg.train.precision, device)
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext
    train_items, val_items = open_splits(cfg.data)
    log.info("data: %s train / %s val images from %s", len(train_items.names), len(val_items.names), cfg.data.root)

    c = cfg.contrast
    projector = None if cfg.train.method == "cam" else {
        "out_dim": c.proj_dim, "hidden_dim": c.proj_hidden, "bottleneck_dim": c.proj_bottleneck}
    model = build_model(cfg.model, cfg.data.num_classes, projector).to(device)
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


class _TqdmHandler(logging.StreamHandler):
    """Console log lines above the progress bar instead of through it."""

    def __init__(self):
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except (OSError, ValueError):  # as StreamHandler: report, never raise
            self.handleError(record)


def _setup_logging(run_dir: Path) -> None:
    log.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    for h in list(log.handlers):
        log.removeHandler(h)
    for h in (_TqdmHandler(), logging.FileHandler(run_dir / "train.log")):
        h.setFormatter(fmt)
        log.addHandler(h)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastwsss.train", description=__doc__,
                                     epilog=packaged_configs_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="NAME|FILE",
                        help=f"a packaged config's name (below) or a YAML file (default: {DEFAULT_CONFIG}; "
                             "when resuming: the run's own)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the fully resolved config (defaults <- YAML <- overrides) and exit without running")
    parser.add_argument("--version", action="version", version=version_string())
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. train.max_iters=100 data.root=/data/VOC2012")
    args = parser.parse_args(argv)
    path, overrides = args.config, args.overrides
    if path is None:
        resume = next((o.split("=", 1)[1] for o in overrides if o.startswith("run.resume=")), None)
        if resume:  # the run's own config; its early stop was for the interrupted invocation only
            run_dir = Path(resume) if Path(resume).is_dir() else Path(resume).parent.parent
            path, overrides = run_dir / "config.yaml", ["train.stop_at=null", *overrides]
        else:
            path = DEFAULT_CONFIG
    cfg = load_config(path, overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return
    result = train(cfg)
    summary = [f"{title} {100 * result[key]:.1f}" for key, title in SUMMARY.items()
               if not math.isnan(result.get(key, math.nan))]
    if summary:
        print("mIoU %: " + " | ".join(summary))


if __name__ == "__main__":
    main()

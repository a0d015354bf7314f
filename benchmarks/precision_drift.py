"""How far one training step moves between fp32 and bf16 autocast, on the same weights and batch (docs/precision.md).

    python benchmarks/precision_drift.py                                  # the demo config, after 1500 warm-up iters
    python benchmarks/precision_drift.py --checkpoint runs/demo/<stamp> train.method=toco   # a checkpoint's weights
    python benchmarks/precision_drift.py --warmup-iters 0 model.backbone=deit_small_patch16_224 ...   # any config

Runs one training step of the method (``fastwsss.methods``) three times on copies of one model and one batch (same
RNG state): in fp32; under
``torch.autocast(<device>, bfloat16)`` as fastwsss computes it (CAMs and labels in fp32 from the bf16 forward); and
under autocast with the CAM computed in bf16 (how fastwsss computed it before the labels were held to fp32). Prints,
for each bf16 path against fp32: the fraction of CAM-derived labels that differ (segmentation pseudo label, token
affinity label, local-view flags), the largest CAM difference, and each loss term's relative change.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from fastwsss.checkpoint import check_model_layout, load_checkpoint
from fastwsss.config import load_config
from fastwsss.data import ResumableSampler, TrainDataset, open_splits
from fastwsss.inference.predict import config_from_checkpoint
from fastwsss.methods import Method, build_method
from fastwsss.models import WSSSNet
from fastwsss.training import train

ROOT = Path(__file__).resolve().parent.parent


def one_batch(method: Method, model: WSSSNet, seed: int) -> dict:
    items, _ = open_splits(method.cfg.data)
    ds = TrainDataset(items, method.sample_views(model), seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=method.cfg.train.batch_size,
                                         sampler=ResumableSampler(len(ds), seed, 0))
    return next(iter(loader))


def recorded_step(method: Method, model: WSSSNet, batch: dict, step: int, autocast: bool, bf16_cam: bool) -> dict:
    """One step of ``method`` on a copy of the model; returns the unweighted terms and the labels the step made."""
    model = copy.deepcopy(model)  # the step's EMA update must not carry over to the next path
    seen: dict[str, torch.Tensor] = {}
    local_views = method.local_views

    def recording_views(*args, **kwargs):
        tokens, flags = local_views(*args, **kwargs)
        seen["flags"] = flags.detach().clone()
        return tokens, flags

    patches = [(method, "local_views", recording_views)]
    if bf16_cam:  # before: the CAM conv ran under autocast
        def cams_from(self, out):
            return (F.conv2d(out.feat.detach(), self.classifier.weight.detach()),
                    F.conv2d(out.aux_feat.detach(), self.aux_classifier.weight.detach()))
        patches.append((WSSSNet, "cams_from", cams_from))
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        torch.manual_seed(0)
        device = batch["img"].device.type
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            it = method.iteration(step)
            method.before_step(model, step)
            out = method.forward(model, batch, it)
            targets = method.targets(model, batch, it, out)
            terms = method.terms(model, batch, it, targets, method.counts(targets, batch), 1, out)
        seen["terms"] = {k: t.value.item() for k, t in terms.items()}
        seen["seg_label"], seen["aff_label"] = targets.seg_label, targets.aff_label
        seen["cams_in"] = targets.cams.float() * batch["cls_label"][:, :, None, None].float()  # as the labels see them
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
    return seen


def compare(ref: dict, paths: list[dict], names: dict[str, str]) -> list[str]:
    """A markdown table: one row per label kind and loss term, one column per bf16 path."""
    rows = []
    for key, what in (("seg_label", "segmentation pseudo-label pixels that differ"),
                      ("aff_label", "affinity-label tokens that differ"), ("flags", "local-view flags that differ")):
        if key in ref:
            cells = [f"{100 * (ref[key] != p[key]).sum().item() / ref[key].numel():.3f} % "
                     f"({(ref[key] != p[key]).sum().item()} / {ref[key].numel()})" for p in paths]
            rows.append(f"| {what} | | {' | '.join(cells)} |")
    if "cams_in" in ref:
        cells = [f"{(ref['cams_in'] - p['cams_in']).abs().max():.1e}" for p in paths]
        rows.append(f"| largest CAM difference (present classes, CAM in [0, 1]) | | {' | '.join(cells)} |")
    for k, v in ref["terms"].items():
        cells = [f"{abs(p['terms'][k] - v) / abs(v):.1e}" for p in paths]
        rows.append(f"| `{names[k]}` relative change | {v:.4g} | {' | '.join(cells)} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--checkpoint", help="take the weights (and config) from this checkpoint or run directory")
    parser.add_argument("--warmup-iters", type=int, default=1500,
                        help="without --checkpoint: classification-only fp32 iterations before the measured step")
    parser.add_argument("--seed", type=int, default=0, help="which batch")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    if args.checkpoint:
        state = load_checkpoint(args.checkpoint)
        cfg = config_from_checkpoint(state, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    cfg.model.pretrained = ""
    cfg.train.device = "cpu"
    step = max(cfg.loss.aff_start, cfg.loss.con_start, cfg.loss.seg_start, cfg.loss.reg_start)  # every term on
    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg)
    if not hasattr(method, "local_views"):
        parser.error(f"train.method={cfg.train.method}: the drift is measured on a method with local views (toco, mcc)")
    model = method.build_model()
    weights = None
    if args.checkpoint:  # e.g. a classification-only (train.method=cam) run: no projector in it
        weights = state["model"]
    elif args.warmup_iters:
        with tempfile.TemporaryDirectory() as tmp:
            warm = copy.deepcopy(cfg)
            warm.train.method, warm.train.max_iters = "cam", args.warmup_iters
            warm.train.eval_interval = warm.train.ckpt_interval = args.warmup_iters
            warm.eval.max_images, warm.eval.num_vis, warm.run.dir = 20, 0, tmp
            train(warm)
            weights = load_checkpoint(tmp)["model"]
    if weights is not None:
        check_model_layout(weights, args.checkpoint or "warm-up")
        missing, _ = model.load_state_dict(weights, strict=False)
        assert all(k.startswith(("proj_head.", "proj_head_t.")) for k in missing), missing
    model.train()
    batch = one_batch(method, model, args.seed)
    names = method.log_names
    print(f"{cfg.name}: method {cfg.train.method}, backbone {cfg.model.backbone} (dim {model.backbone.embed_dim}, "
          f"depth {len(model.backbone.blocks)}), crop {cfg.data.crop_size}, batch {cfg.train.batch_size}, step {step}, "
          f"threads {torch.get_num_threads()}")
    ref = recorded_step(method, model, batch, step, autocast=False, bf16_cam=False)
    paths = [recorded_step(method, model, batch, step, autocast=True, bf16_cam=b) for b in (False, True)]
    print("| fp32 vs bf16 autocast | fp32 value | bf16, labels in fp32 (now) | bf16, CAM conv in bf16 (before) |")
    print("|---|---|---|---|")
    print("\n".join(compare(ref, paths, names)))


if __name__ == "__main__":
    main()

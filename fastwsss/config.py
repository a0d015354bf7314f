"""Typed configuration: one dataclass tree is the single source of truth.

The defaults are the papers' VOC settings (docs/methods/toco-mcc.md §7.1, §9); YAML files in ``configs/`` (shipped as
``fastwsss.configs``, found by name) hold only differences; ``key=value`` overrides come last. Unknown keys fail
with their full path (``data.roott``), wrong types fail with the key and the value, and invalid choices are rejected
before anything runs.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from importlib import resources
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

DATASETS = ("voc", "coco", "synthetic", "folder")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class SyntheticConfig:
    """Generated VOC-layout data (``data.dataset=synthetic``), written to ``data.root`` if missing."""

    num_train: int = 2000
    num_val: int = 300
    image_size: int = 128
    seed: int = 0
    clutter: float = 1.0  # how many background blobs and lines (0: none; the same images otherwise)
    colour_cue: float = 0.0  # probability that an object's light colour is its class's (0: colour says nothing)


@dataclass
class DataConfig:
    dataset: str = "voc"
    root: str = "data/VOC2012"
    train_split: str = "train_aug"
    val_split: str = "val"  # evaluated during training (COCO: val_part, a fixed subset, as the reference)
    eval_split: str | None = None  # what `python -m fastwsss.evaluate` scores by default; None = val_split
    num_classes: int = 21  # including background
    crop_size: int = 448
    rescale_range: tuple[float, float] = (0.5, 2.0)
    color_jitter_p: float = 0.8  # jitter (0.4, 0.4, 0.2, 0.1)
    grayscale_p: float = 0.2
    blur_p: float = 1.0  # Gaussian blur, radius U(0.1, 2.0)
    num_workers: int = 4
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # image-level labels from files instead of masks (docs/data.md); masks are then needed only to evaluate
    labels: str = ""  # the train split's labels: a CSV (image, classes...) or cls_labels_onehot.npy
    val_labels: str = ""  # the val split's (folder layout: without it, no in-training evaluation)
    class_names: str = ""  # a file of class names, one per line (default: <root>/classes.txt, VOC's for 21)
    masks: str = ""  # folder layout: the masks of the evaluated images, <masks>/<name>.png (default <root>/masks)


@dataclass
class ModelConfig:
    backbone: str = "deit_base_patch16_224"  # any timm ViT with one class token
    pretrained: str = "none"  # none (or "") = random init, timm = timm's hub weights, else a .pth / .safetensors file
    pretrained_source: str = ""  # what the paper fine-tuned: named when a paper config misses model.pretrained
    pretrained_strict: bool = True  # missing backbone keys in the file are an error (else a loud warning)
    img_size: int = 224  # the position-embedding table covers img_size/patch_size squared patches
    patch_size: int | None = None  # None = the timm architecture's own; set for small CPU ViTs
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    aux_layer: int = -3  # auxiliary classifier reads the tokens of this block (before the final norm)
    freeze_pos_embed: bool = True  # reference quirk (docs/methods/toco-mcc.md §11); false makes it trainable
    decoder_channels: int = 512
    decoder_dilation: int = 5


@dataclass
class OptimConfig:
    lr: float = 6e-5  # encoder; heads get lr * head_lr_mult
    head_lr_mult: float = 10.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    power: float = 0.9


@dataclass
class CamConfig:
    scales: tuple[float, ...] = (1.0, 0.5, 1.5)  # multi-scale CAM (docs/methods/toco-mcc.md §3 step 1)
    bkg_thresh: float = 0.5  # cam_to_label background threshold (evaluation)
    high_thresh: float = 0.7
    low_thresh: float = 0.25
    par_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)  # PAR neighbourhood (pixels at half resolution)
    par_num_iter: int = 10


@dataclass
class LossConfig:
    """Weights and schedule of the loss terms (docs/methods/toco-mcc.md §7.1). A term is computed only while it is weighted.

    Iterations count from 0 (the first optimizer step is iteration 0), as the authors' ``for n_iter in
    range(max_iters)`` does. ``<term>_start`` is the first iteration at which the term is on: an authors' script that
    keeps a weight at 0 ``if n_iter <= K`` has ``<term>_start = K + 1``. An ``*_until`` setting is the last
    iteration of its phase, boundary included: ``if n_iter <= K: use the aux CAM`` is ``*_until = K``."""

    w_cls_aux: float = 1.0
    w_aff: float = 0.2
    w_con: float = 0.5
    w_seg: float = 0.1
    w_reg: float = 0.05
    aff_start: int = 0  # first iteration at which the term is on; the authors' "weight 0 if n_iter <= 2000" is 2001
    con_start: int = 0
    seg_start: int = 2001
    reg_start: int = 2001
    temperature: float = 0.5
    seg_label_aux_until: int | None = None  # seg labels from the aux CAM while step <= this (COCO: 12000); null: never
    reg_sigma_rgb: float = 15.0
    reg_sigma_xy: float = 100.0
    reg_scale: float = 0.5


@dataclass
class ContrastConfig:
    """Local views, projector and EMA teacher of the contrast loss (docs/methods/toco-mcc.md §2, §5, §6), shared by ToCo and MCC; what
    sets their local views apart is in their own sections (``toco:``, ``mcc:``)."""

    num_local: int = 8  # local views per image: ToCo crops / MCC key masks
    proj_dim: int = 1024
    proj_hidden: int = 2048
    proj_bottleneck: int = 256
    ema_momentum: float = 0.9
    neg_thresh: float = 0.2  # a local view is negative iff its (visible) mean roi <= this


@dataclass
class QuirkConfig:
    """Reference-code behaviours that look like bugs (docs/methods/toco-mcc.md §11). Defaults reproduce the published code."""

    contrast_extra_term: bool = True  # true: keep the always-run sum_a log(1 + n_a) term of the contrast loss
    scale_box_to_grid: bool = False  # true: map img_box onto the token grid (faithful: applied as is, so padded
    #   crops lose affinity supervision)
    share_local_flip: bool = False  # true: the local view shares the image's flip (faithful: independent flip)
    flip_box: bool = False  # true: flip img_box with the image (faithful: box computed before the flip, not flipped)
    exact_reg_grad: bool = False  # true: exact gradient of the regularisation loss (faithful: -2 AS / B * ROI)
    round_denorm: bool = False  # true: PAR's uint8 image rounds the de-normalised levels (faithful: truncates, so 32
    #   of the 768 channel levels come back one lower)


@dataclass
class KernelConfig:
    backend: str = "auto"  # auto | torch | triton, for every fused op (PAR, affinity loss, lattice, MCC attention)


@dataclass
class TrainConfig:
    method: str = "cam"  # a registered method (fastwsss.methods): cam (classification baseline) | toco | mcc | ...
    max_iters: int = 20000  # defines the LR schedule
    stop_at: int | None = None  # stop early (schedule still follows max_iters); resume later
    batch_size: int = 4  # the global batch: split over torchrun's processes and train.grad_accum micro-batches
    grad_accum: int = 1  # micro-batches per step and process (a batch larger than memory; same result)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto = bf16 autocast on CUDA (if supported), fp32 on CPU
    log_interval: int = 50
    eval_interval: int = 2000
    ckpt_interval: int = 2000


@dataclass
class EvalConfig:
    max_images: int = 0  # 0 = the whole val split
    num_vis: int = 6  # val images in the PNG grid saved at each evaluation
    batch_size: int = 1  # > 1 only for val images of one size (e.g. synthetic)
    final_infer: bool = False  # the last evaluation also scores the segmentation as python -m fastwsss.evaluate --crf
    #   does (infer.*: multi-scale + flip -> seg-ms, then the dense CRF -> seg-crf), the papers' test protocol


@dataclass
class InferConfig:
    """Inference and whole-split evaluation from a checkpoint (docs/methods/toco-mcc.md §10): multi-scale + flip, dense CRF."""

    fusion: str = "voc"  # voc: native size, flip pair by sum, scales by max | coco: resize first, flip max, scales sum
    #   | cosa: resize first, flip pair by sum, scales by sum | more: each scale s a square int(s * coco_size), flip pair
    #   by sum, scales by max
    scales: tuple[float, ...] = (1.0, 1.5, 1.25)  # the reference's VOC scales; COCO's are (1.0, 1.25, 1.5)
    coco_size: int = 448  # fusion=coco / cosa: images are resized to coco_size x coco_size first (more: the square side)
    mask_absent_classes: bool = False  # evaluation only: logits of classes absent from the image's (ground-truth)
    #   labels set to -1e5 before the argmax and the CRF, as CoSA's published protocol ("Seg_vd") does
    crf_impl: str = "pydensecrf"  # pydensecrf (C++ reference, process pool) | lattice (ours: CPU or CUDA, batched)
    crf_workers: int = 0  # pydensecrf worker processes; 0 = one per CPU core
    crf_batch_size: int = 1  # lattice: images of one size filtered together
    crf_iterations: int = 10
    crf_gauss_sxy: float = 1.0
    crf_gauss_compat: float = 1.0
    crf_bi_sxy: float = 121.0
    crf_bi_srgb: float = 5.0
    crf_bi_compat: float = 4.0
    num_workers: int = 2  # image-decoding worker processes


@dataclass
class RunConfig:
    dir: str | None = None  # default runs/<name>/<timestamp>
    resume: str | None = None  # a run directory or a checkpoint file to continue from
    tensorboard: bool = False  # also log the metrics.jsonl values to <run dir>/tensorboard (needs tensorboard)
    allow_changes: bool = False  # resume with settings changed that change what the run computes (resume_changes)


@dataclass
class Config:
    name: str = "voc_cam"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    contrast: ContrastConfig = field(default_factory=ContrastConfig)
    quirks: QuirkConfig = field(default_factory=QuirkConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    run: RunConfig = field(default_factory=RunConfig)


class ConfigError(ValueError):
    pass


# The methods register themselves when ``fastwsss.methods`` is imported (every command does): a name ``train.method``
# may take and, if the method has settings of its own, their dataclass, which becomes the top-level section of that
# name (``mcc: {mask_prob: 0.9}``). A section may define ``errors(cfg) -> list[str]``: ``validate`` calls it for the
# selected method.
_METHOD_SECTIONS: dict[str, type | None] = {}


def register_method(name: str, section: type | None = None) -> None:
    """Make ``name`` a valid ``train.method`` with ``section`` (a dataclass, or None) as its config section."""
    if not name.isidentifier() or (section is not None and name in {f.name for f in fields(Config)}):
        raise ValueError(f"method name {name!r} must be an identifier; with a section of its own, one that is not a "
                         "shared section's name")
    _METHOD_SECTIONS[name] = section


def registered_methods() -> tuple[str, ...]:
    return tuple(_METHOD_SECTIONS)


def schema() -> type[Config]:
    """The ``Config`` dataclass with one section per registered method that has one (a subclass of ``Config``)."""
    return _schema(tuple((name, s) for name, s in _METHOD_SECTIONS.items() if s is not None))


@functools.cache
def _schema(sections: tuple[tuple[str, type], ...]) -> type[Config]:
    if not sections:
        return Config
    return make_dataclass("Config", [(name, s, field(default_factory=s)) for name, s in sections], bases=(Config,),
                          namespace={"__module__": __name__})


def _choice(key: str, value: str, choices: tuple[str, ...]) -> list[str]:
    return [] if value in choices else [f"{key}={value!r} is not one of {', '.join(choices)}"]


def check_range(errors: list[str], key: str, value: float, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, what: str = "") -> None:
    """Append an error unless lo <= value <= hi (lo < value with ``lo_open``); NaN and +-inf are errors too (every
    comparison with NaN is false, so a NaN would pass any bound)."""
    bad = (not math.isfinite(value) or (lo is not None and (value <= lo if lo_open else value < lo))
           or (hi is not None and value > hi))
    if bad:
        bounds = f"{'>' if lo_open else '>='} {lo}" if hi is None else f"in {'(' if lo_open else '['}{lo}, {hi}]"
        errors.append(f"{key}={value!r} must be {what or bounds}{'' if math.isfinite(value) else ' (a finite number)'}")


def _non_finite(node, prefix: str = "") -> list[str]:
    """The dotted keys of every float (or float in a tuple) of the config tree that is NaN or +-inf. No setting means
    anything as NaN or infinity; walking the dataclass fields covers sections added later without listing them."""
    keys = []
    for f in fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if is_dataclass(value):
            keys += _non_finite(value, f"{key}.")
        elif any(isinstance(v, float) and not math.isfinite(v)
                 for v in (value if isinstance(value, (tuple, list)) else (value,))):
            keys.append(key)
    return keys


def validate(cfg: Config) -> Config:
    """Check what types alone cannot, before anything runs; every problem is reported at once."""
    errors = _validation_errors(cfg)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return cfg


def _validation_errors(cfg: Config) -> list[str]:
    errors = _choice("data.dataset", cfg.data.dataset, DATASETS)
    errors += (_choice("train.method", cfg.train.method, registered_methods()) if _METHOD_SECTIONS else
               ["no method is registered: import fastwsss.methods before loading a config"])
    errors += _choice("train.precision", cfg.train.precision, PRECISIONS)
    errors += _choice("kernels.backend", cfg.kernels.backend, ("auto", "torch", "triton"))
    errors += _choice("infer.fusion", cfg.infer.fusion, ("voc", "coco", "cosa", "more"))
    errors += _choice("infer.crf_impl", cfg.infer.crf_impl, ("pydensecrf", "lattice"))
    for key in ("infer.scales", "cam.scales"):
        section, name = key.split(".")
        scales = list(getattr(getattr(cfg, section), name))
        if not scales or not all(0 < s < math.inf for s in scales):
            errors.append(f"{key}={scales} must be one or more positive (finite) scales")
    if cfg.data.dataset == "folder" and not cfg.data.labels:
        errors.append("data.dataset=folder reads its images and labels from data.labels (a CSV or .npy): set it")
    for key in ("train_split", "val_split", "eval_split"):
        split = getattr(cfg.data, key)
        if split is not None and (not split.strip() or split != split.strip()):
            errors.append(f"data.{key}={split!r} must name a split list (ImageSets/.../<name>.txt), without spaces "
                          "around it")
    if cfg.data.num_classes < 2:
        errors.append(f"data.num_classes={cfg.data.num_classes} must count background plus at least one class")
    lo, hi = cfg.data.rescale_range
    if not 0 < lo <= hi < math.inf:
        errors.append(f"data.rescale_range={[lo, hi]} must satisfy 0 < low <= high (finite)")
    for key in ("train.max_iters", "train.batch_size", "train.grad_accum", "train.log_interval", "train.eval_interval",
                "train.ckpt_interval", "data.crop_size", "eval.batch_size", "cam.par_num_iter",
                "contrast.proj_dim", "contrast.proj_hidden", "contrast.proj_bottleneck", "infer.coco_size", "infer.crf_batch_size", "infer.crf_iterations",
                "model.img_size", "model.decoder_channels", "model.decoder_dilation"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) <= 0:
            errors.append(f"{key}={getattr(getattr(cfg, section), name)!r} must be positive")
    for key in ("data.num_workers", "eval.max_images", "eval.num_vis", "infer.crf_workers", "infer.num_workers",
                "optim.warmup_iters", "data.synthetic.num_train", "data.synthetic.num_val"):
        *path, name = key.split(".")
        node = cfg
        for part in path:
            node = getattr(node, part)
        if getattr(node, name) < 0:
            errors.append(f"{key}={getattr(node, name)!r} must be >= 0")
    if cfg.train.batch_size % max(cfg.train.grad_accum, 1):
        errors.append(f"train.batch_size={cfg.train.batch_size} must be a multiple of train.grad_accum="
                      f"{cfg.train.grad_accum} (the micro-batches of a step are equal)")
    if cfg.train.stop_at is not None and cfg.train.stop_at < 1:
        errors.append(f"train.stop_at={cfg.train.stop_at} must be >= 1 (or null: run to train.max_iters)")
    if not cfg.cam.par_dilations or min(cfg.cam.par_dilations) < 1:
        errors.append(f"cam.par_dilations={list(cfg.cam.par_dilations)} must be one or more positive ints")
    c, o = cfg.cam, cfg.optim
    for key, value in (("cam.high_thresh", c.high_thresh), ("cam.low_thresh", c.low_thresh),
                       ("cam.bkg_thresh", c.bkg_thresh), ("contrast.neg_thresh", cfg.contrast.neg_thresh),
                       ("contrast.ema_momentum", cfg.contrast.ema_momentum), ("optim.warmup_ratio", o.warmup_ratio),
                       ("data.color_jitter_p", cfg.data.color_jitter_p), ("data.grayscale_p", cfg.data.grayscale_p),
                       ("data.blur_p", cfg.data.blur_p)):
        check_range(errors, key, value, 0.0, 1.0)
    if c.low_thresh > c.high_thresh:
        errors.append(f"cam.low_thresh={c.low_thresh} must be <= cam.high_thresh={c.high_thresh}")
    for key, value in (("optim.lr", o.lr), ("optim.head_lr_mult", o.head_lr_mult), ("optim.eps", o.eps),
                       ("loss.temperature", cfg.loss.temperature), ("loss.reg_sigma_rgb", cfg.loss.reg_sigma_rgb),
                       ("loss.reg_sigma_xy", cfg.loss.reg_sigma_xy), ("loss.reg_scale", cfg.loss.reg_scale),
                       ("infer.crf_gauss_sxy", cfg.infer.crf_gauss_sxy), ("infer.crf_bi_sxy", cfg.infer.crf_bi_sxy),
                       ("infer.crf_bi_srgb", cfg.infer.crf_bi_srgb)):
        check_range(errors, key, value, 0.0, lo_open=True)
    for key, value in (("optim.weight_decay", o.weight_decay), ("optim.power", o.power),
                       ("infer.crf_gauss_compat", cfg.infer.crf_gauss_compat),
                       ("infer.crf_bi_compat", cfg.infer.crf_bi_compat)):
        check_range(errors, key, value, 0.0)
    for i, beta in enumerate(o.betas):
        if not 0 <= beta < 1:
            errors.append(f"optim.betas[{i}]={beta!r} must be in [0, 1)")
    for name in ("w_cls_aux", "w_aff", "w_con", "w_seg", "w_reg"):
        check_range(errors, f"loss.{name}", getattr(cfg.loss, name), 0.0)
    section = getattr(cfg, cfg.train.method, None)
    if hasattr(section, "errors"):
        errors += section.errors(cfg)
    m = cfg.model
    if (m.embed_dim is not None and m.embed_dim < 1) or (m.num_heads is not None and m.num_heads < 1):
        errors.append(f"model.embed_dim={m.embed_dim} and model.num_heads={m.num_heads} must be positive (or null: "
                      "the timm architecture's own)")
    elif m.embed_dim is not None and m.num_heads is not None and m.embed_dim % m.num_heads:
        errors.append(f"model.embed_dim={m.embed_dim} must be a multiple of model.num_heads={m.num_heads} (each head "
                      "gets embed_dim / num_heads channels)")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.train.device):
        errors.append(f"train.device={cfg.train.device!r} is not one of auto, cpu, cuda, cuda:N")
    depth = cfg.model.depth
    if depth is not None and depth < 1:
        errors.append(f"model.depth={depth} must be positive")
    elif depth is not None and not -depth <= cfg.model.aux_layer < depth:
        errors.append(f"model.aux_layer={cfg.model.aux_layer} must name one of the {depth} blocks "
                      f"({-depth}..{depth - 1})")
    for key in _non_finite(cfg):  # what no range check above named
        if not any(e.startswith((f"{key}=", f"{key}[")) for e in errors):
            errors.append(f"{key}={_get(cfg, key)!r} must be a finite number")
    return errors


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return list(cfg) if isinstance(cfg, tuple) else cfg


def packaged_configs() -> dict[str, Path]:
    """The configs shipped as ``fastwsss.configs`` (the repository's ``configs/``), by name, sorted."""
    # a real directory in a wheel install and in an editable one (fastwsss is never imported from a zip)
    root = Path(str(resources.files("fastwsss.configs")))
    return {p.stem: p for p in sorted(root.glob("*.yaml"))}


def config_purpose(path: Path) -> str:
    """What a config reproduces: its first line, a comment."""
    first = path.read_text().partition("\n")[0]
    return first.removeprefix("#").strip() if first.startswith("#") else ""


def packaged_configs_help() -> str:
    """The packaged configs, one line each with its purpose (for ``--help``)."""
    configs = packaged_configs()
    width = max(map(len, configs))
    head = "packaged configs (--config NAME; or a YAML file of your own, which may start with `base: NAME.yaml`):"
    return "\n".join([head, *(f"  {name:<{width}}  {config_purpose(path)}" for name, path in configs.items())])


def resolve_config(config: str | Path, relative_to: Path | None = None) -> Path:
    """A YAML file (relative to ``relative_to`` if given), else a packaged config named ``voc_mcc`` or ``voc_mcc.yaml``.

    An existing file wins over a packaged name, so a local ``demo.yaml`` is never shadowed.
    """
    path = Path(config) if relative_to is None else relative_to / config
    if path.is_file():
        return path
    packaged = packaged_configs()
    name = str(config)
    stem = name.removesuffix(".yaml")
    if Path(name).name == name and stem in packaged:
        return packaged[stem]
    raise ConfigError(f"config file not found: {path} (nor a packaged config: {', '.join(packaged)})")


def _yaml_layers(path: Path, seen: tuple[Path, ...] = ()) -> list:
    """(layer, its file) of a YAML file and, first, of the chain of files it names as ``base:`` (relative to itself,
    else packaged)."""
    if path.resolve() in seen:
        raise ConfigError(f"config files include each other: {' -> '.join(map(str, (*seen, path)))}")
    try:
        layer = OmegaConf.load(path)
    except Exception as err:  # noqa: BLE001 - YAML syntax errors come in several types
        raise ConfigError(f"{path}: not a readable YAML config: {err}") from None
    if not OmegaConf.is_dict(layer):
        raise ConfigError(f"{path}: a config must be a mapping of keys, got {type(layer).__name__}")
    base = layer.pop("base", None)
    if base is None:
        return [(layer, str(path))]
    return [*_yaml_layers(resolve_config(str(base), path.parent), (*seen, path.resolve())), (layer, str(path))]


def _leaves(node, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) of every leaf of a YAML / dotlist layer (lists are leaves)."""
    if OmegaConf.is_dict(node):
        out = []
        for k in node:
            out += _leaves(node._get_node(k), f"{prefix}{k}.")  # keeps interpolations unresolved
        return out
    return [(prefix[:-1], node)]


def _layer_errors(schema, layer, source: str) -> tuple[list[str], object]:
    """Every unknown key and every value of the wrong type in one layer, each with the layer's source; and the layer
    without them (so that the values' own checks can still run and be reported with them)."""
    errors, clean = [], OmegaConf.create()
    for key, node in _leaves(layer):
        single = OmegaConf.create()
        OmegaConf.update(single, key, node, force_add=True)
        try:
            OmegaConf.merge(schema, single)
        except OmegaConfBaseException as err:
            msg = str(err).split("\n")[0]
            errors.append(f"{key}: {msg} ({source})")
        else:
            OmegaConf.update(clean, key, node, force_add=True)
    return errors, clean


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                allow_missing: bool = False) -> Config:
    """Schema defaults <- YAML file or packaged config name (differences only; ``base: other.yaml`` layers it on
    another) <- overrides. Every unknown key, wrong type and invalid value is reported at once, each with the file
    (or the command line) it came from. ``allow_missing``: a mandatory value (``???``) that nothing set is no error
    and reads ``"???"`` in the config returned (what ``--print-config`` shows); such a config is never run."""
    structured = OmegaConf.structured(schema())
    layers = []
    if path is not None:
        path = resolve_config(path)
        layers.extend(_yaml_layers(path))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must be key=value, got: {' '.join(bad)}")
    layers.append((OmegaConf.from_dotlist(list(overrides)), "command line"))
    checked = [_layer_errors(structured, layer, source) for layer, source in layers]
    errors = [e for layer_errors, _ in checked for e in layer_errors]
    if errors:  # with the values' own problems, from the layers without the bad keys: one command line, one fix
        try:
            errors += _validation_errors(OmegaConf.to_object(OmegaConf.merge(structured, *(c for _, c in checked))))
        except OmegaConfBaseException:  # e.g. a ??? left unset: reported once the keys are fixed
            pass
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    merged = OmegaConf.merge(structured, *(layer for layer, _ in layers))
    # a layer's ??? (mandatory) must be set by a later layer: merging ??? would silently keep the default
    missing = sorted({key for i, (layer, _) in enumerate(layers) for key in OmegaConf.missing_keys(layer)
                      if not any(OmegaConf.select(later, key, default=None) is not None
                                 and not OmegaConf.is_missing(later, key) for later, _ in layers[i + 1:])})
    if missing and not allow_missing:
        raise ConfigError("\n".join(_missing_message(merged, key) for key in missing))
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:  # what the per-key checks cannot see (e.g. an interpolation)
        raise ConfigError(f"bad config: {err}") from None
    cfg = validate(cfg)
    for key in missing:  # allow_missing: shown as unset (the merge kept the default in its place)
        *parents, name = key.split(".")
        node = cfg
        for part in parents:
            node = getattr(node, part)
        setattr(node, name, "???")
    return cfg


# What may change when a run resumes (keys, or whole sections): how the run is watched, evaluated, saved and stopped,
# where it runs and reads from; nothing that changes what a step computes. resume_changes explains each.
RESUME_ALLOWED = (
    "name", "run", "eval", "infer",
    "train.log_interval", "train.eval_interval", "train.ckpt_interval", "train.stop_at", "train.device",
    "data.num_workers", "data.root", "data.val_split", "data.eval_split", "data.val_labels", "data.masks",
    "kernels.backend",
)


def leaf_values(node, prefix: str = "") -> dict[str, object]:
    """Dotted key -> value of every leaf of a config tree: dataclass fields and dict entries are walked, so sections
    added later (a method's own, registered at run time) are covered without being listed; tuples read as lists."""
    if is_dataclass(node) and not isinstance(node, type):
        children = {f.name: getattr(node, f.name) for f in fields(node)}
    elif isinstance(node, dict):
        children = node
    else:
        return {prefix[:-1]: list(node) if isinstance(node, tuple) else node}
    out: dict[str, object] = {}
    for name, value in children.items():
        out.update(leaf_values(value, f"{prefix}{name}."))
    return out


def _show(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def resume_changes(saved: Config, new: Config) -> tuple[list[str], list[str]]:
    """The settings a resume changes, as ``"key: old -> new"``: (allowed, refused), comparing the run's saved config
    with the command's, every leaf of the tree (``dataclasses.fields`` recursively, so new sections count at once).

    Allowed (RESUME_ALLOWED): what watches, evaluates, saves, stops and places the run —
    ``train.log_interval``, ``run.tensorboard`` and the rest of ``run.*`` (its paths), ``train.eval_interval``,
    ``eval.*``, ``data.val_split`` / ``data.eval_split`` / ``data.val_labels`` / ``data.masks`` (what is evaluated),
    ``infer.*`` (inference after training), ``train.ckpt_interval``, ``train.stop_at``, ``train.device`` (the same
    maths elsewhere), ``data.num_workers`` (the samples are functions of their position, not of the workers),
    ``data.root`` (the same data moved), ``name``, and ``kernels.backend``: the Triton and PyTorch paths compute the
    same function (parity-tested), so the choice changes speed, not the maths, although results then differ in float
    rounding, as they do between devices.

    Refused: everything else — ``train.method``, ``model.*`` (``model.pretrained`` too: the run's config records
    what it started from, and the checkpoint holds every weight), ``optim.*``, ``loss.*``, ``cam.*``, ``contrast.*``,
    ``quirks.*``, method sections, the rest of ``data.*`` (labels, augmentation, crop, classes), ``train.max_iters``
    (the schedule), ``train.batch_size``, ``train.grad_accum``, ``train.seed`` and ``train.precision`` (bf16 / fp16
    change the maths) — unless ``new.run.allow_changes`` is true: then every change is allowed, the refused ones
    marked ``(run.allow_changes)``.
    """
    old, now = leaf_values(saved), leaf_values(new)
    allowed: list[str] = []
    refused: list[str] = []
    for key in [*old, *(k for k in now if k not in old)]:
        a, b = old.get(key, "<unset>"), now.get(key, "<unset>")
        if a == b:
            continue
        line = f"{key}: {_show(a)} -> {_show(b)}"
        if any(key == p or key.startswith(f"{p}.") for p in RESUME_ALLOWED):
            allowed.append(line)
        elif new.run.allow_changes:
            allowed.append(f"{line} (run.allow_changes)")
        else:
            refused.append(line)
    return allowed, refused


def _missing_message(cfg, key: str) -> str:
    """A mandatory value (``???`` in a YAML) that nothing set; for model.pretrained, what the paper used."""
    if key != "model.pretrained":
        return f"{key} must be set (the config marks it ???): add {key}=..."
    source = cfg.model.pretrained_source or "ImageNet weights"
    return (f"{cfg.name} fine-tunes pretrained weights, as the paper does: {source}. Set model.pretrained=<file> "
            "(.pth or .safetensors with timm's names; docs/data.md shows how to save one), "
            "model.pretrained=timm where timm's hub is reachable, or model.pretrained=none to train from scratch "
            "on purpose")


def to_yaml(cfg: Config) -> str:
    """The fully resolved config (what ``--print-config`` prints and a run saves as ``config.yaml``)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))

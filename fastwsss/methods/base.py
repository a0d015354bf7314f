"""What a method is to the rest of fastwsss: one small protocol (:class:`Method`) that the loop, the loader, the
optimiser, checkpoints and inference talk to, so that a method is one file (docs/adding-a-method.md).

A training step, as the loop runs it (``fastwsss.training``)::

    it = method.iteration(step)                  # the step and every optional term's weight (0 = not computed)
    method.before_step(model, step)              # e.g. EMA teachers
    out = method.forward(model, batch, it)       # the forward with gradients
    targets = method.targets(model, batch, it, out)   # no gradients; may reuse ``out``
    norm = all-reduced method.counts(targets, batch)  # the whole step's denominators, by name
    terms = method.terms(model, batch, it, targets, norm, parts, out)  # {name: Term}; the loss is their sum
    ... backward, optimizer step ...
    method.after_step(model, step)               # only after a step that was taken

With ``train.grad_accum`` > 1, ``targets`` runs for every micro-batch first (their denominators must be known before
any term), with ``out=None``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..config import Config
from ..data.transforms import CropViews
from ..models import WSSSNet, build_model
from ..pseudo import PseudoLabeller


class Term(NamedTuple):
    """One loss term of a step: its unweighted value (what the authors' logs print) and its weight in the total."""

    value: torch.Tensor
    weight: float

    @property
    def weighted(self) -> torch.Tensor:
        return self.weight * self.value


class Iteration(NamedTuple):
    """One training iteration as the method sees it: the (0-based) step and the weight of each optional term at it;
    a term of weight 0 is not computed at all."""

    step: int
    weights: dict[str, float]


Views = Callable[[Image.Image, np.random.Generator], dict[str, torch.Tensor]]


class Method:
    """A WSSS method: everything that sets it apart, behind these hooks. The defaults are what the methods of the
    ToCo lineage share (the training crop, the network of ``model.*``, encoder and heads as two parameter groups, the
    PAR-refined pseudo labels of ``cam.*``); ``forward`` and ``terms`` are each method's own. Subclass, set the class attributes, override what differs, and register it
    (``fastwsss.methods.register``).

    Class attributes:

    - ``name``: the value of ``train.method``.
    - ``config``: a dataclass of the method's own settings (or None): the top-level config section ``<name>:``,
      read as ``cfg.<name>``. It may define ``errors(cfg) -> list[str]``, checked at start.
    - ``log_names``: term -> its name in the authors' training logs, in their order (the log and metrics use them).
    - ``eval_modes``: what the in-training evaluation scores (``fastwsss.inference.EVAL_MODES``).
    - ``trains_segmentation``: False if the decoder is never trained (its predictions then mean nothing).
    """

    name: ClassVar[str]
    config: ClassVar[type | None] = None
    log_names: ClassVar[dict[str, str]]
    eval_modes: ClassVar[tuple[str, ...]] = ("cam", "aux-cam", "seg", "pseudo")
    trains_segmentation: ClassVar[bool] = True

    def __init__(self, cfg: Config):
        self.cfg = cfg

    # ---- the loader

    def sample_views(self, model: WSSSNet) -> Views:
        """The loader's per-sample view maker ``views(image, rng) -> {name: tensor}``, at least ``img`` and
        ``img_box``; it must pickle (loader workers run it). Default: the training crop of ``data.*``."""
        d = self.cfg.data
        return CropViews(d.crop_size, tuple(d.rescale_range), d.color_jitter_p, d.grayscale_p, d.blur_p)

    # ---- the network and its optimisation

    def build_model(self) -> WSSSNet:
        """The network this method trains, with every module it adds (heads, projector, teacher) as a child: they
        train, checkpoint and load with it. Everything but the backbone trains at the head learning rate unless
        :meth:`param_groups` says otherwise. Default: the ``model.*`` network, its attention running key masks with
        ``kernels.backend``."""
        kwargs = dataclasses.asdict(self.cfg.model)
        del kwargs["pretrained_source"]  # what a paper config expects: named in an error, not built
        return build_model(self.cfg.data.num_classes, attention_backend=self.cfg.kernels.backend, **kwargs)

    def param_groups(self, model: WSSSNet) -> list[dict]:
        """AdamW parameter groups, each with its ``initial_lr``: the backbone at ``optim.lr``, every other trainable
        parameter at ``optim.lr * optim.head_lr_mult``."""
        o = self.cfg.optim
        encoder = [p for p in model.backbone.parameters() if p.requires_grad]
        heads = [p for m in model.head_modules() for p in m.parameters() if p.requires_grad]
        return [{"params": encoder, "initial_lr": o.lr}, {"params": heads, "initial_lr": o.lr * o.head_lr_mult}]

    def state_dict(self) -> dict[str, Any]:
        """State the method keeps outside its modules, saved in checkpoints (default: none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"method {self.name} keeps no state, the checkpoint holds {sorted(state)}")

    # ---- one training step

    def weights(self, step: int) -> dict[str, float]:
        """Each optional term's weight at ``step`` (the terms every step computes, e.g. classification, are not
        listed)."""
        return {}

    def iteration(self, step: int) -> Iteration:
        return Iteration(step, self.weights(step))

    def before_step(self, model: WSSSNet, step: int) -> None:
        """Once per step, before any forward (e.g. an EMA teacher that the step's targets read)."""

    def after_step(self, model: WSSSNet, step: int) -> None:
        """Once per step, after the optimizer step, only when the step was taken (not after a skipped one)."""

    def forward(self, model: WSSSNet, batch: dict, it: Iteration) -> Any:
        """The forward with gradients on one part of the step's batch; its result goes to ``targets`` and ``terms``."""
        raise NotImplementedError

    def targets(self, model: WSSSNet, batch: dict, it: Iteration, out: Any = None) -> Any:
        """What the part is scored against, without gradients, from the model as it is at the start of the step.
        ``out``: the part's :meth:`forward`, when it ran first (its outputs may be reused where exact)."""
        return None

    def counts(self, targets: Any, batch: dict) -> dict[str, torch.Tensor]:
        """The part's share of each denominator (0-d float64 tensors, by name): summed over every part of the step
        (processes, micro-batches) they normalise each part's terms, so the parts add up to the whole batch's."""
        return {"images": torch.tensor(float(batch["img"].shape[0]), dtype=torch.float64,
                                       device=batch["img"].device)}

    def terms(self, model: WSSSNet, batch: dict, it: Iteration, targets: Any, norm: dict[str, torch.Tensor],
              parts: int, out: Any) -> dict[str, Term]:
        """The part's loss terms, each divided by the whole step's denominator ``norm[...]``; ``parts``: how many
        parts the step's batch is split into. Every trainable parameter must take part (a zero gradient where its
        term is off: DDP needs every parameter every step, and AdamW decays idle heads as the authors' code does)."""
        raise NotImplementedError

    # ---- inference

    def predictor(self, model: WSSSNet) -> WSSSNet:
        """The network that makes CAMs and segmentation at inference (``cams(x)``, ``model(x).seg_logits``)."""
        return model

    def pseudo_labeller(self) -> PseudoLabeller:
        """CAMs -> the training labels the method makes, for the ``pseudo`` evaluation mode and the export.
        Default: PAR-refined labels with the ``cam.*`` thresholds and PAR settings."""
        c = self.cfg.cam
        return PseudoLabeller(c.high_thresh, c.low_thresh, tuple(c.par_dilations), c.par_num_iter,
                              self.cfg.kernels.backend, self.cfg.quirks.round_denorm)


def idle_anchor(model: nn.Module) -> torch.Tensor:
    """0 times one element of every trainable parameter: added to a loss, every parameter gets a (zero) gradient."""
    return sum(p.reshape(-1)[0] for p in model.parameters() if p.requires_grad) * 0.0

"""A method is one file: a third method plugs in as one new class and its config section, registered from outside
the package (docs/adding-a-method.md), and nothing outside ``fastwsss/methods/`` branches on a method's name."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from fastwsss import config as config_module
from fastwsss.checkpoint import load_checkpoint
from fastwsss.config import ConfigError, check_range
from fastwsss.inference import load_model
from fastwsss.methods import METHODS, Iteration, Method, Term, register
from fastwsss.methods.common import classification_terms
from fastwsss.methods.losses import seg_label_counts, seg_loss
from fastwsss.models import Outputs, WSSSNet
from fastwsss.pseudo import cam_to_label, multiscale_cams
from fastwsss.training import train

ROOT = Path(__file__).resolve().parent.parent


# ---- the worked example of docs/adding-a-method.md: the decoder learns the CAM's own labels (no PAR, no contrast)


@dataclass
class CamSegConfig:
    """``camseg:``, the toy method's settings."""

    w_seg: float = 0.1
    seg_start: int = 2  # first iteration with the segmentation term
    bkg_thresh: float = 0.3

    def errors(self, cfg) -> list[str]:
        errors = []
        check_range(errors, "camseg.bkg_thresh", self.bkg_thresh, 0.0, 1.0)
        return errors


class CamSeg(Method):
    name = "camseg"
    config = CamSegConfig
    log_names: ClassVar[dict[str, str]] = {"cls": "cls_loss", "cls_aux": "cls_loss_aux", "seg": "seg_loss"}

    def weights(self, step: int) -> dict[str, float]:
        c = self.cfg.camseg
        return {"seg": c.w_seg if step >= c.seg_start else 0.0}

    def forward(self, model: WSSSNet, batch: dict, it: Iteration) -> Outputs:
        return model(batch["img"], with_seg=bool(it.weights["seg"]))

    def targets(self, model: WSSSNet, batch: dict, it: Iteration, out: Outputs | None = None):
        if not it.weights["seg"]:
            return None
        cams, _ = multiscale_cams(model, batch["img"], (1.0,), outputs=out)
        return cam_to_label(cams, batch["cls_label"], batch["img_box"], bkg_thresh=self.cfg.camseg.bkg_thresh)

    def counts(self, targets, batch: dict) -> dict[str, torch.Tensor]:
        counts = super().counts(targets, batch)
        fg, bg = seg_label_counts(targets) if targets is not None else counts["images"].new_zeros(2)
        return {**counts, "fg": fg, "bg": bg}

    def terms(self, model: WSSSNet, batch: dict, it: Iteration, targets, norm: dict, parts: int,
              out: Outputs) -> dict[str, Term]:
        terms = classification_terms(model, out, batch["cls_label"], norm["images"], self.cfg.loss.w_cls_aux)
        if it.weights["seg"]:
            seg = torch.nn.functional.interpolate(out.seg_logits, size=batch["img"].shape[-2:], mode="bilinear")
            terms["seg"] = Term(seg_loss(seg, targets, counts=torch.stack([norm["fg"], norm["bg"]])),
                                it.weights["seg"])
        return terms


@pytest.fixture
def camseg():
    register(CamSeg)
    yield CamSeg
    METHODS.pop(CamSeg.name)
    config_module._METHOD_SECTIONS.pop(CamSeg.name)


def test_a_method_registered_from_outside_trains_checkpoints_and_predicts(camseg, tiny_config, tmp_path):
    cfg = tiny_config("train.method=camseg", "camseg.w_seg=0.2", "train.max_iters=4", "train.eval_interval=4")
    assert cfg.camseg.w_seg == 0.2 and cfg.camseg.seg_start == 2  # its section: defaults <- command line
    result = train(cfg)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "eval" not in r]
    assert "seg_loss" not in steps[0] and steps[1]["seg_loss"] > 0  # on from iteration 2 (the second interval)
    assert steps[1]["seg"] == pytest.approx(0.2 * steps[1]["seg_loss"])
    assert {"seg_miou", "cam_miou", "pseudo_miou"} <= set(result)  # the default evaluation modes
    state = load_checkpoint(tmp_path / "run")
    assert "camseg:" in state["config"] and state["method"] == {}
    model, loaded, _ = load_model(tmp_path / "run")
    assert loaded.train.method == "camseg" and model(torch.zeros(1, 3, 32, 32)).seg_logits.shape[1] == 7
    with pytest.raises(ConfigError, match="camseg.bkg_thresh=2.0"):
        tiny_config("train.method=camseg", "camseg.bkg_thresh=2.0")


def test_an_unregistered_method_or_section_is_a_config_error(tiny_config):
    with pytest.raises(ConfigError, match="train.method=.camseg. is not one of cam, toco, mcc, cosa, more"):
        tiny_config("train.method=camseg")
    with pytest.raises(ConfigError, match="camseg"):
        tiny_config("camseg.w_seg=0.2")


def test_every_method_declares_what_the_loop_needs():
    for name, method in METHODS.items():
        assert method.name == name and method.log_names and next(iter(method.log_names)) == "cls", name
        assert set(method.eval_modes) <= {"cam", "aux-cam", "seg", "pseudo", "lam"}, name


# ---- no method name outside fastwsss/methods/


def _method_branches(tree: ast.AST) -> list[int]:
    """Lines of comparisons with a method's name (a string constant, alone or in a tuple / list / set) or of
    ``<x>.method`` / ``method`` with any string: ``cfg.train.method == "mcc"``, ``"toco" in names``. A lookup in the
    registry (``method in METHODS``) is not a branch."""
    names = set(METHODS)
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        strings = {c.value for side in sides for c in ([side] + list(getattr(side, "elts", [])))
                   if isinstance(c, ast.Constant) and isinstance(c.value, str)}
        is_method = any((isinstance(s, ast.Attribute) and s.attr == "method") or (isinstance(s, ast.Name) and
                        s.id == "method") for s in sides)
        if strings & names or (is_method and strings):
            lines.append(node.lineno)
    return lines


def test_no_method_branches_outside_the_methods_package():
    found = []
    for path in sorted((ROOT / "fastwsss").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py")):
        if "methods" in path.relative_to(ROOT).parts:
            continue
        found += [f"{path.relative_to(ROOT)}:{line}" for line in _method_branches(ast.parse(path.read_text()))]
    assert not found, "branches on a method's name outside fastwsss/methods/: " + ", ".join(found)


def test_the_branch_finder_sees_a_branch():
    assert _method_branches(ast.parse('if cfg.train.method == "cam": pass')) == [1]
    assert _method_branches(ast.parse('x = method in ("toco", "mcc")')) == [1]
    assert _method_branches(ast.parse('x = mode in ("cam", "seg")')) == [1]  # "cam" is a method's name too
    assert _method_branches(ast.parse('x = method == "other"')) == [1]
    assert _method_branches(ast.parse('x = y == "z"')) == _method_branches(ast.parse("x = method in METHODS")) == []

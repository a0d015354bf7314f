"""Shared fixtures. Without CUDA, Triton kernels run under the interpreter: TRITON_INTERPRET must be set
before triton is imported anywhere, so it is set here, at collection time."""

from __future__ import annotations

import logging
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import fastwsss.methods  # noqa: F401 -- registers the methods and their config sections
from fastwsss.config import load_config
from fastwsss.data.synthetic import generate_dataset

TINY_OVERRIDES = [
    # a ViT small enough for many CPU steps per second, on 48-px synthetic images
    "data.dataset=synthetic", "data.num_classes=7", "data.crop_size=32", "data.rescale_range=[0.75,1.25]",
    "data.num_workers=0", "data.synthetic.num_train=24", "data.synthetic.num_val=6", "data.synthetic.image_size=48",
    "data.synthetic.colour_cue=0.0",  # the fixture's data (the demo configs ask for the cue)
    "model.backbone=deit_tiny_patch16_224", "model.img_size=32", "model.patch_size=8", "model.embed_dim=32",
    "model.depth=3", "model.num_heads=2", "model.decoder_channels=16", "model.freeze_pos_embed=false",
    "optim.lr=1e-3", "optim.warmup_iters=2", "train.batch_size=4", "train.log_interval=2",
    "eval.num_vis=2", "eval.batch_size=3", "cam.scales=[1.0,0.5]",
]


@pytest.fixture(autouse=True)
def _restore_fastwsss_logger():
    """A run started in-process (train's main) gives the ``fastwsss`` logger a console handler on the sys.stderr of its
    test, which pytest closes afterwards: a later test that logs (the COCO converter's command) would print a logging
    error into the stderr it checks. Each test gets the logger back as it found it."""
    logger = logging.getLogger("fastwsss")
    handlers, level = list(logger.handlers), logger.level
    yield
    for h in logger.handlers:
        if h not in handlers:
            h.close()
    logger.handlers[:] = handlers
    logger.setLevel(level)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic dataset in the VOC layout (24 train / 6 val, 48 px)."""
    root = tmp_path_factory.mktemp("synthetic")
    return generate_dataset(root, num_train=24, num_val=6, image_size=48, seed=0)


@pytest.fixture
def tiny_config(synthetic_root, tmp_path):
    def make(*overrides: str):
        return load_config(None, [*TINY_OVERRIDES, f"data.root={synthetic_root}", f"run.dir={tmp_path / 'run'}",
                                  *overrides])

    return make


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

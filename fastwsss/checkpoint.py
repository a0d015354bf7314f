"""Atomic checkpoints with every RNG state, so an interrupted run continues exactly."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 1

# Parameters of earlier model layouts that the current one no longer has, and why. A checkpoint holding one cannot be
# loaded: dropping a trained parameter would silently change what the network computes.
REMOVED_PARAMETERS = {
    "decoder.2.bias": "its LargeFOV decoder's middle 3x3 conv has a bias; the authors' decoder has none (SPEC §2)",
}


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write to a temporary file in the same folder, fsync, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint file, or a run directory (its ``checkpoints/last.pt``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err
    missing = [k for k in ("format_version", "iteration", "model", "config") if k not in state]
    if missing:
        raise ValueError(f"{path} is not a fastwsss checkpoint (missing {', '.join(missing)})")
    state["path"] = str(path)
    return state


def check_model_layout(weights: dict, source: str | Path) -> None:
    """Raise a clear error if the model weights ``weights`` are of an earlier fastwsss layout (REMOVED_PARAMETERS)."""
    stale = [f"{key}: {why}" for key, why in REMOVED_PARAMETERS.items() if key in weights]
    if stale:
        raise ValueError(f"checkpoint {source} was written by an earlier fastwsss whose model differs from this one "
                         f"({'; '.join(stale)}). Its weights cannot be loaded without changing its predictions: "
                         "retrain, or use the fastwsss version that wrote it.")

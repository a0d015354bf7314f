"""Atomic checkpoints with every RNG state, so an interrupted run continues exactly."""

from __future__ import annotations

import pickletools
import random
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .files import WriteError, atomic_write

FORMAT_VERSION = 1
CHECKPOINT_KEYS = ("format_version", "iteration", "model", "config")  # what makes a file a checkpoint of ours

# Parameters of earlier model layouts that the current one no longer has, and why. A checkpoint holding one cannot be
# loaded: dropping a trained parameter would silently change what the network computes.
REMOVED_PARAMETERS = {
    "decoder.2.bias": "its LargeFOV decoder's middle 3x3 conv has a bias; the authors' decoder has none (docs/methods/toco-mcc.md §2)",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, not fastwsss's, of an older layout, or for another model."""


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


_GOOD: dict[str, int] = {}  # checkpoint file -> the iteration this process last saved there or loaded from it


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write to a temporary file in the same folder, fsync, then rename: a crash never leaves half a file. A failed
    write (a full disk) is a :class:`WriteError` saying so, and which iteration the intact file holds where this
    process saved or loaded it."""
    path = Path(path)
    try:
        atomic_write(path, lambda tmp: torch.save({"format_version": FORMAT_VERSION, **state}, tmp), fsync=True)
    except WriteError as err:
        good = _GOOD.get(str(path.resolve())) if path.is_file() else None
        kept = (f"the last good checkpoint, iteration {good}, is intact in {path}" if good is not None else
                f"{path} as it was before is intact" if path.is_file() else "no checkpoint was saved before")
        raise WriteError(f"cannot save the checkpoint of iteration {state.get('iteration')} to {path}: {err.reason}; "
                         f"{kept}", err.reason, path) from err
    _GOOD[str(path.resolve())] = state.get("iteration")
    return path


def is_training_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint :func:`save_checkpoint` wrote (a torch zip file whose pickle holds its keys),
    told from the pickle's opcodes without unpickling anything (nothing in the file runs)."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")), None)
            if name is None:
                return False
            names = {arg for _, arg, _ in pickletools.genops(z.read(name)) if isinstance(arg, str)}
    except Exception:  # noqa: BLE001 - not a zip file, or not a pickle: not a checkpoint of ours
        return False
    return set(CHECKPOINT_KEYS) <= names


def training_checkpoint_message(path: str | Path) -> str:
    """What to do with a training checkpoint given where backbone weights are expected (``model.pretrained``)."""
    run = Path(path).parent.parent if Path(path).parent.name == "checkpoints" else Path(path)
    export = (f"python -c \"import torch; m = torch.load('{path}', weights_only=False)['model']; torch.save({{k[9:]: v "
              "for k, v in m.items() if k.startswith('backbone.')}, 'backbone.pth')\"")
    return (f"model.pretrained={path} is a fastwsss training checkpoint, not backbone weights: continue that run with "
            f"run.resume={run}, predict with python -m fastwsss.infer --checkpoint {path}, or export its backbone "
            f"for a new run with {export} and set model.pretrained=backbone.pth")


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint file, or a run directory (its ``checkpoints/last.pt``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}" + ("" if path.parent.parent.exists() else
                                                                    f" ({path.parent.parent} does not exist)"))
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a fastwsss checkpoint (missing {', '.join(missing)})")
    state["path"] = str(path)
    _GOOD[str(path.resolve())] = state["iteration"]
    return state


def check_model_layout(weights: dict, source: str | Path) -> None:
    """Raise a clear error if the model weights ``weights`` are of an earlier fastwsss layout (REMOVED_PARAMETERS)."""
    stale = [f"{key}: {why}" for key, why in REMOVED_PARAMETERS.items() if key in weights]
    if stale:
        raise CheckpointError(f"checkpoint {source} was written by an earlier fastwsss whose model differs from this one "
                         f"({'; '.join(stale)}). Its weights cannot be loaded without changing its predictions: "
                         "retrain, or use the fastwsss version that wrote it.")


def load_weights(model: nn.Module, weights: dict, source: str | Path) -> None:
    """``model.load_state_dict(weights)`` with a clear error when they do not fit: every missing, unexpected and
    differently shaped tensor named (a checkpoint of another method, class count or backbone)."""
    check_model_layout(weights, source)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in weights)
    unexpected = sorted(k for k in weights if k not in own)
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")

        parts = [f"{len(missing)} missing ({few(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected ({few(unexpected)})" if unexpected else "",
                 f"{len(shapes)} of another shape, checkpoint vs model ({few(shapes)})" if shapes else ""]
        raise CheckpointError(f"checkpoint {source} does not fit the model its config builds: "
                         + "; ".join(p for p in parts if p)
                         + ". Is it from another train.method, data.num_classes or model.* setting?")
    model.load_state_dict(weights)

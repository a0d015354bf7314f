"""The methods: one file each (``cam.py``, ``toco.py``, ``mcc.py``, ``cosa.py``, ``more.py``) on one protocol
(``base.Method``), the pieces they share (``common.py``, ``losses.py``), and the registry that ``train.method`` names
an entry of.

A new method is a new file with a ``Method`` subclass, registered with :func:`register` (docs/adding-a-method.md).
"""

from __future__ import annotations

from ..config import Config, register_method
from .base import Iteration, Method, Term, idle_anchor
from .cam import CAM
from .cosa import CoSA
from .mcc import MCC
from .more import MoRe
from .toco import ToCo

METHODS: dict[str, type[Method]] = {}


def register(method: type[Method]) -> type[Method]:
    """Make ``method`` the entry ``method.name`` of the registry (``train.method=<name>``) and its ``config`` the
    config section of that name. Usable as a class decorator; registering a name again replaces the entry."""
    register_method(method.name, method.config)
    METHODS[method.name] = method
    return method


def build_method(cfg: Config) -> Method:
    """The method ``train.method`` names, for ``cfg``."""
    if cfg.train.method not in METHODS:
        raise ValueError(f"train.method={cfg.train.method!r} is not a registered method ({', '.join(METHODS)})")
    return METHODS[cfg.train.method](cfg)


for _method in (CAM, ToCo, MCC, CoSA, MoRe):
    register(_method)

__all__ = ["CAM", "MCC", "METHODS", "CoSA", "Iteration", "Method", "MoRe", "Term", "ToCo", "build_method", "idle_anchor",
           "register"]

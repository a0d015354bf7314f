"""Dispatch shared by every op (``kernels._backend``): the warning when CUDA tensors fall back under "auto", the
record of the backend each op resolved to, and tensors on two devices as an error of every public op."""

from __future__ import annotations

import logging

import pytest
import torch

import fastwsss.kernels as K
from fastwsss.kernels import (
    PermutohedralLattice,
    _backend,
    backends_used,
    masked_key_attention,
    masked_key_attention_reasons,
    par_affinity,
    par_propagate,
    par_reasons,
    par_refine,
    permutohedral_filter,
    permutohedral_reasons,
    token_affinity_loss,
    token_affinity_reasons,
    varlen_attention,
    varlen_attention_reasons,
)
from fastwsss.kernels.testing import DEVICE

LOGGER = "fastwsss.kernels"


@pytest.fixture
def fresh_record(monkeypatch):
    """An empty record of used backends and of warnings already given (restored afterwards)."""
    monkeypatch.setattr(_backend, "_used", {})
    monkeypatch.setattr(_backend, "_warned", set())


def _fallbacks(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def _attention_inputs(dtype=torch.float64, head_dim=8):
    q = torch.randn(1, 2, 6, head_dim, dtype=dtype)
    return q, q.clone(), q.clone(), torch.ones(1, 2, 6, dtype=torch.bool)


def test_cuda_fallback_under_auto_is_logged_once_per_op_and_reasons(fresh_record, monkeypatch, caplog):
    """What decides "CUDA" is patched (this machine has no GPU); the fallback itself really runs the reference."""
    monkeypatch.setattr(_backend, "on_cuda", lambda t: True)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    q, k, v, keep = _attention_inputs()
    out = masked_key_attention(q, k, v, keep)  # float64: a reason the kernels cannot take it
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    masked_key_attention(q, k, v, keep)
    logged = _fallbacks(caplog)
    assert len(logged) == 1, logged
    assert "masked_key_attention" in logged[0] and "torch.float64" in logged[0] and "reference" in logged[0]

    q, k, v, keep = _attention_inputs(head_dim=300)  # another set of reasons: logged again, with both
    masked_key_attention(q, k, v, keep)
    logged = _fallbacks(caplog)
    assert len(logged) == 2 and "head dim 300 > 256" in logged[1] and "torch.float64" in logged[1]

    feats = torch.randn(1, 4, 3, dtype=torch.float64)  # another op, named by the sums it runs: its own warning
    token_affinity_loss(feats, torch.tensor([[0, 1, 1, 255]]))
    assert len(_fallbacks(caplog)) == 3 and "token_affinity_sums" in _fallbacks(caplog)[2]

    masked_key_attention(q, k, v, keep, backend="torch")  # asked for: nothing to say
    assert len(_fallbacks(caplog)) == 3


def test_cpu_fallback_under_auto_is_quiet(fresh_record, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    masked_key_attention(*_attention_inputs())
    assert _fallbacks(caplog) == []


def test_backends_used_records_each_ops_resolution(fresh_record):
    q, k, v, keep = _attention_inputs()
    masked_key_attention(q, k, v, keep)  # float64: the reference
    assert backends_used() == {"masked_key_attention": "torch"}
    q, k, v, keep = _attention_inputs(torch.float32)
    masked_key_attention(q, k, v, keep)  # the kernels (the interpreter, on this CPU)
    token_affinity_loss(torch.randn(1, 4, 3), torch.tensor([[0, 1, 1, 255]]), backend="torch")
    assert backends_used(reset=True) == {"masked_key_attention": "torch+triton", "token_affinity_sums": "torch"}
    assert backends_used() == {}


def _two_device_calls(a: str, b: str):
    """Every public op, called with one tensor on device b and the rest on a: (name, call(backend))."""
    def t(*shape, dev=a, **kw):
        return torch.rand(*shape, device=dev, **kw)

    keep = torch.ones(1, 2, 6, dtype=torch.bool, device=a)
    cu = torch.tensor([0, 2, 6], device=a)
    labels = torch.zeros(1, 6, dtype=torch.long, device=b)
    return [
        ("masked_key_attention", lambda be: masked_key_attention(t(1, 2, 6, 8), t(1, 2, 6, 8), t(1, 2, 6, 8, dev=b),
                                                                 keep, backend=be)),
        ("masked_key_attention", lambda be: masked_key_attention(*(t(1, 2, 6, 8) for _ in range(3)),
                                                                 keep.to(b), backend=be)),
        ("varlen_attention", lambda be: varlen_attention(t(6, 2, 8), t(6, 2, 8, dev=b), t(6, 2, 8), cu, backend=be)),
        ("varlen_attention", lambda be: varlen_attention(*(t(6, 2, 8) for _ in range(3)), cu.to(b), backend=be)),
        ("token_affinity_loss", lambda be: token_affinity_loss(t(1, 6, 4), labels, backend=be)),
        ("par_refine", lambda be: par_refine(t(1, 3, 8, 8), t(1, 2, 8, 8, dev=b), backend=be)),
        ("par_propagate", lambda be: par_propagate(t(1, 48, 8, 8, dev=b), t(1, 2, 8, 8), backend=be)),
        ("permutohedral_filter", lambda be: permutohedral_filter(t(1, 2, 8, 8), t(1, 3, 8, 8, dev=b), backend=be)),
        ("PermutohedralLattice.filter", lambda be: PermutohedralLattice(t(1, 3, 8, 8), backend=be
                                                                        ).filter(t(1, 2, 8, 8, dev=b))),
    ]


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_two_devices_are_an_error_naming_the_tensors(backend):
    """CPU + meta (what a CPU-only machine has): a ValueError naming each tensor and its device, on every backend
    (before: the Triton path listed it as a reason, then the reference crashed with torch's generic message, or
    silently returned a meta tensor)."""
    for op, call in _two_device_calls("cpu", "meta"):
        with pytest.raises(ValueError, match="must be on one device") as err:
            call(backend)
        msg = str(err.value)
        assert op.split(".")[0] in msg and "on cpu" in msg and "on meta" in msg, (op, msg)


def _reasons_and_ops(dtype: torch.dtype, device):
    """(name, the reasons of the inputs, the op on them with a backend) for every public ``<op>_reasons``."""
    def t(*shape):
        return torch.rand(*shape, dtype=dtype, device=device)

    q, packed, img, masks = t(1, 2, 6, 8), t(6, 2, 8), t(1, 3, 8, 8), t(1, 2, 8, 8)
    feats, vals = t(1, 3, 8, 8), t(1, 2, 8, 8)
    keep = torch.ones(1, 2, 6, dtype=torch.bool, device=device)
    cu = torch.tensor([0, 2, 6], device=device)
    tokens, labels = t(1, 6, 4), torch.tensor([[0, 1, 1, 255, 0, 1]], device=device)
    return [
        ("masked_key_attention", masked_key_attention_reasons(q, q, q, keep),
         lambda be: masked_key_attention(q, q, q, keep, backend=be)),
        ("varlen_attention", varlen_attention_reasons(packed, packed, packed, cu),
         lambda be: varlen_attention(packed, packed, packed, cu, backend=be)),
        ("token_affinity_sums", token_affinity_reasons(tokens, labels),
         lambda be: token_affinity_loss(tokens, labels, backend=be)),
        ("par_refine", par_reasons(img, masks), lambda be: par_refine(img, masks, backend=be)),
        ("par_affinity", par_reasons(img), lambda be: par_affinity(img, backend=be)),
        ("permutohedral_filter", permutohedral_reasons(feats, values=vals),
         lambda be: permutohedral_filter(vals, feats, backend=be)),
    ]


def test_every_reasons_function_is_public_and_says_what_triton_raises():
    """``<op>_reasons`` are exported (before: ``triton_reasons`` in three api modules, not exported), give [] where the
    Triton path runs, and otherwise exactly the reasons an explicit ``backend="triton"`` raises with."""
    names = {"masked_key_attention_reasons", "varlen_attention_reasons", "token_affinity_reasons", "par_reasons",
             "permutohedral_reasons"}
    assert names <= set(K.__all__) and all(callable(getattr(K, n)) for n in names)
    assert not any(hasattr(m, "triton_reasons") for m in (K.par.api, K.affinity.api, K.lattice.api))
    for op, reasons, _ in _reasons_and_ops(torch.float32, DEVICE):
        assert reasons == [], (op, reasons)
    for op, reasons, call in _reasons_and_ops(torch.float64, "cpu"):
        assert reasons and any("float64" in r for r in reasons), (op, reasons)
        with pytest.raises(ValueError) as err:
            call("triton")
        assert str(err.value) == f"{op}: the Triton backend cannot take these inputs: " + "; ".join(reasons)
    with pytest.raises(TypeError):  # values is keyword-only: (values, features) in permutohedral_filter's order fails
        permutohedral_reasons(torch.rand(1, 2, 8, 8), torch.rand(1, 3, 8, 8))

"""``python -m fastwsss.kernels``: the report of a CPU machine, the checks under the interpreter, and a failing check
turning into exit status 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastwsss.kernels import __main__ as selfcheck


def _run(tmp_path, interpret: bool) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "fastwsss.kernels", "--device", "cpu", "--json", str(report)],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    return proc, json.loads(report.read_text())


def test_cpu_reports_the_references(tmp_path):
    proc, report = _run(tmp_path, interpret=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(report["backends"]) == set(selfcheck.OPS)
    for op, backend in report["backends"].items():
        assert backend.startswith("torch (") and "cpu" in backend, (op, backend)
    assert {c["status"] for c in report["checks"]} == {"skipped"}
    assert report["environment"]["torch"] == torch.__version__
    assert "0 passed, 0 failed" in proc.stdout


def test_interpreter_checks_every_kernel_at_the_small_shapes(tmp_path):
    pytest.importorskip("triton")
    proc, report = _run(tmp_path, interpret=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(report["backends"].values()) == {"triton"}
    small = [c for c in report["checks"] if c["shape"].startswith("small")]
    assert {c["op"] for c in small} == set(selfcheck.OPS)
    for c in small:
        assert c["status"] == "ok" and c["backend"] == "triton", c
        assert c["errors"] and max(c["errors"].values()) <= c["tol"], c
    assert {c["status"] for c in report["checks"] if c["shape"].startswith("real")} == {"skipped"}


def test_a_wrong_kernel_fails_the_check(monkeypatch, capsys):
    """A kernel whose loss is off by 1e-3 (relative) fails, and the command exits 1 (in process: the test session
    runs the Triton kernels under the interpreter)."""
    pytest.importorskip("triton")
    make, run, reasons, tols = selfcheck.OPS["token_affinity_loss"]

    def wrong(inputs, backend):
        out = run(inputs, backend)
        if backend == "triton":
            out["loss"] = out["loss"] * (1 + 1e-3)
        return out

    monkeypatch.setitem(selfcheck.OPS, "token_affinity_loss", (make, wrong, reasons, tols))
    assert selfcheck.main(["--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL    token_affinity_loss    small" in out and "1 failed" in out

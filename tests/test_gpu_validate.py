"""The one-shot GPU validation command, rehearsed on a CPU (``--dry-run``): every stage runs at a tiny size and the
report has what a GPU run commits (device, versions, commit, each stage's status, the training table)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def test_dry_run_runs_every_stage(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_validate.py"), "--dry-run", "--out", str(tmp_path),
                           "--budget", "600", "--commit", "abc123"], env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "validate.json").read_text())
    assert report["commit"] == "abc123" and report["dry_run"]
    assert report["versions"]["torch"] and report["versions"]["device"] == "cpu"
    assert [s["stage"] for s in report["stages"]] == ["selfcheck", "tests", "benchmarks", "training"]
    assert all(s["status"] == "ok" for s in report["stages"]), report["stages"]
    assert "passed" in report["stages"][1]["summary"] and "passed" in report["stages"][2]["summary"]
    assert [(t["config"], t["path"]) for t in report["training"]] == [("voc_mcc", "reference"), ("voc_mcc", "fast")]
    assert [s["method"] for s in report["method_steps"]] == ["cosa", "more"]
    assert all(s["speedup"] > 0 for s in report["method_steps"])
    assert all(t["it_per_s"] > 0 for t in report["training"])
    selfcheck = json.loads((tmp_path / "selfcheck.json").read_text())
    assert {c["status"] for c in selfcheck["checks"] if c["shape"].startswith("small")} == {"ok"}
    assert len(list(tmp_path.iterdir())) <= 8  # what the device tool brings back from $OUT


def test_refuses_to_run_without_a_gpu(tmp_path):
    """Without --dry-run, a machine without CUDA is an error, not a silent CPU run."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_validate.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr

"""Shared harness of the kernel benchmarks.

On a GPU, ``pytest benchmarks/ --benchmark-only`` times every case. On a CPU the suites skip, except under
``--benchmark-disable``, which runs each case once (Triton under the interpreter) as a smoke test of the
providers and of their correctness checks. Every case checks its result against the fp32 reference before it is
timed: a wrong provider fails the case instead of reporting a time.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module imports triton

import pytest

from fastwsss.kernels.testing import GPU


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10, check=False)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_info() -> dict[str, str]:
    """Device, versions and commit, recorded in every case's ``extra_info``."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {"device": torch.cuda.get_device_name() if GPU else "cpu", "torch": torch.__version__,
            "triton": triton_version, "cuda": str(torch.version.cuda), "commit": _commit()}


def sync() -> None:
    if GPU:
        torch.cuda.synchronize()


class Runner:
    """``run(name_of_provider, fn, check)``: check first, warm up, then time ``fn`` with a sync inside the call."""

    def __init__(self, benchmark, timed: bool):
        self.benchmark = benchmark
        self.timed = timed

    def __call__(self, fn: Callable[[], object], check: Callable[[object], None], **info) -> object:
        self.benchmark.extra_info.update(environment_info())
        self.benchmark.extra_info.update({k: str(v) for k, v in info.items()})
        out = fn()
        sync()
        check(out)  # raises on a wrong result: no time is reported for it
        if not self.timed:
            return out
        for _ in range(3):  # warm-up: compilation, autotuning, allocator
            fn()
        sync()
        if GPU:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()

        def timed():
            r = fn()
            sync()
            return r

        out = self.benchmark.pedantic(timed, rounds=20, iterations=1, warmup_rounds=1)
        if GPU:
            self.benchmark.extra_info["peak_mem_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        return out


@pytest.fixture
def run_case(benchmark, request):
    """Skips on a CPU unless ``--benchmark-disable`` (then each case runs once, correctness checked, untimed)."""
    disabled = request.config.getoption("benchmark_disable")
    if not GPU and not disabled:
        pytest.skip("kernel benchmarks time GPUs; on a CPU, --benchmark-disable runs each case once as a smoke test")
    if disabled:
        # pytest-benchmark still expects its fixture to be called once
        benchmark(lambda: None)
    return Runner(benchmark, timed=not disabled)

"""The built wheel works like any library's: installed (not editable) into a fresh venv, run from a directory outside
the checkout. Every other test imports the checkout itself, so a file left out of the package fails only here.

One build and one install per session (~2 min on the 2-core CPU machine, most of it installing torch and triton
from pip's cache). `-m "not wheel"` deselects it; CI runs it (it is part of the README's test command).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from fastwsss.config import packaged_configs

pytestmark = pytest.mark.wheel

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints-cpu.txt"
PINNED_TORCH = next(line.split("==", 1)[1].strip() for line in CONSTRAINTS.read_text().splitlines()
                    if line.startswith("torch=="))
# the repository folder -> where it lands in the wheel, and the files that must travel with it
SHIPPED = {"fastwsss": ("fastwsss", "*.py"), "kernels": ("fastwsss/kernels", "*.py"),
           "configs": ("fastwsss/configs", "*.py *.yaml")}
# `python -m fastwsss.kernels` is being added in parallel: checked from the wheel once the module exists
KERNELS_MAIN = [p for p in (ROOT / "kernels" / "__main__.py", ROOT / "fastwsss" / "kernels" / "__main__.py")
                if p.is_file()]


def _clean_copy(dst: Path) -> Path:
    """The files a fresh clone holds (plus untracked, not ignored ones): setuptools reads a leftover
    ``*.egg-info/SOURCES.txt`` back into the sdist, so building in the checkout can hide a file the config drops."""
    if (ROOT / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True).stdout.decode().split("\0")
        for rel in filter(None, listed):
            if (ROOT / rel).is_file():  # a deleted, not yet committed file is still listed
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, dst / rel)
    else:  # an unpacked archive: leave out what .gitignore names
        top = {".git", ".venv", "build", "dist", "runs", "data", ".pytest_cache", ".benchmarks", ".whl"}
        shutil.copytree(ROOT, dst, ignore=lambda d, names: [
            n for n in names if n == "__pycache__" or n.endswith(".egg-info") or (Path(d) == ROOT and n in top)])
    return dst


def _run(cmd: list, cwd: Path, env: dict, timeout: float = 900) -> str:
    """Run a command; on failure the assertion shows the command and the end of its output."""
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}: {' '.join(map(str, cmd))}\n{out[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """(wheel file, the fresh venv's python, a working directory outside the checkout, the environment)."""
    if torch.__version__.split("+")[0] != PINNED_TORCH:
        pytest.skip(f"reproduces the CPU install of {CONSTRAINTS.name} (torch {PINNED_TORCH}); this environment runs "
                    f"torch {torch.__version__}, whose stack the registry would have to supply")
    tmp = tmp_path_factory.mktemp("wheel")
    # A user's shell: nothing that points into the checkout or this venv; no TRITON_INTERPRET (conftest sets it).
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "TRITON_INTERPRET")}
    env.update(PIP_PROGRESS_BAR="off", PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="1")
    # from a clean copy, sdist first, then the wheel from the unpacked sdist (as a release is built): a file the
    # sdist drops fails too, and no stale build/ or egg-info of the checkout can slip into the wheel
    src = _clean_copy(tmp / "src")
    _run([sys.executable, "-m", "build", "--outdir", tmp / "dist", src], cwd=tmp, env=env)
    wheels = sorted((tmp / "dist").glob("fastwsss-*.whl"))
    assert len(wheels) == 1, wheels
    # a fresh venv, not --system-site-packages: fastwsss and every dependency come from the wheel's own metadata
    # (pip's cache makes the installs cheap); torch first and pinned, as the README installs it
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp, env=env)
    python = venv / "bin" / "python"
    _run([python, "-m", "pip", "install", "-q", "-c", CONSTRAINTS, f"torch=={PINNED_TORCH}"], cwd=tmp, env=env)
    _run([python, "-m", "pip", "install", "-q", "-c", CONSTRAINTS, wheels[0]], cwd=tmp, env=env)
    work = tmp / "elsewhere"
    work.mkdir()
    # The venv (~0.9 GB, mostly torch) is left to pytest, which keeps the last three sessions' tmp dirs: deleting it
    # here took 13-100 s on a busy 2-core machine, and CI's fresh machine never pays for the cleanup at all.
    return wheels[0], python, work, env


def test_wheel_ships_every_module_and_config_and_the_metadata(wheel_env):
    wheel, python, work, env = wheel_env
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    missing = [f"{folder}/{path.relative_to(ROOT / folder).as_posix()}"
               for folder, (target, patterns) in SHIPPED.items() for pattern in patterns.split()
               for path in sorted((ROOT / folder).rglob(pattern))
               if f"{target}/{path.relative_to(ROOT / folder).as_posix()}" not in names]
    assert not missing, f"not in the wheel (pyproject.toml: packages, package-data?): {missing}"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    for field in ("License-Expression: MIT", "Requires-Dist: torch>=2.11",
                  "Provides-Extra: crf", "Provides-Extra: coco", "Provides-Extra: bench", "Provides-Extra: dev"):
        assert field in metadata, field
    assert "Project-URL" not in metadata  # no link until the project has a public repository
    probe = "import fastwsss.config as c, fastwsss.kernels as k; print(c.__file__, k.__file__, *c.packaged_configs())"
    where = _run([python, "-c", probe], cwd=work, env=env).split()
    assert all(Path(f).is_relative_to(python.parent.parent) for f in where[:2]), where  # the installed copy
    assert where[2:] == list(packaged_configs())
    _run([python, "-m", "pip", "check"], cwd=work, env=env)


def test_demo_help_and_version_from_outside_the_checkout(wheel_env):
    wheel, python, work, env = wheel_env
    helped = _run([python, "-m", "fastwsss.train", "--help"], cwd=work, env=env)
    for name in packaged_configs():
        assert f"\n  {name} " in helped, f"--help does not list {name}"
    version = wheel.name.split("-")[1]  # fastwsss-<version>-py3-none-any.whl
    assert _run([python, "-m", "fastwsss.train", "--version"], cwd=work, env=env).startswith(f"fastwsss {version} (")
    # the demo's first iterations: data generated and the run written under the working directory
    _run([python, "-m", "fastwsss.train", "--config", "demo", "train.stop_at=2"], cwd=work, env=env, timeout=600)
    assert (work / "data" / "synthetic" / "ImageSets" / "Segmentation" / "val.txt").is_file()
    (run,) = (work / "runs" / "demo").iterdir()
    assert (run / "checkpoints" / "last.pt").is_file() and '"step": 2' in (run / "metrics.jsonl").read_text()


@pytest.mark.skipif(not KERNELS_MAIN, reason="kernels/__main__.py does not exist yet in this checkout")
def test_kernels_main_from_the_wheel(wheel_env):
    _, python, work, env = wheel_env
    _run([python, "-m", "fastwsss.kernels"], cwd=work, env=env, timeout=600)

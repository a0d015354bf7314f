"""The timm floor in pyproject.toml is a tested claim: the oldest timm that `timm>=X` admits runs the tests of MCC's
masked forward (timm ``Block(x, attn_mask=)``, ``create_vit`` / ``forward_features``, token dropping) and of the
timm drop-in attention (``attn_layer=MaskedKeyAttention``, ``swap_attention``).

Exactly timm X is installed (``--no-deps --target``, from the package registry; pip's cache makes repeats cheap)
into a temporary folder that goes first on PYTHONPATH, and those tests run in a subprocess against it. Skips when
the registry cannot be reached; ``-m "not network"`` deselects it. ~25 s on the 2-core CPU machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

pytestmark = pytest.mark.network

ROOT = Path(__file__).resolve().parent.parent
TEST_FILES = ["tests/test_models.py", "tests/test_mcc_fastpath.py", "tests/test_methods.py",
              "tests/kernels/test_attention.py"]
# what does not touch timm and takes most of the time: the raw kernels against their references, opcheck, the
# determinism check, PAR's label fusion. Everything else in TEST_FILES runs (so a new timm-facing test is included).
NOT_TIMM = "not matches_reference and not opcheck and not deterministic and not seg_label_fusion"
# these must have run and passed, whatever else the selection holds
MUST_PASS = {
    "test_forward_features_equals_timm_intermediates",
    "test_mcc_steps_through_the_kernels_match_the_reference",
    "test_token_dropping_equals_masked_forward",
    "test_token_dropping_gradients_match",
    "test_attn_layer_drop_in_identical_without_masks",
    "test_swap_attention_keeps_weights_and_masks_keys",
    "test_layer_runs_many_masks_in_one_call",
    "test_layer_falls_back_for_masks_it_cannot_take",
}
# pip's messages when it could not talk to the registry at all (as opposed to: the version does not exist)
UNREACHABLE = re.compile(r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|"
                         r"Name or service not known|Network is unreachable|Connection refused|ConnectTimeout|"
                         r"ReadTimeout|timed out|ProxyError|SSLError|Could not fetch URL")


def timm_floor() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    timm = [d for d in deps if re.match(r"timm\b", d)]
    assert len(timm) == 1, f"pyproject.toml: expected one timm dependency, got {timm}"
    m = re.fullmatch(r"timm\s*>=\s*([0-9]+(?:\.[0-9]+)*)", timm[0].strip())
    assert m, f"pyproject.toml: the timm dependency must be a plain floor `timm>=X`, got {timm[0]!r}"
    return m.group(1)


def _install(version: str, target: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary=:all:", "--no-compile",
           "--disable-pip-version-check", "--timeout", "30", "--retries", "1", "--target", str(target),
           f"timm=={version}"]
    env = {**os.environ, "PIP_PROGRESS_BAR": "off"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 and UNREACHABLE.search(out):
        pytest.skip(f"the package registry is unreachable, cannot install timm=={version}: "
                    f"{UNREACHABLE.search(out).group(0)}")
    assert proc.returncode == 0, f"exit {proc.returncode}: {' '.join(cmd)}\n{out[-4000:]}"


# pytest in the subprocess, then the timm the tests actually imported (not an `import timm` of its own: the
# conftest must set TRITON_INTERPRET before anything imports triton)
RUNNER = """
import sys, pytest
rc = pytest.main(sys.argv[1:])
timm = sys.modules.get("timm")
print("\\nTIMM_IMPORTED", getattr(timm, "__version__", None), getattr(timm, "__file__", None))
sys.exit(rc)
"""


def test_masked_forward_works_with_the_timm_floor(tmp_path):
    version = timm_floor()
    target = tmp_path / "site"
    _install(version, target)
    report = tmp_path / "report.xml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(PYTHONPATH=os.pathsep.join([str(target), *filter(None, [os.environ.get("PYTHONPATH")])]),
               OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-c", RUNNER, "-q", "-p", "no:cacheprovider", f"--junitxml={report}", "-k", NOT_TIMM,
           *TEST_FILES]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    out = proc.stdout + proc.stderr
    imported = re.search(r"^TIMM_IMPORTED (\S+) (\S+)$", proc.stdout, re.MULTILINE)
    assert imported, f"the tests did not report which timm they imported:\n{out[-4000:]}"
    assert imported.group(1) == version and Path(imported.group(2)).is_relative_to(target), (
        f"the tests imported timm {imported.group(1)} from {imported.group(2)}, not timm {version} from {target}")
    assert proc.returncode == 0, (f"with timm {version} (pyproject.toml's floor) these tests fail; raise the floor "
                                  f"or fix the code:\n{out[-6000:]}")
    passed = {case.get("name").split("[")[0] for case in ET.parse(report).iter("testcase")
              if not any(child.tag in ("failure", "error", "skipped") for child in case)}
    assert MUST_PASS <= passed, f"did not run and pass with timm {version}: {sorted(MUST_PASS - passed)}"

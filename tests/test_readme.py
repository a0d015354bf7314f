"""The README's quickstart is the contract with a newcomer: keep it and CI in step."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    demo, tests = _commands()
    assert demo.endswith("python -m fastwsss.train") and tests.endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()[-1]
    assert ci.replace(" -q", "") == tests, "the last line of .ci/run must be the README's test command"


def test_ci_does_not_deselect_the_wheel_test():
    """tests/test_wheel.py is the only test of the installed package; the README command must keep running it."""
    tests = _commands()[1]
    pytest_args = tests.split("python -m pytest", 1)[1].split()
    assert not {"-m", "-k", "--deselect", "--ignore"} & set(pytest_args), tests
    addopts = re.search(r'^addopts = "(.*)"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert "wheel" not in addopts and " -m" not in f" {addopts}", addopts

"""The README's quickstart is the contract with a newcomer: keep it and CI in step."""

import re
import shlex
from pathlib import Path

import pytest

from fastwsss.train import main as train_main

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


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_print_config_command_prints_without_weights(tmp_path, monkeypatch, capsys):
    """The README's --print-config line, as written (a paper config, no model.pretrained): prints, runs nothing."""
    block = _section("Configs and the command line").split("```bash", 1)[1].split("```", 1)[0]
    line = next(ln.split("#", 1)[0] for ln in block.splitlines() if "--print-config" in ln)
    argv = shlex.split(line)
    assert argv[:3] == ["python", "-m", "fastwsss.train"], line
    monkeypatch.chdir(tmp_path)
    assert train_main(argv[3:]) is None
    printed = capsys.readouterr().out
    assert "  pretrained: ???\n" in printed and "  batch_size: 8\n" in printed
    assert not list(tmp_path.iterdir())


def test_the_quoted_typo_message_is_what_the_command_prints(capsys):
    quoted = re.search(r"A typo fails with its full key path and where it came from\s+\(`([^`]*)`\)",
                       _section("Configs and the command line")).group(1)
    key = quoted.split(":", 1)[0]
    with pytest.raises(SystemExit) as exit_info:
        train_main([f"{key}=/data/VOC2012"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[1].strip() == quoted


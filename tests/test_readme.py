"""The README is the contract with a newcomer: its quickstart and CI in step, what it shows runs, what it names exists.
The commands of every page (README and docs/) are checked in tests/test_docs.py."""

import re
import shlex
from pathlib import Path

from fastwsss.config import packaged_configs
from fastwsss.train import main as train_main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
# Names the README's methods table gives to configs that are not in configs/ yet. Each entry is the name of work that
# is under way; remove it once its config exists (test_the_methods_table_names_configs_that_exist then checks it).
PENDING_CONFIGS: set[str] = set()


def _commands():
    block = README.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


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


def test_the_install_commands_are_the_quickstarts():
    """The Install section's CPU commands are the quickstart's install, step by step."""
    block = _section("Install").split("```bash", 1)[1].split("```", 1)[0]
    install = " && ".join(ln.strip() for ln in block.splitlines() if ln.strip())
    assert f"{install} && python -m pytest" == _commands()[1]


def test_install_the_first_run_the_methods_and_the_kernels_are_on_the_first_screen():
    lines = README.splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; keep it under 300 (details go to docs/)"
    first_screen = "\n".join(lines[:64])
    for title in ("Install", "Quickstart", "Methods", "Kernels"):
        assert f"\n## {title}\n" in first_screen, f"'## {title}' is not within the first screen of README.md"


def test_the_print_config_command_prints_without_weights(tmp_path, monkeypatch, capsys):
    """The README's --print-config line, as written (a paper config, no model.pretrained): prints, runs nothing."""
    block = _section("Commands").split("```bash", 1)[1].split("```", 1)[0]
    line = next(ln.split("#", 1)[0] for ln in block.splitlines() if "--print-config" in ln)
    argv = shlex.split(line)
    assert argv[:3] == ["python", "-m", "fastwsss.train"], line
    monkeypatch.chdir(tmp_path)
    assert train_main(argv[3:]) is None
    printed = capsys.readouterr().out
    assert "  pretrained: ???\n" in printed and "  batch_size: 8\n" in printed
    assert not list(tmp_path.iterdir())


def _methods_table_configs() -> set[str]:
    rows = [ln for ln in _section("Methods").splitlines() if ln.startswith("| ") and not ln.startswith("| method")]
    return {name for row in rows for name in re.findall(r"`([a-z]+(?:_[a-z]+)*)`", row.rsplit("|", 2)[-2])}


def test_the_methods_table_names_configs_that_exist():
    named = _methods_table_configs()
    assert {"voc_toco", "coco_toco", "voc_mcc", "coco_mcc", "demo", "demo_cam"} <= named, named
    missing = named - set(packaged_configs()) - PENDING_CONFIGS
    assert not missing, f"the README's methods table names configs that configs/ does not hold: {sorted(missing)}"


def test_every_packaged_config_is_in_the_methods_table():
    unlisted = set(packaged_configs()) - _methods_table_configs()
    assert not unlisted, f"configs/ holds configs the README's methods table does not name: {sorted(unlisted)}"


def test_every_method_is_in_the_methods_table():
    import fastwsss.methods

    shipped = {name for name, m in fastwsss.methods.METHODS.items() if m.__module__.startswith("fastwsss.methods.")}
    listed = set(re.findall(r"^\| [^|]+ \| `(\w+)` \|", _section("Methods"), re.MULTILINE))
    assert shipped <= listed, sorted(shipped - listed)


def test_the_kernels_table_states_that_no_gpu_run_was_made():
    """Until results exist under benchmarks/results/<device>/, the README must not claim a GPU run."""
    results = ROOT / "benchmarks" / "results"
    if results.is_dir() and any(p.is_dir() for p in results.iterdir()):
        return  # a GPU run exists: the table may say so
    rows = [ln for ln in _section("Kernels").splitlines() if ln.startswith("| `")]
    assert rows and all(ln.rstrip().endswith("| not yet |") for ln in rows), rows

"""Every page says what is: the links between pages resolve, the files and configs a page names exist, the commands
in its ``bash`` blocks take the options and settings they are shown with (``--help`` / ``--print-config`` lines are
run), and the section numbers the code cites exist in docs/methods/toco-mcc.md."""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import fastwsss.methods  # noqa: F401  (registers the methods: their config sections)
from fastwsss.config import ConfigError, load_config, packaged_configs, schema
from fastwsss.train import main as train_main

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").rglob("*.md"))
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *DOCS]
# pages that describe the authors' repositories: the paths they name are the authors', not this project's
ABOUT_OTHER_CODE = {ROOT / "docs" / "methods" / "cosa.md", ROOT / "docs" / "methods" / "more.md"}
OWN_PAGES = [p for p in PAGES if p not in ABOUT_OTHER_CODE]
# Named by the pages, added by work that is under way: remove each entry once it exists (the checks then cover it).
PENDING: set[str] = set()
COMMANDS = {"fastwsss.train": "fastwsss.train", "fastwsss.infer": "fastwsss.infer",
            "fastwsss.evaluate": "fastwsss.evaluate", "fastwsss.plot": "fastwsss.plot",
            "fastwsss.data.coco": "fastwsss.data.coco", "fastwsss.kernels": "fastwsss.kernels.__main__"}
MISSING = object()


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def page_id(path: Path) -> str:
    return rel(path)


# ---- links


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)}


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{rel(page)}: {broken}"


@pytest.mark.parametrize("page", OWN_PAGES, ids=page_id)
def test_no_link_to_a_repository_that_does_not_exist(page):
    assert "github.com/fastwsss" not in page.read_text()


@pytest.mark.parametrize("page", OWN_PAGES, ids=page_id)
def test_pages_say_what_is_not_how_it_was_made(page):
    words = re.findall(r"\b(?:sessions?|issues? \d+|issue-\d+|engineers?)\b", page.read_text(), re.IGNORECASE)
    assert not words, f"{rel(page)}: {words}"


# ---- files and configs a page names


def named_paths(text: str) -> list[tuple[str, Path]]:
    out = []
    for span in re.findall(r"`([^`\n]+)`", text):
        if any(c in span for c in "<>*{} "):
            continue
        if re.fullmatch(r"(?:fastwsss|kernels|benchmarks|tests|configs|docs)/[\w./-]+", span):
            out.append((span.rstrip("/"), ROOT / span))
        elif re.fullmatch(r"(?:methods|training|inference|pseudo|models|data)/[\w/]+\.py", span):
            out.append((f"fastwsss/{span}", ROOT / "fastwsss" / span))
    return out


@pytest.mark.parametrize("page", OWN_PAGES, ids=page_id)
def test_named_files_exist(page):
    missing = sorted({name for name, path in named_paths(page.read_text()) if not path.exists()} - PENDING)
    assert not missing, f"{rel(page)} names files that do not exist: {missing}"


# ---- commands in bash blocks


def bash_commands(text: str):
    """(line, argv) of every command in the page's ```bash blocks (continuations joined, comments dropped, split at
    && and ;)."""
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            argv: list[str] = []
            for token in [*shlex.split(line, comments=True), "&&"]:
                if token in ("&&", ";", "||"):
                    if argv:
                        yield line.strip(), argv
                    argv = []
                elif argv or not re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", token):  # leading VAR=value: environment
                    argv.append(token)


def split_command(argv: list[str]) -> tuple[str, str, list[str]] | None:
    """("module", name, args) for python -m / torchrun -m, ("script", path, args) for a benchmark script."""
    if argv[0] == "torchrun" and "-m" in argv:
        i = argv.index("-m")
        return "module", argv[i + 1], argv[i + 2:]
    if argv[0] in ("python", "python3") and len(argv) > 2 and argv[1] == "-m":
        return "module", argv[2], argv[3:]
    if argv[0] in ("python", "python3", "bash") and len(argv) > 1 and argv[1].startswith("benchmarks/"):
        return "script", argv[1], argv[2:]
    if argv[0] == "pytest" and len(argv) > 1:
        return "script", argv[1].rstrip("/"), []
    return None


_HELP: dict[str, str] = {}


def help_text(command: str) -> str:
    if command not in _HELP:
        main = importlib.import_module(COMMANDS[command]).main
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        assert exit_info.value.code == 0, command
        _HELP[command] = out.getvalue()
    return _HELP[command]


def schema_has(key: str) -> bool:
    return OmegaConf.select(OmegaConf.structured(schema()), key, default=MISSING) is not MISSING


def config_source(args: list[str]) -> tuple[str, str | None]:
    """("packaged" | "file" | "pending" | "user" | "default" | "resume", its value)."""
    if "--config" not in args:
        return ("resume" if any(a.startswith("run.resume=") for a in args) else "default"), None
    value = args[args.index("--config") + 1]
    if value.removesuffix(".yaml") in packaged_configs():
        return "packaged", value
    if value in PENDING:
        return "pending", value
    if value.endswith(".yaml") and (ROOT / value).is_file():
        return "file", str(ROOT / value)
    assert value.endswith(".yaml"), f"--config {value}: neither a packaged config nor a YAML file"
    return "user", value


def check_command(line: str, argv: list[str]) -> None:
    kind, name, args = split_command(argv) or (None, None, None)
    if kind == "script":
        path = ROOT / name
        assert path.exists() or name in PENDING, f"{line}: {name} does not exist"
        if path.is_file():
            source = path.read_text()
            for flag in (a.split("=", 1)[0] for a in args if a.startswith("--")):
                assert flag in source, f"{line}: {name} takes no {flag}"
        return
    if kind != "module" or name not in COMMANDS:
        return
    options = set(re.findall(r"--[\w-]+", help_text(name)))
    for flag in (a.split("=", 1)[0] for a in args if a.startswith("--")):
        assert flag in options, f"{line}: python -m {name} takes no {flag}"
    overrides = [a for a in args if re.fullmatch(r"[a-z_]+(?:\.\w+)+=.*", a)]
    unknown = [o for o in overrides if not schema_has(o.split("=", 1)[0])]
    assert not unknown, f"{line}: no such settings: {unknown}"
    if name in ("fastwsss.train", "fastwsss.evaluate") and "--config" in args:
        config_source(args)  # asserts that the config exists
    if name == "fastwsss.train":
        source, value = config_source(args)
        if source in ("packaged", "file", "default"):
            load_config(value or "demo", overrides, allow_missing=True)  # the values, checked as a run checks them


def check_runnable(line: str, argv: list[str], monkeypatch, tmp_path) -> None:
    """Run what runs in a second and writes nothing: train's --print-config, any command's --help / --version."""
    kind, name, args = split_command(argv) or (None, None, None)
    if kind != "module" or name not in COMMANDS:
        return
    if name == "fastwsss.train" and "--print-config" in args:
        monkeypatch.chdir(tmp_path)
        assert train_main(args) is None, line
        assert not list(tmp_path.iterdir()), f"{line} wrote files"
    elif args in (["--help"], ["--version"]):
        main = importlib.import_module(COMMANDS[name]).main
        with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 0, line


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_commands_take_their_options_and_settings(page, monkeypatch, tmp_path, capsys):
    commands = list(bash_commands(page.read_text()))
    for line, argv in commands:
        check_command(line, argv)
        check_runnable(line, argv, monkeypatch, tmp_path)


def test_the_command_checker_catches_mistakes():
    """The checks above can fail: a wrong flag, a wrong key, a wrong value, a missing config or script."""
    for line in ("python -m fastwsss.train --confg voc_mcc", "python -m fastwsss.train data.roott=/data",
                 "python -m fastwsss.train --config voc_mcc cam.high_thresh=7", "python -m fastwsss.train --config nope",
                 "python -m fastwsss.infer --checkpoint x --images y --out z infer.fusionn=voc",
                 "python benchmarks/no_such.py", "python benchmarks/method_step.py --no-such-flag"):
        with pytest.raises((AssertionError, ConfigError)):
            check_command(line, shlex.split(line))


def test_the_quoted_typo_message_is_what_the_command_prints(capsys):
    text = (ROOT / "docs" / "configuration.md").read_text()
    quoted = re.search(r"an unknown key fails with its full path and a suggestion\s+\(`([^`]*)`\)", text).group(1)
    key = quoted.split(":", 1)[0]
    with pytest.raises(SystemExit) as exit_info:
        train_main([f"{key}=/data/VOC2012"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[1].strip() == quoted


# ---- the method reference the code cites


TOCO_MCC = ROOT / "docs" / "methods" / "toco-mcc.md"
SECTIONS = ["1. Backbone", "2. Heads", "3. One training step (both methods)", "4. Pseudo labels",
            "5. ToCo local views (CTC)", "6. MCC local views", "7. Losses", "8. PAR (pixel-adaptive refinement)",
            "9. Optimisation and data", "10. Evaluation", "11. Reference quirks (default = faithful; each fix behind a switch)"]
SUBSECTIONS = ["4.1", "4.2", "4.3", "7.1", "7.2", "7.3", "7.4", "7.5", "7.6"]


def section_numbers() -> set[str]:
    """The sections and subsections, and §3's numbered steps as 3.1 ... (the method pages cite "§3.1": step 1)."""
    text = TOCO_MCC.read_text()
    steps = text.split("\n## 3. ", 1)[1].split("\n## ", 1)[0]
    return (set(re.findall(r"^###? (\d+(?:\.\d+)?)\.? ", text, re.MULTILINE))
            | {f"3.{n}" for n in re.findall(r"^(\d+)\. ", steps, re.MULTILINE)})


def test_toco_mcc_keeps_the_specification_numbering():
    headings = re.findall(r"^## (.+)$", TOCO_MCC.read_text(), re.MULTILINE)
    assert headings == SECTIONS
    assert set(SUBSECTIONS) <= section_numbers()


def test_every_section_the_code_cites_exists():
    """"SPEC §N" and "docs/methods/toco-mcc.md §N" in code, configs, tests and the method pages name a section of
    docs/methods/toco-mcc.md (the specification's numbering, kept)."""
    cite = re.compile(r"(?:SPEC|toco-mcc\.md)\s*§(\d+(?:\.\d+)?)((?:\s*(?:,|and|/|or)\s*§\d+(?:\.\d+)?)*)")
    numbers = section_numbers()
    files = [p for d in ("fastwsss", "kernels", "benchmarks", "tests", "configs") for p in (ROOT / d).rglob("*")
             if p.suffix in (".py", ".yaml", ".md")] + DOCS
    bad = []
    for path in files:
        for m in cite.finditer(path.read_text()):
            for n in [m.group(1), *re.findall(r"§(\d+(?:\.\d+)?)", m.group(2))]:
                if n not in numbers:
                    bad.append(f"{rel(path)}: §{n}")
    assert not bad, bad


# ---- the demo page


def test_the_demo_page_marks_where_the_seeds_table_goes():
    text = (ROOT / "docs" / "demo.md").read_text()
    assert text.count("<!-- demo-seeds-table -->") == 1
    after = text.split("<!-- demo-seeds-table -->\n", 1)[1]
    assert after.startswith("| seed |"), "the table's header follows the marker"
    command = re.findall(r"^python benchmarks/demo_seeds\.py .*$", text, re.MULTILINE)
    assert command, "docs/demo.md shows the command that makes the table"

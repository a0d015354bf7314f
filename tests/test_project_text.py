"""The project's text speaks of the project alone: no numbered work items of how it was built (issue or session
numbers) in code, tests, docs or configs, and no link to a repository or organisation that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".sh", ".cfg", ".ini"}
SKIP = {".git", ".venv", "data", "runs", "build", "dist", ".whl", "__pycache__", ".pytest_cache", ".benchmarks"}
PROCESS = re.compile(r"\b(?:issue|session)s?\s*#?\s*\d+", re.IGNORECASE)
LINK = re.compile(r"https?://(?:www\.)?github\.com/fastwsss\b", re.IGNORECASE)


def project_files() -> list[Path]:
    """Every text file of the repository but this test (which spells out what it looks for)."""
    return sorted(p for p in ROOT.rglob("*") if p.is_file() and p.suffix in SUFFIXES and p != Path(__file__).resolve()
                  and not SKIP & set(p.relative_to(ROOT).parts) and ".egg-info" not in str(p))


def findings(pattern: re.Pattern, files: list[Path], root: Path = ROOT) -> list[str]:
    out = []
    for path in files:
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            if pattern.search(line):
                out.append(f"{path.relative_to(root)}:{n}: {line.strip()[:100]}")
    return out


def test_no_issue_or_session_numbers():
    found = findings(PROCESS, project_files())
    assert not found, "numbered work items in the project's text:\n" + "\n".join(found)


def test_no_link_to_a_repository_that_does_not_exist():
    found = findings(LINK, project_files())
    assert not found, "links to a GitHub organisation that does not exist:\n" + "\n".join(found)


def test_the_scan_sees_what_it_looks_for(tmp_path):
    sample = tmp_path / "a.md"
    sample.write_text("fine: 2 sessions of 13 issues\nas decided in issue 13\nSession 2's settings\n"
                      "see https://github.com/fastwsss/fastwsss\n")
    assert [f.split(":")[1] for f in findings(PROCESS, [sample], tmp_path)] == ["2", "3"]
    assert [f.split(":")[1] for f in findings(LINK, [sample], tmp_path)] == ["4"]

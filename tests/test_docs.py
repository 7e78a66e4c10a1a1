"""The README and docs/ as a user reads them: flags.md is what the configuration generates, and no
page or source file speaks of how the project was developed (work items, numbered work sessions,
who did what) instead of what the software does."""

import importlib.util
import re
from pathlib import Path

from conftest import REPO

HISTORY = re.compile(
    r"\bissues? ?#?\d+"  # "issue 7", "issues 12"
    r"|\bsession ?\d+"  # "session 3"
    r"|§ ?\d+"  # "§5"
    r"|\bhelpers?(?:'s)? (?:session|worktree|wrote|did|measured|added|made|found|left)\b"  # a developer
    r"|\b(?:by|from) (?:a|the|another) helper\b",
    re.IGNORECASE,
)
SKIP = {".venv", ".oracle", ".git", "runs", "demo_data", "__pycache__"}


def make_flags():
    spec = importlib.util.spec_from_file_location("make_flags", REPO / "docs" / "make_flags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def checked_files():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    sources = [p for p in sorted(REPO.rglob("*.py")) if not SKIP & set(p.relative_to(REPO).parts)]
    sources.remove(Path(__file__).resolve())  # its examples of what the pattern must find
    requirements = sorted(REPO.glob("requirements*.txt")) + [REPO / "pyproject.toml"]
    return pages + sources + requirements


def test_flags_page_is_generated_from_the_configuration():
    module = make_flags()
    assert (REPO / "docs" / "flags.md").read_text() == module.render(), (
        "docs/flags.md is out of date: run python docs/make_flags.py"
    )
    assert "`--skip_bad`" in module.render() and "`--dist`" in module.render()


def test_the_history_pattern_finds_what_it_should():
    for text in ("see issue 7", "(issue 12 §5)", "end of session 3", "Issue #4", "a helper measured it"):
        assert HISTORY.search(text), text
    for text in ("rank helpers and reductions", "Helpers of the automatic mask generator", "tissue 7"):
        assert not HISTORY.search(text), text


def test_no_development_history_in_pages_or_sources():
    found = []
    for path in checked_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if HISTORY.search(line):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not found, "development history in user-facing text:\n" + "\n".join(found)


def test_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 250, len(lines)
    install = next(i for i, line in enumerate(lines) if line.startswith("## Install"))
    assert install < 60 and "pip install -e ." in "\n".join(lines[install:60])


def test_links_between_pages_lead_to_files():
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        prose = re.sub(r"```.*?```|`[^`\n]*`", "", page.read_text(), flags=re.DOTALL)  # code is not a link
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.relative_to(REPO)} links to missing {target}"

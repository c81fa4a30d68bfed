"""The README and docs/ stay navigable: links resolve, the README stays short, CI's quick start holds.

CI greps the second fenced block of the README's ``## Quick start`` for the test command, so that
section keeps exactly two blocks: ``make demo`` and ``make test``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md"))
README_MAX_LINES = 200

#: [text](target) outside code; images too. Targets with a scheme or a bare anchor are not files.
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _without_code(text: str) -> str:
    """The text with fenced blocks and inline code removed (links in code are not links)."""
    text = _FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+)$", text, re.MULTILINE)}


def _section(text: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def _links(path: Path) -> list[str]:
    return _LINK.findall(_without_code(path.read_text()))


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path: Path) -> None:
    broken = []
    for target in _links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # http:, https:, mailto:
        file_part, _, anchor = target.partition("#")
        if file_part.startswith("/"):
            broken.append(f"{target} (absolute: make it relative)")
            continue
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target} (no heading for #{anchor})")
    assert broken == [], f"{path.name}: {broken}"


def test_the_readme_is_short_and_points_at_every_page() -> None:
    text = README.read_text()
    assert len(text.splitlines()) < README_MAX_LINES
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in _links(README)}
    assert {p.resolve() for p in PAGES} <= linked, "every docs/ page is linked from the README"


def test_the_quick_start_has_exactly_the_demo_and_the_test_blocks() -> None:
    blocks = [b.strip() for b in _FENCE.findall(_section(README.read_text(), "Quick start"))]
    assert blocks == ["make demo", "make test"]


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_each_page_opens_with_a_title_and_a_paragraph(path: Path) -> None:
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# "), "a page starts with its title"
    assert lines[1] == "" and lines[2] and not lines[2].startswith(("#", "|", "-", "```")), \
        "then one paragraph saying what the page covers"


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_pages_hold_no_machine_paths(path: Path) -> None:
    assert not re.search(r"(?<![\w.~])/(work|home|tmp|root|Users)/", path.read_text())


def test_the_expected_pages_exist() -> None:
    names = {p.name for p in PAGES}
    assert {"architecture.md", "data.md", "feature-store.md", "streaming.md", "training.md",
            "serving.md", "operations.md", "benchmarks.md"} <= names

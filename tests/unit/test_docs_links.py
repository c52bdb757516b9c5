"""Relative links in the README, docs/ and example READMEs point at files that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).parents[2]
PAGES = sorted(
    [
        REPO / "README.md",
        *(REPO / "docs").glob("*.md"),
        *(REPO / "examples").glob("*/README.md"),
        *(REPO / "charts").glob("*/README.md"),
    ]
)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _heading_anchors(page: Path) -> set[str]:
    """GitHub-style anchors of a page's headings."""
    out = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^a-z0-9 _-]", "", title).replace(" ", "-"))
    return out


def broken_links(page: Path) -> list[str]:
    """Relative link targets (file, and #anchor when given) of `page` that do not resolve."""
    broken = []
    # Code spans (regex patterns in the API reference) are not links.
    text = re.sub(r"`[^`\n]*`", "", page.read_text())
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _heading_anchors(dest):
            broken.append(target)
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    assert broken_links(page) == []


def test_the_checker_sees_a_broken_link(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# Title here\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[a](there.md) [b](missing.md) [c](there.md#title-here) [d](there.md#nope) [e](https://x.y/z)"
    )
    assert broken_links(page) == ["missing.md", "there.md#nope"]


def test_docs_are_linked_from_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    for doc in ("quickstart", "concepts", "api-reference", "operations"):
        assert f"(docs/{doc}.md)" in readme

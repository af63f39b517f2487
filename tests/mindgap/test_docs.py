"""The documentation holds together: a short README, and every relative link in it and in docs/ resolves
(to an existing file, and to an existing heading where it names one)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

# [text](target) or [text](target "title"); images too. Fenced code blocks are skipped before matching.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, …


def relative_links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    return [t for t in LINK.findall(text) if not EXTERNAL.match(t)]


def test_readme_is_at_most_300_lines() -> None:
    lines = README.read_text().count("\n")
    assert lines <= 300, f"README.md has {lines} lines; move detail into docs/"


def test_there_are_docs_pages_and_the_readme_links_to_each() -> None:
    pages = PAGES[1:]
    assert pages, "docs/ has no pages"
    linked = {(README.parent / t.split("#", 1)[0]).resolve() for t in relative_links(README) if not t.startswith("#")}
    missing = [p.name for p in pages if p.resolve() not in linked]
    assert not missing, f"README.md links to no docs page named {missing}"


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    text = FENCE.sub("", page.read_text())
    heads = re.findall(r"^#{1,6}\s+(.+?)\s*$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_an_existing_file(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.split("?", 1)[0].partition("#")
        file = page.parent / path if path else page  # "#heading" is on this page
        missing_heading = file.exists() and file.suffix == ".md" and bool(anchor) and anchor not in anchors(file)
        if not file.exists() or missing_heading:
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links to missing files or headings {broken}"


@pytest.mark.parametrize("page", PAGES[1:], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_docs_page_links_back_to_the_readme(page: Path) -> None:
    head = page.read_text().split("\n", 4)[:4]
    assert head[0].startswith("# "), f"{page.name} does not start with a title"
    assert any("](../README.md)" in line for line in head), f"{page.name} has no link back to README.md near its top"

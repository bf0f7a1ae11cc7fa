"""Every relative link in README.md and docs/*.md leads somewhere: the file
exists, and a ``#fragment`` names one of its headings (GitHub's anchors)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: [text](target), not an image's; the target without a title.
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
#: The protocol's normative text, written from the shared contract apart
#: from the pages that cite it.


def anchors(page: Path) -> set[str]:
    """The anchors GitHub makes of a page's headings: lower case, spaces to
    hyphens, punctuation dropped; a repeated heading gets -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not m:
            continue
        text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", m[1]).lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links() -> list[tuple[Path, str]]:
    found = []
    for page in PAGES:
        fenced = False
        for line in page.read_text().splitlines():
            if line.startswith("```"):
                fenced = not fenced
            if fenced:
                continue
            for target in LINK.findall(line):
                if not re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, mailto:
                    found.append((page, target))
    return found


def test_the_pages_have_relative_links_to_check():
    assert len(links()) > 30


@pytest.mark.parametrize("page, target", links(), ids=[f"{p.name}->{t}" for p, t in links()])
def test_each_relative_link_resolves(page, target):
    path, _, fragment = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    assert dest.exists(), f"{page.name}: {target}: no such file"
    assert dest.is_relative_to(ROOT), f"{page.name}: {target}: outside the repository"
    if fragment and dest.suffix == ".md":
        assert fragment in anchors(dest), f"{page.name}: {target}: no such heading"

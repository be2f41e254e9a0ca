"""Every relative link of the README and docs/ reaches a file, and every #anchor a heading of it
(GitHub's heading ids: lower case, punctuation and symbols dropped, spaces to hyphens)."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def heading_id(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@functools.cache
def heading_ids(page: Path) -> set[str]:
    """The ids GitHub gives the page's headings (a repeated one gets -1, -2, ...); code blocks skipped."""
    ids: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        match = None if in_code else re.match(r"^#{1,6} (.*)", line)
        if match:
            base = heading_id(match.group(1))
            ids.add(f"{base}-{seen[base]}" if base in seen else base)
            seen[base] = seen.get(base, 0) + 1
    return ids


def test_heading_ids_follow_github() -> None:
    assert heading_id("Real faces: no magnification, unit 2/3 px") == "real-faces-no-magnification-unit-23-px"
    assert heading_id("TV-L1's parameters (2026-12-06)") == "tv-l1s-parameters-2026-12-06"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_reach_a_file_and_a_heading(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text().replace("\n", " ")):  # a link may wrap a line
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path) if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in heading_ids(dest):
            broken.append(f"{target} (no such heading in {dest.name})")
    assert not broken, f"{page.name}: " + "; ".join(broken)

"""Copy diagrams/*.mmd into the pages that embed them (part of ``make diagrams``).

A page embeds a diagram as ``<!-- embed: diagrams/NAME.mmd -->`` followed by a
``mermaid`` block: the block's text is replaced by the file's, so the site (and any
forge showing the Markdown) draws the diagram that ``diagrams/`` holds.
``tests/test_diagram.py`` checks that the copies are current.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EMBED = re.compile(r"(<!-- embed: (diagrams/[\w.-]+\.mmd) -->\n```mermaid\n)(.*?)(```\n)", re.S)


def embed(page: Path) -> bool:
    """Refresh every embedded diagram of `page`; True when the page changed."""
    text = page.read_text(encoding="utf-8")

    def current(match: re.Match[str]) -> str:
        source = (ROOT / match[2]).read_text(encoding="utf-8")
        return match[1] + source + match[4]

    fresh = EMBED.sub(current, text)
    if fresh != text:
        page.write_text(fresh, encoding="utf-8")
    return fresh != text


def main() -> int:
    """Refresh every page of docs/ and the README; name the pages that changed."""
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        if embed(page):
            print(f"embedded the current diagrams in {page.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

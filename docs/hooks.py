"""MkDocs hooks: pages whose content is generated from ``specs/`` at build time.

A page containing ``<!-- generated: rules -->`` gets the protocol reference
(every rule of ``specs/rules.yaml``) in its place, so the site can never cite
a rule the project does not declare, nor miss one it does. The changelog page
is ``CHANGELOG.md`` of the checkout (one home for it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vhsm.audit.reference import rules_markdown

ROOT = Path(__file__).resolve().parent.parent


def changelog() -> str:
    """The checkout's CHANGELOG.md."""
    return (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")


GENERATORS = {
    "<!-- generated: rules -->": rules_markdown,
    "<!-- generated: changelog -->": changelog,
}


def on_page_markdown(markdown: str, **_: Any) -> str:
    """Replace each generator marker of a page by the generated Markdown."""
    for marker, generate in GENERATORS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, generate())
    return markdown

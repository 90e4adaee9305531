"""The rule ids of specs/rules.yaml hold the sources together (one vocabulary, every row used).

Every ``VU-*`` id written anywhere in the project is declared in ``specs/rules.yaml``;
every declared rule is enforced or checked by the runtime, the machines or the auditor;
and every declared rule is named by a test that breaks it (or checks a peer against it).
The §11 item names (F1, M4...) are aliases that live in ``rules.yaml`` only.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vhsm.errors import VhsmError
from vhsm.session import all_rules, rule

ROOT = Path(__file__).resolve().parent.parent
RULE_ID = re.compile(r"VU-[A-Z]+-\d{3}")
THIS = Path(__file__).resolve()


def cited(paths: list[Path]) -> dict[str, set[Path]]:
    """Every rule id written in the files, with the files that write it."""
    found: dict[str, set[Path]] = {}
    for path in paths:
        for rule_id in RULE_ID.findall(path.read_text(encoding="utf-8")):
            found.setdefault(rule_id, set()).add(path)
    return found


SOURCES = sorted((ROOT / "vhsm").rglob("*.py"))
MACHINES = [p for p in sorted((ROOT / "specs").glob("*.yaml")) if p.stem != "rules"]
TESTS = [p for p in sorted((ROOT / "tests").rglob("*.py")) if p.resolve() != THIS]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_every_cited_rule_is_declared() -> None:
    unknown = {
        rule_id: sorted(str(p.relative_to(ROOT)) for p in where)
        for rule_id, where in cited(SOURCES + MACHINES + TESTS + DOCS).items()
        if rule_id not in all_rules()
    }
    assert unknown == {}


def test_every_declared_rule_is_enforced_or_checked() -> None:
    used = cited(SOURCES + MACHINES)
    assert [r for r in all_rules() if r not in used] == []


def test_every_declared_rule_is_exercised_by_a_test() -> None:
    used = cited(TESTS)
    assert [r for r in all_rules() if r not in used] == []


def test_aliases_live_in_rules_yaml_only() -> None:
    aliases = {r.item for r in all_rules().values() if r.item}
    assert "F1" in aliases and "M4" in aliases
    pattern = re.compile(r"\brules? (?:[FNRMP]\d{1,2})\b")
    offenders = [
        str(p.relative_to(ROOT))
        for p in SOURCES + MACHINES
        if pattern.search(p.read_text(encoding="utf-8"))
    ]
    assert offenders == []


def test_unknown_rule_is_a_clear_error() -> None:
    assert rule("VU-FRAME-001").item == "F1"
    with pytest.raises(VhsmError, match="VU-NOPE-001"):
        rule("VU-NOPE-001")

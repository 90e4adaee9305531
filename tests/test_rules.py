"""The rule ids of specs/rules.yaml hold the sources together (one vocabulary, every row used).

Every ``VU-*`` id written anywhere in the project is declared in ``specs/rules.yaml``;
every declared rule is enforced or checked by the runtime, the machines or the auditor;
and every declared rule is named by a test that breaks it (or checks a peer against it).
The labels of an earlier checklist (F1, M4...) are aliases that live in ``rules.yaml`` only:
no source, spec, test, doc, audit case name or CLI help writes them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vhsm.audit.backend_suite import DEVICES, iter_case_names
from vhsm.cli import main
from vhsm.errors import VhsmError
from vhsm.session import all_rules, rule
from vhsm.session.rules import rule_for_alias

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
#: Other code: the conformance matrix, fuzzers, benchmarks, tools, the docs' hooks.
OTHER = [
    p
    for folder in ("conformance", "fuzz", "benchmarks", "tools", "docs")
    for p in sorted((ROOT / folder).rglob("*.py"))
]
ALIASES = {r.alias for r in all_rules().values() if r.alias}
#: An alias as a word of its own (not the "M1" of "M10", nor a part of "VU-MEM-001").
ALIAS = re.compile(r"(?<![\w-])(?:" + "|".join(sorted(ALIASES)) + r")(?![\w-])")


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
    assert {"F1", "M4", "R2", "P1", "N10"} <= ALIASES
    offenders = [
        f"{p.relative_to(ROOT)}:{number}: {line.strip()}"
        for p in SOURCES + MACHINES + TESTS + DOCS + OTHER
        for number, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if ALIAS.search(line)
    ]
    assert offenders == []


@pytest.mark.parametrize("device", DEVICES)
def test_audit_cases_are_named_by_their_rule_id(device: str) -> None:
    names = list(iter_case_names(device))
    assert len(names) == len(set(names)), "two cases share a name"
    for name in names:
        rule_id, title = name.split(" ", 1)
        assert rule_id in all_rules(), name
        assert not ALIAS.search(title), name


@pytest.mark.parametrize(
    "argv",
    [[], ["audit"], ["audit", "backend"], ["audit", "trace"], ["audit", "frontend"]],
    ids=lambda argv: " ".join(argv) or "vhsm",
)
def test_cli_help_names_rules_by_id(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    text = capsys.readouterr().out
    assert not ALIAS.search(text), text
    if argv == ["audit", "backend"]:
        assert "VU-RING-002" in text


def test_an_alias_resolves_to_its_rule() -> None:
    assert rule_for_alias("F1") == rule_for_alias(" f1") == rule("VU-FRAME-001")
    assert rule_for_alias("VU-FRAME-001") is None
    assert rule_for_alias("F99") is None


def test_unknown_rule_is_a_clear_error() -> None:
    assert rule("VU-FRAME-001").alias == "F1"
    with pytest.raises(VhsmError, match="VU-NOPE-001"):
        rule("VU-NOPE-001")

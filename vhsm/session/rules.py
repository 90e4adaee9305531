"""The compliance rules of ``specs/rules.yaml`` and the findings that cite them."""

from __future__ import annotations

import functools
from typing import Literal

import attrs

from vhsm.errors import ProtocolViolation, VhsmError
from vhsm.specs import load_spec

Severity = Literal["MUST", "SHOULD", "INTEROP"]


@attrs.frozen
class Rule:
    """One rule: stable id, severity, section key, statement, runtime action.

    ``alias`` is the rule's short label in an earlier checklist: it is written in
    ``specs/rules.yaml`` only, and `rule_for_alias` maps it back for ``--only`` filters.
    """

    id: str
    severity: Severity
    section: str
    statement: str
    action: Literal["reject", "warn"]
    alias: str | None = None

    @property
    def upstream(self) -> Upstream:
        """Where the upstream specification describes what this rule is about."""
        return upstream(self.section)

    @property
    def url(self) -> str:
        """The link to the upstream specification's section for this rule."""
        return self.upstream.url


@attrs.frozen
class Upstream:
    """A section of the upstream vhost-user (or virtio) specification, with its link."""

    title: str
    url: str


def upstream(section: str) -> Upstream:
    """Map a ``section`` key of ``specs/`` to the upstream specification's section.

    Keys come from ``specs/upstream.yaml``; a key missing there falls back to its
    major number ("7.9" to "7"), and an unknown major number to the document itself,
    so every citation a report prints leads somewhere.
    """
    doc = load_spec("upstream")
    sections: dict[str, dict[str, str]] = doc["sections"]
    entry = sections.get(section) or sections.get(section.split(".")[0])
    if entry is None:
        return Upstream("vhost-user protocol", doc["base"])
    if "url" in entry:
        return Upstream(entry["title"], doc[entry["url"]])
    return Upstream(entry["title"], f"{doc['base']}#{entry['anchor']}")


@attrs.frozen
class Finding:
    """A rule broken at one point of a session."""

    rule_id: str
    request: str
    state: str
    detail: str

    @property
    def rule(self) -> Rule:
        """The rule this finding cites."""
        return rule(self.rule_id)

    @classmethod
    def from_violation(cls, violation: ProtocolViolation) -> Finding:
        """Record a raised violation as a finding."""
        return cls(violation.rule_id, violation.request, violation.state, violation.detail)


@functools.cache
def all_rules() -> dict[str, Rule]:
    """Every rule by id, in declaration order."""
    rules: dict[str, Rule] = {}
    for entry in load_spec("rules")["rules"]:
        if entry["id"] in rules:
            raise VhsmError(f"specs/rules.yaml: duplicate rule id {entry['id']}")
        rules[entry["id"]] = Rule(
            id=entry["id"],
            severity=entry["severity"],
            section=str(entry["section"]),
            statement=entry["statement"],
            action=entry["action"],
            alias=entry.get("alias"),
        )
    return rules


def rule(rule_id: str) -> Rule:
    """Look a rule up by id (a VhsmError names an unknown id)."""
    try:
        return all_rules()[rule_id]
    except KeyError:
        raise VhsmError(f"unknown rule id {rule_id!r} (not in specs/rules.yaml)") from None


def rule_for_alias(alias: str) -> Rule | None:
    """The rule whose ``alias`` in ``specs/rules.yaml`` is `alias` (any case), or None."""
    wanted = alias.strip().upper()
    return next((r for r in all_rules().values() if r.alias == wanted), None)

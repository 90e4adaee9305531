"""The protocol reference: every rule of ``specs/rules.yaml`` as a Markdown page.

The documentation site renders this page (``docs/reference/rules.md``) at build
time, so every rule id an audit report or a log line cites resolves to its
severity, its statement, the requests it concerns and a link into the upstream
vhost-user specification. Everything is read from ``specs/``: the rules, the
request catalogue and the machines (whose conditions and invalid-state tables
name the rules they enforce).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from vhsm.session.machines import composition
from vhsm.session.rules import Rule, all_rules
from vhsm.specs import load_spec
from vhsm.wire.enums import BackendReq, FrontendReq

_RULE_ID = re.compile(r"\bVU-[A-Z]+-\d+\b")
_WORDS = re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*(?:/[A-Z][A-Z0-9_]*)*")

#: What each severity means, in the order the page lists them.
SEVERITIES = {
    "MUST": "the specification requires it; breaking it fails an audit",
    "SHOULD": "the specification recommends it, or every major implementation enforces it",
    "INTEROP": "a deviation seen in real peers: reported, accepted by vhsm's runtime",
}


def request_names() -> frozenset[str]:
    """Every request name of both channels (without the ``VHOST_USER_`` prefix)."""
    return frozenset(FrontendReq.__members__) | frozenset(BackendReq.__members__)


def _rule_ids(node: Any) -> Iterator[str]:
    """Every rule id anywhere inside a YAML node."""
    if isinstance(node, str):
        yield from _RULE_ID.findall(node)
    elif isinstance(node, dict):
        for value in node.values():
            yield from _rule_ids(value)
    elif isinstance(node, list):
        for value in node:
            yield from _rule_ids(value)


def _mentioned(statement: str, known: frozenset[str]) -> set[str]:
    """Request names a statement mentions, "GET/SET_X" and "SET_A_B/C" forms expanded."""
    found: set[str] = set()
    for token in _WORDS.findall(statement):
        parts = token.split("/")
        full = [p for p in parts if p in known]
        for i, part in enumerate(parts):
            if part in known:
                found.add(part)
            elif full:
                # A short part borrows the words of its full neighbour: GET/SET_X, SET_A_B/C.
                words = full[0].split("_")
                before = i < parts.index(full[0])
                name = "_".join([part, *words[1:]] if before else [*words[:-1], part])
                if name in known:
                    found.add(name)
    return found


def _triggers(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [t for t in node if isinstance(t, str)]
    return []


def _machine_concerns(doc: dict[str, Any], known: frozenset[str]) -> dict[str, set[str]]:
    """Rule id -> requests, from a machine's conditions, transitions and rule tables."""
    concerns: dict[str, set[str]] = {}
    condition_rules: dict[str, str] = {}
    for name, info in (doc.get("conditions") or {}).items():
        if isinstance(info, dict) and isinstance(info.get("rule"), str):
            condition_rules[name] = info["rule"]

    def add(rule_id: str, trigger: str) -> None:
        if trigger.upper() in known:
            concerns.setdefault(rule_id, set()).add(trigger.upper())

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            triggers = _triggers(node.get("trigger"))
            for key in ("conditions", "unless"):
                for name in _triggers(node.get(key)):
                    for trigger in triggers:
                        if name in condition_rules:
                            add(condition_rules[name], trigger)
            for key, value in node.items():
                if isinstance(key, str) and isinstance(value, str) and _RULE_ID.fullmatch(value):
                    add(value, key)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    return concerns


def concerned_requests() -> dict[str, list[str]]:
    """Rule id -> the requests it concerns, sorted (rules about no request map to [])."""
    known = request_names()
    concerns: dict[str, set[str]] = {rid: set() for rid in all_rules()}
    for rid, known_rule in all_rules().items():
        concerns[rid] |= _mentioned(known_rule.statement, known)
    catalogue = load_spec("requests")
    for channel in ("frontend", "backend"):
        for entry in catalogue.get(channel) or []:
            for rid in _rule_ids(entry):
                if rid in concerns and entry.get("name") in known:
                    concerns[rid].add(entry["name"])
    for machine in composition().machines:
        for rid, names in _machine_concerns(load_spec(machine), known).items():
            if rid in concerns:
                concerns[rid] |= names
    return {rid: sorted(names) for rid, names in concerns.items()}


def _row(known_rule: Rule, requests: list[str]) -> str:
    link = f"[{known_rule.upstream.title}]({known_rule.url})"
    concerned = ", ".join(f"`{name}`" for name in requests) or "any request"
    runtime = "rejected" if known_rule.action == "reject" else "logged, accepted"
    return (
        f"### {known_rule.id}\n\n"
        f"**{known_rule.severity}** — {known_rule.statement}.\n\n"
        f"- Upstream: {link}\n"
        f"- Requests: {concerned}\n"
        f"- vhsm's runtime: {runtime} when a front-end breaks it\n"
    )


def rules_markdown() -> str:
    """The reference page body: a summary table, then one section per rule."""
    rules = all_rules()
    requests = concerned_requests()
    out = ["| rule | severity | statement |", "| --- | --- | --- |"]
    for rid, known_rule in rules.items():
        out.append(f"| [{rid}](#{rid.lower()}) | {known_rule.severity} | {known_rule.statement} |")
    out.append("")
    out.append("Severities:\n")
    for severity, meaning in SEVERITIES.items():
        out.append(f"- **{severity}**: {meaning}.")
    out.append("")
    families: dict[str, list[Rule]] = {}
    for known_rule in rules.values():
        families.setdefault(known_rule.id.split("-")[1], []).append(known_rule)
    for family, members in families.items():
        out.append(f"## {family} rules\n")
        out.extend(_row(member, requests[member.id]) for member in members)
    return "\n".join(out)

"""Audit findings and reports: text for terminals, JSON for tools, JUnit XML for CI.

A report lists findings (a rule broken at a point of a session) and, for the
active suites, case results (one scenario or bad input and its outcome). The
exit status is 1 when a MUST rule is broken, else 0.
"""

from __future__ import annotations

import json
from typing import Literal
from xml.etree import ElementTree

import attrs

from vhsm.session.rules import Rule, all_rules, rule

Outcome = Literal["pass", "rejected-cleanly", "wedged", "crashed", "skipped", "fail"]
#: Outcomes that count as the peer breaking the case's rule.
FAILING: frozenset[str] = frozenset({"wedged", "crashed", "fail"})
FORMATS = ("text", "json", "junit")


@attrs.frozen
class AuditFinding:
    """A rule broken at one point: which rule, by whom, where, and why."""

    rule_id: str
    detail: str
    side: str = "front-end"
    index: int | None = None
    t: float | None = None
    state: str = "-"
    request: str = "-"

    @property
    def rule(self) -> Rule:
        """The rule cited."""
        return rule(self.rule_id)

    def line(self) -> str:
        """One readable line."""
        where = f"#{self.index}" if self.index is not None else "-"
        when = f" t={self.t:.6f}" if self.t is not None else ""
        head = f"{self.rule.severity:7} {self.rule_id} {self.side}"
        return (
            f"{head} {where}{when} {self.request} in {self.state}: {self.detail}"
            f" (see {self.rule.url})"
        )


@attrs.frozen
class CaseResult:
    """One scenario or bad input of an active suite and how the peer answered it."""

    name: str
    rule_id: str
    outcome: Outcome
    detail: str = ""
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        """True when the peer broke the case's rule."""
        return self.outcome in FAILING


@attrs.define
class Report:
    """What one audit found."""

    title: str
    findings: list[AuditFinding] = attrs.field(factory=list)
    cases: list[CaseResult] = attrs.field(factory=list)

    def must_broken(self) -> bool:
        """True when any MUST rule was broken."""
        return any(f.rule.severity == "MUST" for f in self.findings) or any(
            c.failed and rule(c.rule_id).severity == "MUST" for c in self.cases
        )

    def exit_status(self) -> int:
        """0 when no MUST rule is broken, 1 otherwise."""
        return 1 if self.must_broken() else 0

    def render(self, fmt: str) -> str:
        """The report in `fmt` (text, json or junit)."""
        return {"text": self.text, "json": self.json, "junit": self.junit}[fmt]()

    def text(self) -> str:
        """A terminal-friendly summary."""
        out = [f"vhsm audit: {self.title}"]
        for case in self.cases:
            mark = "FAIL" if case.failed else case.outcome
            out.append(
                f"  {mark:16} {case.rule_id:12} {case.name}"
                + (f": {case.detail}" if case.detail else "")
            )
        for finding in self.findings:
            out.append("  " + finding.line())
        counts = {sev: 0 for sev in ("MUST", "SHOULD", "INTEROP")}
        for finding in self.findings:
            counts[finding.rule.severity] += 1
        failed = sum(c.failed for c in self.cases)
        summary = ", ".join(f"{n} {sev}" for sev, n in counts.items())
        out.append(
            f"{len(self.findings)} findings ({summary})"
            + (f"; {len(self.cases)} cases, {failed} failed" if self.cases else "")
            + f"; verdict: {'FAIL (a MUST rule is broken)' if self.must_broken() else 'PASS'}"
        )
        return "\n".join(out) + "\n"

    def json(self) -> str:
        """Machine-readable JSON."""
        doc = {
            "title": self.title,
            "verdict": "fail" if self.must_broken() else "pass",
            "findings": [
                {
                    **attrs.asdict(f),
                    "severity": f.rule.severity,
                    "spec": f.rule.url,
                    "statement": f.rule.statement,
                }
                for f in self.findings
            ],
            "cases": [attrs.asdict(c) for c in self.cases],
        }
        return json.dumps(doc, indent=2) + "\n"

    def junit(self) -> str:
        """JUnit XML: one test case per rule (and per active case) so CI shows each."""
        suite = ElementTree.Element("testsuite", name=f"vhsm audit: {self.title}")
        failures = 0
        by_rule: dict[str, list[AuditFinding]] = {}
        for finding in self.findings:
            by_rule.setdefault(finding.rule_id, []).append(finding)
        for rule_id, known in all_rules().items():
            case = ElementTree.SubElement(
                suite,
                "testcase",
                classname=f"rules.{known.severity}",
                name=f"{rule_id} {known.statement}",
            )
            if rule_id in by_rule:
                failures += 1
                failure = ElementTree.SubElement(
                    case, "failure", message=by_rule[rule_id][0].detail
                )
                failure.text = "\n".join(f.line() for f in by_rule[rule_id])
        for result in self.cases:
            case = ElementTree.SubElement(
                suite,
                "testcase",
                classname=f"cases.{result.rule_id}",
                name=result.name,
                time=f"{result.seconds:.3f}",
            )
            if result.failed:
                failures += 1
                ElementTree.SubElement(
                    case, "failure", message=f"{result.outcome}: {result.detail}"
                )
            elif result.outcome == "skipped":
                ElementTree.SubElement(case, "skipped", message=result.detail)
        suite.set("tests", str(len(suite)))
        suite.set("failures", str(failures))
        return ElementTree.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"

"""Audit findings and reports: text for terminals, JSON for tools, JUnit XML for CI.

A report lists findings (a rule broken at a point of a session) and, for the
active suites, case results (one scenario or bad input and its outcome). Every
failed case counts as a finding of its rule (`Report.all_findings`), so the
counts always agree with the verdict. The exit status is 1 when a MUST rule is
broken or the audit is incomplete (it could not see the whole session, e.g. its
own back-end closed it), else 0.
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
_VERDICT_TEXT = {
    "fail": "FAIL (a MUST rule is broken)",
    "incomplete": "INCOMPLETE (the session was cut short: not a pass)",
    "pass": "PASS",
}


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
    #: The active-suite case that found it (None for a recorded session).
    case: str | None = None

    @property
    def rule(self) -> Rule:
        """The rule cited."""
        return rule(self.rule_id)

    def line(self) -> str:
        """One readable line: severity, rule, who, where (case or message), why, and the link."""
        head = f"{self.rule.severity:7} {self.rule_id} {self.side}"
        if self.case is not None:
            where = f"in case {self.case!r}"
            if self.request != "-":
                where += f" ({self.request})"
        else:
            at = f"message #{self.index}" if self.index is not None else "-"
            when = f" t={self.t:.6f}" if self.t is not None else ""
            where = f"{at}{when} {self.request} in {self.state}"
        return f"{head} {where}: {self.detail} (see {self.rule.url})"


@attrs.frozen
class CaseResult:
    """One scenario or bad input of an active suite and how the peer answered it."""

    rule_id: str
    title: str
    outcome: Outcome
    detail: str = ""
    seconds: float = 0.0

    @property
    def name(self) -> str:
        """The case's name in reports (and in its findings): its rule id, then its title."""
        return f"{self.rule_id} {self.title}"

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
    #: Why the audit could not judge the whole session (never a PASS then).
    incomplete: list[str] = attrs.field(factory=list)

    def all_findings(self) -> list[AuditFinding]:
        """The findings, plus one for each failed case that has none of its own rule."""
        have = {(f.case, f.rule_id) for f in self.findings}
        extra = [
            AuditFinding(
                c.rule_id,
                f"{c.outcome}" + (f": {c.detail}" if c.detail else ""),
                side="back-end",
                case=c.name,
            )
            for c in self.cases
            if c.failed and (c.name, c.rule_id) not in have
        ]
        return [*self.findings, *extra]

    def must_broken(self) -> bool:
        """True when any MUST rule was broken (a MUST finding, or a failed MUST case)."""
        return any(f.rule.severity == "MUST" for f in self.all_findings())

    def verdict(self) -> str:
        """``fail`` (a MUST rule broken), ``incomplete`` or ``pass``."""
        if self.must_broken():
            return "fail"
        return "incomplete" if self.incomplete else "pass"

    def exit_status(self) -> int:
        """0 on a pass, 1 when a MUST rule is broken or the audit is incomplete."""
        return 0 if self.verdict() == "pass" else 1

    def render(self, fmt: str) -> str:
        """The report in `fmt` (text, json or junit)."""
        return {"text": self.text, "json": self.json, "junit": self.junit}[fmt]()

    def text(self) -> str:
        """A terminal-friendly summary."""
        out = [f"vhsm audit: {self.title}"]
        for case in self.cases:
            mark = "FAIL" if case.failed else case.outcome
            out.append(
                f"  {mark:16} {case.rule_id:12} {case.title}"
                + (f": {case.detail}" if case.detail else "")
            )
        findings = self.all_findings()
        for finding in findings:
            out.append("  " + finding.line())
        for why in self.incomplete:
            out.append(f"  INCOMPLETE: {why}")
        counts = {sev: 0 for sev in ("MUST", "SHOULD", "INTEROP")}
        for finding in findings:
            counts[finding.rule.severity] += 1
        failed = sum(c.failed for c in self.cases)
        summary = ", ".join(f"{n} {sev}" for sev, n in counts.items())
        out.append(
            f"{plural(len(findings), 'finding')} ({summary})"
            + (f"; {plural(len(self.cases), 'case')}, {failed} failed" if self.cases else "")
            + f"; verdict: {_VERDICT_TEXT[self.verdict()]}"
        )
        return "\n".join(out) + "\n"

    def json(self) -> str:
        """Machine-readable JSON."""
        doc = {
            "title": self.title,
            "verdict": self.verdict(),
            "incomplete": list(self.incomplete),
            "findings": [
                {
                    **attrs.asdict(f),
                    "severity": f.rule.severity,
                    "spec": f.rule.url,
                    "statement": f.rule.statement,
                }
                for f in self.all_findings()
            ],
            "cases": [{"name": c.name, **attrs.asdict(c)} for c in self.cases],
        }
        return json.dumps(doc, indent=2) + "\n"

    def junit(self) -> str:
        """JUnit XML for CI: one test case per case of an active suite, else one per rule.

        A case fails when the peer broke its rule or when a finding of a MUST or
        SHOULD rule was made during it. A recorded session (no cases) has one
        test case per declared rule, failed by its findings.
        """
        suite = ElementTree.Element("testsuite", name=f"vhsm audit: {self.title}")
        failures = skipped = 0
        findings = self.all_findings()
        if self.cases:
            by_case: dict[str | None, list[AuditFinding]] = {}
            for finding in findings:
                by_case.setdefault(finding.case, []).append(finding)
            for result in self.cases:
                case = ElementTree.SubElement(
                    suite,
                    "testcase",
                    classname=f"cases.{result.rule_id}",
                    name=result.name,
                    time=f"{result.seconds:.3f}",
                )
                broken = [f for f in by_case.get(result.name, []) if f.rule.severity != "INTEROP"]
                if result.failed or broken:
                    failures += 1
                    failure = ElementTree.SubElement(
                        case, "failure", message=f"{result.outcome}: {result.detail}"
                    )
                    failure.text = "\n".join(f.line() for f in by_case.get(result.name, []))
                elif result.outcome == "skipped":
                    skipped += 1
                    ElementTree.SubElement(case, "skipped", message=result.detail)
        else:
            by_rule: dict[str, list[AuditFinding]] = {}
            for finding in findings:
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
        if self.incomplete:
            case = ElementTree.SubElement(
                suite, "testcase", classname="audit", name="the whole session was audited"
            )
            failures += 1
            failure = ElementTree.SubElement(case, "failure", message=self.incomplete[0])
            failure.text = "\n".join(self.incomplete)
        suite.set("tests", str(len(suite)))
        suite.set("failures", str(failures))
        suite.set("skipped", str(skipped))
        return ElementTree.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"


def plural(count: int, noun: str) -> str:
    """``1 finding``, ``2 findings``, ``0 findings``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"

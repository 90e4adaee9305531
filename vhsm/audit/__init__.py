"""The compliance auditor: transcripts, trace checking, reports."""

from vhsm.audit.report import AuditFinding, CaseResult, Report
from vhsm.audit.trace import audit_trace
from vhsm.audit.transcript import TraceEntry, load_transcript, parse_lines

__all__ = [
    "AuditFinding",
    "CaseResult",
    "Report",
    "TraceEntry",
    "audit_trace",
    "load_transcript",
    "parse_lines",
]

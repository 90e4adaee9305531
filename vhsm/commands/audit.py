"""`vhsm audit`: check a recorded session (and, live, a peer) against specs/rules.yaml."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vhsm.audit.report import FORMATS, Report
from vhsm.audit.trace import audit_trace
from vhsm.audit.transcript import load_transcript


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `vhsm audit` and its modes."""
    parser = subparsers.add_parser("audit", help="check a front-end or back-end against the spec")
    modes = parser.add_subparsers(dest="mode", metavar="MODE", required=True)
    trace = modes.add_parser("trace", help="replay a transcript (JSON lines) through the machines")
    trace.add_argument("transcript", type=Path, help="transcript file (vhsm record output)")
    add_report_options(trace)
    trace.set_defaults(func=run_trace)


def add_report_options(parser: argparse.ArgumentParser) -> None:
    """The options every audit mode shares: report format and destination."""
    parser.add_argument("--format", choices=FORMATS, default="text", help="report format")
    parser.add_argument("--output", "-o", type=Path, help="write the report here (default stdout)")


def emit(report: Report, args: argparse.Namespace) -> int:
    """Write the report as asked and return the audit's exit status."""
    text = report.render(args.format)
    if args.output is not None:
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return report.exit_status()


def run_trace(args: argparse.Namespace) -> int:
    """Audit one transcript file."""
    return emit(audit_trace(load_transcript(args.transcript), str(args.transcript)), args)

"""`vhsm audit`: check a recorded session (and, live, a peer) against specs/rules.yaml."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from vhsm.audit.report import FORMATS, Report
from vhsm.audit.trace import audit_trace
from vhsm.audit.transcript import load_transcript
from vhsm.errors import VhsmError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `vhsm audit` and its modes."""
    parser = subparsers.add_parser("audit", help="check a front-end or back-end against the spec")
    modes = parser.add_subparsers(dest="mode", metavar="MODE", required=True)
    trace = modes.add_parser("trace", help="replay a transcript (JSON lines) through the machines")
    trace.add_argument("transcript", type=Path, help="transcript file (vhsm record output)")
    add_report_options(trace)
    trace.set_defaults(func=run_trace)

    devices = ("blk", "generic", "net", "rng")
    backend = modes.add_parser(
        "backend",
        help="run the active conformance suite against a live back-end",
        description=(
            "Connect to a back-end listening at --socket again and again with vhsm's "
            "front-end driver: legal scenarios (negotiation orders, renegotiation, memory "
            "replacement, ring cycles, reset, reconnect, a data round trip) and bad "
            "inputs, each breaking one rule of specs/rules.yaml. Every case is named by the rule "
            "it judges (VU-*) and a title. Exit status 1 when a MUST rule is broken."
        ),
    )
    backend.add_argument("--socket", required=True, type=Path, metavar="PATH")
    backend.add_argument(
        "--device",
        choices=(*devices, "vsock"),  # vhsm.audit.probe.DEVICES: vsock has no frontend mode
        default="generic",
        help="device type, for ring set-up and the data round trip (default generic)",
    )
    backend.add_argument(
        "--timeout",
        type=_seconds,
        default=2.0,
        metavar="S",
        help="seconds without an answer before the back-end counts as wedged (default 2)",
    )
    backend.add_argument(
        "--only",
        metavar="RULE",
        help=(
            "run only the cases of rule RULE (VU-RING-002), or of the rules starting with it "
            "(VU-MEM); an alias specs/rules.yaml declares for a rule is resolved to it; other "
            "text selects the cases whose title contains it"
        ),
    )
    add_report_options(backend)
    backend.set_defaults(func=run_backend)

    frontend = modes.add_parser(
        "frontend",
        help="serve a permissive back-end and audit the front-end that connects",
        description=(
            "Listen at --listen as a vhost-user back-end (a reference device or a generic "
            "one offering many features), record every message both ways, and audit the "
            "recording with the trace auditor when the audit ends: after the first "
            "connection with --once, after --timeout seconds, or on SIGINT/SIGTERM."
        ),
    )
    frontend.add_argument("--listen", required=True, type=Path, metavar="PATH")
    frontend.add_argument("--device", choices=devices, default="generic")
    frontend.add_argument(
        "--file", metavar="IMG", help="disk image for --device blk (default: a scratch file)"
    )
    frontend.add_argument(
        "--once", action="store_true", help="end when the first front-end disconnects"
    )
    frontend.add_argument(
        "--timeout", type=_seconds, metavar="S", help="end after S seconds in any case"
    )
    frontend.add_argument("--record", type=Path, metavar="FILE", help="also keep the transcript")
    add_report_options(frontend)
    frontend.set_defaults(func=run_frontend)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"{value} not in (0, 86400]")
    return value


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
    """Audit one transcript file (one with no message is an error, not a pass)."""
    entries = load_transcript(args.transcript)
    if not any(entry.message is not None for entry in entries):
        raise VhsmError(
            f"{args.transcript}: no vhost-user message recorded (empty or truncated transcript)"
        )
    return emit(audit_trace(entries, str(args.transcript)), args)


def run_backend(args: argparse.Namespace) -> int:
    """Run the active suite; progress lines on stderr in text format."""
    from vhsm.audit.backend_suite import run_suite
    from vhsm.audit.report import CaseResult

    def progress(number: int, total: int, result: CaseResult) -> None:
        mark = "FAIL" if result.failed else result.outcome
        print(
            f"[{number:3}/{total}] {mark:16} {result.name} ({result.seconds:.2f}s)",
            file=sys.stderr,
            flush=True,
        )

    if not args.socket.exists():
        raise VhsmError(f"no socket at {args.socket}")
    report = run_suite(
        args.socket,
        args.device,
        timeout=args.timeout,
        progress=progress if args.format == "text" else None,
        only=args.only,
    )
    return emit(report, args)


def run_frontend(args: argparse.Namespace) -> int:
    """Serve, record, and audit the front-end's messages when the audit ends."""
    import signal
    import threading
    import time

    from vhsm.audit.frontend_mode import FrontendAudit

    if not args.listen.parent.is_dir():
        raise VhsmError(f"cannot listen at {args.listen}: no directory {args.listen.parent}")
    if args.file is not None and args.device != "blk":
        raise VhsmError("--file is only for --device blk")
    if args.file is not None and not Path(args.file).exists():
        raise VhsmError(f"image {args.file} does not exist")

    def event(line: dict[str, Any]) -> None:
        if line.get("event") in ("open", "close") and line.get("channel") is None:
            extra = f" by {line['by']}: {line['why']}" if line["event"] == "close" else ""
            print(f"connection {line.get('conn')} {line['event']}{extra}", file=sys.stderr)

    stop: list[str] = []
    main_thread = threading.current_thread() is threading.main_thread()
    old: dict[int, Any] = {}
    if main_thread:
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, lambda signum, frame: stop.append(str(signum)))
    audit = FrontendAudit(
        args.listen, args.device, image=args.file, once=args.once, record=args.record,
        on_event=event,
    )  # fmt: skip
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    try:
        audit.start()
        while not stop and not audit.wait(0.2):
            if deadline is not None and time.monotonic() >= deadline:
                break
    finally:
        audit.stop()
        for signum, handler in old.items():
            signal.signal(signum, handler)
    return emit(audit.report(), args)

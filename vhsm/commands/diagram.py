"""`vhsm diagram`: draw the protocol machines, or a recorded session as a sequence diagram.

Machines: ``session`` (the overview: one region per machine, the set-up order
and how the phase is derived), each machine of ``specs/session.yaml``
(ownership, features, protocol_features, memory, backend_channel, inflight,
device_state, vring, status, device), or ``all``. Without ``--out`` one
document goes to stdout (the overview by default); ``--out DIR`` writes every
machine. Formats: mermaid (``.mmd``, no extra program), dot (Graphviz source),
svg and png (rendered by Graphviz's ``dot`` program; png never goes to a
terminal); ``all`` writes mermaid, dot and svg, which is what ``diagrams/``
holds (``make diagrams``). ``--trace`` reads a
transcript (tests/data/README.md) and writes ``<name>-sequence.mmd``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from vhsm import diagram
from vhsm.audit.transcript import load_transcript
from vhsm.diagram_trace import trace_sequence
from vhsm.errors import VhsmError

#: The command that regenerates the committed diagrams.
REGENERATE = "vhsm diagram --format all --out diagrams"


def register(subparsers: Any) -> None:
    """Add the `diagram` sub-command."""
    parser = subparsers.add_parser(
        "diagram",
        help="draw the session's machines (or a transcript as a sequence diagram)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Plain strings, checked by `run`: an unknown name is a one-line error, not a usage dump.
    parser.add_argument(
        "--format",
        default="mermaid",
        metavar="FORMAT",
        help="mermaid (default), dot, svg, png, or all (= mermaid + dot + svg)",
    )
    parser.add_argument(
        "--machine",
        default=None,
        metavar="MACHINE",
        help="session (the overview, default), one machine of specs/session.yaml, or all",
    )
    parser.add_argument(
        "--out", type=Path, metavar="DIR", help="write files into DIR instead of stdout"
    )
    parser.add_argument(
        "--trace",
        type=Path,
        metavar="FILE.jsonl",
        help="draw this transcript as a mermaid sequence diagram with the state changes",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the requested diagrams; return the exit status."""
    formats = diagram.check_format(args.format)
    if args.trace is not None:
        return _run_trace(args, formats)
    # On stdout one document only (two back to back are not a valid diagram): the
    # overview unless a machine is named; --out DIR writes every machine by default.
    default = "session" if args.out is None else "all"
    machines = diagram.check_machine(args.machine or default)
    if args.out is None and len(formats) * len(machines) > 1:
        raise VhsmError("several diagrams make several files: give --out DIR (or one --machine)")
    if args.out is None and formats[0] == "png" and sys.stdout.isatty():
        raise VhsmError("png is binary: give --out DIR or redirect the output to a file")
    if any(fmt in ("svg", "png") for fmt in formats):
        diagram.dot_program()  # fail before writing anything when dot is missing
    outputs = [
        (diagram.file_name(machine, fmt), diagram.render(machine, fmt))
        for machine in machines
        for fmt in formats
    ]
    if args.out is None:
        _print(outputs)
    else:
        _write(args.out, outputs)
    return 0


def _run_trace(args: argparse.Namespace, formats: list[str]) -> int:
    if formats != ["mermaid"]:
        raise VhsmError("--trace draws a mermaid sequence diagram: use --format mermaid")
    if args.machine is not None:
        raise VhsmError("--machine does not apply to --trace (the session machine annotates it)")
    text = trace_sequence(load_transcript(args.trace), title=args.trace.name)
    outputs = [(f"{args.trace.stem}-sequence.mmd", text.encode("utf-8"))]
    if args.out is None:
        _print(outputs)
    else:
        _write(args.out, outputs)
    return 0


def _print(outputs: list[tuple[str, bytes]]) -> None:
    stream = sys.stdout.buffer
    for _name, data in outputs:
        stream.write(data)
    stream.flush()


def _write(out: Path, outputs: list[tuple[str, bytes]]) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, data in outputs:
            (out / name).write_bytes(data)
    except OSError as exc:
        raise VhsmError(f"cannot write into {out}: {exc.strerror}") from None
    for name, _data in outputs:
        print(out / name)

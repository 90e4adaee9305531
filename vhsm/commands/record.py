"""`vhsm record`: relay a front-end to a back-end and write the session as a transcript."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable
from enum import IntFlag
from pathlib import Path
from types import FrameType
from typing import Any

from vhsm.errors import VhsmError
from vhsm.wire import BlkFeature, NetFeature

log = logging.getLogger(__name__)

#: Device names whose feature bits the transcript's ``decoded`` fields spell out.
DEVICE_FEATURES: dict[str, tuple[type[IntFlag], ...]] = {
    "blk": (BlkFeature,),
    "net": (NetFeature,),
    "rng": (),
    "generic": (),
}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `vhsm record`."""
    parser = subparsers.add_parser(
        "record",
        help="relay a front-end to a back-end, recording every message (JSON lines)",
        description=(
            "Listen at --listen for a front-end (e.g. QEMU's chardev path), connect each "
            "front-end connection to the back-end listening at --connect, pass every "
            "message and fd through unchanged (the back-end request channel too) and "
            "write one transcript line per message to --out."
        ),
    )
    parser.add_argument(
        "--listen", required=True, type=Path, metavar="A", help="socket to listen on"
    )
    parser.add_argument(
        "--connect", required=True, type=Path, metavar="B", help="the back-end's socket"
    )
    parser.add_argument(
        "--out", required=True, metavar="FILE.jsonl", help="transcript file ('-' for stdout)"
    )
    parser.add_argument(
        "--once", action="store_true", help="exit when the first front-end connection ends"
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds to retry the back-end for each connection (default 5)",
    )
    parser.add_argument(
        "--device",
        choices=sorted(DEVICE_FEATURES),
        default="generic",
        help="name this device type's feature bits in the transcript",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Relay until SIGINT/SIGTERM (or the first connection's end with --once)."""
    from vhsm.audit.record import Relay

    if not args.listen.parent.is_dir():
        raise VhsmError(f"cannot listen at {args.listen}: no directory {args.listen.parent}")
    out: Any = sys.stdout if args.out == "-" else args.out
    if out is not sys.stdout:
        try:
            Path(out).open("a").close()
        except OSError as exc:
            raise VhsmError(f"cannot write {out}: {exc.strerror or exc}") from None
    relay = Relay(
        args.listen,
        args.connect,
        out,
        once=args.once,
        connect_timeout=args.connect_timeout,
        device_features=DEVICE_FEATURES[args.device],
    )
    why: list[str] = []
    restore = _install_signals(why.append)
    try:
        relay.start()
        while not relay.wait(0.2) and not why:
            pass
    finally:
        relay.stop(f"signal {why[0]}" if why else "once: first connection ended")
        restore()
    return 0


def _install_signals(stop: Callable[[str], object]) -> Callable[[], None]:
    """Route SIGINT/SIGTERM to `stop` (main thread only); return the restorer."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: FrameType | None) -> None:
        stop(signal.Signals(signum).name)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, previous in old.items():
            signal.signal(sig, previous)

    return restore

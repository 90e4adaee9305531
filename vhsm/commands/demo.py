"""`vhsm demo`: a reference device and the Python front-end talking, with a live transcript.

Starts `RngBackend` (or `BlkBackend` on a temporary image) in a daemon thread
on a temporary socket, drives it with `vhsm.frontend.Frontend`, and prints
every message (direction, name, decoded payload), every state change of the
session and ring machines, and the I/O results. No VM, no root, a few seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from enum import IntFlag
from pathlib import Path
from typing import IO, Any

from vhsm.backend import VhostUserBackend
from vhsm.frontend import BlkDevice, Frontend, RngDevice
from vhsm.wire import BlkFeature, Channel, request_spec

#: Size of the demo's blk image (1 MiB).
IMAGE_SIZE = 1 << 20
_SUMMARY_WIDTH = 96


def register(subparsers: Any) -> None:
    """Add the ``demo`` sub-command."""
    parser = subparsers.add_parser(
        "demo",
        help="run a reference device against the Python front-end, printing a live transcript",
        description=__doc__,
    )
    parser.add_argument("--device", choices=["rng", "blk"], default="rng", help="device to run")
    parser.add_argument("--packed", action="store_true", help="use packed virtqueues")
    parser.add_argument("--record", metavar="FILE", help="also write the JSON-lines transcript")
    parser.set_defaults(func=run)


class _Printer:
    """Prints transcript lines and state changes, one thread at a time, in arrival order."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.lock = threading.Lock()

    def line(self, text: str) -> None:
        with self.lock:
            print(text, file=self.out, flush=True)

    def record(self, rec: dict[str, Any]) -> None:
        if "event" in rec:
            what = "back-end channel" if rec.get("channel") == "backend" else "connection"
            extra = f" by {rec['by']} ({rec.get('why', '')})" if "by" in rec else ""
            self.line(f"{rec['t']:8.4f}  ---  {what} {rec['conn']} {rec['event']}{extra}")
            return
        arrow = "F>B" if rec.get("dir") == "F>B" else "B>F"
        channel = " [backend channel]" if rec.get("channel") == "backend" else ""
        kind = "reply" if rec.get("reply") else ("+ack" if rec.get("need_reply") else "")
        fds = f"+{rec['nfds']} fd" if rec.get("nfds") else ""
        summary = _summary(rec.get("decoded"))
        if rec.get("reply") and _is_ack(rec):
            value = int.from_bytes(bytes.fromhex(rec["payload"]), "little")
            summary = "ack: ok" if value == 0 else f"NACK ({value})"
        name = rec.get("name", "?")
        self.line(
            f"{rec['t']:8.4f}  {arrow}  {name:<22}{kind:<8}{fds:<7}{summary}{channel}".rstrip()
        )

    def state(self, machine: str, index: int | None, old: str, new: str, trigger: str) -> None:
        where = "session" if machine == "session" else f"ring {index}"
        self.line(f"{'':8}        {where}: {old} -> {new}  (on {trigger.upper()})")


def _is_ack(rec: dict[str, Any]) -> bool:
    """Whether a reply record is a REPLY_ACK u64 (not an explicit reply body)."""
    spec = request_spec(int(rec.get("req", 0)), Channel.MAIN)
    return spec is not None and spec.reply == "ack" and rec.get("size") == 8


def _summary(decoded: Any) -> str:
    """One short line from a record's ``decoded`` helper."""
    if not decoded:
        return ""
    if isinstance(decoded, dict):
        if "bits" in decoded:
            text = f"{decoded.get('u64')} = " + "|".join(decoded["bits"] or ["0"])
        else:
            parts = []
            for key, value in decoded.items():
                if key == "regions" and isinstance(value, list):
                    value = ", ".join(
                        f"gpa {r.get('guest_phys_addr')} size {r.get('memory_size')}" for r in value
                    )
                    value = f"[{value}]"
                elif isinstance(value, list):
                    value = f"[{len(value)} item(s)]"
                elif isinstance(value, dict):
                    value = "{" + ", ".join(f"{k}={v}" for k, v in value.items()) + "}"
                parts.append(f"{key}={value}")
            text = " ".join(parts)
    else:
        text = str(decoded)
    return text if len(text) <= _SUMMARY_WIDTH else text[: _SUMMARY_WIDTH - 3] + "..."


def _make_backend(device: str, workdir: Path) -> tuple[VhostUserBackend, tuple[type[IntFlag], ...]]:
    if device == "blk":
        from vhsm.devices.blk import BlkBackend

        image = workdir / "disk.img"
        with open(image, "wb") as f:
            f.truncate(IMAGE_SIZE)
        return BlkBackend(str(image), serial="vhsm-demo"), (BlkFeature,)
    from vhsm.devices.rng import RngBackend

    return RngBackend(), ()


def _drive(fe: Frontend, device: str, say: Callable[[str], None]) -> bool:
    """Run the device's I/O; return whether every check passed."""
    if device == "rng":
        rng = RngDevice(fe)
        data = rng.read(32)
        more = rng.read(16, indirect=True)
        say(f"rng: read {len(data)} bytes: {data.hex()}")
        say(f"rng: read {len(more)} bytes through an indirect table: {more.hex()}")
        return len(data) == 32 and len(more) == 16 and data != bytes(32)
    blk = BlkDevice(fe)
    ident = blk.get_id()
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(4096))
    blk.write(8, pattern)
    blk.flush()
    back = blk.read(8, 8)
    say(f"blk: GET_ID = {ident.decode(errors='replace')!r}")
    verdict = "match" if back == pattern else "MISMATCH"
    say(f"blk: wrote 4096 bytes at sector 8, flushed, read them back: {verdict}")
    return back == pattern


def run(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    """Run the demo; exit status 0 when the I/O checks passed."""
    from vhsm.daemon import Listener, VhostUserDaemon

    printer = _Printer(out or sys.stdout)
    say = printer.line
    workdir = Path(tempfile.mkdtemp(prefix="vhsm-demo-"))
    path = workdir / f"{args.device}.sock"
    backend, device_features = _make_backend(args.device, workdir)
    daemon = VhostUserDaemon(f"demo-{args.device}", backend)
    daemon.session_listeners.append(printer.state)
    daemon.start(Listener(path))
    say(f"vhsm demo: virtio-{args.device} back-end ({type(backend).__name__}) serving {path}")
    say("    time  dir  request               kind    fds    payload (decoded)")
    ok = False
    fe: Frontend | None = None
    try:
        fe = Frontend.connect(path, device_features=device_features, record_path=args.record)
        fe.recorder.listeners.append(printer.record)
        fe.start(queues=1, size=64, packed=args.packed)
        layout = "packed" if fe.packed else "split"
        note = " (the device does not offer RING_PACKED)" if args.packed and not fe.packed else ""
        say(f"--- device ready ({layout} rings{note}): I/O ---")
        ok = _drive(fe, args.device, say)
        say("--- stopping ring 0 and disconnecting ---")
        base = fe.stop_vring(0)
        say(f"ring 0 stopped at base {base:#x}")
        fe.disconnect()
    finally:
        if fe is not None:
            fe.close()
        daemon.stop()
        close = getattr(backend, "close", None)
        if callable(close):
            close()
        shutil.rmtree(workdir, ignore_errors=True)
    count = len(fe.transcript) if fe is not None else 0
    say(f"vhsm demo: {count} transcript lines; I/O {'OK' if ok else 'FAILED'}")
    if args.record:
        say(f"transcript written to {os.path.abspath(args.record)}")
    return 0 if ok else 1

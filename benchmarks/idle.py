"""Resident memory of idle daemons: `vhsm serve blk` beside qemu-storage-daemon.

Each back-end exports the same raw image as vhost-user-blk (the commands of
`vhsm bench blk`). Measured from /proc once each daemon's socket exists and
``--settle`` seconds have passed:

* ``idle``: nothing connected (a daemon waiting for its VM);
* ``served``: a front-end (vhsm's own driver, in this process) connected, queue 0
  started, ``--requests`` 4 KiB reads and writes done, and still connected;
* ``--daemons N``: N daemons of each kind at once, idle, their sum.

Per daemon: VmRSS (what ``ps`` shows), its anonymous part (private to the
process) and PSS from /proc/PID/smaps_rollup (shared pages split between the
processes that map them: the fair share of N daemons on one host).

Run: .venv/bin/python benchmarks/idle.py [--daemons 64] [--settle 3]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import benchlib
from blk import BlkLoad, backend_command, connect, make_image

KINDS = ("vhsm", "qsd")
NAMES = {"vhsm": "vhsm serve blk", "qsd": "qemu-storage-daemon"}


@dataclass
class Memory:
    """Resident memory of one process or a sum of them, in KiB."""

    rss: int = 0
    anon: int = 0
    pss: int = 0

    def __add__(self, other: Memory) -> Memory:
        return Memory(self.rss + other.rss, self.anon + other.anon, self.pss + other.pss)


def memory_of(pid: int) -> Memory:
    """VmRSS, RssAnon (/proc/PID/status) and Pss (/proc/PID/smaps_rollup) of ``pid``."""
    status = Path(f"/proc/{pid}/status").read_text()
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()

    def field(text: str, name: str) -> int:
        found = re.search(rf"^{name}:\s+(\d+) kB", text, re.MULTILINE)
        return int(found.group(1)) if found else 0

    return Memory(field(status, "VmRSS"), field(status, "RssAnon"), field(rollup, "Pss"))


@contextmanager
def daemon(kind: str, image: Path, workdir: Path, tag: str) -> Iterator[tuple[int, Path]]:
    """One back-end process serving ``image``; yields (pid, socket)."""
    sock = workdir / f"{tag}.sock"
    sock.unlink(missing_ok=True)
    proc = benchlib.spawn(backend_command(kind, sock, image), workdir / f"{tag}-{kind}.log")
    try:
        benchlib.wait_for_socket(sock, proc)
        yield proc.pid, sock
    finally:
        benchlib.stop(proc, timeout=5)


def one(kind: str, image: Path, workdir: Path, settle: float, requests: int) -> tuple[Memory, ...]:
    """(idle, served) memory of one daemon of ``kind``."""
    with daemon(kind, image, workdir, f"one-{kind}") as (pid, sock):
        time.sleep(settle)
        idle = memory_of(pid)
        fe, vq = connect(sock, 64)
        try:
            load = BlkLoad(fe, vq, 4, image.stat().st_size // 4096)
            done = 0
            while done < requests:
                done += load.run(0.05)[0]
            time.sleep(settle)
            served = memory_of(pid)
        finally:
            fe.close()
    return idle, served


def many(kind: str, n: int, workdir: Path, settle: float) -> Memory:
    """The sum over ``n`` idle daemons of ``kind``.

    Each daemon has its own sparse image (qemu-storage-daemon locks the file it writes).
    """
    images = []
    for i in range(n):
        images.append(workdir / f"many-{i}.img")
        with open(images[-1], "wb") as f:
            os.ftruncate(f.fileno(), 8 << 20)
    with ExitStack() as stack:
        pids = [
            stack.enter_context(daemon(kind, images[i], workdir, f"many-{kind}-{i}"))[0]
            for i in range(n)
        ]
        time.sleep(settle)
        total = Memory()
        for pid in pids:
            total = total + memory_of(pid)
    return total


def mib(kib: int) -> str:
    """KiB as MiB with one decimal."""
    return f"{kib / 1024:.1f}"


def report(rows: Sequence[tuple[str, dict[str, Memory]]], kinds: Sequence[str]) -> list[str]:
    """One line per measured state: each back-end's RSS / anonymous / PSS in MiB."""
    head = f"{'state':22s}" + "".join(f" {NAMES[k] + ' RSS/anon/PSS MiB':>40s}" for k in kinds)
    lines = [f"machine: {benchlib.machine()}", head]
    for state, mems in rows:
        cells = "".join(
            f" {f'{mib(mems[k].rss)} / {mib(mems[k].anon)} / {mib(mems[k].pss)}':>40s}"
            for k in kinds
        )
        lines.append(f"{state:22s}{cells}")
    if "vhsm" in kinds and "qsd" in kinds:
        ratios = [
            f"{state}: {mems['vhsm'].rss / mems['qsd'].rss:.2f}x"
            for state, mems in rows
            if mems["qsd"].rss
        ]
        lines.append("vhsm / qemu-storage-daemon RSS: " + ", ".join(ratios))
    return lines


def build_parser() -> argparse.ArgumentParser:
    """Command-line options (shared with `vhsm bench idle`)."""
    ap = argparse.ArgumentParser(
        prog="vhsm bench idle", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--settle", type=float, default=3.0, help="seconds before measuring")
    ap.add_argument("--requests", type=int, default=200, help="I/O requests of the served state")
    ap.add_argument("--daemons", type=int, default=64, help="daemons at once (0: skip)")
    ap.add_argument("--backends", default=",".join(KINDS), help="vhsm,qsd")
    ap.add_argument("--workdir", type=Path, help="keep the image, logs and sockets here")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print the table (qemu-storage-daemon is skipped, with a note, if missing)."""
    args = build_parser().parse_args(argv)
    kinds = tuple(k for k in args.backends.split(",") if k)
    why = benchlib.missing("qemu-storage-daemon")
    if why is not None and "qsd" in kinds:
        print(f"idle benchmark: {why}; measuring vhsm only", file=sys.stderr)
        kinds = tuple(k for k in kinds if k != "qsd")
    rows: list[tuple[str, dict[str, Memory]]] = [("idle", {}), ("served", {})]
    with tempfile.TemporaryDirectory(prefix="vhsm-bench-idle-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        image = workdir / "disk.img"
        make_image(image, 8 << 20)
        for kind in kinds:
            rows[0][1][kind], rows[1][1][kind] = one(
                kind, image, workdir, args.settle, args.requests
            )
        if args.daemons > 0:
            rows.append((f"{args.daemons} idle daemons", {}))
            for kind in kinds:
                rows[2][1][kind] = many(kind, args.daemons, workdir, args.settle)
    for line in report(rows, kinds):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

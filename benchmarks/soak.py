#!/usr/bin/env python3
"""Soak: many connect/disconnect cycles and a long I/O run against in-process daemons.

    .venv/bin/python benchmarks/soak.py                      # 10,000 cycles + 10 min of I/O
    .venv/bin/python benchmarks/soak.py --cycles 500 --io-seconds 20
    .venv/bin/python benchmarks/soak.py --json soak.json

Phase 1 (``--cycles``): a front-end connects to an rng daemon, negotiates,
sends the memory table, starts a ring, reads 64 random bytes and disconnects;
the next connects at once (a connection refused because the daemon had not yet
noticed the last one's end is retried and counted).
Phase 2 (``--io-seconds``): a blk daemon over a temp image serves writes and
read-backs (verified) continuously. Both phases sample the process's fd count
and RSS; at the end every daemon is stopped and the threads still alive are
listed. Exit status 1 when the fd count grew, a thread was left behind or a
read-back differed. The RSS figures are printed for a person to judge (the
first samples include warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from vhsm.daemon import Listener, VhostUserDaemon
from vhsm.devices.blk import BlkBackend
from vhsm.devices.rng import RngBackend
from vhsm.frontend import BlkDevice, Frontend, RngDevice
from vhsm.transport import PeerClosed


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def wait_idle(daemon: VhostUserDaemon, timeout: float = 10.0) -> None:
    """Wait until the daemon reset the last session (its control thread ended)."""
    deadline = time.monotonic() + timeout
    while daemon.serving or any(
        t.is_alive() and t.name.endswith("-control") for t in getattr(daemon, "_threads", [])
    ):
        if time.monotonic() > deadline:
            raise RuntimeError("daemon did not finish the session")
        time.sleep(0.001)


def cycles(directory: Path, n: int, samples: int, quiet: bool) -> dict[str, Any]:
    """Phase 1: `n` connect / set-up / one request / disconnect cycles."""
    daemon = VhostUserDaemon("soak-rng", RngBackend())
    path = directory / "rng.sock"
    daemon.start(Listener(path))
    points: list[dict[str, float]] = []
    every = max(1, n // samples)
    refused = 0
    start = time.monotonic()
    try:
        for i in range(n):
            while True:
                with Frontend.connect(path, timeout=10.0) as fe:
                    try:
                        fe.start(queues=1, size=64)
                    except PeerClosed:  # refused: the last session was still ending
                        refused += 1
                        continue
                    if len(RngDevice(fe).read(64)) == 0:
                        raise RuntimeError("rng returned nothing")
                    break
            if (i + 1) % every == 0 or i == 0:
                wait_idle(daemon)
                point: dict[str, float] = {"cycle": i + 1, "fds": open_fds(), "rss_kib": rss_kib()}
                point["seconds"] = round(time.monotonic() - start, 1)
                points.append(point)
                if not quiet:
                    print(f"  cycle {i + 1}: fds {point['fds']} rss {point['rss_kib']} KiB")
    finally:
        daemon.stop()
    return {"cycles": n, "samples": points, "connections": daemon.connections, "refused": refused}


def io_run(directory: Path, seconds: float, samples: int, quiet: bool) -> dict[str, Any]:
    """Phase 2: verified blk writes and reads for `seconds`."""
    image = directory / "disk.img"
    with image.open("wb") as f:
        f.truncate(16 << 20)
    backend = BlkBackend(str(image))
    daemon = VhostUserDaemon("soak-blk", backend)
    path = directory / "blk.sock"
    daemon.start(Listener(path))
    points: list[dict[str, float]] = []
    requests = mismatches = 0
    start = time.monotonic()
    every = seconds / max(1, samples)
    next_sample = 0.0
    try:
        with Frontend.connect(path, timeout=10.0) as fe:
            fe.start(queues=1, size=128)
            blk = BlkDevice(fe)
            sectors = (16 << 20) // 512
            while True:
                elapsed = time.monotonic() - start
                if elapsed >= next_sample:
                    point = {"seconds": round(elapsed, 1), "requests": requests}
                    point.update(fds=open_fds(), rss_kib=rss_kib())
                    points.append(point)
                    if not quiet:
                        print(
                            f"  {elapsed:6.0f} s: {requests} requests, fds {point['fds']} "
                            f"rss {point['rss_kib']} KiB"
                        )
                    next_sample += every
                if elapsed >= seconds:
                    break
                sector = (requests * 8) % (sectors - 8)
                data = (requests.to_bytes(8, "little") * 512)[: 8 * 512]
                blk.write(sector, data)
                if blk.read(sector, 8) != data:
                    mismatches += 1
                requests += 2
    finally:
        daemon.stop()
        backend.close()
    return {"seconds": seconds, "requests": requests, "mismatches": mismatches, "samples": points}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0] if __doc__ else "")
    parser.add_argument("--cycles", type=int, default=10_000, help="connect/disconnect cycles")
    parser.add_argument("--io-seconds", type=float, default=600.0, help="length of the I/O run")
    parser.add_argument("--samples", type=int, default=10, help="fd/RSS samples per phase")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    threads_before = {t.ident for t in threading.enumerate()}
    fds_before = open_fds()
    with tempfile.TemporaryDirectory(prefix="vhsm-soak-", dir="/tmp") as tmp:
        directory = Path(tmp)
        print(f"phase 1: {args.cycles} connect/disconnect cycles")
        phase1 = cycles(directory, args.cycles, args.samples, args.quiet)
        print(f"phase 2: {args.io_seconds:g} s of blk I/O")
        phase2 = io_run(directory, args.io_seconds, args.samples, args.quiet)
    left = [t.name for t in threading.enumerate() if t.ident not in threads_before]
    fds_after = open_fds()
    report = {
        "cycles": phase1,
        "io": phase2,
        "fds_before": fds_before,
        "fds_after": fds_after,
        "threads_left": left,
    }
    s1, s2 = phase1["samples"], phase2["samples"]
    print(
        f"cycles: fds {s1[0]['fds']} -> {s1[-1]['fds']}, "
        f"RSS {s1[0]['rss_kib']} -> {s1[-1]['rss_kib']} KiB over {phase1['cycles']} cycles "
        f"({s1[-1]['seconds']} s); {phase1['refused']} immediate reconnects refused"
    )
    print(
        f"io: {phase2['requests']} requests, {phase2['mismatches']} mismatches, "
        f"fds {s2[0]['fds']} -> {s2[-1]['fds']}, RSS {s2[0]['rss_kib']} -> {s2[-1]['rss_kib']} KiB"
    )
    print(f"fds before {fds_before}, after {fds_after}; threads left after stop(): {left}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    bad = fds_after != fds_before or left or phase2["mismatches"]
    bad = bad or s1[-1]["fds"] != s1[0]["fds"] or s2[-1]["fds"] != s2[0]["fds"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

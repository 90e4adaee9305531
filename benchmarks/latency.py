"""Round trip of one request at queue depth 1: kick -> used element -> call, for rng and blk.

The front-end (vhsm.frontend, this process, pinned to one CPU) posts one chain,
writes the kick eventfd, blocks in poll() on the call eventfd and reads the used
element; the time from just before the kick to just after the used element is read
is one sample. Back-ends (pinned to the other CPU): `vhsm serve rng`, `vhsm serve
blk`, and qemu-storage-daemon's vhost-user-blk export on the same image (when
installed). Prints median and p99 (microseconds) per back-end, alternating runs.

Run: .venv/bin/python benchmarks/latency.py [--requests 5000] [--runs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import select
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import benchlib
import blk

from vhsm.frontend import VIRTIO_BLK_T_IN, Frontend, FrontendMemory, Virtqueue

TARGETS = ("rng/vhsm", "blk/vhsm", "blk/qsd")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def round_trip(vq: Virtqueue, poller: select.poll) -> int:
    """Kick, wait for the call, reap the used element; nanoseconds (call posted already)."""
    drv = vq.driver
    t0 = time.perf_counter_ns()
    os.eventfd_write(vq.kick_fd, 1)
    while True:
        got = drv.get_used()
        if got is not None:
            t1 = time.perf_counter_ns()
            break
        if drv.enable_interrupts():
            continue
        if not poller.poll(5000):
            raise TimeoutError(f"ring {vq.index}: no used buffer within 5 s")
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(vq.call_fd)
    return t1 - t0


def sample(kind: str, sock: Path, requests: int) -> list[float]:
    """``requests`` round trips (after 200 warm-up ones), in microseconds."""
    fe = Frontend.connect(sock, memory=FrontendMemory(((0, 4 << 20),)), timeout=10.0)
    try:
        fe.start(queues=[0], size=64)
        vq = fe.vring(0)
        mem = fe.memory
        poller = select.poll()
        poller.register(vq.call_fd, select.POLLIN)
        if kind == "rng":
            buf = mem.alloc(64)
            readable: list[tuple[int, int]] = []
            writable = [(buf, 64)]
        else:
            hdr, data, status = mem.alloc(16), mem.alloc(4096, align=4096), mem.alloc(1)
            mem.write(hdr, blk.HEADER.pack(VIRTIO_BLK_T_IN, 0, 8))
            readable = [(hdr, 16)]
            writable = [(data, 4096), (status, 1)]
        out: list[float] = []
        for i in range(requests + 200):
            vq.driver.add_chain(readable, writable)
            ns = round_trip(vq, poller)
            if i >= 200:
                out.append(ns / 1000)
        return out
    finally:
        fe.close()


def one_run(target: str, image: Path, requests: int, workdir: Path, tag: str) -> list[float]:
    """Serve ``target`` ("rng/vhsm", "blk/vhsm", "blk/qsd") and sample it."""
    device, backend = target.split("/")
    _, be_cpu = benchlib.placement()
    sock = workdir / f"{tag}.sock"
    sock.unlink(missing_ok=True)
    if device == "rng":
        cmd = [*benchlib.vhsm_command(), "serve", "rng", "--socket", str(sock), *blk.vhsm_options()]
    else:
        cmd = blk.backend_command(backend, sock, image)
    proc = benchlib.spawn(benchlib.pinned(cmd, be_cpu), workdir / f"{tag}.log")
    try:
        benchlib.wait_for_socket(sock, proc)
        with blk.frontend_cpu():
            return sample(device, sock, requests)
    finally:
        benchlib.stop(proc, timeout=5)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options (shared with `vhsm bench latency`)."""
    ap = argparse.ArgumentParser(
        prog="vhsm bench latency",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    ap.add_argument("--requests", type=int, default=5000, help="round trips per run")
    ap.add_argument("--runs", type=int, default=3, help="runs per back-end")
    ap.add_argument("--targets", default=",".join(TARGETS), help=",".join(TARGETS))
    ap.add_argument("--workdir", type=Path, help="keep the image, logs and sockets here")
    blk.add_busy_poll_option(ap)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print median / p99 per back-end."""
    args = build_parser().parse_args(argv)
    blk.BUSY_POLL_US = args.busy_poll_us
    targets = [t for t in args.targets.split(",") if t]
    why = benchlib.missing("qemu-storage-daemon")
    if why is not None and "blk/qsd" in targets:
        print(f"latency benchmark: {why}; skipping blk/qsd", file=sys.stderr)
        targets.remove("blk/qsd")
    samples: dict[str, list[float]] = {t: [] for t in targets}
    failures: dict[str, int] = dict.fromkeys(targets, 0)
    with tempfile.TemporaryDirectory(prefix="vhsm-bench-lat-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        image = workdir / "disk.img"
        blk.make_image(image, 16 << 20)
        n = 0
        for r in range(args.runs):
            for target in targets:
                n += 1
                try:
                    got = one_run(target, image, args.requests, workdir, f"l{n}")
                except (RuntimeError, OSError, TimeoutError) as err:
                    failures[target] += 1
                    print(f"  {target} run {r + 1}: FAILED {err}", file=sys.stderr)
                    continue
                samples[target].extend(got)
                print(
                    f"  {target} run {r + 1}: median {statistics.median(got):.1f} us",
                    file=sys.stderr,
                    flush=True,
                )
    fe_cpu, be_cpu = benchlib.placement()
    print(f"machine: {benchlib.machine()}")
    print(f"placement: front-end on CPU {fe_cpu}, back-end on CPU {be_cpu}; queue depth 1")
    print(f"{'target':10s} {'samples':>8s} {'median us':>10s} {'p99 us':>8s}")
    for target in targets:
        vals = samples[target]
        fail = f"  ({failures[target]} runs failed)" if failures[target] else ""
        med = statistics.median(vals) if vals else 0.0
        print(f"{target:10s} {len(vals):8d} {med:10.1f} {percentile(vals, 99):8.1f}{fail}")
    return 0 if any(samples.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""4 KiB random reads and writes through `vhsm serve blk` and `qemu-storage-daemon`.

The front-end is vhsm's own driver (vhsm.frontend) in this process: it keeps
``--depth`` requests in flight (1 and 32 by default), half reads and half writes
at random 4 KiB-aligned offsets of one image file shared by both back-ends, and
counts completed requests per second. The back-end's CPU seconds per million
requests come from /proc/PID/stat (utime + stime, every thread). Runs alternate
between the two back-ends. The front-end and back-end are pinned to different CPUs.

Run: .venv/bin/python benchmarks/blk.py [--seconds 5] [--runs 3] [--depths 1,32]
"""

from __future__ import annotations

import argparse
import os
import random
import select
import struct
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import benchlib

from vhsm.commands.serve import busy_poll_micros
from vhsm.frontend import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, Frontend, FrontendMemory, Virtqueue

BLOCK = 4096
HEADER = struct.Struct("<IIQ")
BACKENDS = ("vhsm", "qsd")
#: `vhsm serve --busy-poll-us` for vhsm back-ends (None: the device's default, off).
BUSY_POLL_US: int | None = None
IMAGE_SIZE = 64 << 20


@dataclass
class Slot:
    """Guest buffers of one in-flight request: header, 4 KiB data, status byte."""

    hdr: int
    data: int
    status: int


@dataclass
class Outcome:
    """One run: requests done, seconds, back-end CPU seconds."""

    requests: int
    seconds: float
    cpu: float

    @property
    def rate(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_per_million(self) -> float:
        """Back-end CPU seconds per million requests."""
        return self.cpu / self.requests * 1e6 if self.requests else 0.0


@dataclass
class Result:
    """Every run of one back-end at one depth."""

    outcomes: list[Outcome] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def make_image(path: Path, size: int = IMAGE_SIZE) -> None:
    """A raw image of random bytes (so reads move real data, not holes)."""
    with open(path, "wb") as f:
        for _ in range(size // (1 << 20)):
            f.write(os.urandom(1 << 20))


def vhsm_options() -> list[str]:
    """Options every `vhsm serve` of this benchmark gets (its busy-poll window)."""
    return [] if BUSY_POLL_US is None else ["--busy-poll-us", str(BUSY_POLL_US)]


def add_busy_poll_option(ap: argparse.ArgumentParser) -> None:
    """The ``--busy-poll-us`` option of the blk and latency benchmarks."""
    ap.add_argument(
        "--busy-poll-us",
        type=busy_poll_micros,
        help="vhsm's busy-poll window after each request (default 0: sleep in epoll)",
    )


def backend_command(kind: str, sock: Path, image: Path) -> list[str]:
    """The back-end process: `vhsm serve blk` or qemu-storage-daemon's vhost-user-blk export."""
    if kind == "vhsm":
        return [
            *benchlib.vhsm_command(),
            "serve",
            "blk",
            "--socket",
            str(sock),
            "--file",
            str(image),
            *vhsm_options(),
        ]
    return [
        benchlib.require("qemu-storage-daemon"),
        "--blockdev",
        f"driver=file,node-name=file0,filename={image}",
        "--export",
        f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={sock},writable=on",
    ]


@contextmanager
def serving(kind: str, image: Path, workdir: Path, tag: str) -> Iterator[tuple[int, Path]]:
    """Run a back-end pinned to the back-end CPU; yield (pid, socket)."""
    _, be_cpu = benchlib.placement()
    sock = workdir / f"{tag}.sock"
    sock.unlink(missing_ok=True)
    cmd = benchlib.pinned(backend_command(kind, sock, image), be_cpu)
    proc = benchlib.spawn(cmd, workdir / f"{tag}-{kind}.log")
    try:
        benchlib.wait_for_socket(sock, proc)
        yield proc.pid, sock
    finally:
        benchlib.stop(proc, timeout=5)


@contextmanager
def frontend_cpu() -> Iterator[None]:
    """Pin this process (the front-end) to the front-end CPU for the duration."""
    fe_cpu, _ = benchlib.placement()
    old = os.sched_getaffinity(0)
    if fe_cpu is not None:
        os.sched_setaffinity(0, {fe_cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def connect(sock: Path, queue_size: int) -> tuple[Frontend, Virtqueue]:
    """Negotiate and start queue 0 with 8 MiB of guest memory."""
    fe = Frontend.connect(sock, memory=FrontendMemory(((0, 8 << 20),)), timeout=10.0)
    fe.start(queues=[0], size=queue_size)
    return fe, fe.vring(0)


def wait_call(vq: Virtqueue, timeout: float = 5.0) -> None:
    """Block until the back-end signals the call eventfd (or used entries show up)."""
    drv = vq.driver
    if drv.enable_interrupts():
        return
    ready, _, _ = select.select([vq.call_fd], [], [], timeout)
    if not ready:
        raise TimeoutError(f"ring {vq.index}: no used-buffer notification in {timeout} s")
    with suppress(BlockingIOError):
        os.eventfd_read(vq.call_fd)


class BlkLoad:
    """Random 4 KiB reads/writes kept ``depth`` deep on one queue."""

    def __init__(self, fe: Frontend, vq: Virtqueue, depth: int, blocks: int) -> None:
        self.vq = vq
        self.blocks = blocks
        self.rng = random.Random(8)
        mem = fe.memory
        self.mem = mem
        self.slots = [
            Slot(mem.alloc(HEADER.size), mem.alloc(BLOCK, align=BLOCK), mem.alloc(1))
            for _ in range(depth)
        ]
        for s in self.slots:
            mem.write(s.data, os.urandom(BLOCK))
        self.inflight: dict[int, Slot] = {}
        self.errors = 0

    def post(self, slot: Slot) -> None:
        """Post one request in ``slot`` (random kind and offset)."""
        sector = self.rng.randrange(self.blocks) * (BLOCK // 512)
        write = self.rng.random() < 0.5
        kind = VIRTIO_BLK_T_OUT if write else VIRTIO_BLK_T_IN
        self.mem.write(slot.hdr, HEADER.pack(kind, 0, sector))
        data = [(slot.data, BLOCK)]
        head = self.vq.post(
            [(slot.hdr, HEADER.size), *(data if write else [])],
            [*([] if write else data), (slot.status, 1)],
        )
        self.inflight[head] = slot

    def run(self, seconds: float) -> tuple[int, float]:
        """Keep the queue full for ``seconds``; return (requests completed, elapsed)."""
        vq = self.vq
        for slot in self.slots:
            self.post(slot)
        vq.kick()
        done = 0
        t0 = time.perf_counter()
        end = t0 + seconds
        while True:
            reaped = 0
            while (got := vq.get_used()) is not None:
                slot = self.inflight.pop(got[0])
                if self.mem.read(slot.status, 1) != b"\0":
                    self.errors += 1
                self.post(slot)
                reaped += 1
            done += reaped
            if reaped:
                vq.kick()  # one kick for everything re-posted
            elif time.perf_counter() >= end:
                break
            else:
                wait_call(vq)
        elapsed = time.perf_counter() - t0
        self.drain()
        return done, elapsed

    def drain(self) -> None:
        """Wait for the requests still in flight."""
        self.vq.kick()
        deadline = time.monotonic() + 10
        while self.inflight and time.monotonic() < deadline:
            got = self.vq.get_used()
            if got is None:
                wait_call(self.vq, 1.0)
                continue
            self.inflight.pop(got[0], None)


def one_run(kind: str, image: Path, depth: int, seconds: float, workdir: Path, tag: str) -> Outcome:
    """Measure one back-end at one depth."""
    with serving(kind, image, workdir, tag) as (pid, sock), frontend_cpu():
        fe, vq = connect(sock, max(64, 4 * depth))
        try:
            load = BlkLoad(fe, vq, depth, image.stat().st_size // BLOCK)
            load.run(min(0.5, seconds / 4))  # warm-up
            cpu0 = benchlib.cpu_seconds(pid)
            done, elapsed = load.run(seconds)
            cpu = benchlib.cpu_seconds(pid) - cpu0
            if load.errors:
                raise RuntimeError(f"{load.errors} requests completed with an error status")
        finally:
            fe.close()
    return Outcome(done, elapsed, cpu)


def run_all(
    image: Path, depths: Sequence[int], runs: int, seconds: float, workdir: Path
) -> dict[tuple[int, str], Result]:
    """Alternate the two back-ends at each depth."""
    results: dict[tuple[int, str], Result] = {}
    n = 0
    for depth in depths:
        for r in range(runs):
            for kind in BACKENDS:
                res = results.setdefault((depth, kind), Result())
                n += 1
                try:
                    out = one_run(kind, image, depth, seconds, workdir, f"b{n}")
                except (RuntimeError, OSError, TimeoutError) as err:
                    res.failures.append(str(err))
                    print(f"  QD{depth} {kind} run {r + 1}: FAILED {err}", file=sys.stderr)
                    continue
                res.outcomes.append(out)
                print(
                    f"  QD{depth} {kind:4s} run {r + 1}: {out.rate:,.0f} req/s,"
                    f" {out.cpu_per_million:.1f} CPU s / M req",
                    file=sys.stderr,
                    flush=True,
                )
    return results


def report(depths: Sequence[int], results: dict[tuple[int, str], Result]) -> list[str]:
    """Requests/s min/median/max and CPU s per million requests (median) per back-end."""
    fe_cpu, be_cpu = benchlib.placement()
    lines = [
        f"machine: {benchlib.machine()}",
        f"placement: front-end (vhsm.frontend, this process) on CPU {fe_cpu},"
        f" back-end on CPU {be_cpu}",
        f"{'depth':5s} {'back-end':8s} {'req/s min':>10s} {'median':>10s} {'max':>10s}"
        f" {'CPU s/M req':>11s}",
    ]
    for depth in depths:
        for kind in BACKENDS:
            res = results.get((depth, kind), Result())
            lo, med, hi = benchlib.summary([o.rate for o in res.outcomes])
            cpu = benchlib.summary([o.cpu_per_million for o in res.outcomes])[1]
            name = "vhsm" if kind == "vhsm" else "qemu-sd"
            fail = f"  ({len(res.failures)} runs failed)" if res.failures else ""
            lines.append(
                f"QD{depth:<3d} {name:8s} {lo:10,.0f} {med:10,.0f} {hi:10,.0f} {cpu:11.1f}{fail}"
            )
    return lines


def build_parser() -> argparse.ArgumentParser:
    """Command-line options (shared with `vhsm bench blk`)."""
    ap = argparse.ArgumentParser(
        prog="vhsm bench blk", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=5, help="measured seconds per run")
    ap.add_argument("--runs", type=int, default=3, help="runs per back-end and depth")
    ap.add_argument(
        "--depths", type=lambda t: [int(x) for x in t.split(",")], default=[1, 32], help="QDs"
    )
    ap.add_argument("--backends", default=",".join(BACKENDS), help="vhsm,qsd")
    ap.add_argument("--workdir", type=Path, help="keep the image, logs and sockets here")
    add_busy_poll_option(ap)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison (qemu-storage-daemon runs are skipped, with a note, if missing)."""
    global BACKENDS, BUSY_POLL_US
    args = build_parser().parse_args(argv)
    BUSY_POLL_US = args.busy_poll_us
    wanted = tuple(b for b in args.backends.split(",") if b)
    why = benchlib.missing("qemu-storage-daemon")
    if why is not None and "qsd" in wanted:
        print(f"blk benchmark: {why}; measuring vhsm only", file=sys.stderr)
        wanted = tuple(b for b in wanted if b != "qsd")
    BACKENDS = wanted
    with tempfile.TemporaryDirectory(prefix="vhsm-bench-blk-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        image = workdir / "disk.img"
        make_image(image)
        results = run_all(image, args.depths, args.runs, args.seconds, workdir)
    for line in report(args.depths, results):
        print(line)
    return 0 if any(r.outcomes for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

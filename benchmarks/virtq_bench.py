"""Chains per second through the device side of split and packed rings.

The driver (vhsm.virtq.driver) fills the ring over memfd-backed GuestMemory; only the
device side (pop + add_used, chain by chain or batched) is timed, in wall-clock and in
CPU seconds of the measuring thread (the latter is robust to other load). Prints a table.
Run: .venv/bin/python benchmarks/virtq_bench.py [--size 1024] [--chains 300000]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from vhsm import speedups
from vhsm.memory import GuestMemory
from vhsm.virtq import PackedDriver, PackedQueue, SplitDriver, SplitQueue
from vhsm.wire.payloads import VhostUserMemoryRegion

MEM_SIZE = 64 << 20
RING_GPA = 0x1000
BUF_GPA = 0x100000
BUF_LEN = 64

Queue = SplitQueue | PackedQueue
Driver = SplitDriver | PackedDriver


def make_memory() -> GuestMemory:
    fd = os.memfd_create("virtq-bench")
    os.ftruncate(fd, MEM_SIZE)
    region = VhostUserMemoryRegion(0, MEM_SIZE, 0x7F0000000000, 0)
    return GuestMemory.from_table([region], [fd])


def make_ring(mem: GuestMemory, kind: str, size: int) -> tuple[Driver, Queue]:
    if kind == "split":
        sd = SplitDriver.layout(mem, size, RING_GPA)
        sq = SplitQueue(
            mem,
            size,
            mem.translate(sd.desc_gpa, 16 * size),
            mem.translate(sd.avail_gpa, 6 + 2 * size),
            mem.translate(sd.used_gpa, 6 + 8 * size),
        )
        return sd, sq
    pd = PackedDriver.layout(mem, size, RING_GPA)
    pq = PackedQueue(
        mem,
        size,
        mem.translate(pd.desc_gpa, 16 * size),
        mem.translate(pd.driver_event_gpa, 4),
        mem.translate(pd.device_event_gpa, 4),
    )
    return pd, pq


def fill(drv: Driver, ndesc: int, count: int) -> None:
    if ndesc == 1:
        addrs = BUF_GPA + BUF_LEN * np.arange(count, dtype=np.uint64)
        lens = np.full(count, BUF_LEN, dtype=np.uint32)
        drv.add_simple_batch(addrs, lens, np.ones(count, dtype=bool))
        return
    for i in range(count):
        base = BUF_GPA + 4 * BUF_LEN * i
        drv.add_chain([(base, 16)], [(base + BUF_LEN, BUF_LEN), (base + 2 * BUF_LEN, BUF_LEN)])


def device_one_by_one(q: Queue) -> int:
    add_used = q.add_used
    n = 0
    for chain in q:
        add_used(chain.head, chain.writable_len)
        n += 1
    return n


def device_batched(q: Queue) -> int:
    batch = q.pop_batch()
    if len(batch.chains):
        q.add_used_batch(
            np.concatenate([batch.heads, [c.head for c in batch.chains]]).astype(np.int64),
            np.concatenate([batch.lens, [c.writable_len for c in batch.chains]]).astype(np.int64),
        )
    else:
        q.add_used_batch(batch.heads, batch.lens)
    return len(batch)


def run(kind: str, ndesc: int, mode: str, size: int, total: int) -> tuple[float, float]:
    """(chains per wall-clock second, chains per CPU second of this thread)."""
    mem = make_memory()
    drv, q = make_ring(mem, kind, size)
    per_round = size // ndesc
    device: Callable[[Queue], int] = device_one_by_one if mode == "chain" else device_batched
    done = 0
    elapsed = cpu = 0.0
    while done < total:
        fill(drv, ndesc, per_round)
        t0, c0 = time.perf_counter(), time.thread_time()
        got = device(q)
        elapsed += time.perf_counter() - t0
        cpu += time.thread_time() - c0
        assert got == per_round, (got, per_round)
        drv.get_used_batch()
        done += got
    return done / elapsed, done / max(cpu, 1e-9)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vhsm bench virtq", description=__doc__)
    ap.add_argument("--size", type=int, default=1024, help="queue size")
    ap.add_argument("--chains", type=int, default=300_000, help="chains per measurement")
    args = ap.parse_args(argv)
    print(
        f"queue size {args.size}, {args.chains} chains per row, device side timed;"
        f" data path: {speedups.data_path()}"
    )
    print(f"{'ring':8s} {'descs':>5s} {'mode':8s} {'chains/s':>14s} {'per CPU s':>14s}")
    for kind in ("split", "packed"):
        for ndesc in (1, 3):
            for mode in ("chain", "batch"):
                total = args.chains if ndesc == 1 else args.chains // 4
                rate, cpu_rate = run(kind, ndesc, mode, args.size, total)
                print(f"{kind:8s} {ndesc:5d} {mode:8s} {rate:14,.0f} {cpu_rate:14,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The compiled accelerator against the pure-Python data path: identical on hostile rings.

Each example writes the same hostile guest memory twice (two regions, a
descriptor table with addresses near and past region ends, 64-bit wrap-around,
loops, out-of-range heads and next indices, oversized and nested indirect
tables, repeated and in-flight packed ids), builds one queue on each copy (one
with ``vhsm._speedups``, one pure), runs the same pops and completions (good
and bad ids, lengths past 32 bits, every integer dtype) and requires the same
result from both: the batches, the chains' bytes, the errors' text, the queue
state, and every byte of guest memory afterwards.
"""

# ruff: noqa: B023  (the lambdas given to Twins.same run at once, inside the loop)
from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fuzz_support import budget
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from virtq_support import BUF_GPA, make_memory, packed_pair, split_pair

from vhsm import speedups
from vhsm.devices import net
from vhsm.memory import GuestMemory
from vhsm.virtq import PackedQueue, SplitQueue
from vhsm.virtq.batch import Batch
from vhsm.virtq.common import sum_of
from vhsm.wire.enums import MAX_QUEUE_SIZE
from vhsm.wire.payloads import VhostUserMemoryRegion

needs_accel = pytest.mark.skipif(speedups.accel is None, reason=speedups.data_path())

REGION = 1 << 18  # two regions: [0, 256 KiB) and [1 MiB, 1 MiB + 256 KiB)
SECOND = 1 << 20
RING = 0x1000
TABLES = 0x8000  # indirect tables (random descriptors)
BUFS = 0x10000
DESC = struct.Struct("<QIHH")
PDESC = struct.Struct("<QIHH")  # packed: addr, len, id, flags

ADDRS = st.one_of(
    st.integers(BUFS, REGION - 1),
    st.sampled_from(
        [
            0,
            REGION - 1,
            REGION - 16,
            REGION,  # just past the first region
            SECOND,
            SECOND + REGION - 8,
            SECOND + REGION,
            TABLES,
            2**64 - 1,
            2**64 - 8,
            2**63,
        ]
    ),
    st.integers(0, 2**64 - 1),
)
LENS = st.one_of(
    st.sampled_from([0, 1, 12, 16, 32, 64, 4096, REGION, 0xFFFFFFFF]), st.integers(0, 2**32 - 1)
)
FLAGS = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]), st.integers(0, 0xFFFF))


def two_regions() -> GuestMemory:
    fds = []
    for _ in range(2):
        fd = os.memfd_create("speedups-test")
        os.ftruncate(fd, REGION)
        fds.append(fd)
    table = [
        VhostUserMemoryRegion(0, REGION, 0x7F0000000000, 0),
        VhostUserMemoryRegion(SECOND, REGION, 0x7F0010000000, 0),
    ]
    return GuestMemory.from_table(table, fds)


def image(mem: GuestMemory) -> bytes:
    return b"".join(bytes(r.view) for r in mem.regions)


def summary(result: Any) -> Any:
    """A comparable picture of what a queue call returned."""
    if isinstance(result, Batch):
        return (
            result.heads.tolist(),
            result.addrs.tolist(),
            result.lens.tolist(),
            result.writable.tolist(),
            result.region.tolist(),
            result.offsets.tolist(),
            result.lens_range,
            [
                (c.head, [bytes(v) for v in c.readable], [len(v) for v in c.writable])
                for c in result.chains
            ],
            [(str(e), e.head) for e in result.errors],
        )
    return result


def outcome(fn: Callable[[], Any]) -> Any:
    try:
        return ("ok", summary(fn()))
    except Exception as exc:  # the pure path's exceptions are the reference
        return ("raised", type(exc).__name__, str(exc))


class Twins:
    """The same guest memory twice, a queue on each: one compiled, one pure."""

    def __init__(self, build: Callable[[GuestMemory], Any], monkeypatch: Any) -> None:
        self.mems = [two_regions(), two_regions()]
        self.build = build
        self.monkeypatch = monkeypatch
        self.queues: list[Any] = []

    def write(self, gpa: int, data: bytes) -> None:
        for mem in self.mems:
            mem.translate(gpa, len(data))[:] = data

    def start(self) -> None:
        self.queues = [self.build(self.mems[0])]
        with self.monkeypatch.context() as m:
            m.setattr(speedups, "accel", None)
            self.queues.append(self.build(self.mems[1]))
        assert self.queues[0]._accel is not None and self.queues[1]._accel is None

    def same(self, call: Callable[[Any], Any]) -> Any:
        fast, pure = (outcome(lambda q=q: call(q)) for q in self.queues)
        assert fast == pure
        return fast

    def check_state(self) -> None:
        a, b = self.queues
        assert (a.get_base(), a.next_avail, a.next_used) == (
            b.get_base(),
            b.next_avail,
            b.next_used,
        )
        assert image(self.mems[0]) == image(self.mems[1])

    def close(self) -> None:
        for q in self.queues:
            q.release()


def completion(draw: st.DrawFn, n: int) -> tuple[Any, Any]:
    """Ids and lengths of an add_used_batch: good, repeated, out of range, any dtype."""
    dtype = draw(st.sampled_from(["u2", "u4", "i8", "u8", "i4", "u1", "i2"]))
    info = np.iinfo(dtype)
    ids = draw(
        st.lists(
            st.one_of(st.integers(0, n + 2), st.integers(int(info.min), int(info.max))),
            max_size=n + 2,
        )
    )
    ida = np.array(ids, dtype=dtype)
    lens: Any = draw(
        st.one_of(
            st.sampled_from([0, 1, 64, 0xFFFFFFFF, 2**32, -1]),
            st.lists(
                st.sampled_from([0, 7, 0xFFFFFFFF, 2**32, -1]), min_size=len(ids), max_size=len(ids)
            ).map(lambda v: np.array(v, dtype=np.int64)),
            st.lists(st.integers(0, 1000), min_size=len(ids), max_size=len(ids)).map(
                lambda v: np.array(v, dtype=np.uint32)
            ),
        )
    )
    return ida, lens


def lens_for(ids: Any, lens: int | str) -> Any:
    """One length for every id, or an array of lengths (some 0) as long as ``ids``."""
    if lens != "array" or ids is None:
        return lens
    return (np.arange(len(ids), dtype=np.uint32) * 7) % 3


# ---------------------------------------------------------------- split rings
@st.composite
def split_rounds(draw: st.DrawFn) -> tuple[int, list[Any]]:
    size = draw(st.sampled_from([4, 8, 16]))
    rounds = []
    for _ in range(draw(st.integers(1, 4))):
        table = [
            (draw(ADDRS), draw(LENS), draw(FLAGS), draw(st.integers(0, size + 2)))
            for _ in range(size)
        ]
        shape = draw(st.sampled_from(["simple", "simple", "linked", "noise"]))
        if shape == "simple":  # well formed: one buffer each, in the first region
            table = [
                (BUFS + 0x100 * i, 64 + i, draw(st.sampled_from([0, 2])), 0) for i in range(size)
            ]
        elif shape == "linked":  # chains and indirect tables, mostly well formed
            table = [linked(draw, i, size) for i in range(size)]
        indirect = [
            (draw(ADDRS), draw(LENS), draw(FLAGS), draw(st.integers(0, 4))) for _ in range(4)
        ]
        if shape == "linked" and draw(st.booleans()):
            indirect = [linked(draw, i, 4) for i in range(4)]
        heads = draw(st.lists(st.integers(0, size + 3), min_size=size, max_size=size))
        count = draw(st.one_of(st.integers(0, size), st.just(size + 1)))
        pop = draw(st.sampled_from(["batch", "iter", "pop"]))
        max_chains = draw(st.sampled_from([1 << 16, 1, 3]))
        used = draw(st.sampled_from(["heads", "random", "none", "each"]))
        each = (
            draw(st.lists(SINGLE_LENS, min_size=size + 1, max_size=size + 1)),
            draw(st.lists(st.tuples(SINGLE_IDS, SINGLE_LENS), max_size=3)),
            draw(st.booleans()),  # indirect descriptors allowed this round
        )
        rounds.append(
            (table, indirect, heads, count, pop, max_chains, used, completion(draw, size), each)
        )
    return size, rounds


def linked(draw: st.DrawFn, i: int, size: int) -> tuple[int, int, int, int]:
    """A descriptor of a chain: buffers in either region (some across its end), links
    within the table or just past it, now and then an indirect table or a loop."""
    addr = draw(
        st.sampled_from(
            [BUFS + 0x100 * i, SECOND + 0x100 * i, REGION - 8, SECOND + REGION - 16, TABLES]
        )
    )
    ln = draw(st.sampled_from([0, 16, 32, 64, 48]))
    flags = draw(st.sampled_from([0, 1, 2, 3, 1, 3, 4, 5]))
    return addr, ln, flags, draw(st.integers(0, size))


def split_queue(size: int) -> Callable[[GuestMemory], SplitQueue]:
    avail = RING + 16 * size
    used = (avail + 6 + 2 * size + 3) & ~3

    def build(mem: GuestMemory) -> SplitQueue:
        return SplitQueue(
            mem,
            size,
            mem.translate(RING, 16 * size),
            mem.translate(avail, 6 + 2 * size),
            mem.translate(used, 6 + 8 * size),
            indirect=True,
        )

    build.avail = avail  # type: ignore[attr-defined]
    return build


def drain_iter(q: Any) -> list[Any]:
    out: list[Any] = []
    for _ in range(64):
        try:
            out.extend(summary_chain(c, q) for c in q)
            return out
        except Exception as exc:
            out.append(("raised", str(exc), getattr(exc, "head", None)))
    return out


def summary_chain(c: Any, q: Any = None) -> Any:
    """Everything a chain says: head, lengths, the views' bytes, places and containers."""
    return (
        type(c).__name__,
        c.head,
        c.readable_len,
        c.writable_len,
        type(c.readable).__name__,
        type(c.writable).__name__,
        [(bytes(v), place(q, v), v.readonly) for v in c.readable],
        [(len(v), place(q, v), v.readonly) for v in c.writable],
    )


def place(q: Any, view: memoryview) -> tuple[int, int] | None:
    """(region, offset) of a view's first byte: the twins' memories are at other addresses."""
    if q is None:
        return None
    at = int(np.frombuffer(view, dtype=np.uint8, count=1).ctypes.data)
    for i, (start, end, region) in enumerate(q._space.regions):
        base = int(np.frombuffer(region, dtype=np.uint8, count=1).ctypes.data)
        if base <= at < base + end - start:
            return i, at - base
    return -1, 0


# ids and lengths of single completions: good ones, out of range, not 32-bit, not ints
SINGLE_IDS = st.one_of(st.integers(0, 8), st.sampled_from([-1, 65535, 65536, 2**40, True]))
SINGLE_LENS = st.sampled_from([0, 7, 64, 0xFFFFFFFF, 2**32, -1, 2**70])


def complete_each(q: Any, chains: list[Any], lens: list[int], extra: list[tuple[Any, int]]) -> Any:
    """``add_used`` chain by chain (the popped heads, then ``extra`` pairs), each outcome."""
    pairs = [(c[1], ln) for c, ln in zip(chains, lens, strict=False) if c[0] != "raised"]
    return [outcome(lambda h=h, n=n: q.add_used(h, n)) for h, n in pairs + extra]


@needs_accel
@settings(
    max_examples=budget(150),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan=split_rounds())
def test_split_rings_same_on_both_paths(plan: tuple[int, list[Any]], monkeypatch: Any) -> None:
    size, rounds = plan
    build = split_queue(size)
    twins = Twins(build, monkeypatch)
    try:
        twins.start()
        for table, indirect, heads, count, pop, max_chains, used, (ids, lens), each in rounds:
            single_lens, extra, indirect_ok = each
            for q in twins.queues:
                q.set_indirect(indirect_ok)
            twins.write(RING, b"".join(DESC.pack(*d) for d in table))
            twins.write(TABLES, b"".join(DESC.pack(*d) for d in indirect))
            ring = b"".join(struct.pack("<H", h) for h in heads)
            next_idx = (twins.queues[1].next_avail + count) & 0xFFFF
            twins.write(build.avail, struct.pack("<HH", 0, next_idx) + ring)  # type: ignore[attr-defined]
            chains: list[Any] = []
            if pop == "batch":
                got = twins.same(lambda q: q.pop_batch(max_chains))
            elif pop == "iter":
                chains = twins.same(drain_iter)[1]
                got = None
            else:
                one = twins.same(lambda q: summary_chain(c, q) if (c := q.pop()) else ())
                chains = [one[1]] if one[0] == "ok" else []
                got = None
            twins.check_state()
            if used == "each":
                chains = [c for c in chains if c]
                twins.same(lambda q: complete_each(q, chains, single_lens, extra))
            elif used == "heads" and got is not None and got[0] == "ok":
                # the batch's own (trusted) heads array, on each side
                twins.same(
                    lambda q: (
                        q.add_used_batch(q._fresh_heads, lens)
                        if q._fresh_heads is not None
                        else None
                    )
                )
            elif used == "random":
                twins.same(lambda q: q.add_used_batch(ids, lens))
            twins.check_state()
    finally:
        twins.close()


# --------------------------------------------------------------- packed rings
def packed_round(draw: st.DrawFn, size: int, pos: int, wrap: int, free: int) -> Any:
    """One round of a packed ring: a driver run from the device's position, or noise."""
    ids = st.one_of(st.integers(0, 6), st.sampled_from([0xFFFF, 1000]))
    kind = draw(st.sampled_from(["clean", "clean", "dirty", "noise"]))
    descs = (
        [(draw(ADDRS), draw(LENS), draw(ids), draw(FLAGS)) for _ in range(size)]
        if kind == "noise"
        else [(0, 0, 0, 0)] * size
    )
    if kind != "noise":  # available descriptors from pos on, under the right wrap counter
        run = free if free and draw(st.booleans()) else draw(st.integers(1, size))
        id_mode = draw(st.sampled_from(["distinct", "distinct", "few", "any"]))
        for i in range(run):
            p = (pos + i) % size
            w = wrap ^ (pos + i >= size)
            own = 0x80 if w else 0x8000
            clean = kind == "clean"
            extra = draw(st.sampled_from([0, 2] if clean else [0, 0, 0, 2, 2, 1, 4]))
            good = clean or draw(st.integers(0, 5)) > 0
            addr = BUFS + 0x100 * p if good else draw(ADDRS)
            ln = 32 + i if good else draw(LENS)
            if extra == 4 and good and draw(st.booleans()):  # a table of 1-4 descriptors
                addr, ln = TABLES, 16 * draw(st.integers(1, 4))
            if id_mode == "distinct":
                bid = 100 + draw(st.integers(0, 1000)) * 32 + i
            else:
                bid = draw(st.integers(0, 2) if id_mode == "few" else ids)
            descs[p] = (addr, ln, bid, own | extra)
    indirect = [(draw(ADDRS), draw(LENS), draw(FLAGS), draw(st.integers(0, 4))) for _ in range(4)]
    if draw(st.booleans()):  # mostly well formed tables
        indirect = [linked(draw, i, 4) for i in range(4)]
    pop = draw(st.sampled_from(["batch", "batch", "iter", "pop"]))
    max_chains = draw(st.sampled_from([1 << 16, 1 << 16, 1, 2]))
    return descs, indirect, pop, max_chains


def packed_queue(size: int) -> Callable[[GuestMemory], PackedQueue]:
    def build(mem: GuestMemory) -> PackedQueue:
        return PackedQueue(
            mem,
            size,
            mem.translate(RING, 16 * size),
            mem.translate(RING + 16 * size, 4),
            mem.translate(RING + 16 * size + 4, 4),
            indirect=True,
        )

    return build


@needs_accel
@settings(
    max_examples=budget(150),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(size=st.sampled_from([3, 4, 8, 16]), rounds=st.integers(1, 6), data=st.data())
def test_packed_rings_same_on_both_paths(
    size: int, rounds: int, data: st.DataObject, monkeypatch: Any
) -> None:
    twins = Twins(packed_queue(size), monkeypatch)
    try:
        twins.start()
        for _ in range(rounds):
            pure = twins.queues[1]
            free = size - int(sum_of(pure._counts_np & 0xFFFF))
            where = (size, pure.next_avail, pure.avail_wrap, free)
            plan = data.draw(st.composite(packed_round)(*where))
            descs, indirect, pop, max_chains = plan
            twins.write(RING, b"".join(PDESC.pack(*d) for d in descs))
            twins.write(TABLES, b"".join(DESC.pack(*d) for d in indirect))
            if pop == "batch":
                got = twins.same(lambda q: q.pop_batch(max_chains))
            elif pop == "iter":
                got = twins.same(drain_iter)
            else:
                got = twins.same(
                    lambda q: summary_chain(c, q) if (c := q.pop()) is not None else None
                )
            twins.check_state()
            used = data.draw(
                st.sampled_from(["heads", "heads", "flight", "random", "single", "each"])
            )
            lens = data.draw(st.one_of(st.sampled_from([0, 0, 1, 64]), st.just("array")))
            if used == "heads":
                twins.same(
                    lambda q: (
                        q.add_used_batch(q._fresh_heads, lens_for(q._fresh_heads, lens))
                        if q._fresh_heads is not None
                        else None
                    )
                )
            elif used == "flight":  # ids in flight, some perhaps twice, in any order
                flight = np.flatnonzero(pure._counts_np).tolist()
                ids = data.draw(st.lists(st.sampled_from(flight), max_size=size)) if flight else []
                ida = np.array(ids, dtype=data.draw(st.sampled_from(["u2", "i8", "u4"])))
                twins.same(lambda q: q.add_used_batch(ida, lens_for(ida, lens)))
            elif used == "random":
                ida, lns = completion(data.draw, size)
                twins.same(lambda q: q.add_used_batch(ida, lns))
            elif used == "each" and got[0] == "ok" and pop != "batch":
                chains = got[1] if pop == "iter" else [got[1]] if got[1] else []
                single_lens = data.draw(st.lists(SINGLE_LENS, min_size=len(chains)))
                extra = data.draw(st.lists(st.tuples(SINGLE_IDS, SINGLE_LENS), max_size=3))
                twins.same(lambda q: complete_each(q, chains, single_lens, extra))
            elif used == "single" and got[0] == "ok" and pop == "batch" and got[1][0]:
                bid = got[1][0][0]
                twins.same(lambda q: q.add_used(bid, 0))
                twins.same(
                    lambda q: (
                        q.add_used_batch(q._fresh_heads, 0) if q._fresh_heads is not None else None
                    )
                )
            twins.check_state()
            assert np.array_equal(twins.queues[0]._counts_np, twins.queues[1]._counts_np)
    finally:
        twins.close()


# ------------------------------------------------------- rings a driver fills
@needs_accel
@settings(
    max_examples=budget(60),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    kind=st.sampled_from(["split", "packed"]),
    size=st.sampled_from([4, 8, 16]),
    rounds=st.lists(
        st.tuples(st.integers(1, 16), st.integers(0, 3), st.integers(0, 2**16), st.booleans()),
        min_size=1,
        max_size=30,
    ),
)
def test_driven_rings_same_on_both_paths(
    kind: str, size: int, rounds: list[tuple[int, int, int, bool]], monkeypatch: Any
) -> None:
    """A well-behaved driver's bursts (around the ring many times), completed out of order."""
    pair = split_pair if kind == "split" else packed_pair
    mems = [make_memory(), make_memory()]
    sides = [pair(mems[0], size)]
    with monkeypatch.context() as m:
        m.setattr(speedups, "accel", None)
        sides.append(pair(mems[1], size))
    for n, chains, seed, keep_order in rounds:
        chains = min(chains, sides[0][0].num_free // 2)
        n = min(n, sides[0][0].num_free - 2 * chains)
        addrs = BUF_GPA + 0x1000 * np.arange(max(n, 0), dtype=np.uint64) + seed % 64
        lens = (np.arange(max(n, 0), dtype=np.uint32) * 7 + seed) % 200 + 1
        wr = (np.arange(max(n, 0)) + seed) % 3 == 0
        got = []
        for drv, q in sides:
            if n > 0:
                drv.add_simple_batch(addrs, lens, wr)
            for c in range(chains):
                drv.add_chain([(BUF_GPA + 0x80000 + 64 * c, 16)], [(BUF_GPA + 0x90000, 32)])
            b = q.pop_batch()
            ids = np.concatenate((b.heads.astype(np.int64), [c.head for c in b.chains]))
            order = ids if keep_order else ids[np.argsort((ids * 2654435761 + seed) % 4093)]
            lengths = np.where(np.arange(len(order)) % 2, 0, 16).astype(np.uint32)
            if keep_order and not b.chains:
                q.add_used_batch(b.heads, seed % 3)  # the burst's own, trusted, heads
            else:
                q.add_used_batch(order, lengths)
            got.append((summary(b), drv.get_used_batch()[0].tolist(), q.get_base()))
        assert got[0] == got[1]
        assert image(mems[0]) == image(mems[1])


# ------------------------------------------------------------------- the sink
@needs_accel
@settings(
    max_examples=budget(100),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    data=st.binary(min_size=0, max_size=4096),
    rows=st.lists(st.integers(0, 4096), max_size=40),
    n=st.integers(0, 300),
    skip=st.integers(0, 12),
    checksum=st.booleans(),
)
def test_sink_reads_same_on_both_paths(
    data: bytes, rows: list[int], n: int, skip: int, checksum: bool, monkeypatch: Any
) -> None:
    assume(len(data) >= n)  # the sink's buffers are inside their region
    region = memoryview(bytearray(data))
    skip = min(skip, n)
    offsets = np.array([r for r in rows if r + n <= len(region)], dtype=np.int64)
    fast = net._gather_rows(region, offsets, n, skip)
    fast_sum = net._adler32_of_rows(fast) if n - skip <= 256 else None
    with monkeypatch.context() as m:
        m.setattr(speedups, "accel", None)
        pure = net._gather_rows(region, offsets, n, skip)
        pure_sum = net._adler32_of_rows(pure) if n - skip <= 256 else None
    assert np.array_equal(fast, pure)
    assert fast_sum == pure_sum
    if fast_sum is not None:
        assert fast_sum == sum(zlib.adler32(bytes(r)) for r in pure)
    lens = np.array([max(12, n - (i % 3)) for i in range(len(offsets))], dtype=np.uint32)
    keep = offsets + lens <= len(region)
    stats = [net.NetStats(), net.NetStats()]
    net._sink_frames((region,), 0, offsets[keep], lens[keep], stats[0], checksum)
    with monkeypatch.context() as m:
        m.setattr(speedups, "accel", None)
        net._sink_frames((region,), 0, offsets[keep], lens[keep], stats[1], checksum)
    assert stats[0] == stats[1]


# ------------------------------------------------------------- chain by chain
@needs_accel
@pytest.mark.parametrize("kind", ["split", "packed"])
def test_chain_by_chain_is_compiled_and_shares_the_queue_state(kind: str, monkeypatch: Any) -> None:
    """pop, iteration and add_used go through C and leave the queue where the pure path would."""
    pair = split_pair if kind == "split" else packed_pair
    sides = []
    for accel in (speedups.accel, None):
        with monkeypatch.context() as m:
            m.setattr(speedups, "accel", accel)
            sides.append(pair(make_memory(), 8))
    assert sides[0][1]._chains is not None and sides[1][1]._chains is None
    for drv, q in sides:
        drv.add_chain([(BUF_GPA, 16)], [(BUF_GPA + 64, 32), (BUF_GPA + 128, 32)])
        drv.add_chain([(BUF_GPA + 256, 8)])
        first = q.pop()
        assert first is not None and first.writable_len == 64
        q.add_used(first.head, 5)
        rest = list(q)
        assert [c.readable_len for c in rest] == [8]
        q.add_used(rest[0].head, 0)
        assert q.pop() is None and list(q) == []
    (da, qa), (db, qb) = sides
    assert (qa.get_base(), qa.next_used) == (qb.get_base(), qb.next_used)
    assert da.get_used_batch()[0].tolist() == db.get_used_batch()[0].tolist()


@needs_accel
def test_a_packed_chain_as_long_as_the_ring_flips_the_used_wrap(monkeypatch: Any) -> None:
    sides = []
    for accel in (speedups.accel, None):
        with monkeypatch.context() as m:
            m.setattr(speedups, "accel", accel)
            sides.append(packed_pair(make_memory(), 4))
    for drv, q in sides:
        for _ in range(2):  # around the ring twice: the wrap counter flips and flips back
            drv.add_chain([(BUF_GPA, 16), (BUF_GPA + 64, 16)], [(BUF_GPA + 128, 16)] * 2)
            c = q.pop()
            assert c is not None and (c.readable_len, c.writable_len) == (32, 32)
            wrap = q.used_wrap
            q.add_used(c.head, 32)
            assert (q.next_used, q.used_wrap) == (0, wrap ^ 1)
            assert drv.get_used_batch()[0].tolist() == [c.head]
    assert sides[0][1].get_base() == sides[1][1].get_base()


@pytest.mark.parametrize("kind", ["split", "packed"])
def test_a_queue_released_while_iterated_refuses_to_go_on(kind: str) -> None:
    """Released views are never read: the next step raises ValueError (either path)."""
    pair = split_pair if kind == "split" else packed_pair
    drv, q = pair(make_memory(), 8)
    for i in range(3):
        drv.add_chain([(BUF_GPA + 64 * i, 16)])
    chains = iter(q)
    assert next(chains).readable_len == 16
    q.release()
    with pytest.raises(ValueError, match="released"):
        next(chains)
    with pytest.raises(ValueError, match="released"):
        q.pop()


# ------------------------------------------------------------- the data path
def test_pure_python_forced_by_the_environment() -> None:
    env = dict(os.environ, VHSM_PURE_PYTHON="1")
    out = subprocess.run(
        [sys.executable, "-m", "vhsm", "--version"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert "data path: pure Python (VHSM_PURE_PYTHON is set)" in out
    probe = "from vhsm import speedups; print(speedups.accel)"
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "None"


def test_version_names_the_active_data_path() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vhsm", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().endswith(speedups.data_path())


def test_ci_runs_the_compiled_path() -> None:
    """On CI (a C compiler and python3-dev are installed) the accelerator must be active."""
    if not os.environ.get("CI") or os.environ.get(speedups.PURE_ENV, "") not in ("", "0"):
        pytest.skip("only on CI's compiled run")
    assert speedups.accel is not None, speedups.data_path()


# ------------------------------------------------------------- the declared ring limit
@needs_accel
def test_the_compiled_paths_take_the_ring_limit_from_the_declaration() -> None:
    """The C code has no ring limit of its own: vhsm.speedups hands it the declared one."""
    accel = speedups.accel
    assert accel is not None
    avail, desc = bytearray(4 + 2 * 16), bytearray(16 * 16)
    bounds = np.zeros(2, dtype=np.uint64)
    out = (np.zeros(16, np.uint16), np.zeros(16, np.uint64), np.zeros(16, np.int64))
    try:
        accel.set_max_queue_size(8)  # below the ring: the compiled pop refuses it
        with pytest.raises(ValueError, match="bad size"):
            accel.split_pop(avail, desc, bounds, 0, 16, 0, *out)
    finally:
        accel.set_max_queue_size(MAX_QUEUE_SIZE)
    for bad in (0, MAX_QUEUE_SIZE * 2):  # the packed format's positions are 15 bits
        with pytest.raises(ValueError, match="outside"):
            accel.set_max_queue_size(bad)

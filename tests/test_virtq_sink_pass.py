"""The fused sink pass against the pure loop: the same TX kicks on hostile split rings.

Each example builds the same guest memory twice (two regions), a net sink's TX
ring on each (one served by `vhsm._speedups.sink_split`, one pure), and runs the
same kicks: tables of good frames, frames in the second region or across the
regions' border, chains, runts, empty and out-of-memory buffers, heads past the
ring, avail indices too far ahead, the driver's event index and flags, small
pass budgets. Both sides must agree on everything a driver or the lead can see:
counters, every byte of guest memory, the call and err eventfds, the ring's
indices, broken and yielded flags.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fuzz_support import budget
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhsm import speedups
from vhsm.backend import EPOLLIN
from vhsm.devices.net import NET_HDR_SIZE, NetBackend
from vhsm.memory import GuestMemory, GuestMemoryAtomic
from vhsm.virtq import PackedQueue
from vhsm.virtq.sink_pass import DONE, FALLBACK
from vhsm.vring import VringMutex
from vhsm.wire.enums import VirtioFeature
from vhsm.wire.payloads import VhostUserMemoryRegion

needs_accel = pytest.mark.skipif(speedups.accel is None, reason=speedups.data_path())

REGION = 1 << 18  # [0, 256 KiB) and [1 MiB, 1 MiB + 256 KiB)
SECOND = 1 << 20
RING = 0x1000
BUFS = 0x10000
DESC = struct.Struct("<QIHH")
EVENT_IDX = int(VirtioFeature.RING_EVENT_IDX)
PACKED = int(VirtioFeature.RING_PACKED)
BASE_FEATURES = int(VirtioFeature.VERSION_1 | VirtioFeature.RING_INDIRECT_DESC)

#: Buffers a TX ring may hold: mostly good frames, and every kind the fast path refuses.
BUFFERS = st.one_of(
    st.tuples(st.integers(BUFS, REGION - 2048), st.integers(NET_HDR_SIZE, 1500), st.just(0)),
    st.tuples(
        st.sampled_from([SECOND, SECOND + 0x800, REGION - 64, SECOND + REGION - 100]),
        st.sampled_from([NET_HDR_SIZE, 64, 100, 200]),
        st.sampled_from([0, 2]),  # a device-writable TX buffer is read all the same
    ),
    st.tuples(
        st.sampled_from([0, BUFS, REGION, 2**64 - 8, 2**63]),
        st.sampled_from([0, 1, 11, 4096, 0xFFFFFFFF]),
        st.sampled_from([0, 1, 4, 5]),  # NEXT, INDIRECT, both
    ),
)


def two_regions() -> GuestMemory:
    fds = []
    for _ in range(2):
        fd = os.memfd_create("sink-pass-test")
        os.ftruncate(fd, REGION)
        fds.append(fd)
    table = [
        VhostUserMemoryRegion(0, REGION, 0x7F0000000000, 0),
        VhostUserMemoryRegion(SECOND, REGION, 0x7F0010000000, 0),
    ]
    return GuestMemory.from_table(table, fds)


def image(mem: GuestMemory) -> bytes:
    return b"".join(bytes(r.view) for r in mem.regions)


def read_counter(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0
    except OSError:  # not an eventfd any more (the call fd test)
        return -1


class Side:
    """One net sink with its TX ring (index 1) over its own copy of guest memory."""

    def __init__(self, size: int, features: int, reads: str) -> None:
        self.mem = two_regions()
        self.size = size
        self.backend = NetBackend("sink", sink_reads=reads, busy_poll_us=0)
        self.backend.acked_features(features)
        # split: avail and used rings; packed: driver and device event areas
        self.avail = RING + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        if features & PACKED:
            self.used = self.avail + 4
        atomic = GuestMemoryAtomic(self.mem)
        self.vrings = [VringMutex(atomic, 1024, index=i) for i in range(2)]
        tx = self.tx = self.vrings[1]
        tx.set_features(features)
        tx.set_queue_size(size)
        tx.set_queue_info(RING, self.avail, self.used)
        self.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        tx.set_call(self.call)
        tx.set_err(self.err)
        tx.started = tx.enabled = True

    def write(self, gpa: int, data: bytes) -> None:
        self.mem.translate(gpa, len(data))[:] = data

    def kick(self, budget_chains: int | None) -> Any:
        for vring in self.vrings:
            vring.begin_pass()
        if budget_chains is not None:
            self.tx._state._left = budget_chains
        try:
            self.backend.handle_event(1, EPOLLIN, self.vrings, 0)
            raised = None
        except Exception as exc:
            raised = (type(exc).__name__, str(exc))
        state = self.tx._state
        q = state.queue
        packed = isinstance(q, PackedQueue)
        in_flight = (q.get_base(), q._counts_np.tolist()) if packed else None
        return (
            in_flight,
            raised,
            self.backend.stats,
            read_counter(self.call),
            read_counter(self.err),
            state.broken,
            state.yielded,
            state._left,
            None if q is None else (q.next_avail, q.next_used),
        )

    def close(self) -> None:
        for vring in self.vrings:
            vring.reset()  # closes the eventfds; the memfd mappings go with the object


def twins(size: int, features: int, reads: str, monkeypatch: Any) -> list[Side]:
    sides = [Side(size, features, reads)]
    with monkeypatch.context() as m:
        m.setattr(speedups, "accel", None)
        sides.append(Side(size, features, reads))
    assert sides[0].tx._state.queue._accel is not None
    assert sides[1].tx._state.queue._accel is None
    return sides


@st.composite
def kicks(draw: st.DrawFn) -> tuple[int, int, str, list[Any]]:
    size = draw(st.sampled_from([4, 8, 16, 64]))
    event_idx = draw(st.booleans())
    reads = draw(st.sampled_from(["copy", "checksum"]))
    rounds = []
    for _ in range(draw(st.integers(1, 5))):
        table = draw(st.lists(BUFFERS, min_size=size, max_size=size))
        if draw(st.booleans()):  # a well-behaved burst: the fused pass takes all of it
            table = [(BUFS + 0x800 * i, NET_HDR_SIZE + 50 + i, 0) for i in range(size)]
        heads = draw(st.lists(st.integers(0, size + 2), min_size=size, max_size=size))
        if draw(st.booleans()):
            heads = list(range(size))
        count = draw(st.one_of(st.integers(0, size), st.just(size + 1), st.just(0xFFFF)))
        flags = draw(st.sampled_from([0, 1]))  # VRING_AVAIL_F_NO_INTERRUPT
        used_event = draw(st.integers(0, 0xFFFF))
        chains_budget = draw(st.one_of(st.none(), st.integers(0, size + 1)))
        payload = draw(st.integers(0, 255))
        rounds.append((table, heads, count, flags, used_event, chains_budget, payload))
    return size, BASE_FEATURES | (EVENT_IDX if event_idx else 0), reads, rounds


@needs_accel
@settings(
    max_examples=budget(150),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=kicks())
def test_fused_pass_same_as_pure_loop(
    case: tuple[int, int, str, list[Any]], monkeypatch: Any
) -> None:
    size, features, reads, rounds = case
    sides = twins(size, features, reads, monkeypatch)
    try:
        for table, heads, count, flags, used_event, chains_budget, payload in rounds:
            for side in sides:
                q = side.tx._state.queue
                na = q.next_avail if q is not None else 0
                for i, (addr, ln, fl) in enumerate(table):
                    side.write(RING + 16 * i, DESC.pack(addr, ln, fl, 0))
                    if BUFS <= addr < REGION - 2048:
                        side.write(addr, bytes([(payload + i + j) & 0xFF for j in range(64)]))
                ring = b"".join(struct.pack("<H", h) for h in heads)
                for k in range(size):
                    slot = (na + k) & (size - 1)
                    side.write(side.avail + 4 + 2 * slot, ring[2 * k : 2 * k + 2])
                side.write(side.avail, struct.pack("<HH", flags, (na + count) & 0xFFFF))
                side.write(side.avail + 4 + 2 * size, struct.pack("<H", used_event))
            got = [side.kick(chains_budget) for side in sides]
            assert got[0] == got[1]
            assert image(sides[0].mem) == image(sides[1].mem)
    finally:
        for side in sides:
            side.close()


@needs_accel
def test_fused_pass_takes_a_plain_kick_whole(monkeypatch: Any) -> None:
    """A burst of good frames is one fused call: done, counted, completed, the driver called."""
    side = Side(8, BASE_FEATURES, "checksum")
    try:
        for i in range(8):
            side.write(RING + 16 * i, DESC.pack(BUFS + 0x800 * i, 76, 0, 0))
            side.write(side.avail + 4 + 2 * i, struct.pack("<H", i))
        side.write(side.avail, struct.pack("<HH", 0, 8))
        side.tx.begin_pass()
        done = side.tx.sink_pass(NET_HDR_SIZE, True)
        assert done is not None and done.status == DONE
        assert (done.packets, done.bytes, done.left) == (8, 8 * 64, 0)
        assert done.checksum == 8 * 0x00400001  # adler32 of 64 zero bytes
        assert read_counter(side.call) == 1
        assert side.tx._state.queue.next_used == 8
    finally:
        side.close()


@needs_accel
def test_fused_pass_leaves_a_chain_to_the_pure_loop() -> None:
    side = Side(8, BASE_FEATURES, "copy")
    try:
        side.write(RING, DESC.pack(BUFS, 76, 1, 1))  # a chain: the pure path walks it
        side.write(RING + 16, DESC.pack(BUFS + 0x800, 76, 0, 0))
        side.write(side.avail, struct.pack("<HHH", 0, 1, 0))
        side.tx.begin_pass()
        done = side.tx.sink_pass(NET_HDR_SIZE, False)
        assert done is not None and done.status == FALLBACK and done.packets == 0
        assert side.tx._state.queue.next_avail == 0  # nothing consumed
    finally:
        side.close()


def fused_states() -> Iterator[str]:
    yield "dirty log"
    yield "inflight"
    yield "broken"
    yield "no call fd"


@needs_accel
@pytest.mark.parametrize("state", list(fused_states()))
def test_fused_pass_does_not_apply(state: str) -> None:
    """Dirty logging, inflight tracking, a broken ring, in-band calls: the pure loop only."""
    side = Side(8, BASE_FEATURES, "copy")
    try:
        s = side.tx._state
        if state == "dirty log":
            s.queue.set_log(object(), None)  # type: ignore[arg-type]
        elif state == "inflight":
            s.inflight = object()
        elif state == "broken":
            s.broken = "test"
        else:
            side.tx.set_call(None)
        assert side.tx.sink_pass(NET_HDR_SIZE, False) is None
    finally:
        side.close()


@needs_accel
def test_fused_pass_and_pure_loop_raise_the_same_on_a_bad_call_fd(monkeypatch: Any) -> None:
    """A call fd that cannot be written: OSError from both, the work done and counted."""
    sides = twins(8, BASE_FEATURES, "copy", monkeypatch)
    got = []
    try:
        for side in sides:
            r, w = os.pipe()
            os.close(w)
            side.tx.set_call(r)  # a read end: write() fails with EBADF
            side.write(RING, DESC.pack(BUFS, 76, 0, 0))
            side.write(side.avail, struct.pack("<HHH", 0, 1, 0))
            got.append(side.kick(None))
        assert got[0] == got[1]
        assert got[0][1][0] == "OSError" and got[0][2].tx_packets == 1
    finally:
        for side in sides:
            side.close()


def test_pure_path_has_no_fused_pass(monkeypatch: Any) -> None:
    monkeypatch.setattr(speedups, "accel", None)
    side = Side(8, BASE_FEATURES, "copy")
    try:
        assert side.tx.sink_pass(NET_HDR_SIZE, False) is None
        assert np.uint16(side.tx._state.queue.next_avail) == 0
    finally:
        side.close()


@st.composite
def packed_kicks(draw: st.DrawFn) -> tuple[int, int, str, list[Any]]:
    size = draw(st.sampled_from([4, 6, 8, 16, 64]))  # packed rings need no power of two
    event_idx = draw(st.booleans())
    reads = draw(st.sampled_from(["copy", "checksum"]))
    rounds = []
    for _ in range(draw(st.integers(1, 5))):
        count = draw(st.integers(0, size))
        table = draw(st.lists(BUFFERS, min_size=count, max_size=count))
        if draw(st.booleans()):
            table = [(BUFS + 0x800 * i, NET_HDR_SIZE + 50 + i, 0) for i in range(count)]
        ids = draw(st.lists(st.integers(0, size + 2), min_size=count, max_size=count))
        if draw(st.booleans()):
            ids = list(range(count))
        driver_flags = draw(st.integers(0, 3))
        off_wrap = draw(st.integers(0, 0xFFFF))
        chains_budget = draw(st.one_of(st.none(), st.integers(0, size + 1)))
        rounds.append((table, ids, driver_flags, off_wrap, chains_budget))
    return size, BASE_FEATURES | PACKED | (EVENT_IDX if event_idx else 0), reads, rounds


@needs_accel
@settings(
    max_examples=budget(150),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=packed_kicks())
def test_fused_packed_pass_same_as_pure_loop(
    case: tuple[int, int, str, list[Any]], monkeypatch: Any
) -> None:
    """Packed rings: runs of buffers made available (wrap counters), repeated ids, chains."""
    size, features, reads, rounds = case
    sides = twins(size, features, reads, monkeypatch)
    try:
        for table, ids, driver_flags, off_wrap, chains_budget in rounds:
            for side in sides:
                q = side.tx._state.queue
                assert isinstance(q, PackedQueue)
                pos, wrap = q.next_avail, q.avail_wrap
                descs = []
                for (addr, ln, fl), bid in zip(table, ids, strict=True):
                    avail = (0x80 if wrap else 0x8000) | fl
                    descs.append((pos, DESC.pack(addr, ln, bid, avail)))
                    pos += 1
                    if pos == size:
                        pos, wrap = 0, wrap ^ 1
                for p, raw in reversed(descs):  # the first one's flags last, as drivers do
                    side.write(RING + 16 * p, raw)
                side.write(side.avail, struct.pack("<HH", off_wrap, driver_flags))
            got = [side.kick(chains_budget) for side in sides]
            assert got[0] == got[1]
            assert image(sides[0].mem) == image(sides[1].mem)
    finally:
        for side in sides:
            side.close()

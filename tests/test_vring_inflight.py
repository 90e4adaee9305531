"""Vrings with an inflight buffer: track, "crash", re-attach, resubmit, complete."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from virtq_support import BUF_GPA, make_memory

from vhsm import inflight
from vhsm.errors import VirtqError
from vhsm.inflight import InflightBuffer, InflightPacked, InflightSplit
from vhsm.memory import GuestMemory
from vhsm.virtq import PackedDriver, PackedQueue, SplitDriver
from vhsm.vring import VringMutex, VringState
from vhsm.wire.payloads import VhostUserInflight

PACKED = 1 << 34
INDIRECT = 1 << 28
SIZE = 16
RING_GPA = 0x1000


@dataclass
class Rig:
    """Guest memory, a driver-side ring and the inflight buffer the front-end keeps."""

    mem: GuestMemory
    packed: bool
    drv: SplitDriver | PackedDriver
    desc: VhostUserInflight
    fd: int
    buffers: list[InflightBuffer] = field(default_factory=list)
    next_buf: int = BUF_GPA

    def attach(self) -> InflightSplit | InflightPacked:
        """SET_INFLIGHT_FD: map the same buffer again (as a restarted back-end does)."""
        buf = inflight.attach(self.desc, os.dup(self.fd), packed=self.packed)
        self.buffers.append(buf)
        return buf.queue(0)

    def vring(self, base: int | None = None) -> VringMutex:
        """A fresh vring over the same ring memory (SET_VRING_NUM/BASE/ADDR), not yet started."""
        vring = VringMutex(self.mem, 256, index=0)
        vring.set_features((PACKED if self.packed else 0) | INDIRECT)
        vring.set_queue_size(SIZE)
        if base is not None:
            vring.set_queue_base(base)
        drv = self.drv
        if isinstance(drv, PackedDriver):
            vring.set_queue_info(drv.desc_gpa, drv.driver_event_gpa, drv.device_event_gpa)
        else:
            vring.set_queue_info(drv.desc_gpa, drv.avail_gpa, drv.used_gpa)
        return vring

    def resume_base(self) -> int:
        """What a front-end sends after a disconnect: the used index it has seen."""
        drv = self.drv
        if isinstance(drv, PackedDriver):
            used = drv.last_used | drv.used_wrap << 15
            return used | used << 16
        return int.from_bytes(self.mem.read(drv.used_gpa + 2, 2), "little")

    def buf(self, data: bytes) -> int:
        gpa = self.next_buf
        self.next_buf += 0x100
        self.mem.write(gpa, data.ljust(0x100, b"\0"))
        return gpa

    def post(self, text: bytes, pieces: int = 1, *, indirect: bool = False) -> int:
        """A request: ``text`` in ``pieces`` readable buffers and one writable buffer."""
        step = -(-len(text) // pieces)
        parts = [text[i : i + step] for i in range(0, len(text), step)]
        readable = [(self.buf(p), len(p)) for p in parts]
        writable = [(self.buf(b""), 64)]
        if indirect:
            table = self.buf(b"")
            return self.drv.add_chain(readable, writable, indirect_gpa=table, memory=self.mem)
        return self.drv.add_chain(readable, writable)


def make_rig(packed: bool) -> Iterator[Rig]:
    mem = make_memory()
    drv: SplitDriver | PackedDriver
    if packed:
        drv = PackedDriver.layout(mem, SIZE, RING_GPA)
    else:
        drv = SplitDriver.layout(mem, SIZE, RING_GPA)
    desc, fd = inflight.allocate(1, SIZE, packed)
    r = Rig(mem, packed, drv, desc, fd)
    yield r
    for b in r.buffers:
        b.close()
    os.close(fd)


@pytest.fixture(params=["split", "packed"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    yield from make_rig(request.param == "packed")


@pytest.fixture
def packed_rig() -> Iterator[Rig]:
    yield from make_rig(True)


def cycle(rig: Rig, vring: VringMutex, n: int) -> None:
    """Move the ring positions on: ``n`` one-descriptor requests through and back."""
    for i in range(n):
        head = rig.drv.add_chain([(rig.buf(b"w"), 1)])
        chain = vring.pop()
        assert chain is not None and chain.head == head
        vring.add_used(head, 0)
        assert rig.drv.get_used() == (head, 0), i


@pytest.mark.parametrize("warm", [0, 12, 29])
def test_only_uncompleted_requests_come_back_in_order(rig: Rig, warm: int) -> None:
    vring = rig.vring()
    assert vring.set_inflight(rig.attach()) == 0  # nothing recorded yet
    cycle(rig, vring, warm)  # 12 and 29: the crash state straddles the ring's end
    texts = [b"alpha chain", b"bravo", b"charlie indirect", b"delta in three"]
    heads = [
        rig.post(texts[0], 1),
        rig.post(texts[1], 1),
        rig.post(texts[2], 2, indirect=True),
        rig.post(texts[3], 3),
    ]
    got = [vring.pop() for _ in texts]
    assert [c.head for c in got if c is not None] == heads
    assert vring.pop() is None
    # B and D complete (out of order: packed used descriptors overwrite A's ring slots)
    vring.add_used(heads[3], 4)
    vring.add_used(heads[1], 2)
    assert [rig.drv.get_used(), rig.drv.get_used()] == [(heads[3], 4), (heads[1], 2)]
    assert rig.drv.get_used() is None

    # "crash": the back-end loses the vring; a new one over the same ring and buffer
    del vring
    fresh = rig.vring(base=rig.resume_base())
    assert fresh.set_inflight(rig.attach()) == 2  # A and C, to be served again
    again = [fresh.pop(), fresh.pop()]
    assert fresh.pop() is None  # not read from the ring a second time
    assert [c.head for c in again if c is not None] == [heads[0], heads[2]]
    assert [c.read_all() for c in again if c is not None] == [texts[0], texts[2]]
    assert again[1] is not None and again[1].writable_len == 64
    fresh.add_used_batch([heads[2], heads[0]], [7, 5])
    assert [rig.drv.get_used(), rig.drv.get_used()] == [(heads[2], 7), (heads[0], 5)]
    assert rig.drv.get_used() is None
    # the ring goes on past the resubmitted requests, across its end
    cycle(rig, fresh, SIZE + 3)
    last = rig.post(b"echo", 2)
    chain = fresh.pop()
    assert chain is not None and chain.head == last and chain.read_all() == b"echo"
    fresh.add_used(last, 1)
    assert rig.drv.get_used() == (last, 1)


def test_one_length_for_a_tracked_batch(rig: Rig) -> None:
    """``add_used_batch(ids, n)`` with inflight tracking: completed, and not resubmitted."""
    vring = rig.vring()
    vring.set_inflight(rig.attach())
    heads = [rig.post(t, 1) for t in (b"one", b"two", b"three")]
    assert [c.head for c in iter(vring.pop, None)] == heads
    vring.add_used_batch(heads[:2], 9)
    assert [rig.drv.get_used(), rig.drv.get_used()] == [(heads[0], 9), (heads[1], 9)]
    fresh = rig.vring(base=rig.resume_base())
    fresh.set_inflight(rig.attach())
    again = fresh.pop()
    assert again is not None and again.head == heads[2] and fresh.pop() is None


def test_a_second_crash_resubmits_what_is_still_in_flight(rig: Rig) -> None:
    vring = rig.vring()
    vring.set_inflight(rig.attach())
    heads = [rig.post(t, 2) for t in (b"one!", b"two!", b"three")]
    assert [c.head for c in iter(vring.pop, None)] == heads
    vring.add_used(heads[1], 0)
    assert rig.drv.get_used() == (heads[1], 0)
    second = rig.vring(base=rig.resume_base())
    second.set_inflight(rig.attach())
    first = second.pop()
    assert first is not None and first.head == heads[0]
    second.add_used(heads[0], 3)
    third = rig.vring(base=rig.resume_base())  # crashed again with "three" still held
    third.set_inflight(rig.attach())
    batch = third.pop_batch()
    assert [c.head for c in batch.chains] == [heads[2]] and not batch.errors
    assert len(batch.heads) == 0 and third.pop() is None
    third.add_used(heads[2], 5)
    assert [rig.drv.get_used(), rig.drv.get_used()] == [(heads[0], 3), (heads[2], 5)]


def test_batch_published_before_the_crash_is_not_resubmitted(
    packed_rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = packed_rig
    vring = rig.vring()
    tracker = rig.attach()
    vring.set_inflight(tracker)
    a, b = rig.post(b"a"), rig.post(b"b", 1)
    assert [c.head for c in iter(vring.pop, None)] == [a, b]
    vring.add_used(a, 1)

    def crash(slots: object) -> None:
        raise RuntimeError("back-end died before committing the batch")

    monkeypatch.setattr(tracker, "commit_batch", crash)
    with pytest.raises(RuntimeError):
        vring.add_used(b, 1)  # the used descriptor is written, the header not committed
    assert isinstance(tracker, InflightPacked) and tracker.inflight_slots()
    fresh = rig.vring(base=rig.resume_base())
    fresh.set_inflight(rig.attach())
    assert fresh.pop() is None  # the flags at old_used_idx say "published": kept
    assert [rig.drv.get_used(), rig.drv.get_used()] == [(a, 1), (b, 1)]
    with fresh.lock() as state:
        assert state.queue is not None and state.queue.next_used == 4


def test_batch_not_published_before_the_crash_is_resubmitted(
    packed_rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = packed_rig
    vring = rig.vring()
    vring.set_inflight(rig.attach())
    a, b = rig.post(b"a"), rig.post(b"bb", 2)
    assert [c.head for c in iter(vring.pop, None)] == [a, b]
    vring.add_used(a, 1)

    def crash(self: PackedQueue, bid: int, length: int) -> None:
        raise RuntimeError("back-end died before writing the used descriptor")

    with monkeypatch.context() as m:
        m.setattr(PackedQueue, "add_used", crash)
        with pytest.raises(RuntimeError):
            vring.add_used(b, 2)  # the header moved on, nothing published
    fresh = rig.vring(base=rig.resume_base())
    fresh.set_inflight(rig.attach())
    chain = fresh.pop()
    assert chain is not None and chain.head == b and chain.read_all() == b"bb"
    assert fresh.pop() is None
    fresh.add_used(b, 2)
    assert [rig.drv.get_used(), rig.drv.get_used()] == [(a, 1), (b, 2)]


def test_bad_chains_are_tracked_and_completed(rig: Rig) -> None:
    vring = rig.vring()
    vring.set_inflight(rig.attach())
    bad = rig.drv.add_chain([(0xFFFF_0000_0000, 16)])  # outside guest memory
    good = rig.post(b"fine")
    with pytest.raises(VirtqError) as info:
        vring.pop()
    assert info.value.head == bad
    vring.complete_error(info.value)
    chain = vring.pop()
    assert chain is not None and chain.head == good
    fresh = rig.vring(base=rig.resume_base())
    fresh.set_inflight(rig.attach())
    again = fresh.pop()
    assert again is not None and again.head == good and fresh.pop() is None
    fresh.add_used(good, 0)
    assert [rig.drv.get_used(), rig.drv.get_used()] == [(bad, 0), (good, 0)]


def test_a_split_region_on_a_packed_ring_is_refused(packed_rig: Rig) -> None:
    rig = packed_rig
    desc, fd = inflight.allocate(1, SIZE, packed=False)
    buf = inflight.attach(desc, fd, packed=False)
    try:
        vring = rig.vring()
        with pytest.raises(VirtqError, match="split region"):
            vring.set_inflight(buf.queue(0))
        with vring.lock() as state:
            assert isinstance(state, VringState) and state.inflight is None
        head = rig.post(b"untracked")
        chain = vring.pop()
        assert chain is not None and chain.head == head
    finally:
        buf.close()


@pytest.mark.parametrize("tracked", [False, True])
def test_buffers_in_flight_survive_a_memory_table_change(rig: Rig, tracked: bool) -> None:
    vring = rig.vring()
    if tracked:
        vring.set_inflight(rig.attach())
    heads = [rig.post(b"held across", 2), rig.post(b"the update")]
    assert [c.head for c in iter(vring.pop, None)] == heads
    assert vring.update_memory(rig.mem)  # SET_MEM_TABLE: the ring is rebuilt over it
    vring.add_used(heads[1], 1)
    vring.add_used(heads[0], 2)
    assert [rig.drv.get_used(), rig.drv.get_used()] == [(heads[1], 1), (heads[0], 2)]
    if tracked:  # and the inflight buffer agrees: nothing comes back after a crash
        fresh = rig.vring(base=rig.resume_base())
        fresh.set_inflight(rig.attach())
        assert fresh.pop() is None

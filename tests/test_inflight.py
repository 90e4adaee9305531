from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhsm.errors import GuestMemoryError, VirtqError, WireError
from vhsm.inflight import (
    InflightBuffer,
    InflightPacked,
    InflightSplit,
    PackedDesc,
    allocate,
    attach,
    queue_region_size,
)
from vhsm.wire.payloads import VhostUserInflight

AVAIL, USED = 1 << 7, 1 << 15


def restart(desc: VhostUserInflight, fd: int, packed: bool) -> InflightBuffer:
    """A fresh back-end attaching the buffer the front-end kept (Python state lost)."""
    return attach(desc, os.dup(fd), packed=packed)


@pytest.fixture
def split_buf() -> Iterator[tuple[VhostUserInflight, int]]:
    desc, fd = allocate(2, 8, packed=False)
    yield desc, fd
    os.close(fd)


@pytest.fixture
def packed_buf() -> Iterator[tuple[VhostUserInflight, int]]:
    desc, fd = allocate(2, 8, packed=True)
    yield desc, fd
    os.close(fd)


# ---------------------------------------------------------------- allocation / attach


@pytest.mark.parametrize(
    ("qs", "packed", "size"),
    [(8, False, 192), (256, False, 4160), (1, False, 64), (8, True, 320), (3, True, 128)],
)
def test_region_sizes(qs: int, packed: bool, size: int) -> None:
    assert queue_region_size(qs, packed) == size
    if packed:  # DPDK's formula gives the same
        assert size == (32 * qs + 29 + 63) // 64 * 64
    else:
        assert size == (16 * qs + 16 + 63) // 64 * 64


@pytest.mark.parametrize("packed", [False, True])
def test_allocate_gives_a_new_sealed_memfd(packed: bool) -> None:
    desc, fd = allocate(3, 16, packed=packed)
    try:
        assert desc == VhostUserInflight(3 * queue_region_size(16, packed), 0, 3, 16)
        assert os.fstat(fd).st_size == desc.mmap_size
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 10)  # sealed: the front-end cannot make us SIGBUS
        # all zero, as libvhost-user and DPDK hand theirs out: a new region (version 0)
        assert os.pread(fd, desc.mmap_size, 0) == bytes(desc.mmap_size)
        buf = restart(desc, fd, packed)
        assert len(buf.queues) == 3
        assert all(q.queue_size == 16 and q.new for q in buf.queues)
        header = os.pread(fd, 12, queue_region_size(16, packed))  # queue 1, laid out
        assert header[8:12] == (0).to_bytes(2, "little") + (16).to_bytes(2, "little")
        if packed:
            q = buf.queue(0)
            assert isinstance(q, InflightPacked)
            assert q.used_wrap_counter and q.free_head == 0 and q.used_idx == 0
        buf.close()
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("num_queues", "queue_size", "field"),
    [(0, 8, "num_queues"), (1, 0, "queue_size"), (1, 65535, "queue_size")],
)
def test_bad_geometry_refused(num_queues: int, queue_size: int, field: str) -> None:
    with pytest.raises(WireError) as info:
        allocate(num_queues, queue_size, packed=False)
    assert info.value.rule_id == "VU-PAY-003"
    assert info.value.field == field
    fd = os.memfd_create("x")
    os.ftruncate(fd, 4096)
    with pytest.raises(WireError) as info:
        attach(VhostUserInflight(4096, 0, num_queues, queue_size), fd, packed=False)
    assert info.value.field == field
    with pytest.raises(OSError):
        os.fstat(fd)  # closed even on error


def test_attach_checks_sizes() -> None:
    fd = os.memfd_create("x")
    os.ftruncate(fd, 192)
    with pytest.raises(WireError) as info:
        attach(VhostUserInflight(191, 0, 1, 8), os.dup(fd), packed=False)
    assert info.value.field == "mmap_size"
    with pytest.raises(GuestMemoryError, match="too small"):
        attach(VhostUserInflight(192, 64, 1, 8), os.dup(fd), packed=False)
    # a queue header claiming another size is refused
    os.pwrite(fd, (1).to_bytes(2, "little") + (4).to_bytes(2, "little"), 8)
    with pytest.raises(VirtqError, match="desc_num 4"):
        attach(VhostUserInflight(192, 0, 1, 8), os.dup(fd), packed=False)
    os.pwrite(fd, (7).to_bytes(2, "little"), 8)
    with pytest.raises(VirtqError, match="version 7"):
        attach(VhostUserInflight(192, 0, 1, 8), os.dup(fd), packed=False)
    os.close(fd)


def test_uninitialised_buffer_is_initialised_on_attach() -> None:
    fd = os.memfd_create("x")
    os.ftruncate(fd, 320)
    buf = attach(VhostUserInflight(320, 0, 1, 8), os.dup(fd), packed=True)
    q = buf.queue(0)
    assert isinstance(q, InflightPacked)
    assert q.resubmit(lambda pos: 0) == []
    slot = q.fetch([(0x1000, 16, 0, 0)])
    assert slot == 0 and q.free_head == 1
    buf.close()
    os.close(fd)


# ---------------------------------------------------------------- split


def split_queue(buf: InflightBuffer, index: int = 0) -> InflightSplit:
    q = buf.queue(index)
    assert isinstance(q, InflightSplit)
    return q


def test_split_fetch_complete_crash_resubmit_in_fetch_order(
    split_buf: tuple[VhostUserInflight, int],
) -> None:
    desc, fd = split_buf
    buf = restart(desc, fd, False)
    q = split_queue(buf, 1)
    for head in (5, 2, 7, 0):
        q.fetch(head)
    used = 0

    def publish(n: int) -> int:
        nonlocal used
        used += n
        return used

    q.complete([2], lambda: publish(1))
    q.complete([0], lambda: publish(1))
    assert q.inflight_heads() == [5, 7]
    # queue 0 is untouched
    assert split_queue(buf, 0).inflight_heads() == []
    buf.close()  # the back-end "crashes"

    again = restart(desc, fd, False)
    q2 = split_queue(again, 1)
    assert q2.resubmit(used) == [5, 7]
    q2.fetch(3)  # fetched after the resubmitted ones: later in the order
    again.close()
    third = restart(desc, fd, False)
    assert split_queue(third, 1).resubmit(used) == [5, 7, 3]
    third.close()


def test_split_half_published_batch_is_fixed_up(
    split_buf: tuple[VhostUserInflight, int],
) -> None:
    desc, fd = split_buf
    buf = restart(desc, fd, False)
    q = split_queue(buf)
    for head in (1, 3, 4, 6):
        q.fetch(head)
    q.complete([6], lambda: 1)
    # batch [3, 1]: linked, then the used ring is published (idx 1 -> 3), then crash
    q.prepare_batch([3, 1])
    buf.close()

    crashed = restart(desc, fd, False)
    q2 = split_queue(crashed)
    assert q2.inflight_heads() == [1, 3, 4]  # flags still stale
    assert q2.resubmit(3) == [4]
    assert q2.used_idx == 3
    crashed.close()


def test_split_batch_linked_but_not_published_is_resubmitted(
    split_buf: tuple[VhostUserInflight, int],
) -> None:
    desc, fd = split_buf
    buf = restart(desc, fd, False)
    q = split_queue(buf)
    for head in (1, 3, 4):
        q.fetch(head)
    q.prepare_batch([3, 1])  # crash before used->idx moved
    buf.close()
    crashed = restart(desc, fd, False)
    assert split_queue(crashed).resubmit(0) == [1, 3, 4]
    crashed.close()


def test_split_used_idx_wraps(split_buf: tuple[VhostUserInflight, int]) -> None:
    desc, fd = split_buf
    buf = restart(desc, fd, False)
    q = split_queue(buf)
    q.fetch(0)
    q.complete([0], lambda: 0xFFFF)
    q.fetch(1)
    q.fetch(2)
    q.prepare_batch([1, 2])
    buf.close()
    crashed = restart(desc, fd, False)
    q2 = split_queue(crashed)
    assert q2.resubmit(0x10001) == []  # 0xFFFF + 2, taken modulo 2**16
    assert q2.used_idx == 1
    crashed.close()


def test_split_inconsistent_used_idx_refused(split_buf: tuple[VhostUserInflight, int]) -> None:
    desc, fd = split_buf
    first = restart(desc, fd, False)
    split_queue(first).adopt(0)  # the region records position 0
    first.close()
    buf = restart(desc, fd, False)
    q = split_queue(buf)
    assert not q.new
    with pytest.raises(VirtqError):
        q.resubmit(100)  # 100 entries past with a queue of 8
    with pytest.raises(VirtqError):
        q.fetch(8)
    buf.close()


# ---------------------------------------------------------------- packed


class PackedRing:
    """Just enough of a packed ring for the tracker: descriptor flags per position."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.flags = [0] * size
        self.avail_idx, self.avail_wrap = 0, 1
        self.used_idx, self.used_wrap = 0, 1

    def make_available(self, n: int) -> list[int]:
        positions = []
        for _ in range(n):
            self.flags[self.avail_idx] = AVAIL if self.avail_wrap else USED
            positions.append(self.avail_idx)
            self.avail_idx += 1
            if self.avail_idx == self.size:
                self.avail_idx, self.avail_wrap = 0, self.avail_wrap ^ 1
        return positions

    def publish(self, lengths: list[int]) -> None:
        for n in lengths:
            self.flags[self.used_idx] = (AVAIL | USED) if self.used_wrap else 0
            self.used_idx += n
            if self.used_idx >= self.size:
                self.used_idx, self.used_wrap = self.used_idx - self.size, self.used_wrap ^ 1


def packed_queue(buf: InflightBuffer, index: int = 0) -> InflightPacked:
    q = buf.queue(index)
    assert isinstance(q, InflightPacked)
    return q


def chain(buf_id: int, n: int) -> list[PackedDesc]:
    return [
        PackedDesc(0x10000 * buf_id + 0x100 * k, 64 + k, buf_id, 0x1 if k < n - 1 else 0)
        for k in range(n)
    ]


def test_packed_fetch_complete_crash_resubmit(packed_buf: tuple[VhostUserInflight, int]) -> None:
    desc, fd = packed_buf
    buf = restart(desc, fd, True)
    q = packed_queue(buf, 1)
    ring = PackedRing(8)
    slots = {}
    for buf_id, n in ((7, 2), (3, 1), (5, 3)):
        ring.make_available(n)
        slots[buf_id] = q.fetch(chain(buf_id, n))
    assert slots == {7: 0, 3: 2, 5: 3}
    q.complete([slots[3]], lambda: ring.publish([1]))
    assert q.used_idx == 1
    buf.close()

    again = restart(desc, fd, True)
    q2 = packed_queue(again, 1)
    got = q2.resubmit(lambda pos: ring.flags[pos])
    assert [c.id for c in got] == [7, 5]
    assert [list(c.descs) for c in got] == [chain(7, 2), chain(5, 3)]
    # completing a resubmitted chain after the restart works and frees its slots
    q2.complete([got[0].slot], lambda: ring.publish([2]))
    assert q2.inflight_slots() == [slots[5]]
    again.close()


@pytest.mark.parametrize("published", [False, True])
def test_packed_half_recorded_batch(
    packed_buf: tuple[VhostUserInflight, int], published: bool
) -> None:
    desc, fd = packed_buf
    buf = restart(desc, fd, True)
    q = packed_queue(buf)
    ring = PackedRing(8)
    ring.make_available(4)
    a = q.fetch(chain(1, 1))
    b = q.fetch(chain(2, 2))
    c = q.fetch(chain(3, 1))
    q.prepare_batch([c, a])
    if published:
        ring.publish([1, 1])
    buf.close()  # crash before commit_batch

    crashed = restart(desc, fd, True)
    q2 = packed_queue(crashed)
    got = q2.resubmit(lambda pos: ring.flags[pos])
    if published:
        assert [g.id for g in got] == [2]
        assert (q2.used_idx, q2.used_wrap_counter) == (2, True)
    else:
        assert [g.id for g in got] == [1, 2, 3]
        assert (q2.used_idx, q2.used_wrap_counter) == (0, True)
    assert got[0 if published else 1].slot == b
    crashed.close()


def test_packed_crash_mid_fetch_rolls_back(packed_buf: tuple[VhostUserInflight, int]) -> None:
    desc, fd = packed_buf
    buf = restart(desc, fd, True)
    q = packed_queue(buf)
    q.fetch(chain(1, 1))
    with pytest.raises(VirtqError):
        q.fetch(chain(2, 9))  # longer than the queue
    with pytest.raises(VirtqError):
        q.prepare_batch([5])  # not in flight
    buf.close()
    crashed = restart(desc, fd, True)
    assert [c.id for c in packed_queue(crashed).resubmit(lambda pos: 0)] == [1]
    crashed.close()


# ---------------------------------------------------------------- random histories

CRASH_POINTS = ("none", "before_publish", "before_commit")


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_split_random_histories(data: st.DataObject) -> None:
    qs = 8
    desc, fd = allocate(1, qs, packed=False)
    buf = restart(desc, fd, False)
    q = split_queue(buf)
    free = list(range(qs))
    inflight: list[int] = []  # fetch order
    used = 0
    try:
        for _ in range(data.draw(st.integers(1, 25))):
            if free and (not inflight or data.draw(st.booleans())):
                head = free.pop(data.draw(st.integers(0, len(free) - 1)))
                q.fetch(head)
                inflight.append(head)
                continue
            batch = data.draw(st.lists(st.sampled_from(inflight), min_size=1, unique=True))
            crash = data.draw(st.sampled_from(CRASH_POINTS))
            q.prepare_batch(batch)
            if crash != "before_publish":
                used = (used + len(batch)) & 0xFFFF
                inflight = [h for h in inflight if h not in batch]
                free += batch
                if crash == "none":
                    q.commit_batch(batch, used)
            if crash != "none":
                buf.close()
                buf = restart(desc, fd, False)
                q = split_queue(buf)
                assert q.resubmit(used) == inflight
        buf.close()
        buf = restart(desc, fd, False)
        assert split_queue(buf).resubmit(used) == inflight
    finally:
        buf.close()
        os.close(fd)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_packed_random_histories(data: st.DataObject) -> None:
    qs = 8
    desc, fd = allocate(1, qs, packed=True)
    buf = restart(desc, fd, True)
    q = packed_queue(buf)
    ring = PackedRing(qs)
    inflight: list[tuple[int, int, int]] = []  # (buffer id, slot, n) in fetch order
    next_id = 0
    try:
        for _ in range(data.draw(st.integers(1, 30))):
            room = qs - sum(n for _, _, n in inflight)
            if room and (not inflight or data.draw(st.booleans())):
                n = data.draw(st.integers(1, min(3, room)))
                ring.make_available(n)
                inflight.append((next_id, q.fetch(chain(next_id, n)), n))
                next_id += 1
                continue
            batch = data.draw(st.lists(st.sampled_from(inflight), min_size=1, unique=True))
            crash = data.draw(st.sampled_from(CRASH_POINTS))
            slots = [slot for _, slot, _ in batch]
            q.prepare_batch(slots)
            if crash != "before_publish":
                ring.publish([n for _, _, n in batch])
                inflight = [e for e in inflight if e not in batch]
                if crash == "none":
                    q.commit_batch(slots)
            if crash != "none":
                buf.close()
                buf = restart(desc, fd, True)
                q = packed_queue(buf)
                got = q.resubmit(lambda pos: ring.flags[pos])
                assert [(c.id, c.slot, len(c.descs)) for c in got] == inflight
                assert all(list(c.descs) == chain(c.id, len(c.descs)) for c in got)
                assert (q.used_idx, q.used_wrap_counter) == (ring.used_idx, bool(ring.used_wrap))
        buf.close()
        buf = restart(desc, fd, True)
        got = packed_queue(buf).resubmit(lambda pos: ring.flags[pos])
        assert [(c.id, c.slot, len(c.descs)) for c in got] == inflight
    finally:
        buf.close()
        os.close(fd)

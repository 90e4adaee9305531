from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtq_support import BUF_GPA, MEM_SIZE, make_memory, split_pair

from vhsm.dirtylog import DirtyLog
from vhsm.errors import VirtqError
from vhsm.memory import GuestMemory
from vhsm.virtq import SplitQueue, vring_need_event
from vhsm.virtq.common import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE


@pytest.fixture(scope="module")
def mem() -> GuestMemory:
    return make_memory()


def write_desc(mem: GuestMemory, table: int, i: int, addr: int, ln: int, fl: int, nxt: int) -> None:
    mem.write(table + 16 * i, struct.pack("<QIHH", addr, ln, fl, nxt))


def test_round_trip_direct_and_indirect(mem: GuestMemory) -> None:
    drv, q = split_pair(mem, 8)
    mem.write(BUF_GPA, b"request!")
    h1 = drv.add_chain([(BUF_GPA, 4), (BUF_GPA + 4, 4)], [(BUF_GPA + 0x100, 16)])
    h2 = drv.add_chain([(BUF_GPA, 8)], [(BUF_GPA + 0x200, 8)], indirect_gpa=0x8000, memory=mem)
    c1 = q.pop()
    assert c1 is not None and c1.head == h1
    assert c1.read_all() == b"request!" and c1.readable_len == 8 and c1.writable_len == 16
    assert c1.write(b"x" * 20) == 16
    q.add_used(c1.head, 16)
    c2 = q.pop()
    assert c2 is not None and c2.head == h2 and c2.read(3, offset=2) == b"que"
    q.add_used(c2.head, 0)
    assert q.pop() is None
    assert drv.get_used() == (h1, 16)
    assert drv.get_used() == (h2, 0)
    assert mem.read(BUF_GPA + 0x100, 16) == b"x" * 16
    assert drv.num_free == 8


def test_wraparound_of_16_bit_indices(mem: GuestMemory) -> None:
    drv, q = split_pair(mem, 4)
    for i in range(70000 // 3):
        for _ in range(3):
            drv.add_chain([(BUF_GPA, 8)], publish=False)
        drv.publish()
        got = [c.head for c in q]
        assert len(got) == 3
        if i % 2:
            q.add_used_batch(got, [1, 2, 3])
        else:
            for h in got:
                q.add_used(h, 1)
        assert len(drv.get_used_batch()[0]) == 3
    assert q.next_avail == q.next_used == (3 * (70000 // 3)) & 0xFFFF
    assert q.get_base() == q.next_avail


def test_event_idx_suppression(mem: GuestMemory) -> None:
    drv, q = split_pair(mem, 8, event_idx=True)
    assert drv.kick_needed() is False  # nothing published
    drv.add_chain([(BUF_GPA, 8)])
    assert drv.kick_needed()  # avail_event 0 lies in [0, 1)
    chain = q.pop()
    assert chain is not None
    assert q.enable_notification() is False  # avail_event := 1, nothing new
    drv.add_chain([(BUF_GPA, 8)])
    drv.add_chain([(BUF_GPA, 8)])
    assert drv.kick_needed()
    q.add_used(chain.head, 0)
    assert q.needs_notification()  # first signal always
    drv.enable_interrupts()  # used_event := last_used (0)
    heads = [c.head for c in q]
    q.add_used(heads[0], 0)
    assert not q.needs_notification()  # driver has not reaped: used_event 0 not in [1, 2)
    assert drv.enable_interrupts() is True  # entries pending: the driver reaps first
    assert drv.get_used() is not None and drv.get_used() is not None
    assert drv.enable_interrupts() is False  # used_event := 2
    q.add_used(heads[1], 0)
    assert q.needs_notification()  # 2 lies in [2, 3)
    assert not q.needs_notification()  # nothing new since


def test_flags_suppression_without_event_idx(mem: GuestMemory) -> None:
    drv, q = split_pair(mem, 8)
    q.disable_notification()
    drv.add_chain([(BUF_GPA, 8)])
    assert not drv.kick_needed()
    assert q.enable_notification() is True  # work arrived while kicks were off
    assert drv.kick_needed() is False  # nothing new since the last decision
    drv.add_chain([(BUF_GPA, 8)])
    assert drv.kick_needed()
    drv.disable_interrupts()
    chain = q.pop()
    assert chain is not None
    q.add_used(chain.head, 0)
    assert not q.needs_notification()
    assert drv.enable_interrupts() is True  # the driver sees the pending entry itself
    assert not q.needs_notification()  # nothing new
    drv.add_chain([(BUF_GPA, 8)])
    chain = q.pop()
    assert chain is not None
    q.add_used(chain.head, 0)
    assert q.needs_notification()


@pytest.mark.parametrize(
    ("new", "old", "event", "expected"),
    [
        (1, 0, 0, True),
        (5, 3, 2, False),
        (5, 3, 3, True),
        (5, 3, 4, True),
        (5, 3, 5, False),
        (2, 0xFFFE, 0xFFFF, True),
        (2, 0xFFFE, 2, False),
        (0, 0, 0, False),
    ],
)
def test_vring_need_event(new: int, old: int, event: int, expected: bool) -> None:
    assert vring_need_event(event, new, old) is expected


def test_batch_pop_and_add_used(mem: GuestMemory) -> None:
    drv, q = split_pair(mem, 16)
    addrs = BUF_GPA + 64 * np.arange(10, dtype=np.uint64)
    drv.add_simple_batch(addrs, np.full(10, 64, np.uint32), np.arange(10) % 2 == 0)
    drv.add_chain([(BUF_GPA, 8), (BUF_GPA + 8, 8)])
    drv.add_chain([(MEM_SIZE + 0x1000, 8)])  # outside guest memory
    batch = q.pop_batch()
    assert len(batch) == 12 and len(batch.heads) == 10
    assert len(batch.chains) == 1 and len(batch.errors) == 1
    assert batch.writable.tolist() == [i % 2 == 0 for i in range(10)]
    batch.buffer(0)[:4] = b"abcd"
    assert mem.read(BUF_GPA, 4) == b"abcd"
    assert batch.region_array(0)[int(batch.offsets[1])] == mem.read(BUF_GPA + 64, 1)[0]
    err = batch.errors[0]
    assert err.head is not None
    ids = [*batch.heads.tolist(), batch.chains[0].head, err.head]
    q.add_used_batch(ids, [64] * 10 + [0, 0])
    heads, lens = drv.get_used_batch()
    assert sorted(heads.tolist()) == sorted(ids) and lens.tolist()[:10] == [64] * 10
    assert drv.num_free == 16


def test_bad_chains_are_consumed_and_queue_stays_usable(mem: GuestMemory) -> None:
    drv, q = split_pair(mem, 8, indirect=False)
    drv.add_chain([(BUF_GPA, 8)], [(BUF_GPA, 8)], indirect_gpa=0x8000, memory=mem)
    drv.add_chain([(BUF_GPA, 8)])
    with pytest.raises(VirtqError, match="INDIRECT without") as info:
        q.pop()
    assert info.value.head is not None and info.value.rule_id == "VU-RING-009"
    q.add_used(info.value.head, 0)
    chain = q.pop()
    assert chain is not None and chain.readable_len == 8


def test_avail_idx_too_far_is_not_consumed(mem: GuestMemory) -> None:
    drv, q = split_pair(mem, 8)
    avail = mem.translate(drv.avail_gpa, 4).cast("H")
    avail[1] = 9
    with pytest.raises(VirtqError, match="moved 9") as info:
        q.pop()
    assert info.value.head is None and q.next_avail == 0
    avail[1] = 0
    assert q.pop() is None


@pytest.mark.parametrize(
    ("descs", "match"),
    [
        ([(BUF_GPA, 8, VIRTQ_DESC_F_NEXT, 0)], "longer than"),  # loop to itself
        ([(BUF_GPA, 8, VIRTQ_DESC_F_NEXT, 9)], "next index"),
        ([(0x8000, 0, VIRTQ_DESC_F_INDIRECT, 0)], "indirect table length"),
        ([(0x8000, 24, VIRTQ_DESC_F_INDIRECT, 0)], "indirect table length"),
        ([(0x8000, 16 * 9, VIRTQ_DESC_F_INDIRECT, 0)], "indirect table length"),
        ([(0x8000, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)], "INDIRECT and NEXT"),
        ([(BUF_GPA, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1), (BUF_GPA, 8, 0, 0)], "after"),
        ([(MEM_SIZE - 4, 8, 0, 0)], "outside guest memory"),
        ([(2**64 - 4, 8, 0, 0)], "outside guest memory"),
        ([(BUF_GPA, 2**32 - 1, VIRTQ_DESC_F_NEXT, 1), (BUF_GPA, 8, 0, 0)], "outside|2\\^32"),
    ],
)
def test_invalid_chains(
    mem: GuestMemory, descs: list[tuple[int, int, int, int]], match: str
) -> None:
    drv, q = split_pair(mem, 8)
    for i, d in enumerate(descs):
        write_desc(mem, drv.desc_gpa, i, *d)
    avail = mem.translate(drv.avail_gpa, 6 + 16).cast("H")
    avail[2] = 0
    avail[1] = 1
    with pytest.raises(VirtqError, match=match) as info:
        q.pop()
    assert info.value.head == 0 and q.next_avail == 1


def test_nested_indirect(mem: GuestMemory) -> None:
    drv, q = split_pair(mem, 8)
    write_desc(mem, drv.desc_gpa, 0, 0x8000, 16, VIRTQ_DESC_F_INDIRECT, 0)
    write_desc(mem, 0x8000, 0, 0x9000, 16, VIRTQ_DESC_F_INDIRECT, 0)
    avail = mem.translate(drv.avail_gpa, 6 + 16).cast("H")
    avail[1] = 1
    with pytest.raises(VirtqError, match="nested"):
        q.pop()


def test_dirty_log_marks_device_writes(mem: GuestMemory) -> None:
    drv, q = split_pair(mem, 8)
    bitmap = bytearray(MEM_SIZE // 4096 // 8)
    log = DirtyLog(memoryview(bitmap), atomic=False)
    q.set_log(log, log_used_gpa=drv.used_gpa)
    page = 0x200000
    drv.add_chain([(BUF_GPA, 8)], [(page, 4096), (page + 3 * 4096, 4096)])
    chain = q.pop()
    assert chain is not None
    q.add_used(chain.head, 4097)  # one byte into the second writable buffer

    def dirty(gpa: int) -> bool:
        pg = gpa // 4096
        return bool(bitmap[pg // 8] >> (pg % 8) & 1)

    assert dirty(page) and dirty(page + 3 * 4096)
    assert not dirty(page + 4096) and not dirty(BUF_GPA)  # readable buffer not logged
    assert dirty(drv.used_gpa)


def test_rejects_bad_layout(mem: GuestMemory) -> None:
    view = mem.translate(0x1000, 4096)
    with pytest.raises(ValueError, match="power of two"):
        SplitQueue(mem, 6, view, view, view)
    with pytest.raises(ValueError, match="aligned"):
        SplitQueue(mem, 8, mem.translate(0x1008, 128), view, view)
    with pytest.raises(ValueError, match="bytes"):
        SplitQueue(mem, 8, view[:64], view, view)


# ----------------------------------------------------------------------------- hostile rings
descriptor = st.tuples(
    st.one_of(st.integers(0, MEM_SIZE + 0x2000), st.integers(0, 2**64 - 1)),
    st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    table=st.lists(descriptor, min_size=8, max_size=8),
    indirect=st.lists(descriptor, min_size=0, max_size=4),
    heads=st.lists(st.integers(0, 0xFFFF), min_size=8, max_size=8),
    avail_idx=st.integers(0, 0xFFFF),
    batch=st.booleans(),
    feature=st.booleans(),
)
def test_hostile_split_ring(
    mem: GuestMemory,
    table: list[tuple[int, int, int, int]],
    indirect: list[tuple[int, int, int, int]],
    heads: list[int],
    avail_idx: int,
    batch: bool,
    feature: bool,
) -> None:
    drv, q = split_pair(mem, 8, indirect=feature)
    for i, d in enumerate(table):
        write_desc(mem, drv.desc_gpa, i, *d)
    for i, d in enumerate(indirect):
        write_desc(mem, 0x8000, i, *d)
    avail = mem.translate(drv.avail_gpa, 6 + 16).cast("H")
    for i, h in enumerate(heads):
        avail[2 + i] = h
    avail[1] = avail_idx
    consumed = 0
    for _ in range(20):  # termination: at most 8 entries can be consumed
        try:
            if batch:
                b = q.pop_batch()
                if not len(b):
                    break
                consumed += len(b)
                for c in b.chains:
                    assert c.readable_len + c.writable_len < 2**32
                for e in b.errors:
                    if e.head is not None and e.head < 8:
                        q.add_used(e.head, 0)
            else:
                chain = q.pop()
                if chain is None:
                    break
                consumed += 1
                chain.read_all()
                chain.fill(0)
                q.add_used(chain.head, chain.writable_len)
        except VirtqError as exc:
            if exc.head is None:
                # a wild index: as written, or after a writable buffer overlapping the
                # ring overwrote it (chain.fill)
                assert avail_idx > 8 or avail[1] != avail_idx
                break
            consumed += 1
    assert consumed <= 8

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtq_support import BUF_GPA, MEM_SIZE, make_memory, packed_pair

from vhsm.dirtylog import DirtyLog
from vhsm.errors import VirtqError
from vhsm.memory import GuestMemory
from vhsm.virtq.common import (
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)


@pytest.fixture(scope="module")
def mem() -> GuestMemory:
    return make_memory()


def test_round_trip_chains_and_indirect(mem: GuestMemory) -> None:
    drv, q = packed_pair(mem, 8)
    mem.write(BUF_GPA, b"packed!!")
    b1 = drv.add_chain([(BUF_GPA, 4), (BUF_GPA + 4, 4)], [(BUF_GPA + 0x100, 8)])
    b2 = drv.add_chain([(BUF_GPA, 8)], [(BUF_GPA + 0x200, 8)], indirect_gpa=0x8000, memory=mem)
    assert drv.num_free == 4
    c1 = q.pop()
    assert c1 is not None and c1.head == b1 and c1.read_all() == b"packed!!"
    c2 = q.pop()
    assert c2 is not None and c2.head == b2 and c2.writable_len == 8
    assert q.pop() is None
    c2.write(b"12345678")
    q.add_used(b2, 8)  # out of order: the used descriptor goes to position 0
    q.add_used(b1, 3)
    assert drv.get_used() == (b2, 8)
    assert drv.get_used() == (b1, 3)
    assert drv.get_used() is None and drv.num_free == 8
    assert mem.read(BUF_GPA + 0x200, 8) == b"12345678"


def test_wrap_counters_and_base(mem: GuestMemory) -> None:
    drv, q = packed_pair(mem, 5)  # packed sizes need not be powers of two
    for i in range(40):
        ids = [drv.add_chain([(BUF_GPA, 8)], [(BUF_GPA + 8, 8)] * (i % 2)) for _ in range(2)]
        got = [c.head for c in q]
        assert got == ids
        if i % 3:
            q.add_used_batch(got, [1, 2])
        else:
            for h in got:
                q.add_used(h, 1)
        assert len(drv.get_used_batch()[0]) == 2
    base = q.get_base()
    assert base & 0x7FFF == drv.next_avail and base >> 15 & 1 == drv.avail_wrap
    assert base >> 16 & 0x7FFF == drv.last_used and base >> 31 == drv.used_wrap
    _, q2 = packed_pair(mem, 5)
    q2.set_base(base)
    assert q2.get_base() == base
    q2.set_base(base & 0xFFFF)  # DPDK form: used = avail
    assert q2.get_base() == (base & 0xFFFF) | (base & 0xFFFF) << 16
    with pytest.raises(ValueError, match="queue size"):
        q2.set_base(7)


def test_event_suppression(mem: GuestMemory) -> None:
    drv, q = packed_pair(mem, 8, event_idx=True)
    drv.add_chain([(BUF_GPA, 8)])
    assert drv.kick_needed()  # device area flags ENABLE (zeroed)
    q.disable_notification()
    drv.add_chain([(BUF_GPA, 8)])
    assert not drv.kick_needed()
    chains = list(q)
    assert q.enable_notification() is False  # DESC at next avail, nothing new
    drv.add_chain([(BUF_GPA, 8)])
    assert drv.kick_needed()
    q.add_used(chains[0].head, 0)
    assert q.needs_notification()  # first time
    drv.disable_interrupts()
    q.add_used(chains[1].head, 0)
    assert not q.needs_notification()
    drv.get_used()
    assert drv.enable_interrupts() is True  # DESC event at last_used; one pending
    drv.get_used()
    assert drv.enable_interrupts() is False
    extra = q.pop()
    assert extra is not None
    q.add_used(extra.head, 0)
    assert q.needs_notification()


def test_batch(mem: GuestMemory) -> None:
    drv, q = packed_pair(mem, 16)
    drv.add_simple_batch(
        BUF_GPA + 64 * np.arange(6, dtype=np.uint64), np.full(6, 64, np.uint32), np.ones(6, bool)
    )
    drv.add_chain([(BUF_GPA, 8), (BUF_GPA + 8, 8)])
    drv.add_simple_batch(
        np.array([BUF_GPA], np.uint64), np.array([8], np.uint32), np.zeros(1, bool)
    )
    batch = q.pop_batch()
    assert len(batch) == 8 and len(batch.heads) == 7 and len(batch.chains) == 1
    ids = [*batch.heads.tolist(), batch.chains[0].head]
    q.add_used_batch(ids, [5] * 8)
    got, lens = drv.get_used_batch()
    assert sorted(got.tolist()) == sorted(ids) and set(lens.tolist()) == {5}
    assert drv.num_free == 16
    with pytest.raises(VirtqError, match="not in flight"):
        q.add_used_batch([ids[0]], [0])


def put(mem: GuestMemory, gpa: int, i: int, addr: int, ln: int, bid: int, fl: int) -> None:
    mem.write(gpa + 16 * i, struct.pack("<QIHH", addr, ln, bid, fl))


A = VIRTQ_DESC_F_AVAIL  # available in wrap 1


@pytest.mark.parametrize(
    ("descs", "match"),
    [
        ([(BUF_GPA, 8, 3, A | VIRTQ_DESC_F_NEXT)], "not available"),
        ([(0x8000, 0, 3, A | VIRTQ_DESC_F_INDIRECT)], "indirect table length"),
        ([(0x8000, 16, 3, A | VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT), (0, 0, 3, A)], "NEXT"),
        (
            [(BUF_GPA, 8, 3, A | VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT), (BUF_GPA, 8, 3, A)],
            "after",
        ),
        ([(MEM_SIZE, 8, 3, A)], "outside"),
    ],
)
def test_invalid_packed_chains(
    mem: GuestMemory, descs: list[tuple[int, int, int, int]], match: str
) -> None:
    drv, q = packed_pair(mem, 8)
    for i, d in reversed(list(enumerate(descs))):
        put(mem, drv.desc_gpa, i, *d)
    with pytest.raises(VirtqError, match=match) as info:
        q.pop()
    assert info.value.head == 3
    q.add_used(3, 0)  # the bad buffer is completed with length 0
    assert q.pop() is None


def test_indirect_without_feature_and_duplicate_id(mem: GuestMemory) -> None:
    drv, q = packed_pair(mem, 8, indirect=False)
    put(mem, drv.desc_gpa, 0, BUF_GPA, 8, 1, A)
    put(mem, drv.desc_gpa, 1, BUF_GPA, 8, 1, A)  # same buffer id while in flight
    put(mem, drv.desc_gpa, 2, 0x8000, 16, 2, A | VIRTQ_DESC_F_INDIRECT)
    assert q.pop() is not None
    with pytest.raises(VirtqError, match="already in flight") as info:
        q.pop()
    assert info.value.head is None
    with pytest.raises(VirtqError, match="INDIRECT without"):
        q.pop()


def test_dirty_log(mem: GuestMemory) -> None:
    drv, q = packed_pair(mem, 8)
    bitmap = bytearray(MEM_SIZE // 4096 // 8)
    q.set_log(DirtyLog(memoryview(bitmap), atomic=False), log_desc_gpa=drv.desc_gpa)
    page = 0x300000
    drv.add_chain([], [(page + 4096, 100)])
    chain = q.pop()
    assert chain is not None
    q.add_used(chain.head, 100)

    def dirty(gpa: int) -> bool:
        pg = gpa // 4096
        return bool(bitmap[pg // 8] >> (pg % 8) & 1)

    assert dirty(page + 4096) and not dirty(page) and dirty(drv.desc_gpa)


packed_desc = st.tuples(
    st.one_of(st.integers(0, MEM_SIZE + 0x2000), st.integers(0, 2**64 - 1)),
    st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ring=st.lists(packed_desc, min_size=8, max_size=8),
    indirect=st.lists(packed_desc, min_size=0, max_size=4),
    batch=st.booleans(),
    feature=st.booleans(),
)
def test_hostile_packed_ring(
    mem: GuestMemory,
    ring: list[tuple[int, int, int, int]],
    indirect: list[tuple[int, int, int, int]],
    batch: bool,
    feature: bool,
) -> None:
    drv, q = packed_pair(mem, 8, indirect=feature)
    for i, d in enumerate(ring):
        put(mem, drv.desc_gpa, i, *d)
    for i, d in enumerate(indirect):
        put(mem, 0x8000, i, *d)
    for _ in range(40):  # terminates: every step consumes at least one descriptor
        try:
            if batch:
                b = q.pop_batch(4)
                if not len(b):
                    break
                for e in b.errors:
                    if e.head is not None:
                        q.add_used(e.head, 0)
                for c in b.chains:
                    q.add_used(c.head, 0)
                if len(b.heads):
                    q.add_used_batch(b.heads, np.zeros(len(b.heads), np.int64))
            else:
                chain = q.pop()
                if chain is None:
                    break
                chain.read_all()
                chain.fill(1)
                q.add_used(chain.head, chain.writable_len)
        except VirtqError as exc:
            if exc.head is not None:
                q.add_used(exc.head, 0)

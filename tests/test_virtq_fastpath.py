"""The vectorised and chain-by-chain fast paths of both rings against a plain model."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtq_support import BUF_GPA, MEM_SIZE, make_memory, packed_pair, split_pair

from vhsm import speedups
from vhsm.dirtylog import DirtyLog
from vhsm.errors import VirtqError
from vhsm.memory import GuestMemory
from vhsm.virtq.common import VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED


@pytest.fixture(scope="module")
def mem() -> GuestMemory:
    return make_memory()


# one round: (simple buffers, a 2-descriptor chain after them?, pop with batch?, complete with
# batch?, completion order seed)
rounds = st.lists(
    st.tuples(
        st.integers(0, 7), st.booleans(), st.booleans(), st.booleans(), st.integers(0, 2**16)
    ),
    min_size=1,
    max_size=25,
)


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(kind=st.sampled_from(["split", "packed"]), size=st.sampled_from([4, 8, 16]), plan=rounds)
def test_fast_paths_match_the_model(
    mem: GuestMemory, kind: str, size: int, plan: list[tuple[int, bool, bool, bool, int]]
) -> None:
    drv: Any
    q: Any
    drv, q = split_pair(mem, size) if kind == "split" else packed_pair(mem, size + (size == 8))
    for n, chain, batched, used_batch, seed in plan:
        n = min(n, drv.num_free - 2 * chain)
        posted: dict[int, tuple[int, int, bool]] = {}
        if n > 0:
            addrs = BUF_GPA + 0x1000 * np.arange(n, dtype=np.uint64) + seed % 64
            lens = (1 + np.arange(n, dtype=np.uint32) * 7) % 200 + 1
            wr = (np.arange(n) + seed) % 3 == 0
            ids = drv.add_simple_batch(addrs, lens, wr)
            for i, bid in enumerate(np.asarray(ids).tolist()):
                posted[bid] = (int(addrs[i]), int(lens[i]), bool(wr[i]))
        if chain:
            bid = drv.add_chain([(BUF_GPA + 0x80000, 16)], [(BUF_GPA + 0x90000, 32)])
            posted[bid] = (BUF_GPA + 0x80000, 48, True)
        got: dict[int, int] = {}  # id -> writable length
        if batched:
            b = q.pop_batch()
            assert not b.errors
            for i, bid in enumerate(b.heads.tolist()):
                a, ln, w = posted[bid]
                assert (int(b.addrs[i]), int(b.lens[i]), bool(b.writable[i])) == (a, ln, w)
                assert len(b.buffer(i)) == ln
                got[bid] = ln if w else 0
            for c in b.chains:
                got[c.head] = c.writable_len
        else:
            for c in q:
                a, ln, w = posted[c.head]
                assert c.readable_len + c.writable_len == ln
                got[c.head] = c.writable_len
        assert sorted(got) == sorted(posted)
        order = sorted(got, key=lambda h: (h * 2654435761 + seed) % 4093)
        if used_batch and len(set(got.values())) == 1:  # one length for every id
            q.add_used_batch(order, next(iter(got.values())))
        elif used_batch:
            q.add_used_batch(order, [got[h] for h in order])
        else:
            for h in order:
                q.add_used(h, got[h])
        ids_back, lens_back = drv.get_used_batch()
        assert ids_back.tolist() == order
        assert lens_back.tolist() == [got[h] for h in order]
        assert not q.has_available()


def test_packed_batch_repeated_and_in_flight_ids(mem: GuestMemory) -> None:
    drv, q = packed_pair(mem, 8)
    ids = drv.add_simple_batch(
        BUF_GPA + 64 * np.arange(4, dtype=np.uint64), np.full(4, 64, np.uint32), np.ones(4, bool)
    )
    desc = np.frombuffer(mem.translate(drv.desc_gpa, 16 * 8), dtype=np.uint16).reshape(8, 8)
    desc[2, 6] = ids[0]  # the third buffer reuses the first one's id
    b = q.pop_batch()
    assert sorted(b.heads.tolist()) == sorted([ids[0], ids[1], ids[3]])
    assert len(b.errors) == 1 and b.errors[0].head is None
    with pytest.raises(VirtqError, match="repeated"):
        q.add_used_batch([ids[0], ids[0]], [1, 1])
    with pytest.raises(VirtqError, match="not in flight"):
        q.add_used_batch([ids[0], ids[2]], [1, 1])
    assert q.next_used == 0 and drv.get_used() is None  # nothing written by a refused batch
    q.add_used_batch(b.heads, [0, 0, 0])
    assert len(drv.get_used_batch()[0]) == 3


class _Publish:
    """Stands in for the descriptor-ring view: checks the burst is complete when published."""

    def __init__(self, view: memoryview, desc: np.ndarray, first: int, wrap: int, k: int) -> None:
        self.view, self.desc, self.first, self.wrap, self.k = view, desc, first, wrap, k
        self.checked = 0

    def __getitem__(self, i: int) -> int:
        return int(self.view[i])

    def __setitem__(self, i: int, value: int) -> None:
        if i == 2 * self.first + 1:  # the first flags word: every other one is written
            size = len(self.desc)
            au = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
            for j in range(1, self.k):
                w = self.wrap if self.first + j < size else self.wrap ^ 1
                assert self.desc["flags"][(self.first + j) % size] & au == (au if w else 0)
            self.checked += 1
        self.view[i] = value


@pytest.mark.parametrize("start", [0, 5])
def test_packed_first_flags_written_last(
    mem: GuestMemory, start: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The spy replaces the Python view the pure path stores through; the compiled path
    # stores the first word last with a release store, in C (the twin tests of
    # tests/test_speedups.py check it writes the same bytes).
    monkeypatch.setattr(speedups, "accel", None)
    drv, q = packed_pair(mem, 8)
    for _ in range(start):  # move the ring so that the burst wraps
        drv.add_chain([(BUF_GPA, 8)])
        (c,) = list(q)
        q.add_used(c.head, 0)
        drv.get_used()
    ids = drv.add_simple_batch(
        BUF_GPA + 64 * np.arange(6, dtype=np.uint64), np.full(6, 64, np.uint32), np.ones(6, bool)
    )
    b = q.pop_batch()
    desc = np.frombuffer(mem.translate(drv.desc_gpa, 16 * 8), dtype=drv._desc_np.dtype)
    spy = _Publish(q._desc_q, desc, q.next_used, q.used_wrap, 6)
    q._desc_q = spy  # type: ignore[assignment]
    q.add_used_batch(b.heads, np.full(6, 64))
    q._desc_q = spy.view
    assert spy.checked == 1
    assert drv.get_used_batch()[0].tolist() == ids.tolist()


@pytest.mark.parametrize("kind", ["split", "packed"])
@pytest.mark.parametrize("batched", [False, True])
def test_log_attached_while_buffers_in_flight(mem: GuestMemory, kind: str, batched: bool) -> None:
    drv: Any
    q: Any
    drv, q = split_pair(mem, 8) if kind == "split" else packed_pair(mem, 8)
    page = 0x300000
    drv.add_simple_batch(
        np.array([page + 4096, page + 3 * 4096], np.uint64),
        np.array([100, 100], np.uint32),
        np.array([True, False]),
    )
    if batched:
        b = q.pop_batch()
        heads = b.heads.tolist()
    else:
        heads = [c.head for c in q]
    bitmap = bytearray(MEM_SIZE // 4096 // 8)
    q.set_log(DirtyLog(memoryview(bitmap), atomic=False))  # migration starts now
    if batched:
        q.add_used_batch(heads, [100, 0])
    else:
        q.add_used(heads[0], 100)
        q.add_used(heads[1], 0)

    def dirty(gpa: int) -> bool:
        pg = gpa // 4096
        return bool(bitmap[pg // 8] >> (pg % 8) & 1)

    assert dirty(page + 4096) and not dirty(page + 3 * 4096) and not dirty(page)


@pytest.mark.parametrize("kind", ["split", "packed"])
def test_has_available(mem: GuestMemory, kind: str) -> None:
    drv: Any
    q: Any
    drv, q = split_pair(mem, 8) if kind == "split" else packed_pair(mem, 8)
    assert not q.has_available()
    drv.add_chain([(BUF_GPA, 8)], [(BUF_GPA + 8, 8)])
    assert q.has_available()
    c = q.pop()
    assert c is not None and not q.has_available()
    q.add_used(c.head, 8)
    assert not q.has_available()


@pytest.mark.parametrize("kind", ["split", "packed"])
@pytest.mark.parametrize("hostile", [(1 << 63) - 8, (1 << 64) - 8, MEM_SIZE - 8, MEM_SIZE])
def test_a_burst_with_one_address_outside_memory_refuses_it(
    mem: GuestMemory, kind: str, hostile: int
) -> None:
    """The vectorised range check: an offset that overflows int64 must not wrap into range."""
    drv: Any
    q: Any
    drv, q = split_pair(mem, 8) if kind == "split" else packed_pair(mem, 8)
    addrs = np.array([BUF_GPA, BUF_GPA + 0x1000, hostile, BUF_GPA + 0x2000], dtype=np.uint64)
    ids = drv.add_simple_batch(addrs, np.full(4, 64, np.uint32), np.zeros(4, bool))
    b = q.pop_batch()
    assert sorted(b.heads.tolist()) == sorted(int(i) for i in np.asarray(ids)[[0, 1, 3]])
    assert b.single_region == 0 and b.region.tolist() == [0, 0, 0]
    assert len(b.errors) == 1 and f"{hostile:#x}" in str(b.errors[0])
    assert all(len(b.buffer(i)) == 64 for i in range(3))


def test_packed_burst_ids_are_trusted_once(mem: GuestMemory) -> None:
    """A burst's own ids array skips the repeat check, never the in-flight one."""
    drv, q = packed_pair(mem, 8)
    drv.add_simple_batch(
        BUF_GPA + 64 * np.arange(4, dtype=np.uint64), np.full(4, 64, np.uint32), np.zeros(4, bool)
    )
    b = q.pop_batch()
    assert not b.heads.flags.writeable  # the array add_used_batch trusts cannot change
    q.add_used_batch(b.heads[:1], [0])
    with pytest.raises(VirtqError, match="not in flight"):
        q.add_used_batch(b.heads, np.zeros(4, np.uint32))
    q.add_used_batch(b.heads[1:], np.zeros(3, np.uint32))
    with pytest.raises(VirtqError, match="not in flight"):
        q.add_used_batch(b.heads, np.zeros(4, np.uint32))
    assert len(drv.get_used_batch()[0]) == 4


@pytest.mark.parametrize("kind", ["split", "packed"])
@pytest.mark.parametrize("length", [0, 48])
def test_one_length_for_every_id(mem: GuestMemory, kind: str, length: int) -> None:
    """``add_used_batch(ids, n)``: every element gets length n, across the ring's end."""
    drv: Any
    q: Any
    drv, q = split_pair(mem, 8) if kind == "split" else packed_pair(mem, 8)
    for burst in (5, 6):  # the second burst wraps
        addrs = BUF_GPA + 64 * np.arange(burst, dtype=np.uint64)
        drv.add_simple_batch(addrs, np.full(burst, 64, np.uint32), np.full(burst, length > 0))
        b = q.pop_batch()
        assert b.lens_range == (64, 64)
        q.add_used_batch(b.heads, length)
        ids, lens = drv.get_used_batch()
        assert ids.tolist() == b.heads.tolist() and lens.tolist() == [length] * burst
    for bad in (-1, 1 << 32):
        with pytest.raises(ValueError, match=f"used length {bad} does not fit in 32 bits"):
            q.add_used_batch([0], bad)


def test_lens_range_of_a_batch_built_without_one(mem: GuestMemory) -> None:
    """The general path leaves ``lens_range`` to be computed on first use."""
    drv, q = split_pair(mem, 8)
    addrs = np.array([BUF_GPA, BUF_GPA + 0x1000, MEM_SIZE + 0x1000], dtype=np.uint64)
    drv.add_simple_batch(addrs, np.array([16, 40, 8], np.uint32), np.zeros(3, bool))
    b = q.pop_batch()  # one address outside memory: the general path
    assert len(b.errors) == 1 and b.lens_range == (16, 40)
    q.add_used_batch(b.heads, 0)
    drv.get_used_batch()
    assert q.pop_batch().lens_range == (0, 0)


def test_split_burst_heads_skip_the_range_check_only_as_popped(mem: GuestMemory) -> None:
    """The fast path's read-only heads are in range by construction; other ids are checked."""
    drv, q = split_pair(mem, 8)
    drv.add_simple_batch(
        BUF_GPA + 64 * np.arange(3, dtype=np.uint64), np.full(3, 64, np.uint32), np.zeros(3, bool)
    )
    b = q.pop_batch()
    assert not b.heads.flags.writeable
    with pytest.raises(VirtqError, match="used id 8 >= queue size 8"):
        q.add_used_batch(np.array([8], np.uint16), 0)
    q.add_used_batch(b.heads, 0)
    assert sorted(drv.get_used_batch()[0].tolist()) == sorted(b.heads.tolist())


def test_packed_burst_loses_its_trust_after_a_single_completion(mem: GuestMemory) -> None:
    """``add_used`` of one buffer of a burst makes the burst's array go through every check."""
    drv, q = packed_pair(mem, 8)
    drv.add_simple_batch(
        BUF_GPA + 64 * np.arange(3, dtype=np.uint64), np.full(3, 64, np.uint32), np.zeros(3, bool)
    )
    b = q.pop_batch()
    q.add_used(int(b.heads[1]), 0)
    with pytest.raises(VirtqError, match=f"used buffer id {int(b.heads[1])} not in flight"):
        q.add_used_batch(b.heads, 0)
    q.add_used_batch(b.heads[[0, 2]], 0)
    assert len(drv.get_used_batch()[0]) == 3


def test_a_region_ending_at_the_top_of_the_address_space_is_addressable() -> None:
    from types import SimpleNamespace

    from vhsm.virtq.common import AddressSpace

    top = 1 << 64
    region = SimpleNamespace(
        guest_phys_addr=top - 4096, memory_size=4096, view=memoryview(bytearray(4096))
    )
    space = AddressSpace(SimpleNamespace(regions=[region]))  # type: ignore[arg-type]
    (piece,) = space.pieces(0, 0, top - 16, 16)
    assert len(piece) == 16

"""vhsm.ondemand: regions mapped per access, through GuestMemory and the virtqueues.

A fake mapper maps windows of a memfd (page ``p`` of the region is page ``p`` of
the file) and records every map and release, so the tests see what was mapped,
when, at which pages, and that the data path reads and writes the right bytes.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import numpy as np
import pytest

from vhsm import speedups
from vhsm.errors import GuestMemoryError, VirtqError
from vhsm.memory import GuestMemory, MappedRegion
from vhsm.ondemand import PAGE_SIZE, OnDemandMapping, Release
from vhsm.virtq import PackedDriver, PackedQueue, SplitDriver, SplitQueue
from vhsm.vring_state import VringState
from vhsm.wire.payloads import VhostUserMemoryRegion

PAGE = PAGE_SIZE
SIZE = 64 * PAGE
GPA = 0x40000
RING_GPA = GPA + PAGE
BUF_GPA = GPA + 16 * PAGE


class FakePages:
    """``map_pages`` over a memfd: records (first, count) of each map, counts releases."""

    def __init__(self, fd: int, *, fail: bool = False) -> None:
        self.fd = fd
        self.fail = fail
        self.maps: list[tuple[int, int]] = []
        self.released: list[tuple[int, int]] = []

    def __call__(self, first: int, count: int) -> tuple[mmap.mmap, Release]:
        if self.fail:
            raise OSError(12, "Cannot allocate memory")
        self.maps.append((first, count))
        mm = mmap.mmap(self.fd, count * PAGE, flags=mmap.MAP_SHARED, offset=first * PAGE)
        return mm, lambda: self.released.append((first, count))


class FakeMapper:
    """A RegionMapper whose regions are all mapped on demand over their fd."""

    def __init__(self, **bounds: int) -> None:
        self.bounds = bounds
        self.pages: list[FakePages] = []
        self.closed = 0

    def map_region(self, region: VhostUserMemoryRegion, fd: int) -> OnDemandMapping:
        pages = FakePages(os.dup(fd))
        self.pages.append(pages)

        def close() -> None:
            os.close(pages.fd)
            self.closed += 1

        return OnDemandMapping(
            region.memory_size, pages, what="test region", close=close, **self.bounds
        )


@pytest.fixture
def fd() -> Iterator[int]:
    fd = os.memfd_create("ondemand-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, SIZE)
    yield fd
    os.close(fd)


def table(fd: int, mapper: FakeMapper | None) -> GuestMemory:
    """One region [GPA, GPA+SIZE) over the memfd: on demand with a mapper, else plain."""
    region = VhostUserMemoryRegion(GPA, SIZE, 0x7F00_0000_0000, 0)
    return GuestMemory.from_table([region], [os.dup(fd)], mapper=mapper)


# --- the mapping ---------------------------------------------------------------------------------
def test_nothing_is_mapped_until_an_access(fd: int) -> None:
    mapper = FakeMapper()
    mem = table(fd, mapper)
    (pages,) = mapper.pages
    assert pages.maps == []
    (region,) = mem.regions
    assert isinstance(region, MappedRegion) and region.on_demand is not None
    assert region.view.nbytes == 0  # no whole-region view


def test_an_access_maps_the_pages_it_covers_and_reads_the_right_bytes(fd: int) -> None:
    os.pwrite(fd, b"hello", 3 * PAGE + 100)
    mapper = FakeMapper()
    mem = table(fd, mapper)
    (pages,) = mapper.pages
    assert bytes(mem.translate(GPA + 3 * PAGE + 100, 5)) == b"hello"
    assert pages.maps == [(3, 1)]
    mem.translate(GPA + 3 * PAGE + 200, 8)[:] = b"written!"
    assert pages.maps == [(3, 1)]  # the cached window served it
    assert os.pread(fd, 8, 3 * PAGE + 200) == b"written!"
    # a range crossing a page border is one window of both pages
    view = mem.translate(GPA + 5 * PAGE - 2, 4)
    view[:] = b"ABCD"
    assert pages.maps == [(3, 1), (4, 2)]
    assert os.pread(fd, 4, 5 * PAGE - 2) == b"ABCD"
    # a range inside the two-page window needs no new one
    mem.translate(GPA + 5 * PAGE + 10, 10)
    assert pages.maps == [(3, 1), (4, 2)]


def test_the_cache_is_bounded_and_releases_the_least_recently_used(fd: int) -> None:
    mapper = FakeMapper(max_windows=2)
    mem = table(fd, mapper)
    (pages,) = mapper.pages
    mapping = mem.regions[0].on_demand
    assert mapping is not None
    mem.translate(GPA, 1)
    mem.translate(GPA + PAGE, 1)
    mem.translate(GPA, 1)  # page 0 used again: page 1 is now the oldest
    mem.translate(GPA + 2 * PAGE, 1)
    assert pages.released == [(1, 1)]
    assert (mapping.windows, mapping.maps, mapping.unmaps) == (2, 3, 1)


def test_the_cache_is_bounded_in_pages(fd: int) -> None:
    mapper = FakeMapper(max_pages=4)
    mem = table(fd, mapper)
    (pages,) = mapper.pages
    mem.translate(GPA, 3 * PAGE)
    mem.translate(GPA + 10 * PAGE, 2 * PAGE)  # 5 pages cached > 4: the first window goes
    assert pages.released == [(0, 3)]
    mem.translate(GPA + 20 * PAGE, 9 * PAGE)  # larger than the bound alone: still mapped
    assert pages.released == [(0, 3), (10, 2)]
    assert pages.maps[-1] == (20, 9)


def test_a_view_outlives_the_eviction_of_its_window(fd: int) -> None:
    os.pwrite(fd, b"kept", 7 * PAGE)
    mapper = FakeMapper(max_windows=1)
    mem = table(fd, mapper)
    (pages,) = mapper.pages
    held = mem.translate(GPA + 7 * PAGE, 4)
    mem.translate(GPA + 9 * PAGE, 4)  # evicts the window ``held`` is in
    assert pages.released == [(7, 1)]
    assert bytes(held) == b"kept"  # still mapped: unmapped when ``held`` goes
    held[:] = b"more"
    assert os.pread(fd, 4, 7 * PAGE) == b"more"


@pytest.mark.parametrize(
    ("gpa", "length"),
    [
        (GPA + SIZE - 2, 4),  # crosses the region's end
        (GPA + SIZE, 1),  # just past it
        (GPA - 1, 2),  # starts before it
        (GPA + PAGE, -1),  # negative length
        (1 << 62, 8),  # nowhere
    ],
)
def test_addresses_outside_the_region_are_refused(fd: int, gpa: int, length: int) -> None:
    mapper = FakeMapper()
    mem = table(fd, mapper)
    with pytest.raises(GuestMemoryError):
        mem.translate(gpa, length)
    assert mapper.pages[0].maps == []  # nothing mapped for a refused range


def test_window_checks_its_own_bounds(fd: int) -> None:
    mapping = OnDemandMapping(4 * PAGE, FakePages(fd), what="r")
    for offset, length in [(-1, 1), (0, 4 * PAGE + 1), (4 * PAGE, 1), (3 * PAGE, -2)]:
        with pytest.raises(GuestMemoryError, match="outside the region"):
            mapping.window(offset, length)
    assert mapping.window(PAGE, 0).nbytes == 0


def test_a_failed_map_is_a_guest_memory_error_naming_the_pages(fd: int) -> None:
    mapping = OnDemandMapping(8 * PAGE, FakePages(fd, fail=True), what="region X")
    with pytest.raises(GuestMemoryError, match=r"region X: mapping pages 0x2\.\.0x3 failed"):
        mapping.window(2 * PAGE + 5, PAGE)


def test_close_releases_every_window_then_the_mapper(fd: int) -> None:
    mapper = FakeMapper()
    mem = table(fd, mapper)
    (pages,) = mapper.pages
    mem.translate(GPA, 1)
    mem.translate(GPA + 4 * PAGE, 1)
    mapping = mem.regions[0].mapping
    mapping.close()
    assert sorted(pages.released) == [(0, 1), (4, 1)]
    assert mapper.closed == 1
    mapping.close()  # idempotent
    assert mapper.closed == 1
    with pytest.raises(GuestMemoryError, match="unmapped"):
        mem.translate(GPA, 1)


def test_gather_spans_an_on_demand_region_and_a_plain_one(fd: int) -> None:
    plain_fd = os.memfd_create("plain", os.MFD_CLOEXEC)
    os.ftruncate(plain_fd, PAGE)
    os.pwrite(fd, b"ab", SIZE - 2)
    os.pwrite(plain_fd, b"cd", 0)
    mapper = FakeMapper()
    on_demand = mapper.map_region(VhostUserMemoryRegion(GPA, SIZE, 0x1000_0000, 0), fd)
    plain = GuestMemory.from_table(
        [VhostUserMemoryRegion(GPA + SIZE, PAGE, 0x2000_0000, 0)], [os.dup(plain_fd)]
    )
    mem = GuestMemory(
        [MappedRegion(VhostUserMemoryRegion(GPA, SIZE, 0x1000_0000, 0), on_demand),
         plain.regions[0]],
    )  # fmt: skip
    assert mem.read(GPA + SIZE - 2, 4, gather=True) == b"abcd"
    mem.write(GPA + SIZE - 1, b"XY", gather=True)
    assert os.pread(fd, 1, SIZE - 1) == b"X"
    assert os.pread(plain_fd, 1, 0) == b"Y"
    os.close(plain_fd)


def test_translate_uva_maps_on_demand_too(fd: int) -> None:
    os.pwrite(fd, b"uva", 2 * PAGE)
    mem = table(fd, FakeMapper())
    assert bytes(mem.translate_uva(0x7F00_0000_0000 + 2 * PAGE, 3)) == b"uva"


# --- the data path -------------------------------------------------------------------------
@pytest.fixture(params=["compiled", "pure"])
def accel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "pure":
        monkeypatch.setattr(speedups, "accel", None)
    elif speedups.accel is None:
        pytest.skip("the compiled data path is not built")
    return str(request.param)


def split_rings(fd: int, mapper: FakeMapper, size: int = 16) -> tuple[SplitDriver, SplitQueue]:
    """The driver writes through a plain view of the memfd; the device maps on demand."""
    guest = table(fd, None)
    device = table(fd, mapper)
    drv = SplitDriver.layout(guest, size, RING_GPA)
    q = SplitQueue(
        device,
        size,
        device.translate(drv.desc_gpa, 16 * size),
        device.translate(drv.avail_gpa, 6 + 2 * size),
        device.translate(drv.used_gpa, 6 + 8 * size),
        indirect=True,
    )
    return drv, q


def test_split_ring_areas_are_mapped_when_the_queue_is_built(fd: int, accel: str) -> None:
    mapper = FakeMapper()
    split_rings(fd, mapper, 16)
    maps = mapper.pages[0].maps
    assert maps and all(first == 1 for first, _ in maps)  # the ring's page, nothing else


def test_split_chains_in_an_on_demand_region(fd: int, accel: str) -> None:
    mapper = FakeMapper()
    drv, q = split_rings(fd, mapper)
    (pages,) = mapper.pages
    ring_maps = len(pages.maps)
    os.pwrite(fd, b"request", BUF_GPA - GPA + PAGE - 3)  # crosses a page border
    head = drv.add_chain([(BUF_GPA + PAGE - 3, 7)], [(BUF_GPA + 5 * PAGE, 16)])
    chain = q.pop()
    assert chain is not None and chain.head == head
    assert chain.read_all() == b"request"
    assert chain.write(b"response") == 8
    q.add_used(chain.head, 8)
    assert os.pread(fd, 8, BUF_GPA - GPA + 5 * PAGE) == b"response"
    assert pages.maps[ring_maps:] == [(16, 2), (21, 1)]  # each buffer's own pages


def test_split_batches_in_an_on_demand_region_come_as_chains(fd: int, accel: str) -> None:
    mapper = FakeMapper()
    drv, q = split_rings(fd, mapper)
    for i in range(4):
        os.pwrite(fd, bytes([65 + i]) * 8, BUF_GPA - GPA + i * PAGE)
    drv.add_simple_batch(
        BUF_GPA + PAGE * np.arange(4, dtype=np.uint64),
        np.full(4, 8, np.uint32),
        np.zeros(4, bool),
    )
    batch = q.pop_batch()
    assert len(batch.heads) == 0 and not batch.errors  # no whole-region view to slice
    assert [c.read_all() for c in batch.chains] == [b"A" * 8, b"B" * 8, b"C" * 8, b"D" * 8]


def test_hostile_buffers_in_an_on_demand_table(fd: int, accel: str) -> None:
    mapper = FakeMapper()
    drv, q = split_rings(fd, mapper)
    drv.add_chain([(GPA + SIZE - 4, 8)])  # crosses the end of guest memory
    drv.add_chain([(1 << 40, 8)])  # outside every region
    drv.add_chain([(BUF_GPA, 8)])
    with pytest.raises(VirtqError, match=f"from {GPA + SIZE:#x} outside guest memory"):
        q.pop()
    with pytest.raises(VirtqError, match="outside guest memory"):
        q.pop()
    chain = q.pop()
    assert chain is not None and chain.readable_len == 8  # the ring keeps serving


def test_indirect_tables_in_an_on_demand_region(fd: int, accel: str) -> None:
    mapper = FakeMapper()
    guest = table(fd, None)
    drv, q = split_rings(fd, mapper)
    os.pwrite(fd, b"in", BUF_GPA - GPA)
    drv.add_chain(
        [(BUF_GPA, 2)], [(BUF_GPA + 3 * PAGE, 4)], indirect_gpa=BUF_GPA + 8 * PAGE, memory=guest
    )
    chain = q.pop()
    assert chain is not None and chain.read_all() == b"in" and chain.writable_len == 4


def test_packed_chains_and_batches_in_an_on_demand_region(fd: int, accel: str) -> None:
    mapper = FakeMapper()
    guest = table(fd, None)
    device = table(fd, mapper)
    size = 16
    drv = PackedDriver.layout(guest, size, RING_GPA)
    q = PackedQueue(
        device,
        size,
        device.translate(drv.desc_gpa, 16 * size),
        device.translate(drv.driver_event_gpa, 4),
        device.translate(drv.device_event_gpa, 4),
    )
    os.pwrite(fd, b"packed", BUF_GPA - GPA + 2 * PAGE)
    drv.add_chain([(BUF_GPA + 2 * PAGE, 6)])
    (chain,) = list(q)
    assert chain.read_all() == b"packed"
    q.add_used(chain.head, 0)
    drv.get_used()
    drv.add_simple_batch(
        BUF_GPA + PAGE * np.arange(3, dtype=np.uint64),
        np.full(3, 4, np.uint32),
        np.ones(3, bool),
    )
    batch = q.pop_batch()
    assert len(batch.heads) == 0 and len(batch.chains) == 3 and not batch.errors
    for c in batch.chains:
        c.write(b"done")
        q.add_used(c.head, 4)
    assert os.pread(fd, 4, BUF_GPA - GPA + PAGE) == b"done"


def test_plain_regions_keep_their_whole_region_views(fd: int, accel: str) -> None:
    mem = table(fd, None)
    (region,) = mem.regions
    assert region.on_demand is None and region.view.nbytes == SIZE
    drv = SplitDriver.layout(mem, 16, RING_GPA)
    q = SplitQueue(
        mem,
        16,
        mem.translate(drv.desc_gpa, 256),
        mem.translate(drv.avail_gpa, 38),
        mem.translate(drv.used_gpa, 134),
    )
    drv.add_simple_batch(
        BUF_GPA + PAGE * np.arange(4, dtype=np.uint64), np.full(4, 8, np.uint32), np.zeros(4, bool)
    )
    batch = q.pop_batch()
    assert len(batch.heads) == 4 and not batch.chains  # the fast path, sliced from the view


def test_a_used_ring_over_the_available_ring_is_found_across_windows(fd: int) -> None:
    # The available ring fits in page 3; the used ring starts inside it and runs into
    # page 4, so it gets a window of its own: the host addresses differ, the guest
    # addresses overlap. The ring is broken, not served feeding itself.
    mem = table(fd, FakeMapper())
    state = VringState(mem, 1024)
    state.set_queue_size(512)
    page3 = GPA + 3 * PAGE
    state.set_queue_info(GPA + PAGE, page3 + 100, page3 + 200)
    assert state.broken == "the used area overlaps the available area"
    state.set_queue_info(GPA + PAGE, page3 + 100, GPA + 8 * PAGE)  # reconfigured apart
    assert state.broken is None


def test_the_fused_sink_pass_hands_on_demand_buffers_to_the_pure_loop(fd: int) -> None:
    from vhsm.virtq.sink_pass import FALLBACK, sink_pass_split

    if speedups.accel is None:
        pytest.skip("the compiled data path is not built")
    drv, q = split_rings(fd, FakeMapper())
    drv.add_chain([(BUF_GPA, 64)])
    call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        done = sink_pass_split(q, 16, call, 0, True)
    finally:
        os.close(call)
    assert done is not None and done.status == FALLBACK and done.packets == 0
    chain = q.pop()  # nothing consumed: the pure path takes it, through a window
    assert chain is not None and chain.readable_len == 64

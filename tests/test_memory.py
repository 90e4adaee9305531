from __future__ import annotations

import fcntl
import gc
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhsm.errors import GuestMemoryError, WireError
from vhsm.memory import (
    GuestMemory,
    GuestMemoryAtomic,
    MmapMapping,
    RegionMapping,
    map_fd,
    shrunk_mappings,
)
from vhsm.wire.payloads import VhostUserMemoryRegion as Region

MiB = 1 << 20
UVA = 0x7F00_0000_0000


def memfd(size: int, fill: bytes = b"") -> int:
    fd = os.memfd_create("vhsm-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if fill:
        os.pwrite(fd, fill, 0)
    return fd


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def pattern(size: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(size))


@pytest.fixture
def two_regions() -> Iterator[tuple[GuestMemory, int, int]]:
    """Region A: GPA 0..1MiB from fd offset 0; region B: GPA 1MiB..2MiB at fd offset 0x1800."""
    fa = memfd(MiB, pattern(MiB, 1))
    fb = memfd(MiB + 0x1800)
    os.pwrite(fb, pattern(MiB, 2), 0x1800)
    # keep private dups to inspect the files after GuestMemory closed its fds
    da, db = os.dup(fa), os.dup(fb)
    mem = GuestMemory.from_table(
        [Region(0, MiB, UVA, 0), Region(MiB, MiB, UVA + 4 * MiB, 0x1800)], [fa, fb]
    )
    yield mem, da, db
    for r in mem.regions:
        r.mapping.close()
    os.close(da)
    os.close(db)


def test_translate_inside_reads_and_writes_the_file(
    two_regions: tuple[GuestMemory, int, int],
) -> None:
    mem, da, db = two_regions
    assert bytes(mem.translate(0x10, 4)) == pattern(MiB, 1)[0x10:0x14]
    # unaligned mmap_offset is honoured
    assert bytes(mem.translate(MiB + 5, 3)) == pattern(MiB, 2)[5:8]
    view = mem.translate(MiB + 0x100, 4)
    view[:] = b"ABCD"
    assert os.pread(db, 4, 0x1800 + 0x100) == b"ABCD"
    mem.write(0x20, b"xyz")
    assert os.pread(da, 3, 0x20) == b"xyz"
    assert mem.read(0x20, 3) == b"xyz"
    # the whole region, exactly
    assert mem.translate(MiB, MiB).nbytes == MiB


def test_translate_uva_and_conversions(two_regions: tuple[GuestMemory, int, int]) -> None:
    mem, _, _ = two_regions
    assert bytes(mem.translate_uva(UVA + 4 * MiB + 9, 2)) == pattern(MiB, 2)[9:11]
    assert mem.uva_to_gpa(UVA + 4 * MiB + 9) == MiB + 9
    assert mem.gpa_to_uva(MiB + 9) == UVA + 4 * MiB + 9
    with pytest.raises(GuestMemoryError):
        mem.uva_to_gpa(UVA + MiB)  # the hole between the two UVA ranges
    with pytest.raises(GuestMemoryError):
        mem.translate_uva(UVA + MiB - 1, 2)


@pytest.mark.parametrize(
    ("gpa", "length"),
    [
        (2 * MiB, 1),  # past the end
        (MiB - 2, 4),  # spans A and B
        (2 * MiB - 1, 2),  # crosses the end of B
        (-1, 1),
        (0, -1),
        (1 << 64, 1),
    ],
)
def test_translate_outside_or_spanning_is_refused(
    two_regions: tuple[GuestMemory, int, int], gpa: int, length: int
) -> None:
    mem, _, _ = two_regions
    with pytest.raises(GuestMemoryError):
        mem.translate(gpa, length)


def test_gather_spans_adjacent_regions(two_regions: tuple[GuestMemory, int, int]) -> None:
    mem, _, _ = two_regions
    parts = mem.gather(MiB - 2, 4)
    assert [p.nbytes for p in parts] == [2, 2]
    assert b"".join(bytes(p) for p in parts) == pattern(MiB, 1)[-2:] + pattern(MiB, 2)[:2]
    mem.write(MiB - 1, b"!?", gather=True)
    assert mem.read(MiB - 1, 2, gather=True) == b"!?"
    assert mem.gather(5, 0) == []
    with pytest.raises(GuestMemoryError):
        mem.gather(2 * MiB - 1, 2)
    with pytest.raises(GuestMemoryError):
        mem.read(MiB - 1, 2)  # no gather: refused


def test_gather_refuses_a_hole() -> None:
    mem = GuestMemory.from_table(
        [Region(0, 0x1000, UVA, 0), Region(0x2000, 0x1000, UVA + 0x2000, 0)],
        [memfd(0x1000), memfd(0x1000)],
    )
    with pytest.raises(GuestMemoryError, match="no region at 0x1000"):
        mem.gather(0xFF0, 0x20)


def test_fds_are_closed_after_mapping() -> None:
    fd = memfd(0x1000)
    GuestMemory.from_table([Region(0, 0x1000, UVA, 0)], [fd])
    assert not fd_is_open(fd)


def test_short_memfd_refused_before_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    fd = memfd(0x1000)
    mapped: list[int] = []
    real_mmap = __import__("mmap").mmap

    def spy(*args: object, **kwargs: object) -> object:
        mapped.append(1)
        return real_mmap(*args, **kwargs)

    monkeypatch.setattr("vhsm.memory.mmap.mmap", spy)
    with pytest.raises(GuestMemoryError, match="file too small") as info:
        GuestMemory.from_table([Region(0, 0x1000, UVA, 0x800)], [fd])
    assert info.value.rule_id == "VU-MEM-014"
    assert mapped == []
    assert not fd_is_open(fd)


@pytest.mark.parametrize(
    ("regions", "rule", "field"),
    [
        (
            [Region(0, 0x2000, UVA, 0), Region(0x1000, 0x1000, UVA + 0x10000, 0)],
            "VU-MEM-005",
            "region[1].guest_phys_addr",
        ),
        (
            [Region(0x10000, 0x1000, UVA + 0x800, 0), Region(0, 0x1000, UVA, 0)],
            "VU-MEM-005",
            "region[1].userspace_addr",
        ),
    ],
)
def test_bad_tables_refused_and_fds_closed(regions: list[Region], rule: str, field: str) -> None:
    fds = [memfd(0x2000) for _ in regions]
    with pytest.raises(WireError) as info:
        GuestMemory.from_table(regions, fds)
    assert info.value.rule_id == rule
    assert info.value.field == field
    assert not any(fd_is_open(fd) for fd in fds)


def test_fd_count_mismatch() -> None:
    fds = [memfd(0x1000)]
    with pytest.raises(WireError) as info:
        GuestMemory.from_table([Region(0, 0x1000, UVA, 0)] * 2, fds)
    assert info.value.rule_id == "VU-MEM-002"
    assert not fd_is_open(fds[0])


def test_failed_mapping_closes_the_earlier_ones() -> None:
    closed: list[RegionMapping] = []

    class Recorded:
        def __init__(self, inner: MmapMapping) -> None:
            self.inner = inner

        @property
        def view(self) -> memoryview:
            return self.inner.view

        def close(self) -> None:
            closed.append(self.inner)
            self.inner.close()

    class Recording:
        def map_region(self, region: Region, fd: int) -> RegionMapping:
            return Recorded(map_fd(fd, region.mmap_offset, region.memory_size, what="rec"))

    good, short = memfd(0x1000), memfd(0x10)
    with pytest.raises(GuestMemoryError):
        GuestMemory.from_table(
            [Region(0, 0x1000, UVA, 0), Region(0x1000, 0x1000, UVA + 0x1000, 0)],
            [good, short],
            mapper=Recording(),
        )
    assert len(closed) == 1
    assert isinstance(closed[0], MmapMapping)
    assert closed[0].closed


def test_xen_regions_go_to_the_mapper() -> None:
    xen = Region(0, 0x1000, UVA, 0, xen_mmap_flags=1, domid=3)
    with pytest.raises(GuestMemoryError, match="Xen"):
        GuestMemory.from_table([xen], [memfd(0x1000)])

    seen: list[Region] = []

    class FakeXen:
        def map_region(self, region: Region, fd: int) -> RegionMapping:
            seen.append(region)
            return map_fd(fd, region.mmap_offset, region.memory_size, what="xen")

    mem = GuestMemory.from_table([xen], [memfd(0x1000)], mapper=FakeXen())
    assert seen == [xen]
    assert mem.regions[0].xen_mmap_flags == 1
    assert mem.regions[0].domid == 3


def test_mapper_returning_a_wrong_view_is_refused() -> None:
    class Bad:
        def map_region(self, region: Region, fd: int) -> RegionMapping:
            return map_fd(fd, 0, 0x800, what="bad")

    with pytest.raises(GuestMemoryError, match="0x800-byte"):
        GuestMemory.from_table([Region(0, 0x1000, UVA, 0)], [memfd(0x1000)], mapper=Bad())


def test_add_remove_share_mappings() -> None:
    mem = GuestMemory.empty()
    a = Region(0, 0x1000, UVA, 0)
    b = Region(0x1000, 0x1000, UVA + 0x1000, 0x1000)
    c = Region(0x4000, 0x1000, UVA + 0x4000, 0)
    m1 = mem.with_region_added(a, memfd(0x1000, b"A"))
    m2 = m1.with_region_added(b, memfd(0x2000))
    assert len(mem) == 0 and len(m1) == 1 and len(m2) == 2
    assert m2.regions[0] is m1.regions[0]  # unchanged mapping shared
    assert m2.read(0, 1) == b"A"
    fd = memfd(0x1000)
    with pytest.raises(WireError) as info:
        m2.with_region_added(Region(0x1800, 0x1000, UVA + 0x8000, 0), fd)
    assert info.value.rule_id == "VU-MEM-005"
    assert not fd_is_open(fd)
    # removal ignores mmap_offset
    m3 = m2.with_region_removed(Region(0x1000, 0x1000, UVA + 0x1000, 0xDEAD000))
    assert [r.guest_phys_addr for r in m3.regions] == [0]
    assert m3.regions[0] is m1.regions[0]
    with pytest.raises(GuestMemoryError):
        m3.translate(0x1000, 1)
    m4 = m3.with_region_added(c, memfd(0x1000))
    assert [r.guest_phys_addr for r in m4.regions] == [0, 0x4000]


@pytest.mark.parametrize(
    "region",
    [
        Region(0x1000, 0x1000, UVA + 0x9000, 0),  # GPA differs
        Region(0, 0x1000, UVA + 0x9000, 0),  # UVA differs
        Region(0, 0x800, UVA, 0),  # size differs
    ],
)
def test_remove_not_found(region: Region) -> None:
    mem = GuestMemory.empty().with_region_added(Region(0, 0x1000, UVA, 0), memfd(0x1000))
    with pytest.raises(WireError) as info:
        mem.with_region_removed(region)
    assert info.value.rule_id == "VU-MEM-008"


def test_add_overlapping_refused() -> None:
    mem = GuestMemory.empty().with_region_added(Region(0, 0x2000, UVA, 0), memfd(0x2000))
    with pytest.raises(WireError) as info:
        mem.with_region_added(Region(0x3000, 0x1000, UVA + 0x1000, 0), memfd(0x1000))
    assert info.value.rule_id == "VU-MEM-005"
    assert info.value.field == "region[1].userspace_addr"
    with pytest.raises(WireError, match="region\\[0\\]"):
        mem.with_region_added(Region(0x1FFF, 0x1000, UVA + 0x8000, 0), memfd(0x1000))


# ---------------------------------------------------------------- GuestMemoryAtomic


def test_replace_closes_unshared_mappings_when_unleased() -> None:
    a = GuestMemory.empty().with_region_added(Region(0, 0x1000, UVA, 0), memfd(0x1000))
    b = a.with_region_added(Region(0x1000, 0x1000, UVA + 0x1000, 0), memfd(0x1000))
    atomic = GuestMemoryAtomic(a)
    assert atomic.replace(b) is a
    first = a.regions[0].mapping
    assert isinstance(first, MmapMapping)
    assert not first.closed  # shared with b
    c = b.with_region_removed(Region(0, 0x1000, UVA, 0))
    atomic.replace(c)
    assert first.closed
    atomic.close()
    assert all(isinstance(m, MmapMapping) and m.closed for m in b.mappings)


def test_lease_keeps_old_mapping_until_released_across_threads() -> None:
    fd = memfd(0x1000, b"old!")
    old = GuestMemory.from_table([Region(0, 0x1000, UVA, 0)], [fd])
    new = GuestMemory.from_table([Region(0, 0x1000, UVA, 0)], [memfd(0x1000, b"new!")])
    atomic = GuestMemoryAtomic(old)
    leased = threading.Event()
    replaced = threading.Event()
    seen: list[bytes] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with atomic.lease() as mem:
                view = mem.translate(0, 4)
                leased.set()
                replaced.wait()
                # the snapshot is no longer current, yet still mapped for us
                seen.append(bytes(view))
                seen.append(mem.read(0, 4))
                view.release()
            with atomic.lease() as mem:
                seen.append(mem.read(0, 4))
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=worker)
    t.start()
    leased.wait()
    atomic.replace(new)  # must not raise BufferError although the worker holds a view
    old_mapping = old.regions[0].mapping
    assert isinstance(old_mapping, MmapMapping)
    assert not old_mapping.closed
    replaced.set()
    t.join()
    assert errors == []
    assert seen == [b"old!", b"old!", b"new!"]
    assert old_mapping.closed
    with pytest.raises(GuestMemoryError, match="unmapped"):
        old.translate(0, 4)
    atomic.close()


def test_nested_leases_of_same_snapshot() -> None:
    old = GuestMemory.from_table([Region(0, 0x1000, UVA, 0)], [memfd(0x1000)])
    atomic = GuestMemoryAtomic(old)
    mapping = old.regions[0].mapping
    assert isinstance(mapping, MmapMapping)
    with atomic.lease() as m1, atomic.lease() as m2:
        assert m1 is m2 is old
        atomic.replace(GuestMemory.empty())
    assert mapping.closed


def test_stray_view_beyond_lease_never_raises_and_stays_readable() -> None:
    old = GuestMemory.from_table([Region(0, 0x1000, UVA, 0)], [memfd(0x1000, b"keep")])
    atomic = GuestMemoryAtomic(old)
    with atomic.lease() as mem:
        stray = mem.translate(0, 4)
        arr = np.frombuffer(mem.translate(0, 4), dtype=np.uint8)
    atomic.replace(GuestMemory.empty())  # no BufferError
    mapping = old.regions[0].mapping
    assert isinstance(mapping, MmapMapping)
    assert mapping.closed
    assert bytes(stray) == b"keep"  # still mapped: unmapping deferred to GC
    assert bytes(arr) == b"keep"
    del stray, arr
    gc.collect()


def test_lease_is_not_reentrant() -> None:
    atomic = GuestMemoryAtomic()
    lease = atomic.lease()
    with lease, pytest.raises(RuntimeError), lease:
        pass


# ---------------------------------------------------------------- hypothesis

LAYOUT = [
    # (gpa, size, uva, mmap_offset)
    (0x0, 0x3000, UVA + 0x100000, 0x0),
    (0x3000, 0x1000, UVA, 0x1234),
    (0x10000, 0x2000, UVA + 0x8000, 0x3000),
]


@pytest.fixture(scope="module")
def layout_memory() -> Iterator[GuestMemory]:
    fds = [memfd(off + size) for _, size, _, off in LAYOUT]
    mem = GuestMemory.from_table([Region(g, s, u, o) for g, s, u, o in LAYOUT], fds)
    yield mem
    for r in mem.regions:
        r.mapping.close()


def _address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0])


@settings(max_examples=400, deadline=None)
@given(addr=st.integers(-0x10, 0x14000), length=st.integers(0, 0x4000), uva=st.booleans())
def test_translation_never_escapes_a_region(
    layout_memory: GuestMemory, addr: int, length: int, uva: bool
) -> None:
    mem = layout_memory
    if uva:
        addr += UVA
    expected = None
    for r in mem.regions:
        start = r.userspace_addr if uva else r.guest_phys_addr
        if start <= addr and addr + length <= start + r.memory_size:
            expected = (r, addr - start)
    try:
        view = mem.translate_uva(addr, length) if uva else mem.translate(addr, length)
    except GuestMemoryError:
        assert expected is None
        return
    assert expected is not None
    region, off = expected
    assert view.nbytes == length
    assert not view.readonly
    if length:
        base = _address(region.view)
        got = _address(view)
        assert got == base + off
        assert base <= got and got + length <= base + region.memory_size


@settings(max_examples=100, deadline=None)
@given(addr=st.integers(0, 0x14000), length=st.integers(0, 0x8000))
def test_gather_covers_exactly_the_mapped_range(
    layout_memory: GuestMemory, addr: int, length: int
) -> None:
    mem = layout_memory
    covered = all(mem.find_region(a) is not None for a in range(addr, addr + length, 0x100)) and (
        length == 0 or mem.find_region(addr + length - 1) is not None
    )
    try:
        parts = mem.gather(addr, length)
    except GuestMemoryError:
        assert not covered
        return
    assert covered
    assert sum(p.nbytes for p in parts) == length
    cur = addr
    for p in parts:
        r = mem.find_region(cur)
        assert r is not None
        if p.nbytes:
            assert _address(p) == _address(r.view) + cur - r.guest_phys_addr
            assert cur + p.nbytes <= r.gpa_end
        cur += p.nbytes


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    gaps=st.lists(st.integers(0, 2), min_size=4, max_size=4),
    addrs=st.lists(st.integers(0, 0x10000), min_size=1, max_size=20),
)
def test_random_layouts(sizes: list[int], gaps: list[int], addrs: list[int]) -> None:
    regions, fds, gpa = [], [], 0
    for i, pages in enumerate(sizes):
        gpa += gaps[i] * 0x1000
        regions.append(Region(gpa, pages * 0x1000, UVA + (len(sizes) - i) * 0x10000, 0))
        fds.append(memfd(pages * 0x1000, bytes([i + 1]) * pages * 0x1000))
        gpa += pages * 0x1000
    mem = GuestMemory.from_table(regions, fds)
    try:
        for a in addrs:
            owner = [
                i
                for i, r in enumerate(regions)
                if r.guest_phys_addr <= a < r.guest_phys_addr + r.memory_size
            ]
            if owner:
                assert mem.read(a, 1) == bytes([owner[0] + 1])
                assert mem.uva_to_gpa(mem.gpa_to_uva(a)) == a
            else:
                with pytest.raises(GuestMemoryError):
                    mem.translate(a, 1)
    finally:
        GuestMemoryAtomic(mem).close()


def test_many_replacements_while_workers_read() -> None:
    def snapshot(tag: int) -> GuestMemory:
        return GuestMemory.from_table(
            [Region(0, 0x1000, UVA, 0)], [memfd(0x1000, bytes([tag]) * 16)]
        )

    atomic = GuestMemoryAtomic(snapshot(0))
    stop = threading.Event()
    errors: list[BaseException] = []
    reads = [0, 0]

    def worker(n: int) -> None:
        try:
            while not stop.is_set() or reads[n] < 50:
                with atomic.lease() as mem:
                    view = mem.translate(0, 16)
                    data = bytes(view)
                    assert data == data[:1] * 16
                    view.release()
                reads[n] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    old = []
    for tag in range(1, 60):
        old.append(atomic.replace(snapshot(tag)))
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    # every replaced snapshot's mapping got closed once its last lease ended
    assert all(
        isinstance(r.mapping, MmapMapping) and r.mapping.closed for s in old for r in s.regions
    )
    atomic.close()


# --- files that could shrink under a mapping (a SIGBUS on the next access) ----------------
def sealable_memfd(size: int) -> int:
    fd = os.memfd_create("vhsm-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    return fd


def test_a_sealable_memfd_is_sealed_against_shrinking() -> None:
    fd = sealable_memfd(2 * MiB)
    mapping = map_fd(fd, 0, MiB, what="test")
    assert not mapping.may_shrink
    with pytest.raises(PermissionError):
        os.ftruncate(fd, 0)
    os.ftruncate(fd, 4 * MiB)  # growing stays allowed: the front-end's file, not ours
    mapping.view[0] = 1
    mapping.close()
    os.close(fd)


def test_a_memfd_sealed_like_qemus_is_used_as_it_is() -> None:
    """QEMU's memory-backend-memfd seals shrink, grow and further seals itself."""
    fd = sealable_memfd(MiB)
    seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    mapping = map_fd(fd, 0, MiB, what="test")
    assert not mapping.may_shrink
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == seals
    mapping.close()
    os.close(fd)


def test_an_unsealable_file_is_watched_and_its_shrinking_reported() -> None:
    fd = memfd(2 * MiB)  # no MFD_ALLOW_SEALING: cannot be sealed
    mapping = map_fd(fd, MiB, MiB, what="test")
    assert mapping.may_shrink and mapping.intact()
    assert shrunk_mappings() == []
    os.ftruncate(fd, MiB + 4096)
    assert not mapping.intact()
    assert len(shrunk_mappings()) == 1
    mapping.close()
    assert shrunk_mappings() == [], "a closed mapping is no longer watched"
    os.close(fd)


def test_only_files_open_read_write_are_mapped(tmp_path: Any) -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    path = tmp_path / "ro"
    path.write_bytes(bytes(MiB))
    read_only = os.open(path, os.O_RDONLY)
    directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for fd, why in (
            (a.fileno(), "socket"),
            (r, "pipe"),
            (directory, "directory"),
            (read_only, "reading and writing"),
        ):
            with pytest.raises(GuestMemoryError, match=why) as info:
                map_fd(fd, 0, 4096, what="test")
            assert info.value.rule_id == "VU-FD-003"
    finally:
        for fd in (r, w, read_only, directory):
            os.close(fd)
        a.close()
        b.close()

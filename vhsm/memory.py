"""Guest memory: the front-end's memory table mapped from its fds, with fast address translation.

A :class:`GuestMemory` is an immutable snapshot of the mapped regions. Updates
(SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG) build a new snapshot that shares the unchanged
mappings; :class:`GuestMemoryAtomic` publishes snapshots to the worker threads and unmaps a
region only once no current snapshot and no lease still uses it.

Memory safety: a memoryview handed out by :meth:`GuestMemory.translate` keeps the mmap object
alive (CPython refuses ``mmap.close()`` while views exist), so a view kept too long can never
read unmapped memory; at worst the unmapping is deferred to the garbage collector.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import stat
import threading
import weakref
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from itertools import pairwise
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, TypeVar

from vhsm.errors import GuestMemoryError, WireError
from vhsm.fdcheck import describe
from vhsm.ondemand import OnDemandMapping

if TYPE_CHECKING:
    from vhsm.wire.payloads import VhostUserMemoryRegion

__all__ = [
    "GuestMemory",
    "GuestMemoryAtomic",
    "MappedRegion",
    "MmapMapper",
    "MmapMapping",
    "RegionMapper",
    "RegionMapping",
    "map_fd",
    "seal_against_shrinking",
    "shrunk_mappings",
]

log = logging.getLogger(__name__)

_U64_END = 1 << 64


# --------------------------------------------------------------------------- mappings


class RegionMapping(Protocol):
    """A mapped region: ``view`` is a writable byte view of exactly the region's bytes."""

    @property
    def view(self) -> memoryview:
        """The region's bytes (``memory_size`` long, format ``B``, writable)."""
        ...

    def close(self) -> None:
        """Release the mapping (idempotent; must not raise ``BufferError``)."""
        ...


class RegionMapper(Protocol):
    """Maps one memory-table region from its fd (pluggable: Xen grants, tests, hugepages)."""

    def map_region(self, region: VhostUserMemoryRegion, fd: int) -> RegionMapping:
        """Map ``region`` from ``fd``; the caller closes ``fd`` afterwards (dup it to keep it)."""
        ...


class MmapMapping:
    """A shared read/write ``mmap`` of ``size`` bytes at ``offset`` in a file, as one view.

    ``close()`` releases the view and unmaps; if someone still holds a view or a numpy/ctypes
    object exported from it, the unmapping is left to the garbage collector instead of raising.
    ``may_shrink``: the file could not be sealed against shrinking (see :func:`map_fd`);
    :meth:`intact` then tells whether it still covers the mapping.
    """

    __slots__ = ("__weakref__", "_mmap", "_view", "may_shrink", "offset", "size")

    def __init__(
        self,
        mm: mmap.mmap,
        view: memoryview,
        offset: int,
        size: int,
        *,
        may_shrink: bool = False,
    ) -> None:
        self._mmap: mmap.mmap | None = mm
        self._view = view
        self.offset = offset
        self.size = size
        self.may_shrink = may_shrink
        if may_shrink:
            with _unsealed_lock:
                _unsealed.add(self)

    def intact(self) -> bool:
        """Whether the file still covers the mapping (always, once sealed or closed)."""
        mm = self._mmap
        if not self.may_shrink or mm is None:
            return True
        try:
            return mm.size() >= self.offset + self.size
        except (OSError, ValueError):  # closed meanwhile
            return True

    @property
    def view(self) -> memoryview:
        """The mapped bytes (released once :meth:`close` ran)."""
        return self._view

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (the pages may still be mapped for stray views)."""
        return self._mmap is None

    def close(self) -> None:
        """Unmap now if nothing else exports the buffer, else drop our reference (GC unmaps)."""
        mm, self._mmap = self._mmap, None
        if mm is None:
            return
        if self.may_shrink:
            with _unsealed_lock:
                _unsealed.discard(self)
        try:
            self._view.release()
            mm.close()
        except BufferError:
            log.debug("mapping at offset %#x still exported; unmapping deferred to GC", self.offset)

    def __repr__(self) -> str:
        state = "closed" if self._mmap is None else "mapped"
        return f"<MmapMapping offset={self.offset:#x} size={self.size:#x} {state}>"


#: Live mappings whose file could not be sealed against shrinking (see `shrunk_mappings`).
_unsealed: weakref.WeakSet[MmapMapping] = weakref.WeakSet()
_unsealed_lock = threading.Lock()


def seal_against_shrinking(fd: int) -> bool:
    """Forbid the file behind ``fd`` to shrink, where it allows sealing; True if it cannot.

    A memfd created with MFD_ALLOW_SEALING gets F_SEAL_SHRINK (nothing else: the
    front-end may still grow it and write it). QEMU's memory-backend-memfd seals its
    memfds itself (seal=on, the default), which this recognises. Other files (tmpfs or
    hugetlbfs files, memfds without MFD_ALLOW_SEALING) cannot be sealed: False.
    """
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return False  # not a file that supports seals
    if seals & fcntl.F_SEAL_SHRINK:
        return True
    if seals & fcntl.F_SEAL_SEAL:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError:
        return False
    return True


def shrunk_mappings() -> list[str]:
    """Descriptions of live unsealed mappings whose file shrank below them (rule VU-FD-004).

    Touching such a mapping past the file's end would kill the process with SIGBUS, so
    the data plane checks this before it lets a worker touch guest memory.
    """
    if not _unsealed:
        return []
    with _unsealed_lock:
        mappings = list(_unsealed)
    return [
        f"mapping of {m.size:#x} bytes at offset {m.offset:#x}: its file shrank below it"
        for m in mappings
        if not m.intact()
    ]


def map_fd(fd: int, offset: int, size: int, *, what: str) -> MmapMapping:
    """Map ``size`` bytes at ``offset`` of ``fd`` shared read/write; ``what`` names it in errors.

    The fd must be a file opened for reading and writing (VU-FD-003: not a socket, pipe
    or directory). A file that allows it is sealed against shrinking first (a mapping
    past the end of its file kills the process with SIGBUS when touched); otherwise the
    mapping is watched (`shrunk_mappings`). Checks ``os.fstat(fd).st_size`` then (a short
    file would SIGBUS on access) and maps from ``offset`` rounded down to the allocation
    granularity (or the file's block size, which is the huge page size on hugetlbfs),
    adding the difference back. Does not close ``fd``.
    """
    if size <= 0 or offset < 0 or offset + size > _U64_END:
        raise GuestMemoryError(f"{what}: bad mapping offset={offset:#x} size={size:#x}")
    try:
        st = os.fstat(fd)
        access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError as exc:
        raise GuestMemoryError(f"{what}: fd {fd} is not usable: {exc}") from exc
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise GuestMemoryError(
            f"{what}: fd {fd} is a {describe(fd)}, not a mappable file", rule_id="VU-FD-003"
        )
    if access != os.O_RDWR:
        raise GuestMemoryError(
            f"{what}: fd {fd} is not open for reading and writing", rule_id="VU-FD-003"
        )
    sealed = stat.S_ISREG(st.st_mode) and seal_against_shrinking(fd)
    if sealed:
        st = os.fstat(fd)  # the size that can no longer decrease
    if stat.S_ISREG(st.st_mode) and st.st_size < offset + size:
        raise GuestMemoryError(
            f"{what}: file too small: needs {offset + size:#x} bytes (offset {offset:#x} + "
            f"size {size:#x}), file has {st.st_size:#x}",
            rule_id="VU-MEM-014",
        )
    align = mmap.ALLOCATIONGRANULARITY
    blk = st.st_blksize
    if blk > align and blk & (blk - 1) == 0:
        align = blk
    base = offset - offset % align
    delta = offset - base
    try:
        mm = mmap.mmap(
            fd,
            size + delta,
            flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=base,
        )
    except (OSError, ValueError, OverflowError) as exc:
        raise GuestMemoryError(
            f"{what}: mmap of fd {fd} offset {offset:#x} size {size:#x} failed: {exc}"
        ) from exc
    whole = memoryview(mm)
    view = whole[delta : delta + size]
    whole.release()
    return MmapMapping(mm, view, offset, size, may_shrink=stat.S_ISREG(st.st_mode) and not sealed)


class MmapMapper:
    """The default mapper: ``mmap`` of the region's fd; refuses Xen foreign/grant regions."""

    def map_region(self, region: VhostUserMemoryRegion, fd: int) -> RegionMapping:
        """Map ``memory_size`` bytes at ``mmap_offset`` of ``fd``."""
        what = _describe(region)
        if region.xen_mmap_flags is not None or region.domid is not None:
            raise GuestMemoryError(
                f"{what}: Xen mapping (xen_mmap_flags={region.xen_mmap_flags}, "
                f"domid={region.domid}) needs a Xen-aware RegionMapper; the default mmap "
                "mapper cannot map it"
            )
        return map_fd(fd, region.mmap_offset, region.memory_size, what=what)


_DEFAULT_MAPPER = MmapMapper()


def _describe(region: VhostUserMemoryRegion) -> str:
    return (
        f"region gpa={region.guest_phys_addr:#x} size={region.memory_size:#x} "
        f"uva={region.userspace_addr:#x} mmap_offset={region.mmap_offset:#x}"
    )


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            log.debug("closing fd %d failed", fd)


# --------------------------------------------------------------------------- regions


class MappedRegion:
    """One mapped region of a snapshot: the table entry plus ``view`` of its bytes.

    A region mapped on demand (`vhsm.ondemand.OnDemandMapping`, Xen NO_ADVANCE_MAP)
    has an empty ``view`` and its mapping in ``on_demand``: `GuestMemory` lookups
    map the bytes of each access through it.
    """

    __slots__ = (
        "desc",
        "domid",
        "gpa_end",
        "guest_phys_addr",
        "mapping",
        "memory_size",
        "mmap_offset",
        "on_demand",
        "userspace_addr",
        "uva_end",
        "view",
        "xen_mmap_flags",
    )

    def __init__(self, desc: VhostUserMemoryRegion, mapping: RegionMapping) -> None:
        self.desc = desc
        self.guest_phys_addr: int = desc.guest_phys_addr
        self.memory_size: int = desc.memory_size
        self.userspace_addr: int = desc.userspace_addr
        self.mmap_offset: int = desc.mmap_offset
        self.xen_mmap_flags: int | None = desc.xen_mmap_flags
        self.domid: int | None = desc.domid
        self.gpa_end: int = desc.guest_phys_addr + desc.memory_size
        self.uva_end: int = desc.userspace_addr + desc.memory_size
        self.mapping = mapping
        self.on_demand = mapping if isinstance(mapping, OnDemandMapping) else None
        view = mapping.view
        if self.on_demand is not None:
            if self.on_demand.size != desc.memory_size:
                mapping.close()
                raise GuestMemoryError(f"{_describe(desc)}: on-demand mapping of another size")
        elif view.nbytes != desc.memory_size or view.readonly:
            detail = f"{view.nbytes:#x}-byte{' read-only' if view.readonly else ''} view"
            mapping.close()
            raise GuestMemoryError(f"{_describe(desc)}: mapper returned a {detail}")
        self.view: memoryview = view

    def matches(self, region: VhostUserMemoryRegion) -> bool:
        """REM_MEM_REG identity: same guest address, user address and size (not mmap_offset)."""
        return same_region(self, region)

    def __repr__(self) -> str:
        return (
            f"<MappedRegion gpa={self.guest_phys_addr:#x} size={self.memory_size:#x} "
            f"uva={self.userspace_addr:#x} mmap_offset={self.mmap_offset:#x}>"
        )


def _check_overlaps(request: str, regions: Sequence[MappedRegion | VhostUserMemoryRegion]) -> None:
    """VU-MEM-005: guest-physical ranges must not overlap, nor user-address ranges."""
    for name in ("guest_phys_addr", "userspace_addr"):
        starts = [(int(getattr(r, name)), i) for i, r in enumerate(regions)]
        starts.sort()
        for (a_start, ia), (b_start, ib) in pairwise(starts):
            a_end = a_start + regions[ia].memory_size
            if a_end > b_start:
                lo, hi = min(ia, ib), max(ia, ib)
                lo_start = a_start if lo == ia else b_start
                lo_end = lo_start + regions[lo].memory_size
                raise WireError(
                    request,
                    f"region[{hi}].{name}",
                    b_start if hi == ib else a_start,
                    f"no overlap with region[{lo}] [{lo_start:#x}, {lo_end:#x})",
                    rule_id="VU-MEM-005",
                )


# The table's rules, on region descriptions: the runtime (`GuestMemory`) and the trace
# auditor (`vhsm.session.shadow.ShadowDataPlane`) both check a table with these.

_Region = TypeVar("_Region", "MappedRegion", "VhostUserMemoryRegion")


# A region's own validity (VU-MEM-004) is the payload decoder's check and the slot limit
# (VU-MEM-007) the memory machine's condition `slots_suffice`: neither is repeated here.


def check_table(request: str, regions: Sequence[VhostUserMemoryRegion], nfds: int) -> None:
    """A whole new table: one fd per region (VU-MEM-002), no overlap (VU-MEM-005)."""
    if nfds != len(regions):
        raise WireError(request, "fds", nfds, f"{len(regions)} (one per region)", "VU-MEM-002")
    _check_overlaps(request, regions)


def check_added(
    request: str,
    current: Sequence[MappedRegion | VhostUserMemoryRegion],
    region: VhostUserMemoryRegion,
) -> None:
    """One more region: no overlap with an active one (VU-MEM-005)."""
    _check_overlaps(request, [*current, region])


def same_region(a: MappedRegion | VhostUserMemoryRegion, b: VhostUserMemoryRegion) -> bool:
    """REM_MEM_REG identity: same guest address, user address and size (not mmap_offset)."""
    return (
        a.guest_phys_addr == b.guest_phys_addr
        and a.userspace_addr == b.userspace_addr
        and a.memory_size == b.memory_size
    )


def without_region(
    request: str, current: Sequence[_Region], region: VhostUserMemoryRegion
) -> tuple[_Region, ...]:
    """The table without `region` (VU-MEM-008 when no region matches)."""
    kept = tuple(r for r in current if not same_region(r, region))
    if len(kept) == len(current):
        raise WireError(
            request,
            "region.guest_phys_addr",
            region.guest_phys_addr,
            f"an active region (uva={region.userspace_addr:#x}, "
            f"size={region.memory_size:#x} not found)",
            rule_id="VU-MEM-008",
        )
    return kept


# --------------------------------------------------------------------------- snapshot


class GuestMemory:
    """An immutable snapshot of the mapped regions, translating GPAs and UVAs to memoryviews."""

    __slots__ = ("_by_gpa", "_by_uva", "_gpa_starts", "_uva_starts", "regions")

    regions: tuple[MappedRegion, ...]
    """The regions in table order (SET_MEM_TABLE order, then ADD_MEM_REG order)."""

    def __init__(self, regions: Sequence[MappedRegion] = ()) -> None:
        self.regions = tuple(regions)
        self._by_gpa = tuple(sorted(self.regions, key=lambda r: r.guest_phys_addr))
        self._gpa_starts = [r.guest_phys_addr for r in self._by_gpa]
        self._by_uva = tuple(sorted(self.regions, key=lambda r: r.userspace_addr))
        self._uva_starts = [r.userspace_addr for r in self._by_uva]

    # -- construction

    @classmethod
    def empty(cls) -> GuestMemory:
        """A snapshot with no regions (before the first SET_MEM_TABLE)."""
        return cls(())

    @classmethod
    def from_table(
        cls,
        regions: Sequence[VhostUserMemoryRegion],
        fds: Sequence[int],
        *,
        mapper: RegionMapper | None = None,
        request: str = "SET_MEM_TABLE",
    ) -> GuestMemory:
        """Map a whole memory table (one fd per region, in order); always closes ``fds``.

        The regions are decoded ones (the decoder checked each, VU-MEM-004); the
        slot limit is the session's (VU-MEM-007).

        Raises:
            WireError: fd count mismatch (VU-MEM-002), overlapping ranges (VU-MEM-005).
            GuestMemoryError: a region cannot be mapped (short file, mmap failure, Xen form).
        """
        try:
            check_table(request, regions, len(fds))
            use = mapper if mapper is not None else _DEFAULT_MAPPER
            mapped: list[MappedRegion] = []
            try:
                for region, fd in zip(regions, fds, strict=True):
                    mapped.append(MappedRegion(region, use.map_region(region, fd)))
            except BaseException:
                for done in mapped:
                    done.mapping.close()
                raise
        finally:
            _close_fds(fds)
        return cls(mapped)

    def with_region_added(
        self,
        region: VhostUserMemoryRegion,
        fd: int,
        *,
        mapper: RegionMapper | None = None,
        request: str = "ADD_MEM_REG",
    ) -> GuestMemory:
        """A new snapshot with ``region`` mapped from ``fd`` (always closed) added.

        Raises:
            WireError: overlap with an active region (VU-MEM-005).
            GuestMemoryError: the region cannot be mapped.
        """
        try:
            check_added(request, self.regions, region)
            use = mapper if mapper is not None else _DEFAULT_MAPPER
            added = MappedRegion(region, use.map_region(region, fd))
        finally:
            _close_fds((fd,))
        return GuestMemory((*self.regions, added))

    def with_region_removed(
        self, region: VhostUserMemoryRegion, *, request: str = "REM_MEM_REG"
    ) -> GuestMemory:
        """A new snapshot without the region matching GPA, UVA and size (mmap_offset ignored).

        The removed mapping is not closed here: :class:`GuestMemoryAtomic` does that once no
        lease uses it.

        Raises:
            WireError: no such region (VU-MEM-008).
        """
        return GuestMemory(without_region(request, self.regions, region))

    # -- lookups (data path: bisect, no allocation beyond the returned slice)

    def translate(self, gpa: int, length: int) -> memoryview:
        """Writable view of guest-physical ``[gpa, gpa+length)``, which must lie in one region.

        Raises:
            GuestMemoryError: the range is not wholly inside one mapped region.
        """
        i = bisect_right(self._gpa_starts, gpa) - 1
        if i >= 0 and length >= 0:
            r = self._by_gpa[i]
            off = gpa - r.guest_phys_addr
            end = off + length
            if end <= r.memory_size:
                if r.on_demand is not None:
                    return r.on_demand.window(off, length)
                try:
                    return r.view[off:end]
                except ValueError:
                    raise _unmapped(r) from None
        raise self._miss("guest-physical", gpa, length, self._by_gpa, gpa=True)

    def translate_uva(self, uva: int, length: int) -> memoryview:
        """Writable view of front-end user addresses ``[uva, uva+length)`` within one region.

        Raises:
            GuestMemoryError: the range is not wholly inside one mapped region.
        """
        i = bisect_right(self._uva_starts, uva) - 1
        if i >= 0 and length >= 0:
            r = self._by_uva[i]
            off = uva - r.userspace_addr
            end = off + length
            if end <= r.memory_size:
                if r.on_demand is not None:
                    return r.on_demand.window(off, length)
                try:
                    return r.view[off:end]
                except ValueError:
                    raise _unmapped(r) from None
        raise self._miss("user-address", uva, length, self._by_uva, gpa=False)

    def find_region(self, gpa: int) -> MappedRegion | None:
        """The region containing guest-physical address ``gpa``, if any."""
        i = bisect_right(self._gpa_starts, gpa) - 1
        if i >= 0:
            r = self._by_gpa[i]
            if gpa < r.gpa_end:
                return r
        return None

    def find_region_uva(self, uva: int) -> MappedRegion | None:
        """The region containing front-end user address ``uva``, if any."""
        i = bisect_right(self._uva_starts, uva) - 1
        if i >= 0:
            r = self._by_uva[i]
            if uva < r.uva_end:
                return r
        return None

    def uva_to_gpa(self, uva: int) -> int:
        """Guest-physical address of front-end user address ``uva``.

        Raises:
            GuestMemoryError: ``uva`` is in no region.
        """
        r = self.find_region_uva(uva)
        if r is None:
            raise self._miss("user-address", uva, 1, self._by_uva, gpa=False)
        return uva - r.userspace_addr + r.guest_phys_addr

    def gpa_to_uva(self, gpa: int) -> int:
        """Front-end user address of guest-physical address ``gpa``.

        Raises:
            GuestMemoryError: ``gpa`` is in no region.
        """
        r = self.find_region(gpa)
        if r is None:
            raise self._miss("guest-physical", gpa, 1, self._by_gpa, gpa=True)
        return gpa - r.guest_phys_addr + r.userspace_addr

    def gather(self, gpa: int, length: int) -> list[memoryview]:
        """Views covering ``[gpa, gpa+length)`` piecewise across adjacent regions.

        Raises:
            GuestMemoryError: any part of the range is unmapped.
        """
        if length < 0:
            raise GuestMemoryError(f"negative length {length} at gpa {gpa:#x}")
        out: list[memoryview] = []
        cur, left = gpa, length
        while left > 0:
            r = self.find_region(cur)
            if r is None:
                raise GuestMemoryError(
                    f"guest range [{gpa:#x}, {gpa + length:#x}) is not fully mapped: "
                    f"no region at {cur:#x}"
                )
            off = cur - r.guest_phys_addr
            n = min(left, r.memory_size - off)
            if r.on_demand is not None:
                out.append(r.on_demand.window(off, n))
            else:
                try:
                    out.append(r.view[off : off + n])
                except ValueError:
                    raise _unmapped(r) from None
            cur += n
            left -= n
        return out

    def read(self, gpa: int, n: int, *, gather: bool = False) -> bytes:
        """Copy ``n`` bytes from guest-physical ``gpa`` (across regions if ``gather``)."""
        if gather:
            return b"".join(bytes(v) for v in self.gather(gpa, n))
        return bytes(self.translate(gpa, n))

    def write(
        self, gpa: int, data: bytes | bytearray | memoryview, *, gather: bool = False
    ) -> None:
        """Copy ``data`` to guest-physical ``gpa`` (across regions if ``gather``)."""
        n = len(data)
        if not gather:
            self.translate(gpa, n)[:] = data
            return
        src = memoryview(data).cast("B")
        pos = 0
        for view in self.gather(gpa, src.nbytes):
            view[:] = src[pos : pos + view.nbytes]
            pos += view.nbytes

    # -- helpers

    @property
    def mappings(self) -> tuple[RegionMapping, ...]:
        """The mappings this snapshot uses (shared with snapshots derived from it)."""
        return tuple(r.mapping for r in self.regions)

    def __len__(self) -> int:
        return len(self.regions)

    def __iter__(self) -> Iterator[MappedRegion]:
        return iter(self.regions)

    def __repr__(self) -> str:
        return f"<GuestMemory {len(self.regions)} regions>"

    @staticmethod
    def _miss(
        kind: str, addr: int, length: int, ordered: Sequence[MappedRegion], *, gpa: bool
    ) -> GuestMemoryError:
        if length < 0:
            return GuestMemoryError(f"negative length {length} at {kind} address {addr:#x}")
        end = addr + length
        for r in ordered:
            start = r.guest_phys_addr if gpa else r.userspace_addr
            if start <= addr < start + r.memory_size:
                return GuestMemoryError(
                    f"{kind} range [{addr:#x}, {end:#x}) crosses the end of {r!r} "
                    f"at {start + r.memory_size:#x}"
                )
        return GuestMemoryError(
            f"{kind} range [{addr:#x}, {end:#x}) is not in any of the {len(ordered)} mapped regions"
        )


def _unmapped(r: MappedRegion) -> GuestMemoryError:
    return GuestMemoryError(
        f"{r!r} was unmapped (its snapshot was replaced); hold GuestMemoryAtomic.lease() "
        "while using guest memory"
    )


# --------------------------------------------------------------------------- atomic holder


class GuestMemoryAtomic:
    """The current snapshot, shared by the control thread and the workers.

    Workers take :meth:`lease` around each batch of work; :meth:`replace` publishes a new
    snapshot at once, and a mapping is closed when it is neither in the current snapshot
    nor in a snapshot still leased. ``mapper`` maps the regions of new tables (the daemon's
    data plane passes it on).
    """

    __slots__ = ("_current", "_leases", "_lock", "mapper")

    def __init__(
        self, memory: GuestMemory | None = None, *, mapper: RegionMapper | None = None
    ) -> None:
        #: How new regions are mapped (None: ``mmap`` of the region's fd; `vhsm.xen.XenMapper`
        #: for Xen foreign and grant regions).
        self.mapper = mapper
        self._current = memory if memory is not None else GuestMemory.empty()
        self._lock = threading.Lock()
        self._leases: dict[GuestMemory, int] = {}

    def memory(self) -> GuestMemory:
        """The current snapshot (unleased: its mappings may be closed by a later replace)."""
        return self._current

    def lease(self) -> MemoryLease:
        """Context manager pinning the current snapshot's mappings until it exits."""
        return MemoryLease(self)

    def replace(self, new: GuestMemory) -> GuestMemory:
        """Make ``new`` current; close the old snapshot's unshared mappings if not leased."""
        with self._lock:
            old, self._current = self._current, new
            doomed = () if old in self._leases else self._unused(old)
        _close_all(doomed)
        return old

    def close(self) -> None:
        """Replace the current snapshot with an empty one (mappings close when unleased)."""
        self.replace(GuestMemory.empty())

    def _acquire(self) -> GuestMemory:
        with self._lock:
            snap = self._current
            self._leases[snap] = self._leases.get(snap, 0) + 1
        return snap

    def _release(self, snap: GuestMemory) -> None:
        with self._lock:
            left = self._leases[snap] - 1
            if left:
                self._leases[snap] = left
                return
            del self._leases[snap]
            if snap is self._current:
                return
            doomed = self._unused(snap)
        _close_all(doomed)

    def _unused(self, snap: GuestMemory) -> tuple[RegionMapping, ...]:
        """Mappings of ``snap`` used by neither the current nor any leased snapshot."""
        live = {id(r.mapping) for r in self._current.regions}
        for other in self._leases:
            live.update(id(r.mapping) for r in other.regions)
        return tuple(r.mapping for r in snap.regions if id(r.mapping) not in live)


class MemoryLease:
    """``with atomic.lease() as mem:`` — ``mem`` stays mapped until the block exits."""

    __slots__ = ("_atomic", "_snap")

    def __init__(self, atomic: GuestMemoryAtomic) -> None:
        self._atomic = atomic
        self._snap: GuestMemory | None = None

    def __enter__(self) -> GuestMemory:
        if self._snap is not None:
            raise RuntimeError("a MemoryLease is not reentrant; take a new lease")
        self._snap = self._atomic._acquire()
        return self._snap

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        snap, self._snap = self._snap, None
        if snap is not None:
            self._atomic._release(snap)


def _close_all(mappings: Sequence[RegionMapping]) -> None:
    for m in mappings:
        try:
            m.close()
        except Exception:
            log.exception("closing mapping %r failed", m)

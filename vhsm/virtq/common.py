"""Pieces shared by the split and packed rings: flags, protocols, event maths, address lookup."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Protocol, TypeGuard

import numpy as np

from vhsm.errors import GuestMemoryError, VirtqError
from vhsm.virtq.chain import CHAIN_SLOTS, DescriptorChain
from vhsm.wire.enums import MAX_QUEUE_SIZE

if TYPE_CHECKING:
    from vhsm._speedups import ChainRing

# Descriptor flags (the same bits in split and packed descriptors).
VIRTQ_DESC_F_NEXT = 0x1
VIRTQ_DESC_F_WRITE = 0x2
VIRTQ_DESC_F_INDIRECT = 0x4
# Packed ring descriptor ownership bits (the driver's and the device's wrap counters).
VIRTQ_DESC_F_AVAIL = 0x80
VIRTQ_DESC_F_USED = 0x8000
# Split ring notification suppression flags.
VRING_AVAIL_F_NO_INTERRUPT = 0x1
VRING_USED_F_NO_NOTIFY = 0x1
# Packed ring event suppression flags.
RING_EVENT_FLAGS_ENABLE = 0x0
RING_EVENT_FLAGS_DISABLE = 0x1
RING_EVENT_FLAGS_DESC = 0x2

DESC_SIZE = 16

#: The ufunc reductions themselves: ``ndarray.max()`` and friends go through a Python
#: wrapper that costs more than the reduction on a burst-sized array.
max_of = np.maximum.reduce
min_of = np.minimum.reduce
or_of = np.bitwise_or.reduce
all_of = np.logical_and.reduce
any_of = np.logical_or.reduce
sum_of = np.add.reduce

# numpy views of ring memory (little-endian, as VIRTIO_F_VERSION_1 requires).
SPLIT_DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
PACKED_DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("id", "<u2"), ("flags", "<u2")])
USED_ELEM_DTYPE = np.dtype([("id", "<u4"), ("len", "<u4")])

_fence_lock = threading.Lock()
_logger = logging.getLogger("vhsm.virtq")


def log_failure(queue: int, exc: Exception) -> None:
    """Report a dirty-log mark that failed (log too small): the data path carries on."""
    _logger.warning("queue %d: dirty log not updated: %s", queue, str(exc))


def memory_barrier() -> None:
    """Full memory barrier: a lock round trip is an atomic read-modify-write (a fence on x86).

    Needed between publishing an index and re-reading the peer's event word (store -> load).
    """
    _fence_lock.acquire()
    _fence_lock.release()


def vring_need_event(event: int, new: int, old: int) -> bool:
    """True iff ``event`` lies in the window ``[old, new)`` modulo 2^16 (virtio event-idx rule)."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class MappedRegionLike(Protocol):
    """What the virtqueue needs from one mapped guest memory region."""

    @property
    def guest_phys_addr(self) -> int:
        """First guest-physical address of the region."""

    @property
    def memory_size(self) -> int:
        """Size of the region in bytes."""

    @property
    def view(self) -> memoryview:
        """Writable view of the region's bytes."""


class GuestMemoryLike(Protocol):
    """The part of ``vhsm.memory.GuestMemory`` the rings use."""

    @property
    def regions(self) -> Sequence[MappedRegionLike]:
        """The mapped regions."""

    def translate(self, gpa: int, length: int) -> memoryview:
        """Writable view of ``[gpa, gpa+length)``; GuestMemoryError unless inside one region."""


class DirtyLogLike(Protocol):
    """The part of ``vhsm.dirtylog.DirtyLog`` the rings use."""

    def mark(self, gpa: int, length: int) -> None:
        """Set the dirty bits of every 4 KiB page in ``[gpa, gpa+length)``."""


class AddressSpace:
    """Guest-physical lookups for buffers, with the biggest region checked inline by callers.

    Built once per memory snapshot; a buffer spanning regions is split into pieces
    (memory ``gather`` when available), anything unmapped raises VirtqError.

    A region with an empty view is mapped on demand (Xen NO_ADVANCE_MAP): it is in
    none of the fast paths' tables (``primary``, ``bounds``, ``views``), so its
    buffers take the general path, which maps each access through ``memory.translate``.
    """

    __slots__ = ("bounds", "memory", "on_demand", "primary", "regions", "views")

    def __init__(self, memory: GuestMemoryLike) -> None:
        self.memory = memory
        regs: list[tuple[int, int, memoryview]] = []
        on_demand: list[tuple[int, int]] = []
        for r in memory.regions:
            view = r.view
            start = r.guest_phys_addr
            if not len(view):
                on_demand.append((start, start + r.memory_size))
                continue
            regs.append((start, start + min(r.memory_size, len(view)), view))
        #: (start, end) of the regions mapped per access.
        self.on_demand: tuple[tuple[int, int], ...] = tuple(on_demand)
        regs.sort(key=lambda t: t[0])
        self.regions: tuple[tuple[int, int, memoryview], ...] = tuple(regs)
        self.primary: tuple[int, int, memoryview] = (
            max(regs, key=lambda t: t[1] - t[0]) if regs else (1, 0, memoryview(bytearray()))
        )
        # A region may end at 2**64 exactly; uint64 holds at most 2**64 - 1 (the burst fast
        # path then misses the last byte and the exact slow path answers).
        top = (1 << 64) - 1
        self.bounds = np.array([(s, min(e, top)) for s, e, _ in regs], dtype=np.uint64).reshape(
            -1, 2
        )
        self.views: tuple[memoryview, ...] = tuple(v for _, _, v in regs)

    def pieces(self, queue: int, head: int, addr: int, length: int) -> list[memoryview]:
        """Views of ``[addr, addr+length)`` split at region borders; VirtqError if unmapped."""
        out: list[memoryview] = []
        first, total = addr, length
        while length > 0:
            for start, end, view in self.regions:
                if start <= addr < end:
                    n = min(length, end - addr)
                    off = addr - start
                    out.append(view[off : off + n])
                    addr += n
                    length -= n
                    break
            else:
                piece = self._on_demand_piece(queue, head, addr, length) if self.on_demand else None
                if piece is None:
                    part = "" if addr == first else f"from {addr:#x} "
                    msg = f"buffer {first:#x}+{total:#x}: {part}outside guest memory"
                    raise VirtqError(queue, msg, head)
                out.append(piece)
                addr += len(piece)
                length -= len(piece)
        return out

    def _on_demand_piece(self, queue: int, head: int, addr: int, length: int) -> memoryview | None:
        """The view of ``[addr, ...)`` up to the end of its on-demand region (None: no such)."""
        for start, end in self.on_demand:
            if start <= addr < end:
                n = min(length, end - addr)
                try:
                    return self.memory.translate(addr, n)
                except GuestMemoryError as exc:
                    raise VirtqError(queue, f"buffer at {addr:#x}+{n:#x}: {exc}", head) from None
        return None

    def view(self, queue: int, head: int, addr: int, length: int) -> memoryview:
        """One view of ``[addr, addr+length)`` (descriptor tables must not straddle regions)."""
        for start, end, view in self.regions:
            if start <= addr and addr + length <= end:
                off = addr - start
                return view[off : off + length]
        try:
            return self.memory.translate(addr, length)
        except GuestMemoryError as exc:
            raise VirtqError(queue, f"table at {addr:#x}+{length:#x}: {exc}", head) from None

    def locate_together(self, addrs: np.ndarray, longest: int) -> tuple[int, np.ndarray] | None:
        """(region index, int64 offsets) when every buffer lies in the first one's region.

        The fast path of a burst (buffers from one pool); None sends the caller to
        :meth:`locate`. ``addrs`` are uint64, ``longest`` the largest length. One
        reduction checks it all: as uint64, an address below the region's start wraps
        above its end.
        """
        first = int(addrs[0])
        for i, (start, end, _) in enumerate(self.regions):
            if start <= first < end:
                offsets = addrs - np.uint64(start)
                if int(max_of(offsets)) + longest <= end - start:
                    return i, offsets.view(np.int64)
                return None
        return None

    def locate(self, addrs: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised lookup: (region index or -1, byte offset in that region) per buffer."""
        region = np.full(addrs.shape, -1, dtype=np.int64)
        for i, (start, end) in enumerate(self.bounds.tolist()):
            inside = (addrs >= start) & (addrs <= end) & (lens <= np.uint64(end) - addrs)
            region[inside & (region < 0)] = i
        starts = self.bounds[:, 0] if len(self.bounds) else np.zeros(1, dtype=np.uint64)
        offsets = (addrs - starts[np.maximum(region, 0)]).astype(np.int64)
        return region, offsets


def _integers(a: object) -> TypeGuard[np.ndarray]:
    """Whether ``a`` is a numpy array of integers."""
    return isinstance(a, np.ndarray) and a.dtype.kind in "iu"


def _unsigned(a: object, max_bytes: int) -> bool:
    """Whether ``a`` is a numpy array of an unsigned type of at most ``max_bytes`` bytes."""
    return isinstance(a, np.ndarray) and a.dtype.kind == "u" and a.dtype.itemsize <= max_bytes


def used_arrays(
    queue: int, ids: object, lens: object, id_bound: int, what: str, *, trusted: bool = False
) -> tuple[np.ndarray, np.ndarray | int]:
    """(ids, lens) of an ``add_used_batch`` as integer arrays, checked.

    ValueError unless there are as many lengths as ids (or one int for all), each
    fitting in 32 bits; VirtqError naming the first id outside ``[0, id_bound)``
    (``what`` names the bound), unless ``trusted`` says the queue itself produced the
    ids in range. Integer arrays are used as they are (no copy); other sequences
    become int64. Reductions are skipped where the dtype guarantees the range.
    """
    ida = ids if _integers(ids) else np.asarray(ids, dtype=np.int64)
    lna: np.ndarray | int
    if isinstance(lens, int):
        if not 0 <= lens <= 0xFFFFFFFF:
            raise ValueError(f"used length {lens} does not fit in 32 bits")
        lna = lens
    else:
        lna = lens if _integers(lens) else np.asarray(lens, dtype=np.int64)
        if len(ida) != len(lna):
            raise ValueError(f"{len(ida)} ids but {len(lna)} lengths")
        if len(lna) and not _unsigned(lens, 4) and (min_of(lna) < 0 or max_of(lna) > 0xFFFFFFFF):
            raise ValueError("used length does not fit in 32 bits")
    if (
        not trusted
        and len(ida)
        and (
            (not _unsigned(ids, 4) and min_of(ida) < 0)
            or (not (_unsigned(ids, 2) and id_bound > 0xFFFF) and max_of(ida) >= id_bound)
        )
    ):
        bad = int(ida[(ida < 0) | (ida >= id_bound)][0])
        raise VirtqError(queue, f"used id {bad} >= {what} {id_bound}", bad)
    return ida, lna


def length_list(lens: Sequence[int] | np.ndarray | int, k: int) -> list[int]:
    """The ``k`` used lengths of an ``add_used_batch`` as ints (one int stands for all)."""
    if isinstance(lens, int):
        return [lens] * k
    if isinstance(lens, np.ndarray):
        out: list[int] = lens.tolist()
        return out
    return [int(n) for n in lens]


def check_queue_size(size: int, *, packed: bool, limit: int = MAX_QUEUE_SIZE) -> None:
    """Reject a queue size the ring layout (or the device, ``limit``) cannot have.

    The one statement of the queue-size rule (VU-RING-002): the vring machine's
    condition `queue_size_valid` asks it, and the ring layouts guard themselves
    with it. 1..32768 (capped by ``limit``), a power of two for split rings.

    Raises:
        ValueError: why the size is refused.
    """
    top = min(MAX_QUEUE_SIZE, limit)
    if not 1 <= size <= top:
        raise ValueError(f"queue size {size} not in 1..{top}")
    if not packed and size & (size - 1):
        raise ValueError(f"split queue size {size} is not a power of two")


def host_span(view: memoryview) -> tuple[int, int]:
    """The host address range ``[start, end)`` of a (non-empty) view of guest memory."""
    start = int(np.frombuffer(view, dtype=np.uint8, count=1).ctypes.data)
    return start, start + view.nbytes


def written_over(device: tuple[str, memoryview], *driver: tuple[str, memoryview]) -> str | None:
    """Why the area the device writes lies over one the driver writes, or None.

    Compares host addresses, so two guest addresses mapping the same bytes count.
    A ring laid out like this feeds the device its own writes (used index over
    avail index: every completion publishes new work), so it is treated as broken.
    """
    name, view = device
    start, end = host_span(view)
    for other, area in driver:
        s, e = host_span(area)
        if start < e and s < end:
            return f"the {name} area overlaps the {other} area"
    return None


def check_area(name: str, view: memoryview, size: int, align: int) -> None:
    """Check that a ring area view is long enough and suitably aligned."""
    if view.nbytes < size:
        raise ValueError(f"{name} area is {view.nbytes} bytes, needs {size}")
    if view.readonly:
        raise ValueError(f"{name} area is read-only")
    address = int(np.frombuffer(view, dtype=np.uint8, count=1).ctypes.data) if size else 0
    if address % align:
        raise ValueError(f"{name} area at host address {address:#x} not {align}-byte aligned")


def chain_ring(
    accel: ModuleType | None,
    queue: object,
    slots: tuple[str, ...],
    size: int,
    desc: memoryview,
    areas: tuple[object, ...],
    space: AddressSpace,
) -> ChainRing | None:
    """The compiled ``pop``/iteration/``add_used`` of ``queue``, or None for the pure path.

    ``slots`` names the queue's state slots (the C code reads and writes them in
    place, so both paths share one state); ``areas`` are the split ring's avail and
    used areas or the packed ring's in-flight tables. None also when a region's
    view is not a plain byte view (the pure path handles any).
    """
    if accel is None:
        return None
    primary = next((i for i, r in enumerate(space.regions) if r is space.primary), -1)
    regions = tuple((start, end - start, view) for start, end, view in space.regions)
    ring: ChainRing | None = accel.chain_ring(
        queue, slots, DescriptorChain, CHAIN_SLOTS, size, desc, areas, regions, primary
    )
    return ring


class QueueState:
    """What split and packed queues answer alike; the values live in their own slots.

    Also where the compiled per-chain API is dropped when a queue gives its views back.
    """

    __slots__ = ("_chains", "_event_idx", "_indirect", "_next_avail", "_next_used", "_size")
    _size: int
    _next_avail: int
    _next_used: int
    _event_idx: bool
    _indirect: bool
    _chains: ChainRing | None

    @property
    def size(self) -> int:
        """Queue size N."""
        return self._size

    @property
    def next_avail(self) -> int:
        """Where the device reads next: the avail index (split) or ring position (packed)."""
        return self._next_avail

    @property
    def next_used(self) -> int:
        """Where the device writes next: the used index (split) or ring position (packed)."""
        return self._next_used

    @property
    def event_idx(self) -> bool:
        """Whether VIRTIO_F_RING_EVENT_IDX is in effect (packed: descriptor-specific events)."""
        return self._event_idx

    def set_indirect(self, enabled: bool) -> None:
        """Allow or refuse INDIRECT descriptors (VIRTIO_F_RING_INDIRECT_DESC)."""
        self._indirect = enabled

    def _release_chains(self) -> None:
        """Give the compiled per-chain API's hold on the ring areas back (``release``)."""
        if self._chains is not None:
            self._chains.release()
            self._chains = None

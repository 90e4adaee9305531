"""Inflight I/O tracking (protocol feature INFLIGHT_SHMFD): shared buffers that survive a crash.

GET_INFLIGHT_FD: :func:`allocate` makes a zeroed, initialised memfd. SET_INFLIGHT_FD:
:func:`attach` maps it and gives one tracker per queue (:class:`InflightSplit` or
:class:`InflightPacked`). A ring records every fetched request and every completed batch in
the order the upstream specification lays down (see the trackers' "Ring protocol"); after a
restart, ``resubmit()`` repairs a half-recorded last batch and returns the requests still in
flight, oldest first.

Fields are accessed through memoryview casts of the shared buffer: every 16-bit field is
written with one aligned 2-byte store, so a crash never leaves a torn field.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from vhsm.errors import VirtqError, WireError
from vhsm.memory import MmapMapping, map_fd
from vhsm.wire.enums import MAX_QUEUE_SIZE
from vhsm.wire.payloads import VhostUserInflight

__all__ = [
    "INFLIGHT_VERSION",
    "MAX_QUEUE_SIZE",
    "InflightBuffer",
    "InflightChain",
    "InflightPacked",
    "InflightSplit",
    "PackedDesc",
    "allocate",
    "attach",
    "queue_region_size",
]

log = logging.getLogger(__name__)

INFLIGHT_VERSION = 1

SPLIT_HEADER_SIZE = 16
SPLIT_DESC_SIZE = 16
PACKED_HEADER_SIZE = 32  # C layout: desc[] is 8-byte aligned after the 29-byte header
PACKED_DESC_SIZE = 32

_AVAIL = 1 << 7  # VRING_PACKED_DESC_F_AVAIL
_USED = 1 << 15  # VRING_PACKED_DESC_F_USED

_RULE = "VU-PAY-003"


def _roundup(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def queue_region_size(queue_size: int, packed: bool) -> int:
    """Bytes of one queue's region.

    Split: ``roundup(16*qs + 16, 64)``; packed: ``roundup(32*qs + 32, 64)``, which equals
    DPDK's ``roundup(32*qs + 29, 64)``.
    """
    if packed:
        return _roundup(PACKED_HEADER_SIZE + PACKED_DESC_SIZE * queue_size, 64)
    return _roundup(SPLIT_HEADER_SIZE + SPLIT_DESC_SIZE * queue_size, 64)


def _check_geometry(request: str, num_queues: int, queue_size: int) -> None:
    if num_queues < 1 or num_queues > 0xFFFF:
        raise WireError(request, "num_queues", num_queues, "1..65535", _RULE)
    if queue_size < 1 or queue_size > MAX_QUEUE_SIZE:
        raise WireError(request, "queue_size", queue_size, f"1..{MAX_QUEUE_SIZE}", _RULE)


def allocate(
    num_queues: int, queue_size: int, packed: bool, *, request: str = "GET_INFLIGHT_FD"
) -> tuple[VhostUserInflight, int]:
    """Create the buffer for GET_INFLIGHT_FD: the reply description and the memfd (caller's).

    The buffer is left all zero, a *new* region (version 0), as libvhost-user and DPDK
    hand theirs out: each queue adopts its ring's position when the ring starts. The
    memfd is sealed against shrinking and growing, so a later mapping cannot SIGBUS.

    Raises:
        WireError: ``num_queues`` or ``queue_size`` out of range (VU-PAY-003).
    """
    _check_geometry(request, num_queues, queue_size)
    stride = queue_region_size(queue_size, packed)
    size = stride * num_queues
    fd = os.memfd_create("vhsm-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        desc = VhostUserInflight(size, 0, num_queues, queue_size)
        map_fd(fd, 0, size, what=f"{request} inflight buffer").close()
    except BaseException:
        os.close(fd)
        raise
    return desc, fd


def attach(
    desc: VhostUserInflight, fd: int, *, packed: bool, request: str = "SET_INFLIGHT_FD"
) -> InflightBuffer:
    """Map the buffer of SET_INFLIGHT_FD (``fd`` is always closed); see :class:`InflightBuffer`."""
    return InflightBuffer.attach(desc, fd, packed=packed, request=request)


class InflightBuffer:
    """The mapped inflight buffer: ``num_queues`` regions, one tracker per queue."""

    def __init__(
        self, mapping: MmapMapping, num_queues: int, queue_size: int, packed: bool
    ) -> None:
        """Wrap ``mapping`` (at least ``num_queues`` regions of ``queue_size`` entries)."""
        self._mapping = mapping
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.packed = packed
        stride = queue_region_size(queue_size, packed)
        cls: type[InflightSplit] | type[InflightPacked] = (
            InflightPacked if packed else InflightSplit
        )
        view = mapping.view
        self.queues: tuple[InflightSplit | InflightPacked, ...] = tuple(
            cls(view[i * stride : (i + 1) * stride], queue_size, i) for i in range(num_queues)
        )

    @classmethod
    def attach(
        cls,
        desc: VhostUserInflight,
        fd: int,
        *,
        packed: bool,
        request: str = "SET_INFLIGHT_FD",
    ) -> InflightBuffer:
        """Map ``desc``'s buffer from ``fd`` (always closed) and check every queue header.

        Raises:
            WireError: zero/oversized ``num_queues``/``queue_size``, or ``mmap_size`` too
                small for them (VU-PAY-003).
            GuestMemoryError: the file is too small or cannot be mapped.
            VirtqError: a queue region holds an unknown version or another queue size.
        """
        try:
            _check_geometry(request, desc.num_queues, desc.queue_size)
            need = desc.num_queues * queue_region_size(desc.queue_size, packed)
            if desc.mmap_size < need:
                raise WireError(
                    request,
                    "mmap_size",
                    desc.mmap_size,
                    f">= {need:#x} ({desc.num_queues} queues of {desc.queue_size} "
                    f"{'packed' if packed else 'split'} entries)",
                    _RULE,
                )
            if desc.mmap_offset < 0 or desc.mmap_offset + desc.mmap_size > 1 << 64:
                raise WireError(
                    request, "mmap_offset", desc.mmap_offset, "offset + size <= 2**64", _RULE
                )
            mapping = map_fd(fd, desc.mmap_offset, need, what=f"{request} inflight buffer")
        finally:
            try:
                os.close(fd)
            except OSError:
                log.debug("closing inflight fd %d failed", fd)
        try:
            return cls(mapping, desc.num_queues, desc.queue_size, packed)
        except BaseException:
            mapping.close()
            raise

    def queue(self, index: int) -> InflightSplit | InflightPacked:
        """The tracker of queue ``index``."""
        return self.queues[index]

    def close(self) -> None:
        """Release the trackers' views and unmap (idempotent)."""
        for q in self.queues:
            q._release()
        self._mapping.close()

    def __repr__(self) -> str:
        kind = "packed" if self.packed else "split"
        return f"<InflightBuffer {self.num_queues} {kind} queues of {self.queue_size}>"


def _header_error(index: int, detail: str) -> VirtqError:
    return VirtqError(index, f"inflight buffer: {detail}")


# --------------------------------------------------------------------------- split

_SPLIT_DTYPE = np.dtype(
    {
        "names": ["inflight", "next", "counter"],
        "formats": ["u1", "=u2", "=u8"],
        "offsets": [0, 6, 8],
        "itemsize": SPLIT_DESC_SIZE,
    }
)


class InflightSplit:
    """One split queue's region: head flags, fetch counters and the last-batch list.

    Ring protocol: :meth:`fetch` each head taken from the avail ring; to complete a batch,
    :meth:`prepare_batch`, publish the used entries and ``used->idx``, then
    :meth:`commit_batch` with the new ``used->idx`` (or :meth:`complete` doing all three).
    """

    # u16 indexes: header version 4, desc_num 5, last_batch_head 6, used_idx 7;
    # entry i: inflight byte 16 + 16i, next u16 11 + 8i, counter u64 3 + 2i.

    def __init__(self, view: memoryview, queue_size: int, index: int = 0) -> None:
        """Track the queue whose region is ``view`` (laid out afresh if its version is 0)."""
        self.index = index
        self.queue_size = queue_size
        self._b = view
        self._h = view.cast("H")
        self._q = view.cast("Q")
        version = self._h[4]
        #: Version 0: a new region, nothing recorded; it adopts the ring's position.
        self.new = version == 0
        if self.new:
            view[:] = bytes(view.nbytes)
            self._h[5] = queue_size
        elif version != INFLIGHT_VERSION:
            raise _header_error(index, f"unknown version {version}")
        elif self._h[5] != queue_size:
            raise _header_error(index, f"desc_num {self._h[5]} != queue size {queue_size}")
        self._counter = self._next_counter()

    @property
    def used_idx(self) -> int:
        """``used->idx`` after the last completed batch."""
        return int(self._h[7])

    @property
    def last_batch_head(self) -> int:
        """Head of the list of the last completed batch."""
        return int(self._h[6])

    def adopt(self, used_idx: int) -> None:
        """A new region takes the ring's position: ``used_idx`` read from the used ring."""
        self._h[7] = used_idx & 0xFFFF
        self._mark_recording()

    def _mark_recording(self) -> None:
        # The version is written once the region records a position: until then a
        # back-end that restarts still sees a new region (layout version 1).
        self._h[4] = INFLIGHT_VERSION
        self.new = False

    def fetch(self, head: int) -> None:
        """Record head ``head`` as in flight (taken from the avail ring), newest counter."""
        if not 0 <= head < self.queue_size:
            raise VirtqError(self.index, "inflight: head out of range", head)
        if self.new:
            self._mark_recording()
        self._q[3 + 2 * head] = self._counter
        self._counter += 1
        self._b[16 + 16 * head] = 1

    def prepare_batch(self, heads: Sequence[int]) -> None:
        """Link ``heads`` into the last-batch list (before publishing them in the used ring)."""
        h = self._h
        qs = self.queue_size
        last = h[6]
        for head in heads:
            if not 0 <= head < qs:
                raise VirtqError(self.index, "inflight: head out of range", head)
            h[11 + 8 * head] = last
            last = head
        h[6] = last

    def commit_batch(self, heads: Sequence[int], used_idx: int) -> None:
        """Clear ``heads``' flags and record ``used_idx`` (after ``used->idx`` was published)."""
        b = self._b
        for head in heads:
            b[16 + 16 * head] = 0
        self._h[7] = used_idx & 0xFFFF

    def complete(self, heads: Sequence[int], publish: Callable[[], int]) -> None:
        """Complete a batch: ``publish()`` writes the used entries and returns ``used->idx``."""
        self.prepare_batch(heads)
        used_idx = publish()
        self.commit_batch(heads, used_idx)

    def inflight_heads(self) -> list[int]:
        """Heads flagged in flight, in fetch (counter) order."""
        arr = np.frombuffer(self._b, _SPLIT_DTYPE, self.queue_size, SPLIT_HEADER_SIZE)
        heads = np.flatnonzero(arr["inflight"])
        order = heads[np.argsort(arr["counter"][heads], kind="stable")]
        return [int(x) for x in order]

    def resubmit(self, used_idx: int) -> list[int]:
        """After a restart: fix a half-recorded last batch, return heads to resubmit in order.

        Args:
            used_idx: ``used->idx`` read from the used ring in guest memory.

        Raises:
            VirtqError: the buffer's batch list is inconsistent with ``used_idx``.
        """
        used_idx &= 0xFFFF
        h, b = self._h, self._b
        pending = (used_idx - h[7]) & 0xFFFF
        if pending:
            if pending > self.queue_size:
                raise _header_error(
                    self.index,
                    f"used->idx {used_idx} is {pending} entries past the recorded "
                    f"used_idx {h[7]} (queue size {self.queue_size})",
                )
            head = h[6]
            for _ in range(pending):
                if head >= self.queue_size:
                    raise _header_error(self.index, f"last-batch list reaches head {head}")
                b[16 + 16 * head] = 0
                head = h[11 + 8 * head]
            h[7] = used_idx
        heads = self.inflight_heads()
        self._counter = self._next_counter()
        return heads

    def _next_counter(self) -> int:
        arr = np.frombuffer(self._b, _SPLIT_DTYPE, self.queue_size, SPLIT_HEADER_SIZE)
        live = arr["counter"][arr["inflight"] != 0]
        return int(live.max()) + 1 if live.size else 0

    def _release(self) -> None:
        self._h.release()
        self._q.release()
        self._b.release()

    def __repr__(self) -> str:
        return f"<InflightSplit queue {self.index} size {self.queue_size}>"


# --------------------------------------------------------------------------- packed


class PackedDesc(NamedTuple):
    """A packed-ring descriptor as copied into the inflight buffer."""

    addr: int
    len: int
    id: int
    flags: int


class InflightChain(NamedTuple):
    """A packed request still in flight: its head slot, fetch counter and descriptors."""

    slot: int
    counter: int
    descs: tuple[PackedDesc, ...]

    @property
    def id(self) -> int:
        """The buffer id (from the chain's last descriptor)."""
        return self.descs[-1].id


_PACKED_DTYPE = np.dtype(
    {
        "names": ["inflight", "next", "last", "num", "counter", "id", "flags", "len", "addr"],
        "formats": ["u1", "=u2", "=u2", "=u2", "=u8", "=u2", "=u2", "=u4", "=u8"],
        "offsets": [0, 2, 4, 6, 8, 16, 18, 20, 24],
        "itemsize": PACKED_DESC_SIZE,
    }
)


class InflightPacked:
    """One packed queue's region: a free list of descriptor copies and used state.

    Ring protocol: :meth:`fetch` each chain (returns its slot); to complete a batch of
    slots, :meth:`prepare_batch`, write the used descriptors' flags, then
    :meth:`commit_batch` (or :meth:`complete` doing all three).
    """

    # u16 indexes: version 4, desc_num 5, free_head 6, old_free_head 7, used_idx 8,
    # old_used_idx 9; bytes: used_wrap_counter 20, old_used_wrap_counter 21.
    # entry j: inflight byte 32+32j; u16 next 17+16j, last 18+16j, num 19+16j, id 24+16j,
    # flags 25+16j; u32 len 13+8j; u64 counter 5+4j, addr 7+4j.

    def __init__(self, view: memoryview, queue_size: int, index: int = 0) -> None:
        """Track the queue whose region is ``view`` (laid out afresh if its version is 0)."""
        self.index = index
        self.queue_size = queue_size
        self._b = view
        self._h = view.cast("H")
        self._i = view.cast("I")
        self._q = view.cast("Q")
        version = self._h[4]
        #: Version 0: a new region, nothing recorded; it adopts the ring's position.
        self.new = version == 0
        if self.new:
            self._initialise()
        elif version != INFLIGHT_VERSION:
            raise _header_error(index, f"unknown version {version}")
        elif self._h[5] != queue_size:
            raise _header_error(index, f"desc_num {self._h[5]} != queue size {queue_size}")
        self._counter = self._next_counter()

    def _initialise(self) -> None:
        b, h = self._b, self._h
        b[:] = bytes(b.nbytes)
        arr = np.frombuffer(b, _PACKED_DTYPE, self.queue_size, PACKED_HEADER_SIZE)
        arr["next"] = np.arange(1, self.queue_size + 1, dtype=np.uint16)
        del arr
        h[5] = self.queue_size
        b[20] = 1
        b[21] = 1

    def adopt(self, next_used: int, used_wrap: int) -> None:
        """A new region takes the ring's used position and wrap counter."""
        b, h = self._b, self._h
        h[8] = h[9] = next_used
        b[20] = b[21] = used_wrap & 1
        self._mark_recording()

    def _mark_recording(self) -> None:
        self._h[4] = INFLIGHT_VERSION
        self.new = False

    @property
    def free_head(self) -> int:
        """First free slot."""
        return int(self._h[6])

    @property
    def used_idx(self) -> int:
        """Next used-ring position (after the last prepared batch)."""
        return int(self._h[8])

    @property
    def used_wrap_counter(self) -> bool:
        """Used wrap counter (after the last prepared batch)."""
        return bool(self._b[20])

    def fetch(self, descs: Sequence[PackedDesc | tuple[int, int, int, int]]) -> int:
        """Record a chain (``(addr, len, id, flags)`` per ring descriptor); return its slot."""
        n = len(descs)
        qs = self.queue_size
        if not 0 < n <= qs:
            raise VirtqError(self.index, f"inflight: chain of {n} descriptors")
        if self.new:
            self._mark_recording()
        b, h, i, q = self._b, self._h, self._i, self._q
        slot = h[7]
        fh = h[6]
        if slot != fh or slot >= qs:
            raise _header_error(self.index, f"free_head {fh} / old_free_head {slot} unusable")
        last = fh
        for addr, length, buf_id, flags in descs:
            if fh >= qs:
                raise VirtqError(self.index, "inflight: free list exhausted")
            q[7 + 4 * fh] = addr
            i[13 + 8 * fh] = length
            h[24 + 16 * fh] = buf_id
            h[25 + 16 * fh] = flags
            last = fh
            fh = h[17 + 16 * fh]
        # Until old_free_head moves, a crash rolls all of this back onto the free list.
        q[5 + 4 * slot] = self._counter
        h[18 + 16 * slot] = last
        h[19 + 16 * slot] = n
        b[32 + 32 * slot] = 1
        h[6] = fh
        h[7] = fh
        self._counter += 1
        return int(slot)

    def prepare_batch(self, slots: Sequence[int]) -> None:
        """Return ``slots``' chains to the free list and advance the used index/wrap."""
        b, h = self._b, self._h
        qs = self.queue_size
        fh, used, wrap = h[6], h[8], b[20]
        for slot in slots:
            if not 0 <= slot < qs or not b[32 + 32 * slot]:
                raise VirtqError(self.index, "inflight: slot not in flight", slot)
            last = h[18 + 16 * slot]
            if last >= qs:
                raise _header_error(self.index, f"slot {slot} has last {last}")
            h[17 + 16 * last] = fh
            fh = slot
            used += h[19 + 16 * slot]
            if used >= qs:
                used -= qs
                wrap ^= 1
        h[6] = fh
        h[8] = used
        b[20] = wrap

    def commit_batch(self, slots: Sequence[int]) -> None:
        """Clear ``slots``' flags and commit the new state (after the used flags were written)."""
        b, h = self._b, self._h
        for slot in slots:
            b[32 + 32 * slot] = 0
        h[7] = h[6]
        h[9] = h[8]
        b[21] = b[20]

    def complete(self, slots: Sequence[int], publish: Callable[[], object]) -> None:
        """Complete a batch: ``publish()`` writes the used descriptors (flags last)."""
        self.prepare_batch(slots)
        publish()
        self.commit_batch(slots)

    def chain(self, slot: int) -> InflightChain:
        """The recorded chain whose head is ``slot``."""
        h, i, q = self._h, self._i, self._q
        qs = self.queue_size
        n = h[19 + 16 * slot]
        if not 0 < n <= qs:
            raise _header_error(self.index, f"slot {slot} records {n} descriptors")
        descs = []
        cur = slot
        for k in range(n):
            if cur >= qs:
                raise _header_error(self.index, f"chain at slot {slot} reaches slot {cur}")
            descs.append(
                PackedDesc(q[7 + 4 * cur], i[13 + 8 * cur], h[24 + 16 * cur], h[25 + 16 * cur])
            )
            if k < n - 1:
                cur = h[17 + 16 * cur]
        return InflightChain(slot, int(q[5 + 4 * slot]), tuple(descs))

    def inflight_slots(self) -> list[int]:
        """Head slots flagged in flight, in fetch (counter) order."""
        arr = np.frombuffer(self._b, _PACKED_DTYPE, self.queue_size, PACKED_HEADER_SIZE)
        slots = np.flatnonzero(arr["inflight"])
        order = slots[np.argsort(arr["counter"][slots], kind="stable")]
        return [int(x) for x in order]

    def resubmit(self, ring_flags: Callable[[int], int]) -> list[InflightChain]:
        """After a restart: settle the last batch, roll back, return chains to resubmit in order.

        Args:
            ring_flags: reads the ``flags`` of the packed ring descriptor at a ring position;
                called with ``old_used_idx`` only when a batch was left half-recorded.

        Raises:
            VirtqError: the buffer's free list or chains are inconsistent.
        """
        b, h = self._b, self._h
        qs = self.queue_size
        if h[8] != h[9] or b[20] != b[21]:
            old_wrap = b[21]
            avail = _AVAIL if old_wrap else _USED
            if ring_flags(h[9]) & (_AVAIL | _USED) != avail:
                # the used descriptor was written: the batch was published, keep it
                h[7] = h[6]
                h[9] = h[8]
                b[21] = b[20]
        h[6] = h[7]
        h[8] = h[9]
        b[20] = b[21]
        cur = h[6]
        for _ in range(qs + 1):
            if cur >= qs:
                break
            b[32 + 32 * cur] = 0
            cur = h[17 + 16 * cur]
        else:
            raise _header_error(self.index, "free list has a cycle")
        chains = [self.chain(slot) for slot in self.inflight_slots()]
        self._counter = self._next_counter()
        return chains

    def _next_counter(self) -> int:
        arr = np.frombuffer(self._b, _PACKED_DTYPE, self.queue_size, PACKED_HEADER_SIZE)
        live = arr["counter"][arr["inflight"] != 0]
        return int(live.max()) + 1 if live.size else 0

    def _release(self) -> None:
        for v in (self._h, self._i, self._q, self._b):
            v.release()

    def __repr__(self) -> str:
        return f"<InflightPacked queue {self.index} size {self.queue_size}>"

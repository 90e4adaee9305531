"""Device side of a split virtqueue: pop available chains, publish used elements.

Error policy (VU-RING-009): everything the guest wrote is checked. A bad chain raises
``VirtqError(queue, detail, head)`` *after* it has been consumed (next avail moved
past it), so the queue stays usable for the following chains; the caller (the vring)
completes it with length 0 when ``head`` is a valid index and signals the err fd.
An avail index that moved by more than the queue size raises with ``head=None``
without consuming anything (the ring is broken until the driver fixes it).

Every 16-bit ring word (flags, idx, event words) is read or written as one aligned
item of a ``memoryview.cast("H")``; used elements are written before the used index.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from types import ModuleType

import numpy as np

from vhsm import speedups
from vhsm.errors import GuestMemoryError, VirtqError
from vhsm.virtq.batch import Batch
from vhsm.virtq.chain import DescriptorChain
from vhsm.virtq.common import (
    SPLIT_DESC_DTYPE,
    USED_ELEM_DTYPE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_USED_F_NO_NOTIFY,
    AddressSpace,
    DirtyLogLike,
    GuestMemoryLike,
    QueueState,
    chain_ring,
    check_area,
    check_queue_size,
    length_list,
    log_failure,
    max_of,
    memory_barrier,
    min_of,
    or_of,
    used_arrays,
    written_over,
)

_NEXT = VIRTQ_DESC_F_NEXT
_WRITE = VIRTQ_DESC_F_WRITE
_INDIRECT = VIRTQ_DESC_F_INDIRECT
_MAX_CHAIN_BYTES = 0xFFFFFFFF
_EMPTY: tuple[()] = ()
_SIMPLE_MASK = (_NEXT | _INDIRECT) << 32
_WRITE_BIT = _WRITE << 32
_new = object.__new__  # a chain with its slots filled inline: no __init__ frame per chain
#: The state slots the compiled per-chain API reads and writes (the order _speedups.c names).
_CHAIN_SLOTS = ("_next_avail", "_avail_shadow", "_next_used", "_indirect", "_log")


def split_area_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of the descriptor table, available ring and used ring (with event words)."""
    return 16 * size, 6 + 2 * size, 6 + 8 * size


class SplitQueue(QueueState):
    """Device-side split ring over three writable memoryviews of guest memory."""

    __slots__ = (
        "_accel",
        "_avail",
        "_avail_h",
        "_avail_np",
        "_avail_shadow",
        "_desc",
        "_desc_h",
        "_desc_i",
        "_desc_np",
        "_desc_q",
        "_desc_w",
        "_fresh_heads",
        "_log",
        "_log_used_gpa",
        "_mask",
        "_signalled_used",
        "_space",
        "_used",
        "_used_event_i",
        "_used_h",
        "_used_np",
        "_used_q",
        "_used_w",
        "index",
        "notify_on_empty",
    )

    def __init__(
        self,
        memory: GuestMemoryLike,
        size: int,
        desc: memoryview,
        avail: memoryview,
        used: memoryview,
        *,
        index: int = 0,
        event_idx: bool = False,
        indirect: bool = False,
        next_avail: int = 0,
        next_used: int | None = None,
        log: DirtyLogLike | None = None,
        log_used_gpa: int | None = None,
    ) -> None:
        """Wrap the ring areas; ``next_used=None`` reads the used index from guest memory."""
        check_queue_size(size, packed=False)
        dsize, asize, usize = split_area_sizes(size)
        check_area("descriptor", desc, dsize, 16)
        check_area("available", avail, asize, 2)
        check_area("used", used, usize, 4)
        self.index = index
        self.notify_on_empty = False
        self._size = size
        self._mask = size - 1
        self._space = AddressSpace(memory)
        self._desc = desc[:dsize]
        self._avail = avail[:asize]
        self._used = used[:usize]
        self._desc_q = self._desc.cast("Q")
        self._desc_i = self._desc.cast("I")
        self._desc_h = self._desc.cast("H")
        self._avail_h = self._avail.cast("H")
        self._used_h = self._used.cast("H")
        self._used_q = self._used[4 : 4 + 8 * size].cast("Q")
        self._desc_np = np.frombuffer(self._desc, dtype=SPLIT_DESC_DTYPE)
        # the same table as rows of 32-bit words: addr low, addr high, len, flags | next << 16
        self._desc_w = self._desc_np.view(np.uint32).reshape(size, 4)
        self._avail_np = np.frombuffer(self._avail, dtype="<u2")
        self._used_np = np.frombuffer(self._used[4 : 4 + 8 * size], dtype=USED_ELEM_DTYPE)
        self._used_w = self._used_np.view(np.uint64)  # each element as one id | len << 32 word
        self._used_event_i = 2 + size  # avail ring word index of used_event
        self._event_idx = event_idx
        self._indirect = indirect
        self._next_avail = next_avail & 0xFFFF
        self._avail_shadow = self._next_avail
        self._next_used = self._used_h[1] if next_used is None else next_used & 0xFFFF
        self._signalled_used: int | None = None
        self._fresh_heads: np.ndarray | None = None  # the last fast burst's heads, all < size
        self._log = log
        self._log_used_gpa = log_used_gpa
        self._accel = speedups.accel  # the compiled data path, or None for pure Python
        # pop, iteration and add_used in C (None: the pure methods below)
        self._chains = chain_ring(
            self._accel,
            self,
            _CHAIN_SLOTS,
            size,
            self._desc,
            (self._avail, self._used),
            self._space,
        )

    # ----------------------------------------------------------------- state
    def set_event_idx(self, enabled: bool) -> None:
        """Turn event-index notification suppression on or off."""
        self._event_idx = enabled
        self._signalled_used = None

    def set_next_avail(self, value: int) -> None:
        """Set the next available index (SET_VRING_BASE)."""
        self._next_avail = value & 0xFFFF
        self._avail_shadow = self._next_avail

    def set_next_used(self, value: int) -> None:
        """Set the next used index (device-private; the ring word is written on the next add)."""
        self._next_used = value & 0xFFFF
        self._signalled_used = None

    def get_base(self) -> int:
        """The GET_VRING_BASE ``num``: the next available index."""
        return self._next_avail

    def set_base(self, num: int) -> None:
        """Apply a SET_VRING_BASE ``num``; bits 16-31 are reserved (VU-RING-005)."""
        if num >> 16:
            raise ValueError(f"split ring base {num:#x} has reserved bits 16-31 set")
        self.set_next_avail(num)

    def set_log(self, log: DirtyLogLike | None, log_used_gpa: int | None = None) -> None:
        """Attach (or detach) the dirty log; ``log_used_gpa`` is set when the ring LOG flag is."""
        self._log = log
        self._log_used_gpa = log_used_gpa

    def avail_idx(self) -> int:
        """The driver's avail index as currently in guest memory."""
        return self._avail_h[1]

    def used_idx(self) -> int:
        """The used index as currently in guest memory."""
        return self._used_h[1]

    def has_available(self) -> bool:
        """Whether the driver has published entries not yet popped."""
        return self._avail_h[1] != self._next_avail

    def device_area_overlap(self) -> str | None:
        """Why the used ring lies over the descriptor table or available ring, or None."""
        return written_over(
            ("used", self._used), ("descriptor", self._desc), ("available", self._avail)
        )

    def empty_batch(self) -> Batch:
        """A batch with nothing in it (a pass that takes nothing)."""
        return Batch(self._space)

    def release(self) -> None:
        """Drop every view of guest memory (before the mapping is closed)."""
        self._release_chains()
        for name in ("_desc_q", "_desc_i", "_desc_h", "_avail_h", "_used_h", "_used_q"):
            getattr(self, name).release()
        self._desc_np = np.zeros(0, dtype=SPLIT_DESC_DTYPE)
        self._desc_w = np.zeros((0, 4), dtype=np.uint32)
        self._avail_np = np.zeros(0, dtype="<u2")
        self._used_np = np.zeros(0, dtype=USED_ELEM_DTYPE)
        self._used_w = np.zeros(0, dtype=np.uint64)

    # ------------------------------------------------------------------ pop
    def _avail_count(self) -> int:
        """Entries published and not popped; VirtqError (no head) if the ring is broken.

        Broken: the avail index moved more than the ring size, or the device has
        completed more chains than it took (only an aliased used ring does that).
        """
        ai: int = self._avail_h[1]
        n = (ai - self._next_avail) & 0xFFFF
        if n > self._size:
            raise VirtqError(
                self.index,
                f"avail idx {ai} moved {n} entries past next avail {self._next_avail}"
                f" (queue size {self._size})",
            )
        if (self._next_avail - self._next_used) & 0xFFFF > self._size:
            # more used than taken: the used ring feeds the avail index (aliased areas)
            raise VirtqError(
                self.index,
                f"used idx {self._next_used} ahead of next avail {self._next_avail}:"
                " the used ring aliases the driver's areas",
            )
        self._avail_shadow = ai
        return n

    def pop(self) -> DescriptorChain | None:
        """Next available chain, or None; VirtqError for a bad chain (consumed)."""
        if self._chains is not None:
            chain: DescriptorChain | None = self._chains.pop(self)
            return chain
        na = self._next_avail
        if na == self._avail_shadow and not self._avail_count():
            return None
        head: int = self._avail_h[2 + (na & self._mask)]
        self._next_avail = (na + 1) & 0xFFFF
        if head < self._size:
            w: int = self._desc_q[(head << 1) + 1]  # len | flags << 32 | next << 48
            if not w & _SIMPLE_MASK and w & 0xFFFFFFFF:  # one direct descriptor: fast path
                addr: int = self._desc_q[head << 1]
                ln = w & 0xFFFFFFFF
                rs, re_, rv = self._space.primary
                off = addr - rs
                if off >= 0 and addr + ln <= re_:
                    c = _new(DescriptorChain)
                    c.head = head
                    if w & _WRITE_BIT:
                        c.readable, c.writable = _EMPTY, (rv[off : off + ln],)
                        c.readable_len, c.writable_len = 0, ln
                    else:
                        c.readable, c.writable = (rv[off : off + ln],), _EMPTY
                        c.readable_len, c.writable_len = ln, 0
                    return c
        return self._walk(head)

    pop_descriptor_chain = pop

    def __iter__(self) -> Iterator[DescriptorChain]:
        """Yield available chains until the ring is empty (the fast way to drain a burst).

        A bad chain raises VirtqError out of the loop, already consumed: iterate again to
        continue with the following chains.
        """
        if self._chains is not None:
            chains: Iterator[DescriptorChain] = self._chains.iter(self)
            return chains
        return self._iter_pure()

    def _iter_pure(self) -> Iterator[DescriptorChain]:
        """``__iter__`` on the pure path: a generator over the avail ring."""
        avail_h, dq = self._avail_h, self._desc_q
        mask, size = self._mask, self._size
        rs, re_, rv = self._space.primary
        chain_cls = DescriptorChain
        new = _new
        empty = _EMPTY
        simple_mask, write_bit = _SIMPLE_MASK, _WRITE_BIT
        while True:
            na = self._next_avail
            n = (self._avail_shadow - na) & 0xFFFF or self._avail_count()
            if not n:
                return
            p = na & mask
            # the heads of this burst in one slice (up to the end of the ring)
            for head in avail_h[2 + p : 2 + min(p + n, size)].tolist():
                if self._next_avail != na:
                    break  # popped elsewhere between two yields: read the ring again
                na = (na + 1) & 0xFFFF
                self._next_avail = na
                if head < size:
                    w: int = dq[(head << 1) + 1]
                    if not w & simple_mask and w & 0xFFFFFFFF:
                        addr: int = dq[head << 1]
                        ln = w & 0xFFFFFFFF
                        off = addr - rs
                        if off >= 0 and addr + ln <= re_:
                            c = new(chain_cls)
                            c.head = head
                            if w & write_bit:
                                c.readable = empty
                                c.writable = (rv[off : off + ln],)
                                c.readable_len = 0
                                c.writable_len = ln
                            else:
                                c.readable = (rv[off : off + ln],)
                                c.writable = empty
                                c.readable_len = ln
                                c.writable_len = 0
                            yield c
                            continue
                yield self._walk(head)

    def _walk(self, head: int, wgpas: list[tuple[int, int]] | None = None) -> DescriptorChain:
        """Follow a chain (NEXT links, one indirect table) validating every descriptor.

        ``wgpas`` collects (gpa, len) of the writable descriptors (for dirty logging).
        """
        q = self.index
        size = self._size
        if head >= size:
            raise VirtqError(q, f"head {head} >= queue size {size}", head)
        space = self._space
        rs, re_, rv = space.primary
        dq = self._desc_q
        limit = size
        idx = head
        count = 0
        indirect = False
        seen_write = False
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        rlen = wlen = 0
        while True:
            count += 1
            if count > limit:
                where = "indirect table" if indirect else "queue size"
                raise VirtqError(q, f"chain longer than the {where} ({limit}): loop?", head)
            addr: int = dq[idx << 1]
            w: int = dq[(idx << 1) + 1]
            ln = w & 0xFFFFFFFF
            fl = (w >> 32) & 0xFFFF
            if fl & _INDIRECT:
                if indirect:
                    raise VirtqError(q, "nested indirect descriptor", head)
                if not self._indirect:
                    raise VirtqError(q, "INDIRECT without VIRTIO_F_RING_INDIRECT_DESC", head)
                if fl & _NEXT:
                    raise VirtqError(q, "descriptor has both INDIRECT and NEXT", head)
                if ln == 0 or ln % 16 or ln // 16 > size:
                    raise VirtqError(
                        q,
                        f"indirect table length {ln} not a multiple of 16 in 16..{16 * size}",
                        head,
                    )
                dq = space.view(q, head, addr, ln).cast("Q")
                indirect = True
                limit = ln // 16
                idx = count = 0
                continue
            if fl & _WRITE:
                seen_write = True
                if ln:
                    if rs <= addr and addr + ln <= re_:
                        off = addr - rs
                        writable.append(rv[off : off + ln])
                    else:
                        writable.extend(space.pieces(q, head, addr, ln))
                    wlen += ln
                    if wgpas is not None:
                        wgpas.append((addr, ln))
            else:
                if seen_write:
                    raise VirtqError(q, "device-readable descriptor after a writable one", head)
                if ln:
                    if rs <= addr and addr + ln <= re_:
                        off = addr - rs
                        readable.append(rv[off : off + ln])
                    else:
                        readable.extend(space.pieces(q, head, addr, ln))
                    rlen += ln
            if not fl & _NEXT:
                break
            idx = w >> 48
            if idx >= limit:
                raise VirtqError(q, f"next index {idx} >= table size {limit}", head)
        if rlen + wlen > _MAX_CHAIN_BYTES:
            raise VirtqError(q, f"chain length {rlen + wlen} >= 2^32 bytes", head)
        return DescriptorChain(head, readable, writable, rlen, wlen)

    def _writable_gpas(self, head: int) -> list[tuple[int, int]]:
        """Re-walk a completed chain to find what to log (empty if it is now invalid)."""
        wgpas: list[tuple[int, int]] = []
        try:
            self._walk(head, wgpas)
        except VirtqError:
            return []
        return wgpas

    # ----------------------------------------------------------------- used
    def add_used(self, head: int, length: int) -> None:
        """Publish one used element (element first, then the used index)."""
        chains = self._chains
        if chains is not None and chains.add_used(self, head, length):
            return
        if not 0 <= head < self._size:
            raise VirtqError(self.index, f"used id {head} >= queue size {self._size}", head)
        nu = self._next_used
        try:
            self._used_q[nu & self._mask] = head | length << 32  # id and len in one store
        except (ValueError, TypeError):
            raise ValueError(f"used length {length!r} is not a 32-bit unsigned int") from None
        self._next_used = self._used_h[1] = (nu + 1) & 0xFFFF
        if self._log is not None:
            self._log_used(((head, length),), nu & self._mask, 1)

    def add_used_batch(
        self, ids: Sequence[int] | np.ndarray, lens: Sequence[int] | np.ndarray | int
    ) -> None:
        """Publish many used elements with one used-index update."""
        if len(ids) > self._size:
            raise ValueError(f"{len(ids)} used elements exceed queue size {self._size}")
        trusted = ids is self._fresh_heads  # read-only, taken from the table: in range
        accel = self._accel
        if (
            accel is not None
            and self._log is None
            and isinstance(ids, np.ndarray)
            and len(ids)
            and (isinstance(lens, np.ndarray) or type(lens) is int)
            and accel.split_used(self._used, self._size, self._next_used, ids, lens, trusted)
        ):  # written, used index too (False: nothing written, the checks below decide)
            self._next_used = (self._next_used + len(ids)) & 0xFFFF
            return
        ida, lna = used_arrays(self.index, ids, lens, self._size, "queue size", trusted=trusted)
        k = len(ida)
        if k == 0:
            return
        nu = self._next_used
        p = nu & self._mask
        first = min(k, self._size - p)
        if isinstance(lna, int):  # one length for all: one store of (id | len << 32) words
            words = ida if not lna else ida.astype(np.uint64) | np.uint64(lna << 32)
            uw = self._used_w
            uw[p : p + first] = words[:first]
            if first < k:
                uw[: k - first] = words[first:]
        else:
            un = self._used_np
            un["id"][p : p + first] = ida[:first]
            un["len"][p : p + first] = lna[:first]
            if first < k:
                un["id"][: k - first] = ida[first:]
                un["len"][: k - first] = lna[first:]
        nu = (nu + k) & 0xFFFF
        self._next_used = nu
        self._used_h[1] = nu
        if self._log is not None:
            self._log_used(zip(ida.tolist(), length_list(lna, k), strict=True), p, k)

    def _log_used(self, elems: Iterable[tuple[int, int]], p: int, k: int) -> None:
        """Mark the written buffers and used-ring bytes in the dirty log."""
        log = self._log
        assert log is not None
        try:
            for head, length in elems:
                remaining = length
                for gpa, ln in self._writable_gpas(head) if remaining else ():
                    n = min(ln, remaining)
                    log.mark(gpa, n)
                    remaining -= n
                    if not remaining:
                        break
            base = self._log_used_gpa
            if base is not None:
                first = min(k, self._size - p)
                log.mark(base + 4 + 8 * p, 8 * first)
                if first < k:
                    log.mark(base + 4, 8 * (k - first))
                log.mark(base + 2, 2)
        except GuestMemoryError as exc:
            log_failure(self.index, exc)

    # ------------------------------------------------------------- batches
    def pop_batch(self, max_chains: int = 1 << 16) -> Batch:
        """Consume up to ``max_chains`` available entries at once (numpy).

        Fast path (the usual burst): every entry a single descriptor, all in one region;
        one gather, four reductions and a subtraction check the whole burst.
        """
        space = self._space
        na = self._next_avail
        n = min(self._avail_count(), max_chains)
        if n <= 0:
            return Batch(space)
        size = self._size
        accel = self._accel
        if accel is not None:
            return self._pop_batch_compiled(accel, space, na, n)
        p = na & self._mask
        an = self._avail_np
        if p + n <= size:
            heads16 = an[2 + p : 2 + p + n].copy()
        else:
            heads16 = np.concatenate((an[2 + p : 2 + size], an[2 : 2 + p + n - size]))
        self._next_avail = (na + n) & 0xFFFF
        try:  # a copy of the descriptors, so the checks hold for what is used
            w = self._desc_w.take(heads16, axis=0)
        except IndexError:  # a head >= size: the general path reports it
            w = None
        if w is not None:
            lens = w[:, 2]
            if not int(or_of(w[:, 3])) & (_NEXT | _INDIRECT) and (shortest := int(min_of(lens))):
                addrs = w.view(np.uint64)[:, 0]
                longest = int(max_of(lens))
                found = space.locate_together(addrs, longest)
                if found is not None:
                    flags = w[:, 3]  # flags | next << 16: only the WRITE bit is read
                    lens_range = (shortest, longest)
                    heads16.flags.writeable = False
                    self._fresh_heads = heads16
                    return Batch(
                        space,
                        heads16,
                        addrs,
                        lens,
                        None,
                        *found,
                        flags=flags,
                        lens_range=lens_range,
                    )
        return self._pop_batch_slow(space, heads16.astype(np.int64))

    def _pop_batch_compiled(self, accel: ModuleType, space: AddressSpace, na: int, n: int) -> Batch:
        """``pop_batch`` through the accelerator: the same checks in one C call."""
        heads16 = np.empty(n, dtype=np.uint16)
        w = np.empty((n, 4), dtype=np.uint32)
        offsets = np.empty(n, dtype=np.int64)
        found = accel.split_pop(
            self._avail, self._desc, space.bounds, na, self._size, n, heads16, w, offsets
        )
        self._next_avail = (na + n) & 0xFFFF
        if found is None:
            return self._pop_batch_slow(space, heads16.astype(np.int64))
        region, shortest, longest = found
        heads16.flags.writeable = False
        self._fresh_heads = heads16
        return Batch(
            space,
            heads16,
            w.view(np.uint64)[:, 0],
            w[:, 2],
            None,
            region,
            offsets,
            flags=w[:, 3],
            lens_range=(shortest, longest),
        )

    def _pop_batch_slow(self, space: AddressSpace, heads: np.ndarray) -> Batch:
        """The general case: per-entry checks, multi-descriptor chains walked, bad ones kept."""
        size = self._size
        valid = heads < size
        d = self._desc_np[np.where(valid, heads, 0)]
        flags = d["flags"]
        addrs = d["addr"]
        lens = d["len"].astype(np.uint64)
        simple = valid & ((flags & (_NEXT | _INDIRECT)) == 0) & (lens > 0)
        region, offsets = space.locate(addrs, lens)
        good = simple & (region >= 0)
        batch = Batch(
            space,
            heads[good].astype(np.uint16),
            addrs[good],
            lens[good].astype(np.uint32),
            (flags[good] & _WRITE) != 0,
            region[good],
            offsets[good],
        )
        if not good.all():
            for head in heads[~good].tolist():
                try:
                    batch.chains.append(self._walk(head))
                except VirtqError as exc:
                    batch.errors.append(exc)
        return batch

    # -------------------------------------------------------- notifications
    def needs_notification(self) -> bool:
        """Whether the driver wants a used-buffer notification now (event idx or flags).

        False when nothing was used since the previous call (no spurious notifications).
        """
        nu = self._next_used
        old = self._signalled_used
        self._signalled_used = nu
        if old != nu:
            memory_barrier()
            if self._event_idx:
                if old is None:
                    return True
                event: int = self._avail_h[self._used_event_i]
                if ((nu - event - 1) & 0xFFFF) < ((nu - old) & 0xFFFF):
                    return True
            elif not self._avail_h[0] & VRING_AVAIL_F_NO_INTERRUPT:
                return True
        return self.notify_on_empty and self._avail_h[1] == self._next_avail

    def enable_notification(self) -> bool:
        """Ask the driver for kicks again; True if more work arrived meanwhile (re-check)."""
        if self._event_idx:
            self._used_h[2 + 4 * self._size] = self._next_avail
            if self._log is not None and self._log_used_gpa is not None:
                self._log.mark(self._log_used_gpa + 4 + 8 * self._size, 2)
        else:
            self._set_used_flags(0)
        memory_barrier()
        return self._avail_h[1] != self._next_avail

    def disable_notification(self) -> None:
        """Tell the driver kicks are not needed (a hint; ignored under event idx)."""
        if not self._event_idx:
            self._set_used_flags(VRING_USED_F_NO_NOTIFY)

    def _set_used_flags(self, value: int) -> None:
        if self._used_h[0] != value:
            self._used_h[0] = value
            if self._log is not None and self._log_used_gpa is not None:
                self._log.mark(self._log_used_gpa, 2)

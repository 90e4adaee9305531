"""Device side of a packed virtqueue: one descriptor ring with wrap counters.

Same error policy as the split ring: a bad chain is consumed and raises
``VirtqError(queue, detail, head)`` where ``head`` is the chain's buffer id (complete
it with length 0), or ``None`` when there is no id that may be completed (a buffer id
already in flight). Used descriptors are published by writing their flags word last.
Ring words (flags, event suppression) are single aligned ``memoryview.cast("H")`` items.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

import numpy as np

from vhsm import speedups
from vhsm.errors import GuestMemoryError, VirtqError
from vhsm.virtq.batch import Batch
from vhsm.virtq.chain import DescriptorChain
from vhsm.virtq.common import (
    PACKED_DESC_DTYPE,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
    AddressSpace,
    DirtyLogLike,
    GuestMemoryLike,
    QueueState,
    all_of,
    any_of,
    chain_ring,
    check_area,
    check_queue_size,
    length_list,
    max_of,
    memory_barrier,
    min_of,
    or_of,
    sum_of,
    used_arrays,
    written_over,
)
from vhsm.virtq.common import log_failure as _log_failure
from vhsm.wire.enums import MAX_QUEUE_SIZE, PACKED_BASE_INITIAL

_NEXT = VIRTQ_DESC_F_NEXT
_WRITE = VIRTQ_DESC_F_WRITE
_INDIRECT = VIRTQ_DESC_F_INDIRECT
_AVAIL = VIRTQ_DESC_F_AVAIL
_USED = VIRTQ_DESC_F_USED
_MAX_CHAIN_BYTES = 0xFFFFFFFF
_EMPTY: tuple[()] = ()
_NEVER = -(1 << 62)  # _since_signal before the first needs_notification
_MASK = _AVAIL | _USED | _NEXT | _INDIRECT
_USED_WORD = (_AVAIL | _USED) << 48  # flags of a used descriptor (wrap 1), in its len/id word
_WRITE_WORD = _WRITE << 48
#: In ``_counts``: the buffer is one writable descriptor whose (gpa, len) are in
#: ``_waddr``/``_wlen`` (no dict entry per buffer). The low 16 bits count descriptors.
_WSINGLE = 1 << 16
_new = object.__new__  # a chain with its slots filled inline: no __init__ frame per chain
#: The state slots the compiled per-chain API reads and writes (the order _speedups.c names).
_CHAIN_SLOTS = (
    "_next_avail",
    "_avail_wrap",
    "_next_used",
    "_used_wrap",
    "_since_signal",
    "_indirect",
    "_log",
    "_wlog",
    "_fresh_heads",
)
_IDS = 65536
_STAMPS = np.arange(1, MAX_QUEUE_SIZE + 1, dtype=np.uint32)  # a burst's positions, from 1
_ONES = np.ones(MAX_QUEUE_SIZE, dtype=np.uint32)  # in-flight counts of a plain burst
_ONES.flags.writeable = False
#: In-flight entries of a fresh burst: one descriptor (low 16 bits), its position above
#: _WSINGLE, so a repeated id shows as a stamp overwritten by a later one.
_PLAIN_STAMPS = (_STAMPS << 17) | 1
_PLAIN_STAMPS.flags.writeable = False
_STAMPS.flags.writeable = False
_FLIP = np.uint64((_AVAIL | _USED) << 48)  # the wrap bits of a used descriptor's word
#: Used descriptor words (len 0) of every buffer id, without and with both wrap bits set.
_USED_WORDS = np.arange(_IDS, dtype=np.uint64) << np.uint64(32)
_USED_WORDS = np.stack((_USED_WORDS, _USED_WORDS | _FLIP))
_USED_WORDS.flags.writeable = False


def _u_view(arr: np.ndarray, fmt: Literal["I", "Q"]) -> memoryview[int]:
    """A flat memoryview over a numpy array (fast scalar item access from Python)."""
    return arr.data.cast("B").cast(fmt)


def packed_area_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of the descriptor ring, driver event area and device event area."""
    return 16 * size, 4, 4


class PackedQueue(QueueState):
    """Device-side packed ring over the descriptor ring and both event suppression areas."""

    __slots__ = (
        "_accel",
        "_avail_wrap",
        "_counts",
        "_counts_np",
        "_desc",
        "_desc_h",
        "_desc_i",
        "_desc_np",
        "_desc_q",
        "_desc_w",
        "_device_h",
        "_driver_h",
        "_fresh_heads",
        "_fresh_plain",
        "_log",
        "_log_desc_gpa",
        "_log_event_gpa",
        "_scratch",
        "_since_signal",
        "_space",
        "_used_wrap",
        "_waddr",
        "_waddr_np",
        "_wlen",
        "_wlen_np",
        "_wlog",
        "index",
    )

    def __init__(
        self,
        memory: GuestMemoryLike,
        size: int,
        desc: memoryview,
        driver_area: memoryview,
        device_area: memoryview,
        *,
        index: int = 0,
        event_idx: bool = False,
        indirect: bool = False,
        base: int = PACKED_BASE_INITIAL,
        log: DirtyLogLike | None = None,
        log_desc_gpa: int | None = None,
        log_event_gpa: int | None = None,
    ) -> None:
        """Wrap the areas (``driver_area`` is SET_VRING_ADDR's avail, ``device_area`` its used)."""
        check_queue_size(size, packed=True)
        check_area("descriptor", desc, 16 * size, 16)
        check_area("driver event", driver_area, 4, 4)
        check_area("device event", device_area, 4, 4)
        self.index = index
        self._size = size
        self._space = AddressSpace(memory)
        self._desc = desc[: 16 * size]
        self._desc_q = self._desc.cast("Q")
        self._desc_i = self._desc.cast("I")
        self._desc_h = self._desc.cast("H")
        self._desc_np = np.frombuffer(self._desc, dtype=PACKED_DESC_DTYPE)
        self._desc_w = np.frombuffer(self._desc, dtype=np.uint64)  # addr, len|id|flags words
        self._driver_h = driver_area[:4].cast("H")
        self._device_h = device_area[:4].cast("H")
        self._event_idx = event_idx
        self._indirect = indirect
        # per buffer id: descriptors in flight (| _WSINGLE); zero pages are mapped lazily
        self._counts_np = np.zeros(_IDS, dtype=np.uint32)
        self._counts = _u_view(self._counts_np, "I")
        self._waddr_np = np.zeros(_IDS, dtype=np.uint64)
        self._waddr = _u_view(self._waddr_np, "Q")
        self._wlen_np = np.zeros(_IDS, dtype=np.uint32)
        self._wlen = _u_view(self._wlen_np, "I")
        self._scratch = np.zeros(_IDS, dtype=np.uint32)  # duplicate-id detection
        self._fresh_heads: np.ndarray | None = None  # the last burst's ids, known distinct
        self._fresh_plain = False  # ... and each one descriptor, read-only: in-flight count 1
        self._wlog: dict[int, tuple[int, int] | list[tuple[int, int]]] = {}
        self._log = log
        self._log_desc_gpa = log_desc_gpa
        self._log_event_gpa = log_event_gpa
        self._since_signal = _NEVER
        self._next_avail = 0
        self._avail_wrap = 1
        self._next_used = 0
        self._used_wrap = 1
        self._accel = speedups.accel  # the compiled data path, or None for pure Python
        self.set_base(base)
        # pop, iteration and add_used in C (None: the pure methods below)
        self._chains = chain_ring(
            self._accel,
            self,
            _CHAIN_SLOTS,
            size,
            self._desc,
            (self._counts_np, self._waddr_np, self._wlen_np),
            self._space,
        )

    # ----------------------------------------------------------------- state
    @property
    def avail_wrap(self) -> int:
        """Driver ring wrap counter the device expects."""
        return self._avail_wrap

    @property
    def used_wrap(self) -> int:
        """Device ring wrap counter."""
        return self._used_wrap

    def set_event_idx(self, enabled: bool) -> None:
        """Turn descriptor event suppression on or off."""
        self._event_idx = enabled

    def get_base(self) -> int:
        """GET_VRING_BASE ``num``: avail idx | wrap << 15 | used idx << 16 | wrap << 31."""
        return (
            self._next_avail
            | self._avail_wrap << 15
            | self._next_used << 16
            | self._used_wrap << 31
        )

    def set_base(self, num: int) -> None:
        """Apply SET_VRING_BASE ``num``; upper 16 bits zero ([DPDK] form) means used = avail."""
        if not 0 <= num <= 0xFFFFFFFF:
            raise ValueError(f"packed ring base {num:#x} does not fit in 32 bits")
        lo = num & 0xFFFF
        hi = num >> 16 or lo
        for name, half in (("avail", lo), ("used", hi)):
            if half & 0x7FFF >= self._size:
                raise ValueError(f"packed {name} index {half & 0x7FFF} >= queue size {self._size}")
        self._next_avail = lo & 0x7FFF
        self._avail_wrap = lo >> 15
        self._next_used = hi & 0x7FFF
        self._used_wrap = hi >> 15
        self._since_signal = _NEVER

    def set_log(
        self,
        log: DirtyLogLike | None,
        log_desc_gpa: int | None = None,
        log_event_gpa: int | None = None,
    ) -> None:
        """Attach the dirty log; ring GPAs are given when the ring LOG flag is set."""
        self._log = log
        self._log_desc_gpa = log_desc_gpa
        self._log_event_gpa = log_event_gpa

    def has_available(self) -> bool:
        """Whether the descriptor at the next avail position is available."""
        fl: int = self._desc_h[(self._next_avail << 3) + 7]
        w = self._avail_wrap
        return (fl >> 7) & 1 == w and (fl >> 15) & 1 != w

    def device_area_overlap(self) -> str | None:
        """Why the device event area lies over the descriptor ring or driver area, or None."""
        return written_over(
            ("device event", self._device_h),
            ("descriptor", self._desc),
            ("driver event", self._driver_h),
        )

    def empty_batch(self) -> Batch:
        """A batch with nothing in it (a pass that takes nothing)."""
        return Batch(self._space)

    def release(self) -> None:
        """Drop every view of guest memory."""
        self._release_chains()
        for name in ("_desc_q", "_desc_i", "_desc_h", "_driver_h", "_device_h"):
            getattr(self, name).release()
        self._desc_np = np.zeros(0, dtype=PACKED_DESC_DTYPE)
        self._desc_w = np.zeros(0, dtype=np.uint64)
        # _counts, _waddr and _wlen are the queue's own memory: kept for take_in_flight

    # ------------------------------------------------------------------ pop
    def pop(self) -> DescriptorChain | None:
        """Next available chain, or None; VirtqError for a bad chain (consumed)."""
        if self._chains is not None:
            chain: DescriptorChain | None = self._chains.pop(self)
            return chain
        p = self._next_avail
        fl: int = self._desc_h[(p << 3) + 7]
        w = self._avail_wrap
        if (fl >> 7) & 1 != w or (fl >> 15) & 1 == w:
            return None
        if fl & 5:
            return self._walk()
        x: int = self._desc_q[(p << 1) + 1]  # len | id << 32 (read after the flags)
        addr: int = self._desc_q[p << 1]
        p += 1
        if p == self._size:
            p = 0
            self._avail_wrap = w ^ 1
        self._next_avail = p
        return self._single(fl, addr, x & 0xFFFFFFFF, (x >> 32) & 0xFFFF)

    pop_descriptor_chain = pop

    def _single(self, fl: int, addr: int, ln: int, bid: int) -> DescriptorChain:
        """A consumed one-descriptor buffer: record it in flight and map it."""
        counts = self._counts
        if counts[bid]:
            raise VirtqError(self.index, f"buffer id {bid} already in flight", None)
        rs, re_, rv = self._space.primary
        off = addr - rs
        if off >= 0 and addr + ln <= re_ and ln:
            c = _new(DescriptorChain)
            c.head = bid
            if fl & _WRITE:
                counts[bid] = 1 | _WSINGLE
                self._waddr[bid] = addr
                self._wlen[bid] = ln
                c.readable, c.writable = _EMPTY, (rv[off : off + ln],)
                c.readable_len, c.writable_len = 0, ln
            else:
                counts[bid] = 1
                c.readable, c.writable = (rv[off : off + ln],), _EMPTY
                c.readable_len, c.writable_len = ln, 0
            return c
        counts[bid] = 1
        return self._buffers(bid, [(fl, addr, ln)])

    def __iter__(self) -> Iterator[DescriptorChain]:
        """Yield available chains until none is available (a bad chain raises, consumed)."""
        if self._chains is not None:
            chains: Iterator[DescriptorChain] = self._chains.iter(self)
            return chains
        return self._iter_pure()

    def _iter_pure(self) -> Iterator[DescriptorChain]:
        """``__iter__`` on the pure path: a generator over the descriptor ring."""
        dh, dq = self._desc_h, self._desc_q
        size = self._size
        counts, waddr, wlen = self._counts, self._waddr, self._wlen
        rs, re_, rv = self._space.primary
        chain_cls = DescriptorChain
        new = _new
        empty = _EMPTY
        write, wsingle = _WRITE, _WSINGLE | 1
        p = self._next_avail
        w = self._avail_wrap
        while True:
            if p != self._next_avail or w != self._avail_wrap:  # popped elsewhere meanwhile
                p, w = self._next_avail, self._avail_wrap
            fl: int = dh[(p << 3) + 7]
            if (fl >> 7) & 1 != w or (fl >> 15) & 1 == w:
                return
            if fl & 5:
                yield self._walk()
                p, w = self._next_avail, self._avail_wrap
                continue
            x: int = dq[(p << 1) + 1]
            addr: int = dq[p << 1]
            p += 1
            if p == size:
                p = 0
                w ^= 1
                self._avail_wrap = w
            self._next_avail = p
            ln = x & 0xFFFFFFFF
            bid = (x >> 32) & 0xFFFF
            off = addr - rs
            if counts[bid] or not ln or off < 0 or addr + ln > re_:
                yield self._single(fl, addr, ln, bid)
                continue
            c = new(chain_cls)
            c.head = bid
            if fl & write:
                counts[bid] = wsingle
                waddr[bid] = addr
                wlen[bid] = ln
                c.readable = empty
                c.writable = (rv[off : off + ln],)
                c.readable_len = 0
                c.writable_len = ln
            else:
                counts[bid] = 1
                c.readable = (rv[off : off + ln],)
                c.writable = empty
                c.readable_len = ln
                c.writable_len = 0
            yield c

    def _walk(self) -> DescriptorChain:
        """Consume the chain at next avail (flags scanned first, then buffers translated)."""
        q = self.index
        size = self._size
        dh, dq, di = self._desc_h, self._desc_q, self._desc_i
        p = self._next_avail
        w = self._avail_wrap
        descs: list[tuple[int, int, int]] = []
        error: str | None = None
        while True:
            fl: int = dh[(p << 3) + 7]
            if (fl >> 7) & 1 != w or (fl >> 15) & 1 == w:
                error = "chain continues into a descriptor that is not available"
                break
            descs.append((fl, dq[p << 1], di[(p << 2) + 2]))
            bid: int = dh[(p << 3) + 6]
            p += 1
            if p == size:
                p = 0
                w ^= 1
            if not fl & _NEXT:
                break
            if len(descs) >= size:
                error = f"chain longer than the queue size ({size})"
                break
        if not descs:  # pragma: no cover - the caller checked the first descriptor
            raise VirtqError(q, "no available descriptor")
        self._next_avail = p
        self._avail_wrap = w
        if self._counts[bid]:
            raise VirtqError(q, f"buffer id {bid} already in flight", None)
        self._counts[bid] = len(descs)
        if error is not None:
            raise VirtqError(q, error, bid)
        return self._buffers(bid, descs)

    def _buffers(self, bid: int, descs: list[tuple[int, int, int]]) -> DescriptorChain:
        """Validate and translate the descriptors of buffer ``bid`` (already consumed)."""
        q = self.index
        space = self._space
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        wgpas: list[tuple[int, int]] = []
        rlen = wlen = 0
        seen_write = False
        if len(descs) == 1 and descs[0][0] & _INDIRECT:
            fl, addr, ln = descs[0]
            if not self._indirect:
                raise VirtqError(q, "INDIRECT without VIRTIO_F_RING_INDIRECT_DESC", bid)
            if fl & _NEXT:
                raise VirtqError(q, "descriptor has both INDIRECT and NEXT", bid)
            if ln == 0 or ln % 16 or ln // 16 > self._size:
                raise VirtqError(
                    q,
                    f"indirect table length {ln} not a multiple of 16 in 16..{16 * self._size}",
                    bid,
                )
            table = space.view(q, bid, addr, ln)
            tq, ti, th = table.cast("Q"), table.cast("I"), table.cast("H")
            descs = []
            for i in range(ln // 16):
                tfl: int = th[(i << 3) + 7]
                if tfl & _INDIRECT:
                    raise VirtqError(q, "nested indirect descriptor", bid)
                descs.append((tfl & ~_NEXT, tq[i << 1], ti[(i << 2) + 2]))
        rs, re_, rv = space.primary
        for fl, addr, ln in descs:
            if fl & _INDIRECT:
                what = "has both INDIRECT and NEXT" if fl & _NEXT else "is INDIRECT in a chain"
                raise VirtqError(q, f"descriptor {what}", bid)
            if fl & _WRITE:
                seen_write = True
                if ln:
                    if rs <= addr and addr + ln <= re_:
                        off = addr - rs
                        writable.append(rv[off : off + ln])
                    else:
                        writable.extend(space.pieces(q, bid, addr, ln))
                    wlen += ln
                    wgpas.append((addr, ln))
            else:
                if seen_write:
                    raise VirtqError(q, "device-readable descriptor after a writable one", bid)
                if ln:
                    if rs <= addr and addr + ln <= re_:
                        off = addr - rs
                        readable.append(rv[off : off + ln])
                    else:
                        readable.extend(space.pieces(q, bid, addr, ln))
                    rlen += ln
        if rlen + wlen > _MAX_CHAIN_BYTES:
            raise VirtqError(q, f"chain length {rlen + wlen} >= 2^32 bytes", bid)
        if wgpas:
            self._wlog[bid] = wgpas
        return DescriptorChain(bid, readable, writable, rlen, wlen)

    # ----------------------------------------------------------------- used
    def add_used(self, bid: int, length: int) -> None:
        """Write one used descriptor (len, id and flags in one store) and skip its chain."""
        chains = self._chains
        if chains is not None and chains.add_used(self, bid, length):
            return
        counts = self._counts
        c = counts[bid] if 0 <= bid <= 0xFFFF else 0
        if not c or length >> 32:
            if length >> 32:
                raise ValueError(f"used length {length} does not fit in 32 bits")
            raise VirtqError(self.index, f"buffer id {bid} is not in flight", bid)
        counts[bid] = 0
        self._fresh_heads = None  # the last burst is no longer whole
        p = self._next_used
        # len, id and flags in one aligned 8-byte store: the flags word publishes the rest.
        self._desc_q[(p << 1) + 1] = (
            length
            | bid << 32
            | (_USED_WORD if self._used_wrap else 0)
            | (_WRITE_WORD if length else 0)
        )
        if self._wlog or self._log is not None:
            self._complete_log(bid, c, length, p, 1)
        p += c & 0xFFFF
        if p >= self._size:
            p -= self._size
            self._used_wrap ^= 1
        self._next_used = p
        self._since_signal += c & 0xFFFF

    def _complete_log(self, bid: int, c: int, length: int, p: int, k: int) -> None:
        """Forget what buffer ``bid`` (``_counts`` entry ``c``) had writable; log it if on."""
        wg = self._wlog.pop(bid, None) if self._wlog else None
        if self._log is not None:
            if c & _WSINGLE:
                wg = (self._waddr[bid], self._wlen[bid])
            self._log_used(wg, length, p, k)

    def add_used_batch(
        self, ids: Sequence[int] | np.ndarray, lens: Sequence[int] | np.ndarray | int
    ) -> None:
        """Write many used descriptors; the first one's flags word is written last.

        Everything is checked before anything is written. A run of one-descriptor
        buffers lands on consecutive ring slots and is written with one numpy store
        of 8-byte (len, id, flags) words; the driver, which reads used descriptors
        in ring order, sees the whole burst when the first flags word flips.
        """
        accel = self._accel
        if (
            accel is not None
            and self._log is None
            and not self._wlog
            and isinstance(ids, np.ndarray)
            and len(ids)
            and (isinstance(lens, np.ndarray) or type(lens) is int)
        ):
            fresh = ids is self._fresh_heads
            mode = (2 if self._fresh_plain else 1) if fresh else 0
            nu = self._next_used
            args = (self._desc, self._size, nu, self._used_wrap, ids, lens)
            total: int = accel.packed_used(*args, self._counts_np, self._scratch, mode)
            if total >= 0:  # written (-1: nothing written, the checks below decide)
                self._fresh_heads = None
                end = nu + total
                if end >= self._size:
                    end -= self._size
                    self._used_wrap ^= 1
                self._next_used = end
                self._since_signal += total
                return
        ida, lna = used_arrays(self.index, ids, lens, _IDS, "buffer id bound")
        k = len(ida)
        if k == 0:
            return
        size = self._size
        nu, uw = self._next_used, self._used_wrap
        fresh, self._fresh_heads = ida is self._fresh_heads, None
        if fresh and self._fresh_plain:  # untouched since popped: distinct, each count 1
            craw = counts = _ONES[:k]
            single, total = True, k
        else:
            craw = self._counts_np[ida]
            counts = craw & 0xFFFF
            if int(min_of(counts)) == 0:
                bad = int(ida[counts == 0][0])
                raise VirtqError(self.index, f"used buffer id {bad} not in flight", bad)
            if not fresh:  # the ids of the last burst popped are distinct
                stamp = _STAMPS[:k]
                scratch = self._scratch
                scratch[ida] = stamp  # a repeated id keeps only its last stamp
                if not all_of(scratch[ida] == stamp):
                    raise VirtqError(self.index, "used buffer id repeated in one batch", None)
            single = int(max_of(counts)) == 1
            total = k if single else int(sum_of(counts, dtype=np.int64))
        if total > size:  # pragma: no cover - in-flight counts never exceed the ring
            raise VirtqError(self.index, f"{total} used descriptors exceed queue size {size}")
        words = _USED_WORDS[uw][ida]  # id << 32 with this wrap's AVAIL/USED flags
        if isinstance(lna, int):  # one length for all
            if lna:
                words |= np.uint64(lna | _WRITE << 48)
        elif int(max_of(lna)) > 0:  # else nothing written: length 0, no WRITE flag
            words |= lna.astype(np.uint64, copy=False)
            words[lna > 0] |= np.uint64(_WRITE << 48)
        if single:  # one slot each, from next_used on: one or two strided stores
            first = min(k, size - nu)
            pos = None
            if first < k:
                words[first:] ^= _FLIP
        else:
            pos = np.cumsum(counts, dtype=np.int64) - counts + nu
            wrapped = pos >= size
            pos[wrapped] -= size
            words[wrapped] ^= _FLIP
        self._counts_np[ida] = 0
        dq = self._desc_q
        qn = self._desc_w
        if pos is None:
            qn[2 * nu + 3 : 2 * (nu + first) : 2] = words[1:first]
            if first < k:
                qn[1 : 2 * (k - first) : 2] = words[first:]
        else:
            qn[2 * pos[1:] + 1] = words[1:]
        dq[2 * nu + 1] = int(words[0])  # the first flags word last: publishes the burst
        end = nu + total
        if end >= size:
            end -= size
            self._used_wrap = uw ^ 1
        self._next_used = end
        self._since_signal += total
        if self._wlog or self._log is not None:
            if pos is None:
                pos = np.arange(nu, nu + k, dtype=np.int64) % size
            cl = craw.tolist()
            lengths = length_list(lna, k)
            for i, (bid, ln) in enumerate(zip(ida.tolist(), lengths, strict=True)):
                self._complete_log(bid, cl[i], ln, int(pos[i]), 1)

    def _log_used(
        self, wg: tuple[int, int] | list[tuple[int, int]] | None, length: int, p: int, k: int
    ) -> None:
        """Mark written buffers and the used descriptors in the dirty log."""
        log = self._log
        assert log is not None
        remaining = length
        pieces: Iterable[tuple[int, int]] = (
            () if wg is None else [wg] if isinstance(wg, tuple) else wg
        )
        try:
            for gpa, ln in pieces:
                if not remaining:
                    break
                n = min(ln, remaining)
                log.mark(gpa, n)
                remaining -= n
            if self._log_desc_gpa is not None:
                log.mark(self._log_desc_gpa + 16 * p, 16 * k)
        except GuestMemoryError as exc:
            _log_failure(self.index, exc)

    # ------------------------------------------------------------- batches
    def pop_batch(self, max_chains: int = 1 << 16) -> Batch:
        """Consume up to ``max_chains`` available buffers at once (numpy over the ring).

        Fast path (the usual burst): the run of available one-descriptor buffers is
        found from the flags words against the wrap counter, then checked (ids not in
        flight nor repeated, lengths non-zero, every buffer inside the first one's
        region) in a handful of numpy operations; anything else takes the general path.
        """
        space = self._space
        runs: list[np.ndarray] = []  # copies of the runs of single descriptors, as raw words
        other: Batch | None = None  # longer chains and errors, when there are any
        taken = 0
        flags_all = self._desc_np["flags"]
        words = self._desc_w
        dh = self._desc_h
        size = self._size
        while taken < max_chains:
            p = self._next_avail
            w = self._avail_wrap
            fl0: int = dh[(p << 3) + 7]
            if (fl0 >> 7) & 1 != w or (fl0 >> 15) & 1 == w:
                break
            if fl0 & (_NEXT | _INDIRECT):  # a longer chain: the scalar walker
                if other is None:
                    other = Batch(space)
                try:
                    other.chains.append(self._walk())
                except VirtqError as exc:
                    other.errors.append(exc)
                taken += 1
                continue
            if self._accel is not None:
                limit = min(size, max_chains - taken)
                out = np.empty(2 * limit, dtype=np.uint64)
                k, p, w = self._accel.packed_run(self._desc, size, p, w, limit, out)
                if not k:  # pragma: no cover - the driver took the descriptor back meanwhile
                    break
                runs.append(out[: 2 * k])
                self._next_avail, self._avail_wrap = p, w
                taken += k
                continue
            n = min(size - p, max_chains - taken)
            # available single descriptors: AVAIL == w, USED != w, no NEXT/INDIRECT
            ok = (flags_all[p : p + n] & _MASK) == (_AVAIL if w else _USED)
            run = n if all_of(ok) else int(np.argmin(ok))
            runs.append(words[2 * p : 2 * (p + run)].copy())  # read after the flags
            p += run
            if p == size:
                p = 0
                self._avail_wrap = w ^ 1
            self._next_avail = p
            taken += run
        if not runs:
            return other if other is not None else Batch(space)
        raw = runs[0] if len(runs) == 1 else np.concatenate(runs)
        simple = self._simple(space, raw.view(PACKED_DESC_DTYPE))
        return simple if other is None else Batch.concat(space, [simple, other])

    def _simple(self, space: AddressSpace, seg: np.ndarray) -> Batch:
        """Record a run of single-descriptor buffers as in flight and locate their bytes."""
        ids, addrs, lens, flags = seg["id"], seg["addr"], seg["len"], seg["flags"]
        counts = self._counts_np
        if self._accel is not None:
            offsets = np.empty(len(seg), dtype=np.int64)
            found = self._accel.packed_take(
                seg, counts, self._waddr_np, self._wlen_np, space.bounds, offsets
            )
            if found is not None:
                region, shortest, longest, plain = found
                self._fresh_plain = plain
                ids.flags.writeable = False  # add_used_batch trusts this array as distinct
                self._fresh_heads = ids
                return Batch(
                    space,
                    ids,
                    addrs,
                    lens,
                    None,
                    region,
                    offsets,
                    flags=flags,
                    lens_range=(shortest, longest),
                )
            return self._simple_slow(
                space, ids.astype(np.int64), addrs, lens.astype(np.int64), (flags & _WRITE) != 0
            )
        shortest = int(min_of(lens))
        if shortest > 0 and int(max_of(counts[ids])) == 0:  # none in flight
            stamps = _PLAIN_STAMPS[: len(ids)]
            counts[ids] = stamps  # in flight now; a repeated id keeps only its last stamp
            if all_of(counts[ids] == stamps):
                longest = int(max_of(lens))
                found = space.locate_together(addrs, longest)
                if found is not None:
                    plain = not int(or_of(flags)) & _WRITE
                    if not plain:
                        self._mark_in_flight(ids, addrs, lens, (flags & _WRITE) != 0)
                    self._fresh_plain = plain
                    ids.flags.writeable = False  # add_used_batch trusts this array as distinct
                    self._fresh_heads = ids
                    lens_range = (shortest, longest)
                    return Batch(
                        space, ids, addrs, lens, None, *found, flags=flags, lens_range=lens_range
                    )
            counts[ids] = 0  # not taken here: the general path marks what it takes
        ids64 = ids.astype(np.int64)
        return self._simple_slow(space, ids64, addrs, lens.astype(np.int64), (flags & _WRITE) != 0)

    def _mark_in_flight(
        self, ids: np.ndarray, addrs: np.ndarray, lens: np.ndarray, wr: np.ndarray
    ) -> None:
        """Count one descriptor per buffer; writable ones keep (gpa, len) for the dirty log."""
        if any_of(wr):
            self._counts_np[ids] = np.where(wr, 1 | _WSINGLE, 1)
            wid = ids[wr]
            self._waddr_np[wid] = addrs[wr]
            self._wlen_np[wid] = lens[wr]
        else:
            self._counts_np[ids] = 1

    def _simple_slow(
        self,
        space: AddressSpace,
        ids: np.ndarray,
        addrs: np.ndarray,
        lens: np.ndarray,
        wr: np.ndarray,
    ) -> Batch:
        """Per-buffer checks: repeated or in-flight ids, empty or unmapped buffers."""
        q = self.index
        # of several fresh entries with one id, the first is taken, the others are errors
        _, first = np.unique(ids, return_index=True)
        fresh = np.zeros(len(ids), dtype=bool)
        fresh[first] = self._counts_np[ids[first]] == 0
        region, offsets = space.locate(addrs.astype(np.uint64), lens.astype(np.uint64))
        good = fresh & (region >= 0) & (lens > 0)
        self._mark_in_flight(ids[good], addrs[good], lens[good], wr[good])
        batch = Batch(
            space,
            ids[good].astype(np.uint16),
            addrs[good],
            lens[good].astype(np.uint32),
            wr[good],
            region[good],
            offsets[good],
        )
        flags = np.where(wr, _WRITE, 0)
        for i in np.flatnonzero(~good).tolist():
            bid = int(ids[i])
            if not fresh[i]:
                batch.errors.append(VirtqError(q, f"buffer id {bid} already in flight", None))
                continue
            self._counts[bid] = 1
            try:
                batch.chains.append(
                    self._buffers(bid, [(int(flags[i]), int(addrs[i]), int(lens[i]))])
                )
            except VirtqError as exc:
                batch.errors.append(exc)
        return batch

    # -------------------------------------------------------- notifications
    def needs_notification(self) -> bool:
        """Whether the driver wants a used-buffer notification now (driver event area)."""
        memory_barrier()
        flags = self._driver_h[1] & 3
        advanced = self._since_signal
        self._since_signal = 0
        if flags == RING_EVENT_FLAGS_DISABLE or not advanced:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self._event_idx or advanced < 0:
            return True
        off_wrap: int = self._driver_h[0]
        event = off_wrap & 0x7FFF
        new = self._next_used
        if off_wrap >> 15 != self._used_wrap:
            event -= self._size
        old = new - advanced
        return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)

    def enable_notification(self) -> bool:
        """Ask the driver for kicks; True if a buffer is available already (race-free re-check)."""
        dev = self._device_h
        if self._event_idx:
            dev[0] = self._next_avail | self._avail_wrap << 15
            dev[1] = RING_EVENT_FLAGS_DESC
        else:
            dev[1] = RING_EVENT_FLAGS_ENABLE
        self._log_event()
        memory_barrier()
        return self.has_available()

    def disable_notification(self) -> None:
        """Tell the driver no kicks are needed."""
        if self._device_h[1] != RING_EVENT_FLAGS_DISABLE:
            self._device_h[1] = RING_EVENT_FLAGS_DISABLE
            self._log_event()

    def _log_event(self) -> None:
        if self._log is not None and self._log_event_gpa is not None:
            self._log.mark(self._log_event_gpa, 4)

    # -------------------------------------------------------- inflight tracking
    def take_in_flight(self, old: PackedQueue) -> None:
        """Take over the buffers ``old`` has in flight (a rebuild over a new memory table)."""
        self._counts_np[:] = old._counts_np
        self._waddr_np[:] = old._waddr_np
        self._wlen_np[:] = old._wlen_np
        self._wlog.update(old._wlog)

    def descriptors(self, pos: int, count: int) -> list[tuple[int, int, int, int]]:
        """The ring descriptors ``(addr, len, id, flags)`` at ``count`` positions from ``pos``.

        Right after a pop its chain is still intact in the ring: used descriptors are
        written only behind the buffers in flight.
        """
        dq = self._desc_q
        size = self._size
        out: list[tuple[int, int, int, int]] = []
        for k in range(count):
            p = (pos + k) % size
            x: int = dq[(p << 1) + 1]
            out.append((dq[p << 1], x & 0xFFFFFFFF, (x >> 32) & 0xFFFF, x >> 48))
        return out

    def resume(self, next_used: int, used_wrap: int, in_flight: Sequence[tuple[int, int]]) -> None:
        """Resume after a restart from an inflight buffer's used position and wrap counter.

        ``in_flight`` lists ``(buffer id, descriptor count)`` of the chains the device had
        consumed but not completed: they become in flight again and the next avail
        position is just past them (used position + their descriptors).
        """
        size = self._size
        total = sum(n for _, n in in_flight)
        ids = {bid for bid, _ in in_flight}
        if not 0 <= next_used < size or total > size or len(ids) != len(in_flight):
            raise VirtqError(
                self.index,
                f"inflight buffer: used position {next_used}, {len(in_flight)} chains "
                f"({len(ids)} ids) of {total} descriptors do not fit a ring of {size}",
            )
        self._counts_np[:] = 0
        self._fresh_heads = None
        self._wlog.clear()
        for bid, n in in_flight:
            self._counts[bid] = n
        self._next_used = next_used
        self._used_wrap = used_wrap & 1
        end = next_used + total
        self._next_avail = end % size
        self._avail_wrap = self._used_wrap ^ (1 if end >= size else 0)
        self._since_signal = _NEVER

    def rebuild(self, descs: Sequence[tuple[int, int, int, int]]) -> DescriptorChain:
        """A resubmitted chain from recorded ``(addr, len, id, flags)`` descriptors.

        Validated and translated like a popped chain (VirtqError names its buffer id,
        to be completed with length 0); the id must be in flight (see :meth:`resume`).
        """
        q = self.index
        bid = descs[-1][2] if descs else 0
        if not descs or not self._counts[bid]:
            raise VirtqError(q, f"resubmitted buffer id {bid} is not in flight", None)
        if any(not fl & _NEXT for _, _, _, fl in descs[:-1]) or descs[-1][3] & _NEXT:
            raise VirtqError(q, "recorded chain has inconsistent NEXT flags", bid)
        return self._buffers(bid, [(fl, addr, ln) for addr, ln, _, fl in descs])

"""`VringState`: one virtqueue plus its fds and flags (not thread-safe; see `vhsm.vring`).

The control thread configures a ring (size, addresses, base, fds, features, log);
worker threads pop chains, add used elements and signal. ``enabled`` and ``started``
are plain bools set by the control thread and read lock-free by workers.

Ring addresses given to :meth:`VringState.set_queue_info` are guest-physical (the
data plane converts SET_VRING_ADDR's user addresses); they are translated
through the current memory snapshot into memoryviews, again on every call (the data
plane calls it after each memory-table change).

Bad chains: ``pop`` raises VirtqError after consuming the chain; call
:meth:`VringState.complete_error` to complete it with length 0 and signal the err fd.

A broken ring (an error no single chain can answer: the avail index more than
the ring size ahead, the used ring aliasing the driver's areas, a buffer id
reused while in flight) is marked broken once (:meth:`VringState.mark_broken`:
err fd signalled, one log line, ``broken`` set, which the data plane reports as
DEVICE_NEEDS_RESET) and gives no more chains until the front-end reconfigures it
(SET_VRING_NUM / ADDR / BASE / KICK, GET_VRING_BASE, reset).

Bounded passes: a worker calls :meth:`VringState.begin_pass` before each
dispatch; ``pop`` and ``pop_batch`` then hand out at most the ring size in
chains. Past that the ring reports nothing available and sets ``yielded``, so
the device's loop ends and the worker dispatches the ring again after releasing
its lock. A ring used without a worker is not bounded.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from vhsm import virtq
from vhsm.errors import GuestMemoryError, VhsmError, VirtqError
from vhsm.memory import GuestMemory, GuestMemoryAtomic
from vhsm.wire.enums import MAX_QUEUE_SIZE, PACKED_BASE_INITIAL, VirtioFeature

if TYPE_CHECKING:
    import numpy as np

    from vhsm.inflight import InflightChain
    from vhsm.virtq.batch import Batch
    from vhsm.virtq.chain import DescriptorChain
    from vhsm.virtq.common import DirtyLogLike
    from vhsm.virtq.packed import PackedQueue
    from vhsm.virtq.sink_pass import SinkPass
    from vhsm.virtq.split import SplitQueue

    Queue = SplitQueue | PackedQueue

log = logging.getLogger(__name__)

_NOTIFY_ON_EMPTY = int(VirtioFeature.NOTIFY_ON_EMPTY)
_LOG_ALL = int(VirtioFeature.LOG_ALL)
_INDIRECT_DESC = int(VirtioFeature.RING_INDIRECT_DESC)
_EVENT_IDX = int(VirtioFeature.RING_EVENT_IDX)
_RING_PACKED = int(VirtioFeature.RING_PACKED)

#: The pass budget of a ring no worker drives (tests, standalone use): unbounded.
_UNBOUNDED = 1 << 62


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError as exc:
            log.debug("closing fd %d: %s", fd, str(exc))


def _replace_fd(old: int | None, new: int | None) -> int | None:
    """Return ``new``, the ring's fd from now on; ``old`` is closed unless it is the same fd."""
    if new != old:
        _close(old)
    return new


def _eventfd_signal(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):  # counter saturated: a wake-up is pending
        os.eventfd_write(fd, 1)


class VringState:
    """One ring's state, not thread-safe (wrap it in VringMutex or VringRwLock to share)."""

    def __init__(
        self,
        memory: GuestMemoryAtomic | GuestMemory,
        max_queue_size: int = MAX_QUEUE_SIZE,
        *,
        index: int = 0,
    ) -> None:
        """Ring ``index`` over ``memory`` (a holder: its current snapshot is used)."""
        self.memory = memory
        self.max_queue_size = max_queue_size
        self.index = index
        self.enabled = False
        self.started = False
        self.queue: Queue | None = None
        self.size = 0
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.log_addr: int | None = None
        self.addr_set = False
        self.base = 0
        self.base_set = False
        self.features = 0
        self.kick: int | None = None
        self.call: int | None = None
        self.err: int | None = None
        self.log: DirtyLogLike | None = None
        self.inflight: Any = None
        self.backend_channel: Any = None
        self._resubmit: list[int] = []
        # packed rings with inflight tracking: chains to resubmit, buffer id -> slot
        self._resubmit_packed: list[InflightChain] = []
        self._slot_of: dict[int, int] = {}
        # needs_notification()'s answer until the next signal or used element, so that
        # rust-vmm's `if needs_notification(): signal_used_queue()` and a bare
        # `signal_used_queue()` both notify exactly when the driver asked.
        self._notify: bool | None = None
        #: Why the ring is broken (None: it is not); see `mark_broken`.
        self.broken: str | None = None
        #: The last pass ran out of budget with work left: dispatch the ring again.
        self.yielded = False
        self._left = _UNBOUNDED  # chains this pass may still take

    # --------------------------------------------------------------- config
    @property
    def packed(self) -> bool:
        """Whether VIRTIO_F_RING_PACKED was negotiated."""
        return bool(self.features & _RING_PACKED)

    @property
    def configured(self) -> bool:
        """Whether the ring has a queue to serve (size and addresses set, memory mapped)."""
        return self.queue is not None

    @property
    def event_idx(self) -> bool:
        """Whether VIRTIO_F_RING_EVENT_IDX was negotiated."""
        return bool(self.features & _EVENT_IDX)

    def is_enabled(self) -> bool:
        """Whether the ring is enabled (SET_VRING_ENABLE)."""
        return self.enabled

    def get_queue(self) -> Queue:
        """The device-side virtqueue (rust-vmm name; VhsmError before the ring is laid out)."""
        if self.queue is None:
            raise VhsmError(f"ring {self.index} has no queue yet (SET_VRING_NUM/ADDR not applied)")
        return self.queue

    def get_queue_mut(self) -> Queue:
        """The device-side virtqueue, to change (rust-vmm name; Python has one reference kind)."""
        return self.get_queue()

    def set_queue_ready(self, ready: bool) -> None:
        """Mark the ring started (ready) or stopped (rust-vmm name for the started flag)."""
        self.started = ready

    def queue_ready(self) -> bool:
        """Whether the ring is started (rust-vmm: the queue is ready)."""
        return self.started

    def set_enabled(self, enabled: bool) -> None:
        """Set the enabled flag."""
        self.enabled = enabled

    def set_features(self, features: int) -> None:
        """Apply acked virtio features (layout, indirect, event idx, LOG_ALL)."""
        layout_changed = (features ^ self.features) & _RING_PACKED
        self.features = features
        if layout_changed:
            try:
                self._rebuild_or_idle()
            except ValueError as exc:  # the base given for the old layout does not fit
                log.warning(
                    "ring %d: idle until a base fits the new layout: %s", self.index, str(exc)
                )
                self._drop_queue()
        elif self.queue is not None:
            self.queue.set_event_idx(self.event_idx)
            self.queue.set_indirect(bool(features & _INDIRECT_DESC))
            if isinstance(self.queue, virtq.SplitQueue):
                self.queue.notify_on_empty = bool(features & _NOTIFY_ON_EMPTY)
            self._apply_log()

    def set_queue_event_idx(self, enabled: bool) -> None:
        """Turn event-idx suppression on or off (rust-vmm name)."""
        self.set_features(self.features | _EVENT_IDX if enabled else self.features & ~_EVENT_IDX)

    def set_queue_size(self, num: int) -> None:
        """SET_VRING_NUM: ValueError if the layout cannot have that size (VU-RING-002)."""
        from vhsm.virtq.common import check_queue_size  # numpy: only once a ring is set up

        check_queue_size(num, packed=self.packed, limit=self.max_queue_size)
        self.size = num
        if self.addr_set:
            self._rebuild_or_idle()
        self._repaired()

    def set_queue_info(self, desc: int, avail: int, used: int, log_addr: int | None = None) -> None:
        """SET_VRING_ADDR (guest-physical areas; ``log_addr`` when the LOG flag is set).

        Raises:
            GuestMemoryError: an area is not inside the current memory table (VU-RING-004).
        """
        first = not self.addr_set or (desc, avail, used) != (
            self.desc_addr,
            self.avail_addr,
            self.used_addr,
        )
        self.desc_addr, self.avail_addr, self.used_addr = desc, avail, used
        self.log_addr = log_addr
        self.addr_set = True
        if self.size:
            self._build(carry=not first)
        self._repaired()

    def update_memory(self, memory: GuestMemoryAtomic | GuestMemory | None = None) -> bool:
        """Re-translate the areas through a new snapshot; False (ring idle) if unmapped."""
        if memory is not None:
            self.memory = memory
        if not (self.addr_set and self.size):
            return True
        try:
            self._build(carry=True)
        except GuestMemoryError as exc:
            log.warning("ring %d: areas not mapped by the new table: %s", self.index, str(exc))
            self._drop_queue()
            return False
        return True

    def _rebuild_or_idle(self) -> None:
        """Rebuild after a size or layout change; an unmappable ring idles until SET_VRING_ADDR."""
        try:
            self._build(carry=False)
        except GuestMemoryError as exc:
            log.warning("ring %d: areas not mapped for this layout: %s", self.index, str(exc))
            self._drop_queue()

    def _snapshot(self) -> GuestMemory:
        mem = self.memory
        return mem.memory() if isinstance(mem, GuestMemoryAtomic) else mem

    def _build(self, *, carry: bool) -> None:
        """(Re)create the queue over the current snapshot; keep indices when ``carry``."""
        if not (self.addr_set and self.size):
            return
        old = self.queue
        if carry and old is not None:
            base = old.get_base()
        elif self.base_set or not self.packed:
            base = self.base
        else:
            base = PACKED_BASE_INITIAL  # packed ring, no SET_VRING_BASE
        next_used = old.next_used if carry and isinstance(old, virtq.SplitQueue) else None
        mem = self._snapshot()
        n = self.size
        common: dict[str, Any] = {
            "index": self.index,
            "event_idx": self.event_idx,
            "indirect": bool(self.features & _INDIRECT_DESC),
        }
        queue: Queue
        try:
            queue = self._new_queue(mem, n, base, next_used, common)
        except GuestMemoryError:
            raise
        except ValueError as exc:
            if " area " not in str(exc):
                raise  # a base the ring cannot take: the session names VU-RING-005
            # an area the ring layout cannot use (host alignment, read-only mapping)
            raise GuestMemoryError(f"ring {self.index}: {exc}", "VU-RING-003") from None
        if old is not None:
            packed = virtq.PackedQueue
            if carry and isinstance(old, packed) and isinstance(queue, packed):
                queue.take_in_flight(old)  # buffers popped before the rebuild stay completable
            old.release()
        self.queue = queue
        self._apply_log()
        overlap = self._area_overlap()
        if overlap is not None and self.broken is None:
            self.mark_broken(overlap)

    def _area_overlap(self) -> str | None:
        """Why the area the device writes lies over one the driver writes, or None.

        The queue compares host addresses (two guest addresses of the same bytes
        count); a region mapped on demand maps each area in its own window, so the
        guest addresses are compared too (plain regions: the same answer).
        """
        q = self.queue
        if q is None:
            return None
        host = q.device_area_overlap()
        if host is not None:
            return host
        n = self.size
        if self.packed:
            device = ("device event", self.used_addr, 4)
            driver = (("descriptor", self.desc_addr, 16 * n), ("driver event", self.avail_addr, 4))
        else:
            device = ("used", self.used_addr, 6 + 8 * n)
            driver = (
                ("descriptor", self.desc_addr, 16 * n),
                ("available", self.avail_addr, 6 + 2 * n),
            )
        name, start, size = device
        for other, at, length in driver:
            if start < at + length and at < start + size:
                return f"the {name} area overlaps the {other} area"
        return None

    def _new_queue(
        self, mem: GuestMemory, n: int, base: int, next_used: int | None, common: dict[str, Any]
    ) -> Queue:
        """The queue object over the translated areas (ValueError: an area is unusable)."""
        queue: Queue
        if self.packed:
            queue = virtq.PackedQueue(
                mem,
                n,
                mem.translate(self.desc_addr, 16 * n),
                mem.translate(self.avail_addr, 4),
                mem.translate(self.used_addr, 4),
                base=base,
                **common,
            )
        else:
            queue = virtq.SplitQueue(
                mem,
                n,
                mem.translate(self.desc_addr, 16 * n),
                mem.translate(self.avail_addr, 6 + 2 * n),
                mem.translate(self.used_addr, 6 + 8 * n),
                next_avail=base & 0xFFFF,
                next_used=next_used,
                **common,
            )
            queue.notify_on_empty = bool(self.features & _NOTIFY_ON_EMPTY)
        return queue

    def _drop_queue(self) -> None:
        if self.queue is not None:
            self.base = self.queue.get_base()
            self.queue.release()
            self.queue = None

    def set_log(self, dirty_log: DirtyLogLike | None) -> None:
        """Attach the dirty log of SET_LOG_BASE (used only while LOG_ALL is acked)."""
        self.log = dirty_log
        self._apply_log()

    def _apply_log(self) -> None:
        q = self.queue
        if q is None:
            return
        active = self.log if self.features & _LOG_ALL else None
        if isinstance(q, virtq.SplitQueue):
            q.set_log(active, self.log_addr)
        else:
            q.set_log(active, self.desc_addr if self.log_addr is not None else None, self.log_addr)

    def set_inflight(self, inflight: Any) -> None:
        """Attach a ring's inflight region: resubmits what it lists as in flight.

        A new region (version 0: nothing recorded yet, as a migration destination gets)
        adopts the ring's current position instead, like libvhost-user and DPDK.
        The next avail index is set past the resubmitted requests (used index + their
        count, as [LVU] does); a packed ring also takes its used position and wrap
        counter from the region's header.

        Raises:
            VirtqError: the region is inconsistent (the ring is then left untracked).
        """
        self.inflight = inflight
        self._resubmit = []
        self._resubmit_packed = []
        self._slot_of = {}
        q = self.queue
        if inflight is None or q is None:
            return
        from vhsm.inflight import InflightPacked  # loaded with the region (numpy)

        try:
            if isinstance(q, virtq.SplitQueue) and inflight.new:
                # nothing recorded (e.g. a migration destination's region): adopt the ring
                inflight.adopt(q.used_idx())
            elif (
                isinstance(q, virtq.PackedQueue)
                and isinstance(inflight, InflightPacked)
                and inflight.new
            ):
                inflight.adopt(q.next_used, q.used_wrap)
            elif isinstance(q, virtq.SplitQueue):
                used = q.used_idx()
                self._resubmit = list(inflight.resubmit(used))
                q.set_next_avail((used + len(self._resubmit)) & 0xFFFF)
            elif isinstance(inflight, InflightPacked):
                chains = inflight.resubmit(lambda pos: q.descriptors(pos, 1)[0][3])
                q.resume(
                    inflight.used_idx,
                    int(inflight.used_wrap_counter),
                    [(c.id, len(c.descs)) for c in chains],
                )
                self._resubmit_packed = chains
            else:
                raise VirtqError(self.index, "inflight buffer: split region for a packed ring")
        except BaseException:
            self.inflight = None
            self._resubmit = []
            self._resubmit_packed = []
            raise

    def set_backend_channel(self, channel: Any) -> None:
        """Back-end request channel, for in-band call/err notifications."""
        self.backend_channel = channel

    # ----------------------------------------------------------------- base
    def get_queue_base(self) -> int:
        """GET_VRING_BASE ``num``."""
        if self.queue is not None:
            return self.queue.get_base()
        return self.base if self.base_set or not self.packed else PACKED_BASE_INITIAL

    def set_queue_base(self, num: int) -> None:
        """SET_VRING_BASE ``num``; ValueError for reserved bits / bad packed index."""
        if not self.packed and num >> 16:
            raise ValueError(f"split ring base {num:#x} has reserved bits 16-31 set")
        q = self.queue
        if q is not None:
            q.set_base(num)  # checked before anything changes (a packed index past the size)
        self.base = num
        self.base_set = True
        if isinstance(q, virtq.SplitQueue):
            q.set_next_used(q.used_idx())  # the used index comes from guest memory
        self._repaired()

    def queue_next_avail(self) -> int:
        """Next avail index (split) / position (packed)."""
        return self.queue.next_avail if self.queue is not None else self.base & 0x7FFF

    def set_queue_next_avail(self, base: int) -> None:
        """Set the next avail index (split)."""
        if isinstance(self.queue, virtq.SplitQueue):
            self.queue.set_next_avail(base)
        self.base = base & 0xFFFF

    def set_queue_next_used(self, idx: int) -> None:
        """Set the next used index (split)."""
        if isinstance(self.queue, virtq.SplitQueue):
            self.queue.set_next_used(idx)

    def queue_used_idx(self) -> int:
        """The used index in guest memory (split) or the device's next used position."""
        q = self._require()
        return q.used_idx() if isinstance(q, virtq.SplitQueue) else q.next_used

    # ------------------------------------------------------------------ fds
    def set_kick(self, fd: int | None) -> None:
        """Own a new kick eventfd (the previous one is closed); a broken ring may run again."""
        self.kick = _replace_fd(self.kick, fd)
        self._repaired()

    def get_kick(self) -> int | None:
        """The kick fd, if any."""
        return self.kick

    def read_kick(self) -> bool:
        """Consume a pending kick; returns whether the ring is enabled."""
        if self.kick is not None:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.kick)
        return self.enabled

    def set_call(self, fd: int | None) -> None:
        """Own a new call eventfd (the previous one is closed)."""
        self.call = _replace_fd(self.call, fd)

    def get_call(self) -> int | None:
        """The call fd, if any."""
        return self.call

    def set_err(self, fd: int | None) -> None:
        """Own a new err eventfd (the previous one is closed)."""
        self.err = _replace_fd(self.err, fd)

    def get_err(self) -> int | None:
        """The err fd, if any."""
        return self.err

    # ------------------------------------------------------------ data path
    def _require(self) -> Queue:
        q = self.queue
        if q is None:
            raise VirtqError(self.index, "ring not configured (size, addresses, memory)")
        return q

    # ------------------------------------------------------- broken, passes
    def mark_broken(self, reason: str) -> None:
        """Stop serving this ring until the front-end reconfigures it (once per breakage).

        Signals the err fd (or in-band VRING_ERR) and logs one line; later calls
        until the repair do nothing.
        """
        self._left = 0
        if self.broken is not None:
            return
        self.broken = reason
        log.warning(
            "ring %d broken (VU-RING-009): %s; not served until the front-end reconfigures it",
            self.index,
            reason,
        )
        try:
            self.signal_err()
        except Exception as exc:  # the in-band channel may be gone: the log line stays
            log.debug("ring %d: error notification failed: %s", self.index, str(exc))

    def _repaired(self) -> None:
        """The front-end reconfigured the ring: serve it again unless its areas still overlap."""
        overlap = self._area_overlap()
        if overlap is not None and self.broken == overlap:
            return  # still broken for the same reason: already reported
        self.broken = None
        self.yielded = False
        self._left = _UNBOUNDED
        if overlap is not None:
            self.mark_broken(overlap)

    def begin_pass(self) -> None:
        """A worker starts a dispatch: at most the ring size in chains until the next one."""
        self.yielded = False
        self._left = 0 if self.broken is not None else max(self.size, 1)

    def _out_of_budget(self) -> None:
        """Asked for more after the pass used its budget: have the worker come back."""
        if self.broken is None:
            self.yielded = True

    def pop(self) -> DescriptorChain | None:
        """Next available chain (resubmitted inflight heads first); VirtqError if bad.

        None when the ring is empty, broken, or this pass used its budget.
        """
        if self._left <= 0:
            self._out_of_budget()
            return None
        q = self._require()
        try:
            if self.inflight is None:
                chain = q.pop()
            elif isinstance(q, virtq.PackedQueue):
                chain = self._pop_packed(q)
            elif self._resubmit:
                chain = q._walk(self._resubmit.pop(0))
            else:
                chain = q.pop()
                if chain is not None:
                    self.inflight.fetch(chain.head)
        except VirtqError as exc:
            self._left -= 1
            if exc.head is not None:
                raise
            self.mark_broken(exc.detail)  # no chain to answer: the ring itself is broken
            return None
        if chain is not None:
            self._left -= 1
        return chain

    def _pop_packed(self, q: PackedQueue) -> DescriptorChain | None:
        """Packed pop with inflight tracking: resubmitted chains first, then the ring."""
        if self._resubmit_packed:
            rec = self._resubmit_packed.pop(0)
            self._slot_of[rec.id] = rec.slot
            return q.rebuild(rec.descs)
        pos, wrap = q.next_avail, q.avail_wrap
        try:
            chain = q.pop()
        except VirtqError as exc:
            if exc.head is not None:  # consumed and to be completed: track it too
                self._fetch_packed(q, pos, wrap, exc.head)
            raise
        if chain is not None:
            self._fetch_packed(q, pos, wrap, chain.head)
        return chain

    def _fetch_packed(self, q: PackedQueue, pos: int, wrap: int, bid: int) -> None:
        """Record the chain just consumed from ring position ``pos`` (buffer id ``bid``)."""
        n = q.next_avail - pos + (q.size if q.avail_wrap != wrap else 0)
        try:
            self._slot_of[bid] = self.inflight.fetch(q.descriptors(pos, n))
        except VirtqError as exc:
            raise VirtqError(self.index, f"not recorded: {exc.detail}", bid) from exc

    def resubmit_count(self) -> int:
        """Requests the inflight region listed that wait to be served again."""
        return len(self._resubmit) + len(self._resubmit_packed)

    def has_available(self) -> bool:
        """Whether a chain is waiting (cheap: one ring word; resubmissions count too)."""
        q = self.queue
        if q is None or self.broken is not None:
            return False
        return bool(self._resubmit or self._resubmit_packed) or q.has_available()

    def iter(self) -> Iterator[DescriptorChain]:
        """Iterate available chains (the queue's fast iterator when no inflight tracking)."""
        q = self._require()
        if self.inflight is None and not self._resubmit and self._left >= _UNBOUNDED:
            return iter(q)
        return iter(self.pop, None)

    def pop_batch(self, max_chains: int = 1 << 16) -> Batch:
        """Take up to ``max_chains`` chains at once (numpy arrays, see Batch)."""
        q = self._require()
        if self.inflight is not None and (isinstance(q, virtq.PackedQueue) or self._resubmit):
            batch = q.empty_batch()  # tracked chains are popped one by one (budgeted by pop)
            while len(batch) < max_chains:
                try:
                    chain = self.pop()
                except VirtqError as exc:
                    batch.errors.append(exc)
                    continue
                if chain is None:
                    break
                batch.chains.append(chain)
            return batch
        left = self._left
        if left <= 0:
            self._out_of_budget()
            return q.empty_batch()
        try:
            batch = q.pop_batch(min(max_chains, left))
        except VirtqError as exc:
            if exc.head is not None:
                raise
            self.mark_broken(exc.detail)
            return q.empty_batch()
        self._left = left - len(batch)
        if self.inflight is not None and isinstance(q, virtq.SplitQueue):
            for head in [*batch.heads.tolist(), *(c.head for c in batch.chains)]:
                self.inflight.fetch(head)
        return batch

    def add_used(self, head: int, length: int) -> None:
        """Publish one used element."""
        q = self._require()
        self._notify = None
        if self.inflight is not None and isinstance(q, virtq.SplitQueue):

            def publish() -> int:
                q.add_used(head, length)
                return q.next_used

            self.inflight.complete([head], publish)
            return
        if self.inflight is not None and head in self._slot_of:
            if not 0 <= length <= 0xFFFFFFFF:
                raise ValueError(f"used length {length} does not fit in 32 bits")
            self.inflight.complete([self._slot_of[head]], lambda: q.add_used(head, length))
            del self._slot_of[head]
            return
        q.add_used(head, length)

    def add_used_batch(
        self, ids: Sequence[int] | np.ndarray, lens: Sequence[int] | np.ndarray | int
    ) -> None:
        """Publish many used elements at once."""
        q = self._require()
        self._notify = None
        if self.inflight is not None and isinstance(q, virtq.SplitQueue):
            heads = [int(h) for h in ids]

            def publish() -> int:
                q.add_used_batch(ids, lens)
                return q.next_used

            self.inflight.complete(heads, publish)
            return
        if self.inflight is not None and self._slot_of:
            self._add_used_packed(q, ids, lens)
            return
        q.add_used_batch(ids, lens)

    def _add_used_packed(
        self, q: Queue, ids: Sequence[int] | np.ndarray, lens: Sequence[int] | np.ndarray | int
    ) -> None:
        """Complete tracked packed buffers as one inflight batch (checked before any write)."""
        from vhsm.virtq.common import length_list

        bids = [int(b) for b in ids]
        lns = length_list(lens, len(bids))
        slots = [self._slot_of.get(b) for b in bids]
        if len(lns) != len(bids):
            raise ValueError(f"{len(bids)} ids but {len(lns)} lengths")
        if any(not 0 <= n <= 0xFFFFFFFF for n in lns):
            raise ValueError("used length does not fit in 32 bits")
        if len(set(bids)) != len(bids) or None in slots:
            bad = next((b for b, s in zip(bids, slots, strict=True) if s is None), None)
            raise VirtqError(self.index, "used buffer id not in flight (or repeated)", bad)
        self.inflight.complete(slots, lambda: q.add_used_batch(ids, lens))
        for b in bids:
            del self._slot_of[b]

    def complete_error(self, exc: VirtqError) -> None:
        """Finish a bad chain: signal err, then complete it with used length 0 when possible.

        The err fd is written first so a driver that sees the zero-length used
        element can already see the error too. An error naming no chain marks the
        ring broken instead (`mark_broken`).
        """
        if exc.head is None:  # nothing to complete: the ring as a whole is broken
            self.mark_broken(exc.detail)
            return
        self.signal_err()
        q = self.queue
        if q is not None:
            try:
                self.add_used(exc.head, 0)
            except VirtqError as again:
                log.debug("ring %d: bad chain not completed: %s", self.index, again)
            self.signal_used_queue()

    def sink_pass(self, skip: int, checksum: bool) -> SinkPass | None:
        """A net sink's whole TX kick in one compiled call (`vhsm.virtq.sink_pass`).

        Pops and reads every available frame (``skip`` header bytes left unread;
        Adler-32 sums or copies), completes them, notifies the driver and re-enables
        kicks, within this pass's budget. None when it does not apply (pure Python,
        dirty logging, inflight tracking, a broken ring, no call fd):
        nothing was done. A result with status FALLBACK did part of the work and
        leaves the rest to the pure loop; CALL_FAILED one could not write the call
        fd (`SinkPass.check` raises the OSError `signal_used_queue` would have raised,
        once the caller counted the work). Either way its counts are to be added.
        """
        q = self.queue
        call = self.call
        if q is None or call is None or self.inflight is not None or self.broken is not None:
            return None
        if isinstance(q, virtq.SplitQueue):
            done = virtq.sink_pass_split(q, self._left, call, skip, checksum)
        else:
            done = virtq.sink_pass_packed(q, self._left, call, skip, checksum)
        if done is None:
            return None
        self._left = done.left
        self._notify = None
        if done.status == virtq.YIELDED:
            self.yielded = True
        return done

    def needs_notification(self) -> bool:
        """Whether the driver wants a used-buffer notification now (event-idx aware).

        The answer holds until the next used element or signal, so asking
        before `signal_used_queue()` does not use the notification up.
        """
        if self._notify is None:
            self._notify = self.queue.needs_notification() if self.queue is not None else False
        return self._notify

    def enable_notification(self) -> bool:
        """Ask for kicks again; True if work arrived meanwhile (process it before sleeping).

        False when the pass used its budget (``yielded`` is set: the worker dispatches
        the ring again) or the ring is broken (kicks stay off: nothing more is taken).
        Each True costs the pass's budget one chain, so re-checks are bounded too.
        """
        q = self.queue
        if q is None or self.broken is not None:
            return False
        more = q.enable_notification()
        if not more:
            return False
        if self._left <= 0:  # work left and the pass used its budget: come back
            self.yielded = True
            return False
        # A re-check costs the budget a chain: a guest that moves its avail index back
        # and forth makes every re-check see work that a pop then does not find, and
        # would otherwise keep the device's drain loop turning without end.
        self._left -= 1
        return True

    def disable_notification(self) -> None:
        """Ask the driver not to kick."""
        if self.queue is not None:
            self.queue.disable_notification()

    def signal_used_queue(self) -> bool:
        """Write 1 to the call fd when the driver wants a notification; returns whether sent."""
        needed = self.needs_notification()
        self._notify = None
        if not needed:
            return False
        if self.call is not None:
            _eventfd_signal(self.call)
            return True
        if self.backend_channel is not None:
            self.backend_channel.vring_call(self.index)
            return True
        return False

    def signal_err(self) -> None:
        """Signal the err fd (or in-band VRING_ERR when there is no fd but a channel)."""
        if self.err is not None:
            _eventfd_signal(self.err)
        elif self.backend_channel is not None:
            self.backend_channel.vring_err(self.index)

    def reset(self) -> None:
        """Back to the initial state: fds closed, queue dropped, flags cleared."""
        for fd in (self.kick, self.call, self.err):
            _close(fd)
        self.kick = self.call = self.err = None
        if self.queue is not None:
            self.queue.release()
        self.queue = None
        self._notify = None
        self.size = 0
        self.addr_set = False
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.log_addr = None
        self.base = 0
        self.base_set = False
        self.enabled = self.started = False
        self.inflight = None
        self._resubmit = []
        self._resubmit_packed = []
        self._slot_of = {}
        self.broken = None
        self.yielded = False
        self._left = _UNBOUNDED

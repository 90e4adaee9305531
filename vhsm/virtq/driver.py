"""Driver side of split and packed rings over guest memory (tests, benchmarks, front-end).

The driver lays the rings out at guest-physical addresses, posts chains (direct or
through an indirect table the caller places), decides whether to kick (event idx or
the device's flags), and reaps used elements. Buffers are given as (gpa, length).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vhsm.virtq.common import (
    PACKED_DESC_DTYPE,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    SPLIT_DESC_DTYPE,
    USED_ELEM_DTYPE,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_USED_F_NO_NOTIFY,
    GuestMemoryLike,
    check_queue_size,
    memory_barrier,
    vring_need_event,
)

Buffers = Sequence[tuple[int, int]]


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


class RingFull(Exception):
    """Not enough free descriptors (or buffer ids) for the chain."""


class SplitDriver:
    """Driver half of a split ring (what a guest's virtio driver does)."""

    def __init__(
        self,
        memory: GuestMemoryLike,
        size: int,
        desc_gpa: int,
        avail_gpa: int,
        used_gpa: int,
        *,
        event_idx: bool = False,
    ) -> None:
        """Take over zeroed ring areas at the given guest-physical addresses."""
        check_queue_size(size, packed=False)
        self.size = size
        self.desc_gpa, self.avail_gpa, self.used_gpa = desc_gpa, avail_gpa, used_gpa
        self.event_idx = event_idx
        self._desc = memory.translate(desc_gpa, 16 * size)
        self._avail = memory.translate(avail_gpa, 6 + 2 * size)
        self._used = memory.translate(used_gpa, 6 + 8 * size)
        self._desc_np = np.frombuffer(self._desc, dtype=SPLIT_DESC_DTYPE)
        self._avail_h = self._avail.cast("H")
        self._avail_np = np.frombuffer(self._avail, dtype="<u2")
        self._used_h = self._used.cast("H")
        self._used_np = np.frombuffer(self._used[4 : 4 + 8 * size], dtype=USED_ELEM_DTYPE)
        self._free: list[int] = list(range(size - 1, -1, -1))
        self._multi: dict[int, list[int]] = {}
        self.avail_idx = 0  # shadow of the published avail idx
        self.last_used = 0
        self._kicked = 0
        self._avail_h[0] = 0
        self._avail_h[1] = 0

    @classmethod
    def layout(
        cls, memory: GuestMemoryLike, size: int, gpa: int, *, event_idx: bool = False
    ) -> SplitDriver:
        """Place the three areas back to back from ``gpa`` (aligned) and zero them."""
        desc = _align(gpa, 16)
        avail = desc + 16 * size
        used = _align(avail + 6 + 2 * size, 4)
        memory.translate(desc, used + 6 + 8 * size - desc)[:] = bytes(used + 6 + 8 * size - desc)
        return cls(memory, size, desc, avail, used, event_idx=event_idx)

    @staticmethod
    def footprint(size: int) -> int:
        """Bytes ``layout`` uses from a 16-aligned address."""
        return _align(16 * size + 6 + 2 * size, 4) + 6 + 8 * size

    @property
    def num_free(self) -> int:
        """Free descriptors."""
        return len(self._free)

    def add_chain(
        self,
        readable: Buffers,
        writable: Buffers = (),
        *,
        indirect_gpa: int | None = None,
        memory: GuestMemoryLike | None = None,
        publish: bool = True,
    ) -> int:
        """Post one chain; with ``indirect_gpa`` its descriptors go to a table there.

        Returns the head index. ``memory`` is needed to write an indirect table.
        """
        bufs = [(a, n, 0) for a, n in readable] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in writable]
        if indirect_gpa is not None:
            if memory is None:
                raise ValueError("an indirect table needs memory to be written to")
            table = np.frombuffer(memory.translate(indirect_gpa, 16 * len(bufs)), SPLIT_DESC_DTYPE)
            for i, (a, n, f) in enumerate(bufs):
                nxt = VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0
                table[i] = (a, n, f | nxt, i + 1 if nxt else 0)
            bufs = [(indirect_gpa, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT)]
        if not bufs or len(bufs) > len(self._free):
            raise RingFull(f"need {len(bufs)} descriptors, {len(self._free)} free")
        ids = [self._free.pop() for _ in bufs]
        for i, (a, n, f) in enumerate(bufs):
            last = i + 1 == len(bufs)
            self._desc_np[ids[i]] = (
                a,
                n,
                f | (0 if last else VIRTQ_DESC_F_NEXT),
                0 if last else ids[i + 1],
            )
        head = ids[0]
        if len(ids) > 1:
            self._multi[head] = ids
        self._avail_np[2 + (self.avail_idx & (self.size - 1))] = head
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.publish()
        return head

    def add_simple_batch(
        self, addrs: np.ndarray, lens: np.ndarray, writable: np.ndarray
    ) -> np.ndarray:
        """Post many single-descriptor chains and publish them with one index write."""
        k = len(addrs)
        if k > len(self._free):
            raise RingFull(f"need {k} descriptors, {len(self._free)} free")
        heads = np.array(self._free[len(self._free) - k :][::-1], dtype=np.int64)
        del self._free[len(self._free) - k :]
        d = self._desc_np
        d["addr"][heads] = addrs
        d["len"][heads] = lens
        d["flags"][heads] = np.where(writable, VIRTQ_DESC_F_WRITE, 0)
        d["next"][heads] = 0
        pos = ((self.avail_idx + np.arange(k)) & (self.size - 1)) + 2
        self._avail_np[pos] = heads
        self.avail_idx = (self.avail_idx + k) & 0xFFFF
        self.publish()
        return heads

    def publish(self) -> None:
        """Make posted chains visible: one aligned write of avail idx."""
        self._avail_h[1] = self.avail_idx

    def kick_needed(self) -> bool:
        """Whether the device wants a kick for what was published since the last call."""
        new, old = self.avail_idx, self._kicked
        self._kicked = new
        if new == old:
            return False
        memory_barrier()
        if self.event_idx:
            return vring_need_event(self._used_h[2 + 4 * self.size], new, old)
        return not self._used_h[0] & VRING_USED_F_NO_NOTIFY

    def enable_interrupts(self) -> bool:
        """Ask for used-buffer notifications; True if used entries are already pending."""
        if self.event_idx:
            self._avail_h[2 + self.size] = self.last_used
        else:
            self._avail_h[0] = 0
        memory_barrier()
        return self._used_h[1] != self.last_used

    def disable_interrupts(self) -> None:
        """Ask the device not to notify (a hint)."""
        if not self.event_idx:
            self._avail_h[0] = VRING_AVAIL_F_NO_INTERRUPT

    def pending_used(self) -> int:
        """How many used elements the device published that were not reaped yet."""
        return (self._used_h[1] - self.last_used) & 0xFFFF

    def get_used(self) -> tuple[int, int] | None:
        """Reap one used element: (head, len), freeing its descriptors."""
        if self._used_h[1] == self.last_used:
            return None
        e = self._used_np[self.last_used & (self.size - 1)]
        head, ln = int(e["id"]), int(e["len"])
        self.last_used = (self.last_used + 1) & 0xFFFF
        self._free.extend(self._multi.pop(head, (head,)))
        return head, ln

    def get_used_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """Reap every used element at once: (heads, lens) arrays."""
        k = (self._used_h[1] - self.last_used) & 0xFFFF
        pos = (self.last_used + np.arange(k)) & (self.size - 1)
        e = self._used_np[pos]
        heads, lens = e["id"].copy(), e["len"].copy()
        self.last_used = (self.last_used + k) & 0xFFFF
        if self._multi:
            for h in heads.tolist():
                self._free.extend(self._multi.pop(h, (h,)))
        else:
            self._free.extend(heads.tolist())
        return heads, lens


class PackedDriver:
    """Driver half of a packed ring (what a guest's virtio driver does)."""

    def __init__(
        self,
        memory: GuestMemoryLike,
        size: int,
        desc_gpa: int,
        driver_event_gpa: int,
        device_event_gpa: int,
        *,
        event_idx: bool = False,
    ) -> None:
        """Take over zeroed ring areas at the given guest-physical addresses."""
        check_queue_size(size, packed=True)
        self.size = size
        self.desc_gpa = desc_gpa
        self.driver_event_gpa = driver_event_gpa
        self.device_event_gpa = device_event_gpa
        self.event_idx = event_idx
        self._desc = memory.translate(desc_gpa, 16 * size)
        self._desc_np = np.frombuffer(self._desc, dtype=PACKED_DESC_DTYPE)
        self._desc_h = self._desc.cast("H")
        self._drv_h = memory.translate(driver_event_gpa, 4).cast("H")
        self._dev_h = memory.translate(device_event_gpa, 4).cast("H")
        self._free_ids: list[int] = list(range(size - 1, -1, -1))
        self._count: dict[int, int] = {}
        self.num_free = size
        self.next_avail = 0
        self.avail_wrap = 1
        self.last_used = 0
        self.used_wrap = 1
        self._since_kick = 0

    @classmethod
    def layout(
        cls, memory: GuestMemoryLike, size: int, gpa: int, *, event_idx: bool = False
    ) -> PackedDriver:
        """Descriptor ring at ``gpa`` (16-aligned), then the driver and device event areas."""
        desc = _align(gpa, 16)
        drv = desc + 16 * size
        dev = drv + 4
        memory.translate(desc, dev + 4 - desc)[:] = bytes(dev + 4 - desc)
        return cls(memory, size, desc, drv, dev, event_idx=event_idx)

    @staticmethod
    def footprint(size: int) -> int:
        """Bytes ``layout`` uses from a 16-aligned address."""
        return 16 * size + 8

    def _flags(self, wrap: int) -> int:
        return VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED

    def add_chain(
        self,
        readable: Buffers,
        writable: Buffers = (),
        *,
        indirect_gpa: int | None = None,
        memory: GuestMemoryLike | None = None,
        publish: bool = True,
    ) -> int:
        """Post one chain (head descriptor made available last); returns its buffer id."""
        del publish  # packed descriptors are published one by one
        bufs = [(a, n, 0) for a, n in readable] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in writable]
        if indirect_gpa is not None:
            if memory is None:
                raise ValueError("an indirect table needs memory to be written to")
            table = np.frombuffer(memory.translate(indirect_gpa, 16 * len(bufs)), PACKED_DESC_DTYPE)
            for i, (a, n, f) in enumerate(bufs):
                table[i] = (a, n, 0, f)
            bufs = [(indirect_gpa, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT)]
        if not bufs or len(bufs) > self.num_free or not self._free_ids:
            raise RingFull(f"need {len(bufs)} descriptors, {self.num_free} free")
        bid = self._free_ids.pop()
        p, w = self.next_avail, self.avail_wrap
        head_p, head_flags = p, 0
        for i, (a, n, f) in enumerate(bufs):
            last = i + 1 == len(bufs)
            flags = f | (0 if last else VIRTQ_DESC_F_NEXT) | self._flags(w)
            self._desc_np[p] = (a, n, bid, flags if i else 0)
            if i == 0:
                head_flags = flags
            p += 1
            if p == self.size:
                p, w = 0, w ^ 1
        self.next_avail, self.avail_wrap = p, w
        self._desc_h[(head_p << 3) + 7] = head_flags  # publish: one aligned store
        self._count[bid] = len(bufs)
        self.num_free -= len(bufs)
        self._since_kick += len(bufs)
        return bid

    def add_simple_batch(
        self, addrs: np.ndarray, lens: np.ndarray, writable: np.ndarray
    ) -> np.ndarray:
        """Post many single-descriptor buffers; the first one is made available last."""
        k = len(addrs)
        if k > self.num_free or k > len(self._free_ids):
            raise RingFull(f"need {k} descriptors, {self.num_free} free")
        ids = np.array(self._free_ids[len(self._free_ids) - k :][::-1], dtype=np.int64)
        del self._free_ids[len(self._free_ids) - k :]
        start = self.next_avail + np.arange(k)
        wraps = np.where((start // self.size) & 1 == 0, self.avail_wrap, self.avail_wrap ^ 1)
        pos = start % self.size
        d = self._desc_np
        d["addr"][pos] = addrs
        d["len"][pos] = lens
        d["id"][pos] = ids
        flags = np.where(writable, VIRTQ_DESC_F_WRITE, 0) | np.where(
            wraps == 1, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED
        )
        if k > 1:
            d["flags"][pos[1:]] = flags[1:]
        if k:
            self._desc_h[(int(pos[0]) << 3) + 7] = int(flags[0])
        for bid in ids.tolist():
            self._count[bid] = 1
        end = self.next_avail + k
        self.avail_wrap ^= (end // self.size) & 1
        self.next_avail = end % self.size
        self.num_free -= k
        self._since_kick += k
        return ids

    def kick_needed(self) -> bool:
        """Whether the device wants a kick for what was posted since the last call."""
        added = self._since_kick
        self._since_kick = 0
        if not added:
            return False
        memory_barrier()
        flags = self._dev_h[1] & 3
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx:
            return True
        off_wrap = self._dev_h[0]
        event = off_wrap & 0x7FFF
        if off_wrap >> 15 != self.avail_wrap:
            event -= self.size
        new = self.next_avail
        return vring_need_event(event, new, new - added)

    def enable_interrupts(self) -> bool:
        """Ask for used notifications; True if a used descriptor is already pending."""
        if self.event_idx:
            self._drv_h[0] = self.last_used | self.used_wrap << 15
            self._drv_h[1] = RING_EVENT_FLAGS_DESC
        else:
            self._drv_h[1] = RING_EVENT_FLAGS_ENABLE
        memory_barrier()
        return self._used_ready()

    def disable_interrupts(self) -> None:
        """Ask the device not to notify."""
        self._drv_h[1] = RING_EVENT_FLAGS_DISABLE

    def _used_ready(self) -> bool:
        fl = self._desc_h[(self.last_used << 3) + 7]
        w = self.used_wrap
        return bool((fl >> 7) & 1 == w and (fl >> 15) & 1 == w)

    def pending_used(self) -> int:
        """How many used buffers the device published that were not reaped yet."""
        count, position, wrap = 0, self.last_used, self.used_wrap
        while count < self.size:
            flags = self._desc_h[(position << 3) + 7]
            if not ((flags >> 7) & 1 == wrap and (flags >> 15) & 1 == wrap):
                break
            count += 1
            position += self._count.get(int(self._desc_np[position]["id"]), 1)
            if position >= self.size:
                position -= self.size
                wrap ^= 1
        return count

    def get_used(self) -> tuple[int, int] | None:
        """Reap one used descriptor: (buffer id, len)."""
        if not self._used_ready():
            return None
        e = self._desc_np[self.last_used]
        bid, ln = int(e["id"]), int(e["len"])
        count = self._count.pop(bid, 1)
        self._free_ids.append(bid)
        self.num_free += count
        p = self.last_used + count
        if p >= self.size:
            p -= self.size
            self.used_wrap ^= 1
        self.last_used = p
        return bid, ln

    def get_used_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """Reap every used descriptor now visible: (ids, lens) arrays."""
        ids: list[int] = []
        lens: list[int] = []
        while True:
            got = self.get_used()
            if got is None:
                break
            ids.append(got[0])
            lens.append(got[1])
        return np.array(ids, dtype=np.uint16), np.array(lens, dtype=np.uint32)

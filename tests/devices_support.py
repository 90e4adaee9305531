"""A bench for the device tests: memfd guest memory, driver-side rings and started vrings.

No daemon: the test plays the driver (vhsm.virtq.driver), the device's
``handle_event`` is called directly, and the call/err eventfds are read back.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from vhsm.backend import EPOLLIN, VhostUserBackend
from vhsm.memory import GuestMemory, GuestMemoryAtomic
from vhsm.virtq import PackedDriver, SplitDriver
from vhsm.vring import VringMutex
from vhsm.wire.payloads import VhostUserMemoryRegion

REGION_SIZE = 1 << 21
UVA_BASE = 0x7F0000000000
RING_GPA = 0x1000
RING_STRIDE = 0x4000
BUF_GPA = 0x100000
RING_PACKED = 1 << 34


def make_memory(regions: int = 2, size: int = REGION_SIZE) -> GuestMemory:
    """``regions`` adjacent memfd regions of ``size`` bytes from guest address 0."""
    table, fds = [], []
    for i in range(regions):
        fd = os.memfd_create("vhsm-devtest", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        table.append(VhostUserMemoryRegion(i * size, size, UVA_BASE + i * size, 0))
        fds.append(fd)
    return GuestMemory.from_table(table, fds)


def eventfd_count(fd: int) -> int:
    """Read (and reset) a non-blocking eventfd's counter; 0 if it was never written."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


class Bench:
    """A device with every queue configured, started and enabled over shared guest memory."""

    def __init__(
        self,
        backend: VhostUserBackend,
        *,
        size: int = 64,
        features: int | None = None,
        packed: bool = False,
        regions: int = 2,
    ) -> None:
        self.backend = backend
        self.memory = make_memory(regions)
        self.atomic = GuestMemoryAtomic(self.memory)
        offered = backend.features()
        # the ring layout is the bench's choice: split unless ``packed``
        self.features = (offered if features is None else features) & ~RING_PACKED
        if packed:
            self.features |= RING_PACKED
        backend.acked_features(self.features)
        event_idx = bool(self.features & (1 << 29))
        self.vrings: list[VringMutex] = []
        self.drivers: list[SplitDriver | PackedDriver] = []
        self.calls: list[int] = []
        self.errs: list[int] = []
        for q in range(backend.num_queues()):
            gpa = RING_GPA + q * RING_STRIDE
            vring = VringMutex(self.atomic, backend.max_queue_size(), index=q)
            vring.set_features(self.features)
            vring.set_queue_size(size)
            drv: SplitDriver | PackedDriver
            if packed:
                drv = PackedDriver.layout(self.memory, size, gpa, event_idx=event_idx)
                vring.set_queue_info(drv.desc_gpa, drv.driver_event_gpa, drv.device_event_gpa)
            else:
                drv = SplitDriver.layout(self.memory, size, gpa, event_idx=event_idx)
                vring.set_queue_info(drv.desc_gpa, drv.avail_gpa, drv.used_gpa)
            call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            vring.set_call(call)
            vring.set_err(err)
            vring.started = vring.enabled = True
            self.vrings.append(vring)
            self.drivers.append(drv)
            self.calls.append(call)
            self.errs.append(err)
        self._next = BUF_GPA

    def close(self) -> None:
        """Close the ring fds and drop the queues (so the memory can be unmapped)."""
        for vring in self.vrings:
            vring.reset()

    def alloc(self, n: int, data: bytes = b"", *, align: int = 8) -> int:
        """Reserve ``n`` bytes of guest memory (optionally filled); returns the address."""
        gpa = (self._next + align - 1) & ~(align - 1)
        if gpa + n > len(self.memory.regions) * REGION_SIZE:
            raise MemoryError("bench guest memory exhausted")
        self._next = gpa + n
        self.memory.write(gpa, data.ljust(n, b"\0") if data else bytes(n), gather=True)
        return gpa

    def alloc_at_border(self, before: int, after: int) -> int:
        """A buffer that starts ``before`` bytes below the first region border."""
        gpa = REGION_SIZE - before
        self.memory.write(gpa, bytes(before + after), gather=True)
        return gpa

    def read(self, gpa: int, n: int) -> bytes:
        """Guest bytes (may span regions)."""
        return self.memory.read(gpa, n, gather=True)

    def kick(self, queue: int) -> None:
        """Deliver a kick to the device, as a worker would."""
        self.backend.handle_event(queue, EPOLLIN, self.vrings, 0)

    def used(self, queue: int) -> list[tuple[int, int]]:
        """Reap every used element of ``queue``."""
        out = []
        while (got := self.drivers[queue].get_used()) is not None:
            out.append(got)
        return out

    def post(
        self, queue: int, readable: Sequence[tuple[int, int]], writable: Sequence[tuple[int, int]]
    ) -> int:
        """Post one chain; returns its head."""
        return self.drivers[queue].add_chain(readable, writable)

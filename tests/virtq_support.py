"""Helpers for the virtqueue tests: memfd guest memory and driver/device ring pairs."""

from __future__ import annotations

import os

from vhsm.memory import GuestMemory
from vhsm.virtq import PackedDriver, PackedQueue, SplitDriver, SplitQueue
from vhsm.wire.payloads import VhostUserMemoryRegion

MEM_SIZE = 1 << 22
UVA_BASE = 0x7F0000000000
RING_GPA = 0x1000
BUF_GPA = 0x100000


def make_memory(size: int = MEM_SIZE, gpa: int = 0) -> GuestMemory:
    fd = os.memfd_create("virtq-test")
    os.ftruncate(fd, size)
    return GuestMemory.from_table([VhostUserMemoryRegion(gpa, size, UVA_BASE, 0)], [fd])


def split_pair(
    mem: GuestMemory, size: int = 8, *, event_idx: bool = False, indirect: bool = True
) -> tuple[SplitDriver, SplitQueue]:
    drv = SplitDriver.layout(mem, size, RING_GPA, event_idx=event_idx)
    q = SplitQueue(
        mem,
        size,
        mem.translate(drv.desc_gpa, 16 * size),
        mem.translate(drv.avail_gpa, 6 + 2 * size),
        mem.translate(drv.used_gpa, 6 + 8 * size),
        event_idx=event_idx,
        indirect=indirect,
    )
    return drv, q


def packed_pair(
    mem: GuestMemory, size: int = 8, *, event_idx: bool = False, indirect: bool = True
) -> tuple[PackedDriver, PackedQueue]:
    drv = PackedDriver.layout(mem, size, RING_GPA, event_idx=event_idx)
    q = PackedQueue(
        mem,
        size,
        mem.translate(drv.desc_gpa, 16 * size),
        mem.translate(drv.driver_event_gpa, 4),
        mem.translate(drv.device_event_gpa, 4),
        event_idx=event_idx,
        indirect=indirect,
    )
    return drv, q

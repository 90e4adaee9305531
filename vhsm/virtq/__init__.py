"""Virtqueues: device-side split and packed rings, descriptor chains, batches, driver side."""

from __future__ import annotations

from vhsm.virtq.batch import Batch
from vhsm.virtq.chain import DescriptorChain
from vhsm.virtq.common import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DirtyLogLike,
    GuestMemoryLike,
    vring_need_event,
)
from vhsm.virtq.driver import PackedDriver, RingFull, SplitDriver
from vhsm.virtq.packed import PackedQueue, packed_area_sizes
from vhsm.virtq.split import SplitQueue, split_area_sizes

__all__ = [
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "Batch",
    "DescriptorChain",
    "DirtyLogLike",
    "GuestMemoryLike",
    "PackedDriver",
    "PackedQueue",
    "RingFull",
    "SplitDriver",
    "SplitQueue",
    "packed_area_sizes",
    "split_area_sizes",
    "vring_need_event",
]

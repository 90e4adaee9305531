"""Virtqueues: device-side split and packed rings, descriptor chains, batches, driver side.

The names below are imported from their modules on first use (they bring
numpy): an idle daemon holds none of them until a front-end starts a ring.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vhsm._lazy import lazy_getattr

if TYPE_CHECKING:
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
    from vhsm.virtq.sink_pass import YIELDED as YIELDED
    from vhsm.virtq.sink_pass import sink_pass_packed as sink_pass_packed
    from vhsm.virtq.sink_pass import sink_pass_split as sink_pass_split
    from vhsm.virtq.split import SplitQueue, split_area_sizes

#: Each public name and the submodule that defines it.
_HOME = {
    "Batch": "batch",
    "DescriptorChain": "chain",
    "VIRTQ_DESC_F_INDIRECT": "common",
    "VIRTQ_DESC_F_NEXT": "common",
    "VIRTQ_DESC_F_WRITE": "common",
    "DirtyLogLike": "common",
    "GuestMemoryLike": "common",
    "vring_need_event": "common",
    "PackedDriver": "driver",
    "RingFull": "driver",
    "SplitDriver": "driver",
    "PackedQueue": "packed",
    "packed_area_sizes": "packed",
    "SplitQueue": "split",
    # the vrings' fused net-sink pass (not exported: vhsm.vring_state reaches it here)
    "YIELDED": "sink_pass",
    "sink_pass_packed": "sink_pass",
    "sink_pass_split": "sink_pass",
    "split_area_sizes": "split",
}


__getattr__ = lazy_getattr(__name__, _HOME, globals())


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

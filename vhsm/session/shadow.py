"""`ShadowDataPlane`: the auditor's stand-in for the daemon's data plane.

The trace auditor replays a recorded session without mapping the guest's
memory. To flag everything the live runtime rejects with the same rule id,
it keeps the memory table's descriptors and checks them with the very
functions `vhsm.memory.GuestMemory` uses (regions valid, no overlap, slots,
a removed region exists) and translates ring addresses through that table
(VU-RING-004). Every fd it receives is closed at once, as `NullDataPlane` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from vhsm.errors import GuestMemoryError
from vhsm.memory import check_added, check_table, without_region
from vhsm.session.dataplane import NullDataPlane
from vhsm.wire import ProtocolFeature, VhostUserMemoryRegion, VhostUserVringAddr


class ShadowDataPlane(NullDataPlane):
    """Keeps the memory table's descriptors (nothing mapped) and checks what the runtime checks.

    Args:
        protocol_features: the session's negotiated protocol features (GPA_ADDRESSES
            makes ring addresses guest-physical: nothing to translate).
    """

    def __init__(self, protocol_features: Callable[[], int] = lambda: 0) -> None:
        self.regions: tuple[VhostUserMemoryRegion, ...] = ()
        self._protocol_features = protocol_features

    def set_mem_table(self, regions: Sequence[VhostUserMemoryRegion], fds: Sequence[int]) -> None:
        """Check the new table as `GuestMemory.from_table` does, then keep it."""
        try:
            check_table("SET_MEM_TABLE", regions, len(fds))
        finally:
            super().set_mem_table(regions, fds)
        self.regions = tuple(regions)

    def add_mem_region(self, region: VhostUserMemoryRegion, fd: int) -> None:
        """Check the region as `GuestMemory.with_region_added` does, then keep it."""
        try:
            check_added("ADD_MEM_REG", self.regions, region)
        finally:
            super().add_mem_region(region, fd)
        self.regions = (*self.regions, region)

    def remove_mem_region(self, region: VhostUserMemoryRegion) -> None:
        """Drop the matching region (VU-MEM-008 when there is none)."""
        self.regions = without_region("REM_MEM_REG", self.regions, region)

    def set_vring_addr(self, index: int, addr: VhostUserVringAddr) -> None:
        """The ring's user addresses must lie in the table (VU-RING-004)."""
        if self._protocol_features() & ProtocolFeature.GPA_ADDRESSES:
            return
        for name in ("desc_user_addr", "avail_user_addr", "used_user_addr"):
            uva = getattr(addr, name)
            inside = (
                r.userspace_addr <= uva < r.userspace_addr + r.memory_size for r in self.regions
            )
            if not any(inside):
                raise GuestMemoryError(f"ring {index}: {name} {uva:#x} is in no memory region")

"""`DataPlane`: the effects a `Session` asks for, implemented by the daemon.

The session is sans-IO: it validates a message and decides what must happen;
the data plane maps memory, configures rings and flips their flags. Every
method that receives an fd owns it from then on and must close it eventually.
`NullDataPlane` closes fds at once and remembers nothing: the auditor and
tests of the protocol alone use it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from vhsm.wire.payloads import (
        VhostUserInflight,
        VhostUserLog,
        VhostUserMemoryRegion,
        VhostUserVringAddr,
    )


class DataPlane(Protocol):
    """What the session needs from the layer that touches guest memory and rings."""

    def set_mem_table(self, regions: Sequence[VhostUserMemoryRegion], fds: Sequence[int]) -> None:
        """Replace the whole memory table (raises GuestMemoryError/WireError on bad regions)."""

    def add_mem_region(self, region: VhostUserMemoryRegion, fd: int) -> None:
        """Map one more region (ADD_MEM_REG; the session checked the slot limit)."""

    def remove_mem_region(self, region: VhostUserMemoryRegion) -> None:
        """Unmap the region matching GPA, user address and size (REM_MEM_REG)."""

    def set_log_base(self, log: VhostUserLog, fd: int) -> None:
        """Install the dirty-page log area."""

    def set_log_fd(self, fd: int) -> None:
        """Install the eventfd signalled after log updates."""

    def set_features(self, acked: int) -> None:
        """Apply the acked virtio features (ring layout, event idx, LOG_ALL)."""

    def set_vring_num(self, index: int, num: int) -> None:
        """Set a ring's size."""

    def set_vring_addr(self, index: int, addr: VhostUserVringAddr) -> None:
        """Set a ring's addresses (raises GuestMemoryError when not mapped)."""

    def set_vring_base(self, index: int, base: int) -> None:
        """Set a ring's base (next avail index; packed: indices and wrap counters)."""

    def get_vring_base(self, index: int) -> int:
        """Return the base of a ring that was just stopped."""

    def needs_reset(self) -> bool:
        """Whether a ring is broken (GET_STATUS then reports DEVICE_NEEDS_RESET)."""

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """Install a kick eventfd (None: poll the ring)."""

    def set_vring_call(self, index: int, fd: int | None) -> None:
        """Install a call eventfd (None: the front-end polls)."""

    def set_vring_err(self, index: int, fd: int | None) -> None:
        """Install an error eventfd (None: no error notification)."""

    def start_vring(self, index: int) -> None:
        """Mark a ring started and process what is already available."""

    def stop_vring(self, index: int) -> None:
        """Mark a ring stopped, drain in-flight work and drop its kick and call fds."""

    def enable_vring(self, index: int, enabled: bool) -> None:
        """Flip a ring's enabled flag."""

    def kick_vring(self, index: int) -> None:
        """An in-band kick (VRING_KICK) for a started ring."""

    def set_backend_req_fd(self, fd: int) -> None:
        """Install (or replace) the back-end request channel socket."""

    def get_inflight_fd(self, desc: VhostUserInflight) -> tuple[VhostUserInflight, int]:
        """Allocate the inflight buffer; return its description and fd."""

    def set_inflight_fd(self, desc: VhostUserInflight, fd: int) -> None:
        """Adopt the inflight buffer handed back after a reconnect."""

    def reset_vring(self, index: int) -> None:
        """Return a ring to its initial state and drop its fds (RESET_DEVICE)."""


class NullDataPlane:
    """A data plane with no data: closes every fd it receives, keeps nothing."""

    def set_mem_table(self, regions: Sequence[VhostUserMemoryRegion], fds: Sequence[int]) -> None:
        """Close the region fds."""
        for fd in fds:
            os.close(fd)

    def add_mem_region(self, region: VhostUserMemoryRegion, fd: int) -> None:
        """Close the region fd."""
        os.close(fd)

    def remove_mem_region(self, region: VhostUserMemoryRegion) -> None:
        """Nothing is mapped."""

    def set_log_base(self, log: VhostUserLog, fd: int) -> None:
        """Close the log fd."""
        os.close(fd)

    def set_log_fd(self, fd: int) -> None:
        """Close the eventfd."""
        os.close(fd)

    def set_features(self, acked: int) -> None:
        """Nothing to apply."""

    def set_vring_num(self, index: int, num: int) -> None:
        """Nothing to configure."""

    def set_vring_addr(self, index: int, addr: VhostUserVringAddr) -> None:
        """Nothing to translate."""

    def set_vring_base(self, index: int, base: int) -> None:
        """Nothing to configure."""

    def get_vring_base(self, index: int) -> int:
        """Return 0: no ring state is kept."""
        return 0

    def needs_reset(self) -> bool:
        """No rings, none broken."""
        return False

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """Close the eventfd."""
        if fd is not None:
            os.close(fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        """Close the eventfd."""
        if fd is not None:
            os.close(fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        """Close the eventfd."""
        if fd is not None:
            os.close(fd)

    def start_vring(self, index: int) -> None:
        """No ring to start."""

    def stop_vring(self, index: int) -> None:
        """No ring to stop."""

    def enable_vring(self, index: int, enabled: bool) -> None:
        """No ring to flip."""

    def kick_vring(self, index: int) -> None:
        """No ring to kick."""

    def set_backend_req_fd(self, fd: int) -> None:
        """Close the socket."""
        os.close(fd)

    def get_inflight_fd(self, desc: VhostUserInflight) -> tuple[VhostUserInflight, int]:
        """Answer with an empty memfd of the requested geometry (nothing tracked)."""
        fd = os.memfd_create("vhsm-inflight-null", os.MFD_CLOEXEC)
        return desc, fd

    def set_inflight_fd(self, desc: VhostUserInflight, fd: int) -> None:
        """Close the buffer fd."""
        os.close(fd)

    def reset_vring(self, index: int) -> None:
        """No ring to reset."""

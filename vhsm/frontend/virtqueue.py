"""A driver-side virtqueue of the front-end: rings in guest memory, kick and call eventfds.

Wraps `vhsm.virtq.SplitDriver` / `PackedDriver` with what a VMM adds: the
eventfds handed over in SET_VRING_KICK / SET_VRING_CALL / SET_VRING_ERR,
indirect tables allocated in guest memory, and a blocking `wait_used` that
polls the call eventfd with a timeout.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import Sequence

from vhsm.frontend.memory import FrontendMemory
from vhsm.virtq import PackedDriver, SplitDriver

Buffers = Sequence[tuple[int, int]]

#: Default seconds to wait for a used element.
DEFAULT_TIMEOUT = 5.0


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


class Virtqueue:
    """One ring as the front-end (the guest's driver) sees it."""

    def __init__(
        self,
        memory: FrontendMemory,
        index: int,
        size: int,
        *,
        packed: bool = False,
        event_idx: bool = False,
        region: int | None = None,
    ) -> None:
        self.memory = memory
        self.index = index
        self.size = size
        self.packed = packed
        self.driver: SplitDriver | PackedDriver
        footprint = (PackedDriver if packed else SplitDriver).footprint(size)
        self.ring_gpa = memory.alloc(footprint, align=4096, region=region)
        if packed:
            self.driver = PackedDriver.layout(memory, size, self.ring_gpa, event_idx=event_idx)
        else:
            self.driver = SplitDriver.layout(memory, size, self.ring_gpa, event_idx=event_idx)
        self.kick_fd = _eventfd()
        self.call_fd = _eventfd()
        self.err_fd = _eventfd()
        #: The base last returned by GET_VRING_BASE (None while running).
        self.base: int | None = None
        self._indirect: dict[int, int] = {}

    # --- addresses for SET_VRING_ADDR ---------------------------------------------
    @property
    def desc_gpa(self) -> int:
        """Descriptor table / descriptor ring."""
        return self.driver.desc_gpa

    @property
    def avail_gpa(self) -> int:
        """Available ring (split) or driver event suppression area (packed)."""
        d = self.driver
        return d.driver_event_gpa if isinstance(d, PackedDriver) else d.avail_gpa

    @property
    def used_gpa(self) -> int:
        """Used ring (split) or device event suppression area (packed)."""
        d = self.driver
        return d.device_event_gpa if isinstance(d, PackedDriver) else d.used_gpa

    def initial_base(self) -> int:
        """The SET_VRING_BASE value of a fresh ring (§5.3): 0, or both wrap counters set."""
        return 0x8000_8000 if self.packed else 0

    def resume_base(self) -> int:
        """The base to resume at after a disconnect: the used index in guest memory (§7.17)."""
        if self.base is not None:
            return self.base
        d = self.driver
        if isinstance(d, PackedDriver):
            used = d.last_used | d.used_wrap << 15
            return used | used << 16
        return int.from_bytes(self.memory.read(d.used_gpa + 2, 2), "little")

    # --- posting and kicking --------------------------------------------------------
    def post(self, readable: Buffers, writable: Buffers = (), *, indirect: bool = False) -> int:
        """Post one chain of (gpa, length) buffers; return its head index / buffer id."""
        if not indirect:
            return self.driver.add_chain(readable, writable)
        table = self.memory.alloc(16 * (len(readable) + len(writable)), align=16)
        try:
            head = self.driver.add_chain(readable, writable, indirect_gpa=table, memory=self.memory)
        except Exception:
            self.memory.free(table)
            raise
        self._indirect[head] = table
        return head

    def kick(self, *, force: bool = False) -> bool:
        """Signal the kick eventfd unless the device suppressed kicks; return whether kicked."""
        needed = self.driver.kick_needed()
        if needed or force:
            os.eventfd_write(self.kick_fd, 1)
        return needed or force

    def get_used(self) -> tuple[int, int] | None:
        """Reap one used element (head / id, bytes written) if there is one."""
        got = self.driver.get_used()
        if got is not None:
            table = self._indirect.pop(got[0], None)
            if table is not None:
                self.memory.free(table)
        return got

    def wait_used(self, timeout: float = DEFAULT_TIMEOUT) -> tuple[int, int]:
        """Wait for the next used element, polling the call eventfd; TimeoutError if none."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.get_used()
            if got is not None:
                return got
            if self.driver.enable_interrupts():
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"ring {self.index}: no used buffer within {timeout} s")
            readable, _, _ = select.select([self.call_fd], [], [], min(left, 0.05))
            if readable:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self.call_fd)

    def error_signalled(self) -> bool:
        """Whether the back-end wrote the error eventfd (consumes the signal)."""
        try:
            os.eventfd_read(self.err_fd)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        """Close the eventfds (guest memory stays with the front-end)."""
        for fd in (self.kick_fd, self.call_fd, self.err_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

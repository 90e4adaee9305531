"""A driver-side virtqueue of the front-end: rings in guest memory, kick and call eventfds.

Wraps `vhsm.virtq.SplitDriver` / `PackedDriver` with what a VMM adds: the
eventfds handed over in SET_VRING_KICK / SET_VRING_CALL / SET_VRING_ERR,
indirect tables allocated in guest memory, and a blocking `wait_used` that
polls the call eventfd with a timeout.

`wait_used` is strict by default: a real guest driver sleeps until the device
signals the call eventfd, so a used element the driver was owed a call for
(interrupts enabled; with event-idx, the element that crosses the driver's
used event) fails the wait when that call never comes, instead of passing
because the ring happened to be polled. Elements already visible when the
driver re-enabled interrupts are not owed a call (the device may have
published them before it could see the request).
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import Sequence

from vhsm.errors import VhsmError
from vhsm.frontend.memory import FrontendMemory
from vhsm.virtq import PackedDriver, SplitDriver
from vhsm.wire.enums import PACKED_BASE_INITIAL

Buffers = Sequence[tuple[int, int]]

#: Default seconds to wait for a used element.
DEFAULT_TIMEOUT = 5.0


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


class MissedNotification(VhsmError, TimeoutError):
    """A used element arrived without the call the driver was owed (the device never signalled)."""


class Virtqueue:
    """One ring as the front-end (the guest's driver) sees it.

    Args:
        memory: Guest memory the ring and indirect tables are allocated in.
        index: The ring's index in the device.
        size: Ring size.
        packed: Lay out a packed ring instead of a split one.
        event_idx: VIRTIO_RING_F_EVENT_IDX was negotiated.
        region: The memory region to allocate the ring in (default: any).
        strict: `wait_used` fails when the device skips a call it owed the driver.
    """

    def __init__(
        self,
        memory: FrontendMemory,
        index: int,
        size: int,
        *,
        packed: bool = False,
        event_idx: bool = False,
        region: int | None = None,
        strict: bool = True,
    ) -> None:
        self.memory = memory
        self.index = index
        self.size = size
        self.packed = packed
        self.event_idx = event_idx
        self.strict = strict
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
        # Used elements are numbered in the order they are reaped (0, 1, ...).
        self._reaped = 0  # how many were taken from the ring
        self._owed_from = 0  # interrupts on since: elements from this number on are owed a call
        self._free_below = 0  # visible before the driver re-enabled interrupts: not owed
        self._covered = 0  # a call was seen after elements below this number were visible
        self.driver.enable_interrupts()

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
        """The SET_VRING_BASE value of a fresh ring: 0, or both wrap counters set."""
        return PACKED_BASE_INITIAL if self.packed else 0

    def resume_base(self) -> int:
        """The base to resume at after a disconnect: the used index in guest memory."""
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
        """Reap one used element (head / id, bytes written) if there is one (no call check)."""
        got = self.driver.get_used()
        if got is None:
            return None
        self._reaped += 1
        return self._release(*got)

    def wait_used(self, timeout: float = DEFAULT_TIMEOUT) -> tuple[int, int]:
        """Wait for the next used element, as a driver sleeping on the call eventfd would.

        Returns (head / id, bytes written). TimeoutError when nothing is used in
        time; with `strict` (the default), `MissedNotification` when an element
        the driver was owed a call for arrives and the call does not come within
        a timeout of its own.
        """
        deadline = time.monotonic() + timeout
        while True:
            self._consume_call()
            number = self._reaped
            got = self.get_used()
            if got is not None:
                missed = self.strict and self._owed(number) and number >= self._covered
                if missed and not self._wait_call(time.monotonic() + timeout):
                    raise MissedNotification(
                        f"ring {self.index}: used element {got[0]} arrived but the device "
                        "never signalled the call eventfd the driver was owed "
                        f"({self._owed_reason()}); a real guest would wait forever. Does "
                        "the back-end call signal_used_queue() after add_used()? "
                        "(strict=False on the Frontend, or the frontend fixture, turns "
                        "this check off)"
                    )
                return got
            if self.driver.enable_interrupts():
                # Visible before the request could be seen: not owed a call.
                self._free_below = self._visible()
                continue
            self._owed_from = self._reaped
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"ring {self.index}: no used buffer within {timeout} s")
            select.select([self.call_fd], [], [], min(left, 0.05))

    def _owed(self, number: int) -> bool:
        """Whether the device owed the driver a call for used element `number`."""
        if number < self._free_below:
            return False
        # Without event-idx every element past the enable is owed a call (one call may
        # cover several); with event-idx only the one that crosses the used event.
        return number == self._owed_from if self.event_idx else number >= self._owed_from

    def _owed_reason(self) -> str:
        if self.event_idx:
            return "event-idx: it crossed the used event the driver set"
        return "interrupts were enabled"

    def _visible(self) -> int:
        """How many used elements were visible so far (reaped or not)."""
        return self._reaped + self.driver.pending_used()

    def _consume_call(self) -> bool:
        """Read the call eventfd; a call covers every element visible now."""
        try:
            os.eventfd_read(self.call_fd)
        except BlockingIOError:
            return False
        self._covered = max(self._covered, self._visible())
        return True

    def _wait_call(self, deadline: float) -> bool:
        """Wait for the call eventfd until `deadline`."""
        while not self._consume_call():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            select.select([self.call_fd], [], [], min(left, 0.05))
        return True

    def _release(self, head: int, length: int) -> tuple[int, int]:
        table = self._indirect.pop(head, None)
        if table is not None:
            self.memory.free(table)
        return head, length

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

"""`DevicePlane`: the daemon's `DataPlane`, where the session's decisions touch memory and rings.

It owns the vrings (the back-end picks the class with a `vring_class`
attribute: `VringMutex` by default, `VringRwLock` or `VringState`), the
worker event loops, the dirty log, the inflight buffer and the back-end
channel. It runs on the connection's control thread; anything a worker might
be using at the same time is changed inside `VringEpollHandler.paused()`.
Lifecycle hooks (`ring_started` ...) that raise are logged, never fatal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from vhsm.dirtylog import LOG_PAGE_SHIFT, DirtyLog
from vhsm.errors import BackendError, GuestMemoryError, VirtqError, WireError
from vhsm.fdcheck import take_notifier, take_stream_socket
from vhsm.memory import GuestMemory, GuestMemoryAtomic, shrunk_mappings
from vhsm.vring import VringMutex
from vhsm.wire import ProtocolFeature, VirtioFeature
from vhsm.worker import VringEpollHandler

if TYPE_CHECKING:
    from vhsm import inflight
    from vhsm.backend import VhostUserBackend
    from vhsm.backend_channel import BackendChannel
    from vhsm.session import Session
    from vhsm.wire.payloads import (
        VhostUserInflight,
        VhostUserLog,
        VhostUserMemoryRegion,
        VhostUserVringAddr,
    )

log = logging.getLogger(__name__)

#: A dirty log may cover at most this many times the highest guest address of the
#: memory table (room for RAM the front-end logs but does not share, such as video
#: memory in the PCI hole, and for growth), and never less than LOG_COVER_FLOOR bytes
#: of guest-physical space (rule VU-MEM-015).
LOG_COVER_FACTOR = 4
LOG_COVER_FLOOR = 1 << 40


class DevicePlane:
    """Implements `vhsm.session.DataPlane` over `GuestMemoryAtomic`, vrings and workers.

    Args:
        backend: the device (hooks, `queues_per_thread`, optional `vring_class` and
            `process_disabled_rings` class attributes).
        memory: the guest memory holder shared with the device.
    """

    def __init__(self, backend: VhostUserBackend, memory: GuestMemoryAtomic) -> None:
        self.backend = backend
        self.memory = memory
        self.num_queues = backend.num_queues()
        vring_class: Any = getattr(backend, "vring_class", None) or VringMutex
        self.vrings: list[Any] = [
            vring_class(memory, backend.max_queue_size(), index=index)
            for index in range(self.num_queues)
        ]
        self.process_disabled = bool(getattr(backend, "process_disabled_rings", False))
        self.handlers: list[VringEpollHandler] = []
        self._handler_of: dict[int, VringEpollHandler] = {}
        for thread_id, queues in enumerate(backend.queues_per_thread()):
            handler = VringEpollHandler(
                backend,
                self.vrings,
                queues,
                thread_id,
                exit_fd=backend.exit_event(thread_id),
                is_active=self.ring_active,
                on_error=self.ring_error,
            )
            self.handlers.append(handler)
            for index in queues:
                if not 0 <= index < self.num_queues or index in self._handler_of:
                    raise BackendError(f"queues_per_thread: bad or repeated queue {index}")
                self._handler_of[index] = handler
        missing = set(range(self.num_queues)) - set(self._handler_of)
        if missing:
            raise BackendError(f"queues_per_thread leaves queues {sorted(missing)} unserved")
        backend.set_vring_workers(list(self.handlers))
        self._session: Session | None = None
        self._acked = 0
        self._addrs: dict[int, VhostUserVringAddr] = {}
        self._log: DirtyLog | None = None
        self._log_fd: int | None = None
        self._channel: BackendChannel | None = None
        self._inflight: inflight.InflightBuffer | None = None
        self._inflight_fds: list[int] = []
        self._workers_running = False
        self._lost: str | None = None
        self._lost_lock = threading.Lock()
        #: Called (once per session, from any thread) when a mapped file shrank.
        self.on_mapping_lost: Callable[[str], None] | None = None

    # --- daemon side ---------------------------------------------------------------
    def attach(self, session: Session) -> None:
        """Bind to the session of a new connection (for its negotiated features)."""
        self._session = session

    @property
    def protocol_features(self) -> int:
        """The protocol features the current session negotiated."""
        return self._session.acked_protocol_features if self._session is not None else 0

    def start_workers(self) -> None:
        """Start one thread per worker event loop."""
        for handler in self.handlers:
            handler.start()
        self._workers_running = True

    def stop_workers(self) -> None:
        """Stop and join the worker threads."""
        if not self._workers_running:
            return
        for handler in self.handlers:
            handler.signal_exit()
        for handler in self.handlers:
            handler.join()
        self._workers_running = False

    def ring_active(self, index: int) -> bool:
        """Whether a kick on ring `index` may reach the device (worker side, lock-free).

        Not while the ring has no queue (started before its size and addresses
        were set, or its areas left the memory table: rule VU-RING-011), and
        never once a mapped file shrank (`mapping_lost`): touching it would SIGBUS.
        """
        vring = self.vrings[index]
        if not (vring.started and (vring.enabled or self.process_disabled) and vring.configured):
            return False
        return self.mapping_lost() is None

    def mapping_lost(self) -> str | None:
        """Why guest memory may no longer be touched (VU-FD-004), or None.

        Files that could be sealed against shrinking never get here; an unsealable
        one (a tmpfs or hugetlbfs file, a memfd without sealing) is re-checked on
        every dispatch and before every request. The first time a shrink is seen,
        `on_mapping_lost` is called with the reason (the daemon ends the session).
        """
        if self._lost is None:
            shrunk = shrunk_mappings()
            if not shrunk:
                return None
            with self._lost_lock:
                if self._lost is not None:
                    return self._lost
                from vhsm.session.rules import rule

                self._lost = f"VU-FD-004: {shrunk[0]} ({rule('VU-FD-004').statement})"
            if self.on_mapping_lost is not None:
                self.on_mapping_lost(self._lost)
        return self._lost

    @property
    def suspended(self) -> bool:
        """Whether every ring is stopped (VU-STATE-007): no back-end-channel messages then."""
        return not any(vring.started for vring in self.vrings)

    def ring_error(self, index: int | None, exc: BaseException) -> None:
        """A hook raised while serving ring `index`: signal its err fd (or in-band VRING_ERR)."""
        if index is None:
            return
        try:
            self.vrings[index].signal_err()
        except BackendError as err:
            log.warning("ring %d: in-band VRING_ERR failed: %s", index, str(err))

    def reset(self) -> None:
        """Drop everything tied to the session: rings, fds, log, channel, inflight, memory."""
        for index in range(self.num_queues):
            self._drop_ring(index, started_hook=True)
        self._acked = 0
        self._addrs.clear()
        self._close_log()
        for vring in self.vrings:
            vring.set_features(0)
            vring.set_backend_channel(None)
        if self._channel is not None:
            self._channel.close()
            self._channel = None
            _hook(self.backend.set_backend_req_fd, None)
        self._close_inflight()
        with self._all_paused():
            self.memory.replace(GuestMemory.empty())
        self._session = None
        self._lost = None  # the shrunk mappings are closed with the memory

    def close(self) -> None:
        """Reset and release the workers' own resources (after `stop_workers`)."""
        self.reset()
        for handler in self.handlers:
            handler.close()

    # --- DataPlane: memory -----------------------------------------------------------
    def set_mem_table(self, regions: Sequence[VhostUserMemoryRegion], fds: Sequence[int]) -> None:
        """Map a whole new table and switch to it."""
        new = GuestMemory.from_table(regions, fds, mapper=self.memory.mapper)
        self._switch_memory(new)

    def add_mem_region(self, region: VhostUserMemoryRegion, fd: int) -> None:
        """Map one more region."""
        current = self.memory.memory()
        self._switch_memory(current.with_region_added(region, fd, mapper=self.memory.mapper))

    def remove_mem_region(self, region: VhostUserMemoryRegion) -> None:
        """Unmap the matching region."""
        self._switch_memory(self.memory.memory().with_region_removed(region))

    def _switch_memory(self, new: GuestMemory) -> None:
        with self._all_paused():
            self.memory.replace(new)
            for index in sorted(self._addrs):
                try:
                    self._apply_addr(index)
                except GuestMemoryError as err:
                    log.warning(
                        "ring %d: addresses not mapped by the new table: %s", index, str(err)
                    )
                    self.vrings[index].update_memory()
        _hook(self.backend.update_memory, self.memory)
        _hook(self.backend.memory_updated)

    def set_log_base(self, log_desc: VhostUserLog, fd: int) -> None:
        """Install the dirty log (replacing any older one).

        Raises:
            GuestMemoryError: the log is far larger than the memory table can need
                (VU-MEM-015; the fd is closed), or cannot be mapped.
        """
        end = max((r.gpa_end for r in self.memory.memory().regions), default=0)
        limit = max(LOG_COVER_FACTOR * end, LOG_COVER_FLOOR) >> (LOG_PAGE_SHIFT + 3)
        if log_desc.mmap_size > limit:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise GuestMemoryError(
                f"SET_LOG_BASE: a log of {log_desc.mmap_size:#x} bytes; the memory table ends"
                f" at {end:#x}, so at most {limit:#x} bytes are accepted",
                "VU-MEM-015",
            )
        new = DirtyLog.from_fd(log_desc, fd)
        with self._all_paused():
            self._close_log()
            self._log = new
            if self._log_fd is not None:
                new.set_log_fd(self._log_fd)
                self._log_fd = None
            for vring in self.vrings:
                vring.set_log(new)

    def set_log_fd(self, fd: int) -> None:
        """Install the log eventfd (kept until a log exists); VU-FD-001 if it is not one."""
        take_notifier(fd, "SET_LOG_FD", "write")
        if self._log is not None:
            self._log.set_log_fd(fd)
            return
        if self._log_fd is not None:
            os.close(self._log_fd)
        self._log_fd = fd

    # --- DataPlane: features and rings --------------------------------------------
    def set_features(self, acked: int) -> None:
        """Apply the acked virtio features to every ring."""
        self._acked = acked
        with self._all_paused():
            for vring in self.vrings:
                vring.set_features(acked)

    def set_vring_num(self, index: int, num: int) -> None:
        """Set the ring size."""
        self.vrings[index].set_queue_size(num)

    def set_vring_addr(self, index: int, addr: VhostUserVringAddr) -> None:
        """Store the raw addresses and translate them through the current table."""
        self._addrs[index] = addr
        with self._paused(index):
            self._apply_addr(index)
        if self.ring_active(index):
            self._handler_of[index].rescan(index)  # kicks ignored while it had no addresses

    def _apply_addr(self, index: int) -> None:
        addr = self._addrs[index]
        gpa_addresses = self.protocol_features & ProtocolFeature.GPA_ADDRESSES
        memory = self.memory.memory()
        if gpa_addresses:
            desc, avail, used = addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr
        else:
            desc = memory.uva_to_gpa(addr.desc_user_addr)
            avail = memory.uva_to_gpa(addr.avail_user_addr)
            used = memory.uva_to_gpa(addr.used_user_addr)
        log_addr = addr.log_guest_addr if addr.flags & 0x1 else None
        self.vrings[index].set_queue_info(desc, avail, used, log_addr)

    def set_vring_base(self, index: int, base: int) -> None:
        """Set the next avail index (packed: with wrap counters)."""
        self.vrings[index].set_queue_base(base)

    def get_vring_base(self, index: int) -> int:
        """The base of a stopped ring."""
        return int(self.vrings[index].get_queue_base())

    def needs_reset(self) -> bool:
        """Whether a ring is marked broken (reported as DEVICE_NEEDS_RESET by GET_STATUS)."""
        return any(getattr(vring, "broken", None) is not None for vring in self.vrings)

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """Watch the new kick fd (None: poll the ring) and close the old one.

        A kick fd must be an eventfd (or pipe) open for reading (VU-FD-001); any
        other fd is closed and refused, and the ring keeps the kick it had, so a
        started ring stays served.
        """
        if fd is not None:
            take_notifier(fd, "SET_VRING_KICK", "read")
        handler = self._handler_of[index]
        try:
            handler.set_kick(index, fd, polled=fd is None)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.close(fd)  # type: ignore[arg-type]
            raise WireError(
                "SET_VRING_KICK", "fd", fd, f"a pollable eventfd ({err.strerror})", "VU-RING-008"
            ) from err
        self.vrings[index].set_kick(fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        """Install the call fd (the old one is closed by the vring); VU-FD-001 if unusable."""
        if fd is not None:
            take_notifier(fd, "SET_VRING_CALL", "write")
        self.vrings[index].set_call(fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        """Install the err fd; VU-FD-001 if it is not a writable eventfd."""
        if fd is not None:
            take_notifier(fd, "SET_VRING_ERR", "write")
        self.vrings[index].set_err(fd)

    def start_vring(self, index: int) -> None:
        """Mark the ring started; resubmit inflight requests; process what is available."""
        vring = self.vrings[index]
        error: VirtqError | None = None
        with self._paused(index):
            if self._inflight is not None and index < self._inflight.num_queues:
                try:
                    resubmitted = vring.set_inflight(self._inflight.queue(index))
                    if resubmitted:
                        log.info(
                            "ring %d: %d requests resubmitted from the inflight region",
                            index,
                            resubmitted,
                        )
                except VirtqError as err:  # the ring runs untracked; the front-end is told
                    log.warning("ring %d: inflight buffer not usable: %s", index, str(err))
                    error = err
            vring.started = True
        if not vring.configured:
            self._note(
                "VU-RING-011",
                f"ring {index} started without a size and addresses: its kicks are ignored "
                "until SET_VRING_ADDR sets them",
            )
        if error is not None:
            self.ring_error(index, error)
        _hook(self.backend.ring_started, index)
        if self.ring_active(index):
            self._handler_of[index].rescan(index)

    def stop_vring(self, index: int) -> None:
        """Drain the worker, mark the ring stopped and drop its kick and call fds."""
        handler = self._handler_of[index]
        with handler.paused():
            was_started = bool(self.vrings[index].started)
            self.vrings[index].started = False
            handler.set_kick(index, None)
            self.vrings[index].set_kick(None)
            self.vrings[index].set_call(None)
        if was_started:
            _hook(self.backend.ring_stopped, index)

    def enable_vring(self, index: int, enabled: bool) -> None:
        """Flip the enabled flag; re-enabling rescans the ring (kicks lost while disabled)."""
        vring = self.vrings[index]
        with self._paused(index):
            vring.enabled = enabled
        _hook(self.backend.ring_enabled if enabled else self.backend.ring_disabled, index)
        if enabled and self.ring_active(index):
            self._handler_of[index].rescan(index)

    def kick_vring(self, index: int) -> None:
        """In-band kick: have the ring's worker dispatch it."""
        self._handler_of[index].rescan(index)

    def reset_vring(self, index: int) -> None:
        """Back to the initial state, fds dropped (RESET_DEVICE)."""
        self._drop_ring(index, started_hook=True)
        self._addrs.pop(index, None)

    def _drop_ring(self, index: int, *, started_hook: bool) -> None:
        handler = self._handler_of[index]
        vring = self.vrings[index]
        with handler.paused():
            was_started = bool(vring.started)
            was_enabled = bool(vring.enabled)
            vring.started = False
            vring.enabled = False
            handler.set_kick(index, None)
            vring.reset()
        if was_started and started_hook:
            _hook(self.backend.ring_stopped, index)
        if was_enabled:
            _hook(self.backend.ring_disabled, index)

    # --- DataPlane: back-end channel and inflight -----------------------------------
    def set_backend_req_fd(self, fd: int) -> None:
        """Wrap the socket in a `BackendChannel` and hand it to the device.

        Anything but a unix stream socket is closed and refused (VU-FD-002).
        """
        sock = take_stream_socket(fd, "SET_BACKEND_REQ_FD")
        if self._channel is not None:
            self._channel.close()
        from vhsm.backend_channel import BackendChannel

        self._channel = BackendChannel(
            sock.detach(), lambda: self.protocol_features, suspended=lambda: self.suspended
        )
        inband = self.protocol_features & ProtocolFeature.INBAND_NOTIFICATIONS
        for vring in self.vrings:
            vring.set_backend_channel(self._channel if inband else None)
        _hook(self.backend.set_backend_req_fd, self._channel)

    @property
    def backend_channel(self) -> BackendChannel | None:
        """The current back-end request channel, if the front-end gave one."""
        return self._channel

    def get_inflight_fd(self, desc: VhostUserInflight) -> tuple[VhostUserInflight, int]:
        """Allocate a zeroed inflight buffer; the fd is kept here and closed on reset."""
        from vhsm import inflight  # numpy: only for front-ends that track inflight requests

        packed = bool(self._acked & VirtioFeature.RING_PACKED)
        reply, fd = inflight.allocate(desc.num_queues, desc.queue_size, packed)
        # The previous buffer's reply is long sent: the front-end holds it, we need not.
        for old in self._inflight_fds:
            with contextlib.suppress(OSError):
                os.close(old)
        self._inflight_fds[:] = [fd]
        return reply, fd

    def set_inflight_fd(self, desc: VhostUserInflight, fd: int) -> None:
        """Map the buffer handed back; rings resubmit its in-flight requests when started."""
        from vhsm import inflight

        packed = bool(self._acked & VirtioFeature.RING_PACKED)
        buffer = inflight.attach(desc, fd, packed=packed)
        self._close_inflight(keep_fds=True)
        self._inflight = buffer

    # --- helpers ---------------------------------------------------------------------
    def _note(self, rule_id: str, detail: str) -> None:
        """Record a warned-about rule on the session (one log line with the rule)."""
        if self._session is not None:
            self._session.note(rule_id, detail)
        else:
            log.warning("%s: %s", rule_id, detail)

    @contextlib.contextmanager
    def _paused(self, index: int) -> Iterator[None]:
        with self._handler_of[index].paused():
            yield

    @contextlib.contextmanager
    def _all_paused(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for handler in self.handlers:
                stack.enter_context(handler.paused())
            yield

    def _close_log(self) -> None:
        if self._log is not None:
            for vring in self.vrings:
                vring.set_log(None)
            self._log.close()
            self._log = None
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None

    def _close_inflight(self, *, keep_fds: bool = False) -> None:
        if self._inflight is not None:
            for vring in self.vrings:
                vring.set_inflight(None)
            self._inflight.close()
            self._inflight = None
        if not keep_fds:
            for fd in self._inflight_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._inflight_fds.clear()


def _hook(hook: Callable[..., object], *args: object) -> None:
    """Call a device hook; log (never propagate) what it raises."""
    try:
        hook(*args)
    except Exception:
        name = getattr(hook, "__name__", repr(hook))
        log.exception("back-end hook %s%r failed", name, args)


__all__ = ["DevicePlane"]

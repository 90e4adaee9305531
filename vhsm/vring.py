"""Vrings with rust-vmm's names: `VringState`, `VringMutex`, `VringRwLock`, and `VringT`.

`VringState` (in `vhsm.vring_state`) is one virtqueue with its fds and flags;
`VringMutex` puts it behind one lock, `VringRwLock` behind a read-write lock,
and both offer the same operations under the right side of their lock. `VringT`
is what devices and the daemon may call on either.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from vhsm.errors import VirtqError
from vhsm.memory import GuestMemory, GuestMemoryAtomic
from vhsm.vring_state import VringState
from vhsm.wire.enums import MAX_QUEUE_SIZE

if TYPE_CHECKING:
    import numpy as np

    from vhsm.virtq.batch import Batch
    from vhsm.virtq.chain import DescriptorChain
    from vhsm.virtq.common import DirtyLogLike
    from vhsm.virtq.sink_pass import SinkPass

__all__ = ["RwLock", "VringMutex", "VringRwLock", "VringState", "VringT"]


class _Guard:
    """Context manager yielding the state while ``lock`` is held."""

    __slots__ = ("_lock", "_state")

    def __init__(self, lock: Any, state: VringState) -> None:
        self._lock = lock
        self._state = state

    def __enter__(self) -> VringState:
        self._lock.__enter__()
        return self._state

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._lock.__exit__(exc_type, exc, tb)


class RwLock:
    """A writer-preferring read-write lock (``read`` and ``write`` are context managers)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0
        self.read = _RwSide(self, write=False)
        self.write = _RwSide(self, write=True)

    def acquire_read(self) -> None:
        """Block until no writer holds or waits for the lock."""
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        """Release a read hold."""
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        """Block until no reader or writer holds the lock."""
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True

    def release_write(self) -> None:
        """Release the write hold."""
        with self._cond:
            self._writer = False
            self._cond.notify_all()


class _RwSide:
    __slots__ = ("_rw", "_write")

    def __init__(self, rw: RwLock, *, write: bool) -> None:
        self._rw = rw
        self._write = write

    def __enter__(self) -> None:
        if self._write:
            self._rw.acquire_write()
        else:
            self._rw.acquire_read()

    def __exit__(self, *exc: object) -> None:
        if self._write:
            self._rw.release_write()
        else:
            self._rw.release_read()


class _SharedVring:
    """Convenience methods shared by VringMutex and VringRwLock: each takes the lock once."""

    _state: VringState
    _rlock: Any
    _wlock: Any

    def get_ref(self) -> _Guard:
        """``with vring.get_ref() as state:`` shared access."""
        return _Guard(self._rlock, self._state)

    def get_mut(self) -> _Guard:
        """``with vring.get_mut() as state:`` exclusive access."""
        return _Guard(self._wlock, self._state)

    # plain flags: written by the control thread, read lock-free by workers
    @property
    def enabled(self) -> bool:
        """SET_VRING_ENABLE flag."""
        return self._state.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._state.enabled = value

    @property
    def started(self) -> bool:
        """Started flag (kick fd set / kicked; cleared by GET_VRING_BASE)."""
        return self._state.started

    @started.setter
    def started(self, value: bool) -> None:
        self._state.started = value

    @property
    def index(self) -> int:
        """Ring index."""
        return self._state.index

    def set_queue_ready(self, ready: bool) -> None:
        """Mark the ring started or stopped (rust-vmm name), under the lock."""
        with self._wlock:
            self._state.set_queue_ready(ready)

    @property
    def configured(self) -> bool:
        """Whether the ring has a queue to serve (size and addresses set, memory mapped)."""
        return self._state.queue is not None

    # passes and breakage: read and reset lock-free by the ring's own worker
    @property
    def broken(self) -> str | None:
        """Why the ring is broken (None: it is not)."""
        return self._state.broken

    @property
    def yielded(self) -> bool:
        """The last pass stopped at its budget with work left."""
        return self._state.yielded

    def begin_pass(self) -> None:
        """Start a worker pass: at most the ring size in chains until the next one."""
        self._state.begin_pass()

    def mark_broken(self, reason: str) -> None:
        """Stop serving the ring until the front-end reconfigures it."""
        with self._wlock:
            self._state.mark_broken(reason)

    def set_enabled(self, enabled: bool) -> None:
        """Set the enabled flag."""
        self._state.enabled = enabled

    def set_features(self, features: int) -> None:
        """Apply acked virtio features."""
        with self._wlock:
            self._state.set_features(features)

    def set_queue_event_idx(self, enabled: bool) -> None:
        """Turn event idx on or off."""
        with self._wlock:
            self._state.set_queue_event_idx(enabled)

    def set_queue_size(self, num: int) -> None:
        """SET_VRING_NUM."""
        with self._wlock:
            self._state.set_queue_size(num)

    def set_queue_info(self, desc: int, avail: int, used: int, log_addr: int | None = None) -> None:
        """SET_VRING_ADDR with guest-physical areas."""
        with self._wlock:
            self._state.set_queue_info(desc, avail, used, log_addr)

    def update_memory(self, memory: GuestMemoryAtomic | GuestMemory | None = None) -> bool:
        """Re-translate over a new memory snapshot."""
        with self._wlock:
            return self._state.update_memory(memory)

    def set_log(self, dirty_log: DirtyLogLike | None) -> None:
        """Attach or detach the dirty log."""
        with self._wlock:
            self._state.set_log(dirty_log)

    def set_inflight(self, inflight: Any) -> int:
        """Attach the inflight region; returns how many requests it resubmits."""
        with self._wlock:
            self._state.set_inflight(inflight)
            return self._state.resubmit_count()

    def set_backend_channel(self, channel: Any) -> None:
        """Back-end request channel for in-band notifications."""
        with self._wlock:
            self._state.set_backend_channel(channel)

    def get_queue_base(self) -> int:
        """GET_VRING_BASE num."""
        with self._rlock:
            return self._state.get_queue_base()

    def set_queue_base(self, num: int) -> None:
        """SET_VRING_BASE num."""
        with self._wlock:
            self._state.set_queue_base(num)

    def queue_next_avail(self) -> int:
        """Next avail index."""
        with self._rlock:
            return self._state.queue_next_avail()

    def set_queue_next_avail(self, base: int) -> None:
        """Set the next avail index."""
        with self._wlock:
            self._state.set_queue_next_avail(base)

    def set_queue_next_used(self, idx: int) -> None:
        """Set the next used index."""
        with self._wlock:
            self._state.set_queue_next_used(idx)

    def queue_used_idx(self) -> int:
        """Used index in guest memory."""
        with self._rlock:
            return self._state.queue_used_idx()

    def set_kick(self, fd: int | None) -> None:
        """Own a new kick fd."""
        with self._wlock:
            self._state.set_kick(fd)

    def get_kick(self) -> int | None:
        """Kick fd."""
        return self._state.kick

    def read_kick(self) -> bool:
        """Consume a kick; returns enabled."""
        return self._state.read_kick()

    def set_call(self, fd: int | None) -> None:
        """Own a new call fd."""
        with self._wlock:
            self._state.set_call(fd)

    def get_call(self) -> int | None:
        """Call fd."""
        return self._state.call

    def set_err(self, fd: int | None) -> None:
        """Own a new err fd."""
        with self._wlock:
            self._state.set_err(fd)

    def get_err(self) -> int | None:
        """Err fd."""
        return self._state.err

    def pop(self) -> DescriptorChain | None:
        """Next available chain (VirtqError for a bad one, consumed)."""
        with self._wlock:
            return self._state.pop()

    def pop_batch(self, max_chains: int = 1 << 16) -> Batch:
        """Many chains at once."""
        with self._wlock:
            return self._state.pop_batch(max_chains)

    def add_used(self, head: int, length: int) -> None:
        """Publish one used element."""
        with self._wlock:
            self._state.add_used(head, length)

    def add_used_batch(
        self, ids: Sequence[int] | np.ndarray, lens: Sequence[int] | np.ndarray | int
    ) -> None:
        """Publish many used elements."""
        with self._wlock:
            self._state.add_used_batch(ids, lens)

    def complete_error(self, exc: VirtqError) -> None:
        """Complete a bad chain with length 0 and signal err."""
        with self._wlock:
            self._state.complete_error(exc)

    def needs_notification(self) -> bool:
        """Whether the driver wants a notification."""
        with self._wlock:
            return self._state.needs_notification()

    def sink_pass(self, skip: int, checksum: bool) -> SinkPass | None:
        """A net sink's whole TX kick in one compiled call (None: use the pure loop)."""
        with self._wlock:
            return self._state.sink_pass(skip, checksum)

    def enable_notification(self) -> bool:
        """Re-enable kicks; True if more work arrived."""
        with self._wlock:
            return self._state.enable_notification()

    def has_available(self) -> bool:
        """Whether a chain is waiting (busy polling)."""
        with self._wlock:
            return self._state.has_available()

    def disable_notification(self) -> None:
        """Suppress kicks."""
        with self._wlock:
            self._state.disable_notification()

    def signal_used_queue(self) -> bool:
        """Notify the driver if it wants it."""
        with self._wlock:
            return self._state.signal_used_queue()

    def signal_err(self) -> None:
        """Signal the err fd."""
        with self._rlock:
            self._state.signal_err()

    def reset(self) -> None:
        """Back to the initial state."""
        with self._wlock:
            self._state.reset()


class VringMutex(_SharedVring):
    """A VringState behind one threading.Lock: ``with vring.lock() as state: ...``."""

    def __init__(
        self,
        memory: GuestMemoryAtomic | GuestMemory,
        max_queue_size: int = MAX_QUEUE_SIZE,
        *,
        index: int = 0,
    ) -> None:
        """Create the ring state and its lock."""
        self._state = VringState(memory, max_queue_size, index=index)
        self._mutex = threading.Lock()
        self._rlock = self._wlock = self._mutex

    def lock(self) -> _Guard:
        """Exclusive access to the state (a context manager)."""
        return _Guard(self._mutex, self._state)


class VringRwLock(_SharedVring):
    """A VringState behind a read-write lock: ``read_lock()`` / ``write_lock()``."""

    def __init__(
        self,
        memory: GuestMemoryAtomic | GuestMemory,
        max_queue_size: int = MAX_QUEUE_SIZE,
        *,
        index: int = 0,
    ) -> None:
        """Create the ring state and its read-write lock."""
        self._state = VringState(memory, max_queue_size, index=index)
        self._rw = RwLock()
        self._rlock = self._rw.read
        self._wlock = self._rw.write

    def read_lock(self) -> _Guard:
        """Shared access to the state."""
        return _Guard(self._rlock, self._state)

    def write_lock(self) -> _Guard:
        """Exclusive access to the state."""
        return _Guard(self._wlock, self._state)


class VringT(Protocol):
    """What devices and the daemon may call on any vring (VringMutex, VringRwLock)."""

    enabled: bool
    started: bool

    @property
    def broken(self) -> str | None:
        """Why the ring is broken (None: it is not)."""

    @property
    def yielded(self) -> bool:
        """The last pass stopped at its budget with work left."""

    def begin_pass(self) -> None:
        """Start a worker pass (bounds how many chains it takes)."""

    def mark_broken(self, reason: str) -> None:
        """Stop serving the ring until the front-end reconfigures it."""

    def pop(self) -> DescriptorChain | None:
        """Next available chain; VirtqError (consumed) for a bad one."""

    def pop_batch(self, max_chains: int = ...) -> Batch:
        """Many chains at once."""

    def add_used(self, head: int, length: int) -> None:
        """Publish one used element."""

    def add_used_batch(
        self, ids: Sequence[int] | np.ndarray, lens: Sequence[int] | np.ndarray | int
    ) -> None:
        """Publish many used elements."""

    def complete_error(self, exc: VirtqError) -> None:
        """Complete a bad chain with length 0 and signal err."""

    def signal_used_queue(self) -> bool:
        """Notify the driver if it wants it."""

    def signal_err(self) -> None:
        """Signal the err fd."""

    def enable_notification(self) -> bool:
        """Re-enable kicks; True if more work arrived meanwhile."""

    def disable_notification(self) -> None:
        """Suppress kicks."""

    def has_available(self) -> bool:
        """Whether a chain is waiting."""

    def needs_notification(self) -> bool:
        """Whether the driver wants a notification."""

    def sink_pass(self, skip: int, checksum: bool) -> SinkPass | None:
        """A net sink's whole TX kick in one compiled call (None: use the pure loop)."""

    def set_queue_event_idx(self, enabled: bool) -> None:
        """Turn event idx on or off."""

    def get_queue_base(self) -> int:
        """GET_VRING_BASE num."""

    def set_queue_base(self, num: int) -> None:
        """SET_VRING_BASE num."""

    def queue_next_avail(self) -> int:
        """Next avail index (split) / position (packed)."""

    def set_queue_next_avail(self, base: int) -> None:
        """Set the next avail index (split: put back chains popped but not completed)."""

    def read_kick(self) -> bool:
        """Consume a kick; returns enabled."""

    def get_err(self) -> int | None:
        """The err fd."""

    def reset(self) -> None:
        """Back to the initial state."""


__all__ = ["RwLock", "VringMutex", "VringRwLock", "VringState", "VringT"]

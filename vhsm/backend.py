"""`VhostUserBackend`: the hooks a device implements, with rust-vmm's names and defaults.

The session calls the negotiation and configuration hooks on the control
thread; workers call `handle_event` for kicks. Plain `VhostUserBackend` hooks
may run concurrently from several workers; `VhostUserBackendMut` makes the
daemon serialise every hook call under one lock so the device can mutate its
own state freely.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from vhsm.errors import BackendError, VirtqError
from vhsm.wire.enums import DEFAULT_MAX_MEM_SLOTS, ProtocolFeature, VirtioFeature

if TYPE_CHECKING:
    import uuid

    from vhsm.memory import GuestMemoryAtomic
    from vhsm.virtq import DescriptorChain
    from vhsm.vring import VringT
    from vhsm.worker import VringEpollHandler

log = logging.getLogger(__name__)

#: Every protocol feature the vhsm runtime implements: a device offers a subset.
IMPLEMENTED_PROTOCOL_FEATURES = int(
    ProtocolFeature.MQ
    | ProtocolFeature.LOG_SHMFD
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.CONFIG
    | ProtocolFeature.INFLIGHT_SHMFD
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.STATUS
)

#: The protocol features of a device with config space that needs neither the
#: back-end channel, dirty logging nor inflight tracking (TAP net, vsock).
CONFIG_DEVICE_PROTOCOL_FEATURES = int(
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.CONFIG
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.STATUS
)

#: The split-ring features the vhsm runtime implements, and
#: VHOST_USER_F_PROTOCOL_FEATURES: what every device offers at the least.
SPLIT_RING_FEATURES = int(
    VirtioFeature.VERSION_1
    | VirtioFeature.RING_INDIRECT_DESC
    | VirtioFeature.RING_EVENT_IDX
    | VirtioFeature.PROTOCOL_FEATURES
)

#: `SPLIT_RING_FEATURES` and packed rings.
RING_FEATURES = SPLIT_RING_FEATURES | int(VirtioFeature.RING_PACKED)

#: EPOLLIN, as `handle_event` receives it for a kick.
EPOLLIN = 0x001


class VhostUserBackend:
    """Base class of device hooks; override what your device needs.

    Required overrides: `num_queues`, `max_queue_size`, `features`, and
    `handle_event`. Everything else has a working default.
    """

    #: True when the daemon must serialise every hook call (see VhostUserBackendMut).
    serialised: bool = False

    #: Busy-poll window in microseconds: after a burst the worker keeps polling the
    #: rings `busy_poll_queue` accepts, kicks suppressed, before it sleeps (0: off).
    busy_poll_us: int = 0

    # --- negotiation -------------------------------------------------------
    def num_queues(self) -> int:
        """Return the number of virtqueues the device has."""
        raise BackendError(f"{type(self).__name__} must override num_queues()")

    def max_queue_size(self) -> int:
        """Return the largest ring size the device accepts."""
        raise BackendError(f"{type(self).__name__} must override max_queue_size()")

    def features(self) -> int:
        """Return the virtio + vhost feature bits offered in GET_FEATURES."""
        raise BackendError(f"{type(self).__name__} must override features()")

    def acked_features(self, features: int) -> None:
        """Receive the feature bits the front-end accepted (SET_FEATURES)."""

    def protocol_features(self) -> int:
        """Return the vhost-user protocol feature bits offered (GET_PROTOCOL_FEATURES)."""
        return 0

    def queue_num(self) -> int:
        """Return the GET_QUEUE_NUM answer (queues; net devices may answer pairs)."""
        return self.num_queues()

    def max_mem_slots(self) -> int:
        """Return the GET_MAX_MEM_SLOTS answer."""
        return DEFAULT_MAX_MEM_SLOTS

    def set_event_idx(self, enabled: bool) -> None:
        """Learn whether VIRTIO_RING_F_EVENT_IDX was negotiated."""

    # --- configuration -----------------------------------------------------
    def get_config(self, offset: int, size: int) -> bytes:
        """Return `size` bytes of device config space from `offset` (zeros by default).

        An override may also take a third argument, the request's flags
        (`get_config(offset, size, flags)`); the session passes them only then.
        """
        return bytes(size)

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        """Write device config space; refuse read-only fields unless flags says migration.

        An override may leave `flags` out, as rust-vmm's `set_config(offset, buf)`
        does; the session passes the flags only to a hook that takes them.
        """
        raise BackendError("device config space is read-only")

    def update_memory(self, memory: GuestMemoryAtomic) -> None:
        """Learn that the guest memory table changed (the holder already has the new one)."""

    def set_backend_req_fd(self, channel: Any) -> None:
        """Receive the back-end request channel (a `BackendChannel`)."""

    def get_shared_object(self, object_id: uuid.UUID) -> int | None:
        """Return a dma-buf fd for `object_id`, or None when not exported."""
        return None

    def set_device_state_fd(self, direction: int, phase: int, fd: int) -> int | None:
        """Start a device-state transfer; return an own fd to use instead, or None.

        The default keeps no state: it closes the channel (an empty state).
        """
        os.close(fd)
        return None

    def check_device_state(self) -> None:
        """Raise BackendError if the last state transfer failed."""

    def reset_device(self) -> None:
        """Return the device to its initial state.

        Called on RESET_DEVICE (after every ring was reset) and on SET_STATUS 0: a
        device status of 0 means reset. Ring state is the session's; this hook resets
        what the device itself keeps (negotiated layouts, pending requests...).
        """

    # --- workers -------------------------------------------------------------
    def queues_per_thread(self) -> Sequence[Sequence[int]]:
        """Return which queue indices each worker thread serves (default: one thread, all)."""
        return [list(range(self.num_queues()))]

    def busy_poll_queue(self, index: int) -> bool:
        """Return whether workers may busy-poll ring `index` (when `busy_poll_us` is set)."""
        return True

    def set_vring_workers(self, workers: Sequence[VringEpollHandler]) -> None:
        """Receive the worker event loops (one per `queues_per_thread` entry) once, at start.

        A device that serves its own fds (sockets, a TAP) registers them here with
        ``workers[i].register_listener(fd, events, data)``; readiness then reaches
        `handle_event` as ``device_event == data`` on that worker's thread.
        """

    def exit_event(self, thread_index: int) -> int | None:
        """Return an eventfd that stops worker `thread_index`, or None for the daemon's own."""
        return None

    def handle_event(
        self, device_event: int, evset: int, vrings: Sequence[VringT], thread_id: int
    ) -> None:
        """Process a kick on queue `device_event` (a global index) or a registered fd."""
        raise BackendError(f"{type(self).__name__} must override handle_event()")

    # --- lifecycle (vhsm extensions) ----------------------------------------------
    def connected(self) -> None:
        """A front-end connected."""

    def disconnected(self) -> None:
        """The front-end went away; the session was reset."""

    def ring_started(self, index: int) -> None:
        """Ring `index` was started (SET_VRING_KICK / VRING_KICK)."""

    def ring_stopped(self, index: int) -> None:
        """Ring `index` was stopped (GET_VRING_BASE) and drained."""

    def ring_enabled(self, index: int) -> None:
        """Ring `index` was enabled."""

    def ring_disabled(self, index: int) -> None:
        """Ring `index` was disabled."""

    def memory_updated(self) -> None:
        """The memory table changed (after `update_memory`)."""


class VhostUserBackendMut(VhostUserBackend):
    """A back-end whose hooks are always called under one lock.

    Mirrors rust-vmm's `VhostUserBackendMut` wrapped in a Mutex: every hook a
    subclass defines is wrapped at class creation, so the control thread and
    all workers take turns and the device can be written as single-threaded.
    """

    serialised = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in HOOK_NAMES:
            method = cls.__dict__.get(name)
            if callable(method) and not getattr(method, "_vhsm_locked", False):
                setattr(cls, name, _locked(method))

    @property
    def lock(self) -> threading.RLock:
        """The lock taken around every hook call (created on first use)."""
        lock: threading.RLock | None = self.__dict__.get("_vhsm_lock")
        if lock is None:
            lock = self.__dict__.setdefault("_vhsm_lock", threading.RLock())
        return lock


def _locked(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a hook so it runs under the back-end's lock."""

    @functools.wraps(method)
    def wrapper(self: VhostUserBackendMut, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)

    wrapper._vhsm_locked = True  # type: ignore[attr-defined]
    return wrapper


def get_config(backend: VhostUserBackend, offset: int, size: int, flags: int) -> bytes:
    """Call `backend.get_config`, with `flags` only when the hook takes them."""
    if _takes_flags(type(backend).get_config):
        return backend.get_config(offset, size, flags)  # type: ignore[call-arg]
    return backend.get_config(offset, size)


def set_config(backend: VhostUserBackend, offset: int, data: bytes, flags: int) -> None:
    """Call `backend.set_config`, with `flags` only when the hook takes them."""
    if _takes_flags(type(backend).set_config):
        backend.set_config(offset, data, flags)
    else:
        backend.set_config(offset, data)  # type: ignore[call-arg]


@functools.cache
def _takes_flags(hook: Callable[..., Any]) -> bool:
    """Whether a config hook accepts a third argument after (self, offset, size/data)."""
    import inspect  # once per hook (cached): a daemon does not carry inspect otherwise

    try:
        params = list(inspect.signature(hook).parameters.values())
    except (TypeError, ValueError):
        return True
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 4


def drain(
    vring: VringT,
    process: Callable[[DescriptorChain], int],
    bad_chain: Callable[[VirtqError], object] | None = None,
) -> int:
    """Complete every available chain of `vring`; `process(chain)` returns the used length.

    The loop every device needs: kicks are suppressed while draining, the
    driver is signalled once per pass (only when it asked, event-idx aware),
    and after kicks are re-enabled the ring is drained again if work arrived
    meanwhile. A bad chain is passed to `bad_chain` (a device logs and counts it
    its own way; the default logs it once it has a head), completed with length 0
    and reported on the ring's err fd. The loop is bounded by the vring: a worker pass takes at
    most the ring size in chains, and a broken ring (avail idx moved too far, used
    ring aliasing the driver's) gives none. Returns how many chains were completed.
    """
    done = 0
    while True:
        vring.disable_notification()
        while True:
            try:
                chain = vring.pop()
            except VirtqError as exc:
                if bad_chain is not None:
                    bad_chain(exc)
                vring.complete_error(exc)
                if exc.head is None:
                    # No chain to answer (a vring class that does not mark the ring broken
                    # itself): retrying would spin holding the worker; wait for a kick.
                    vring.signal_used_queue()
                    return done
                if bad_chain is None:
                    log.warning("bad chain: %s", str(exc))
                continue
            if chain is None:
                break
            vring.add_used(chain.head, process(chain))
            done += 1
        vring.signal_used_queue()
        if not vring.enable_notification():
            return done


#: Every hook name; `VhostUserBackendMut` serialises exactly these.
HOOK_NAMES: tuple[str, ...] = tuple(
    name
    for name, value in vars(VhostUserBackend).items()
    if callable(value) and not name.startswith("_")
)

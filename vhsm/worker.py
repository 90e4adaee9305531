"""`VringEpollHandler`: one worker thread's epoll loop over kick fds, its exit fd and listeners.

Each worker serves the rings `backend.queues_per_thread()` gave it (global
indices). It dispatches a kick to `backend.handle_event(index, EPOLLIN,
vrings, thread_id)` only while the ring is active (the data plane decides:
started, and enabled unless the device processes disabled rings). The control
thread changes kick fds, stops rings and asks for rescans through the methods
here; `paused()` is the drain: inside it no `handle_event` runs on this worker.
A hook that raises is logged and reported through `on_error`; the loop goes on.

Bounded passes: before each dispatch (a kick or a listener event) the worker
starts a pass on its rings (`begin_pass`, when the vring class has it), so one
`handle_event` takes at most a ring's size in chains from each; a ring that
stopped at that budget with work left (`yielded`) is dispatched again on the
next turn of the loop, after the lock was released, so the control thread
(GET_VRING_BASE, a new memory table) and the exit fd are never kept waiting
behind a guest that keeps the ring full.

Busy polling (off unless the back-end's `busy_poll_us` is set): after a burst the
worker keeps looking at its rings' available entries for up to that many
microseconds, with kicks suppressed, before it sleeps in epoll. Each poll takes the
dispatch lock on its own, so `paused()` waits at most one pass; before sleeping,
kicks are re-enabled and the rings re-checked (event idx aware), so no work is missed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from vhsm.errors import BackendError

if TYPE_CHECKING:
    from vhsm.backend import VhostUserBackend

log = logging.getLogger(__name__)

EPOLLIN = select.EPOLLIN
#: Poll period (seconds) while a started ring of this worker has no kick fd (polling mode).
POLL_PERIOD = 0.01

_KICK_EVENTS = select.EPOLLIN


class VringEpollHandler:
    """The event loop of one worker thread (rust-vmm's name and role).

    Args:
        backend: the device; its `handle_event` gets the kicks and listener events.
        vrings: every ring of the device, indexed by global queue index.
        queues: the global indices this worker serves.
        thread_id: this worker's index in `queues_per_thread()`.
        exit_fd: an eventfd that stops the loop when readable (not owned); None
            creates one.
        is_active: whether a kick on ring `index` may be dispatched now.
        on_error: called with (ring index or None, exception) when a hook raised.
    """

    def __init__(
        self,
        backend: VhostUserBackend,
        vrings: Sequence[Any],
        queues: Sequence[int],
        thread_id: int,
        *,
        exit_fd: int | None = None,
        is_active: Callable[[int], bool] | None = None,
        on_error: Callable[[int | None, BaseException], None] | None = None,
    ) -> None:
        self.backend = backend
        self.vrings = vrings
        self.queues: tuple[int, ...] = tuple(queues)
        self.thread_id = thread_id
        self._is_active = is_active if is_active is not None else (lambda index: True)
        self._on_error = on_error
        self._own_exit = exit_fd is None
        self.exit_fd: int = (
            os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) if exit_fd is None else exit_fd
        )
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll = select.epoll()
        self._epoll.register(self.exit_fd, select.EPOLLIN)
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._lock = threading.RLock()
        self._kicks: dict[int, int] = {}  # kick fd -> ring index
        self._kick_of: dict[int, int] = {}  # ring index -> kick fd
        self._listeners: dict[int, int] = {}  # fd -> data
        self._polled: set[int] = set()  # rings without a kick fd (polling mode)
        self._pending: set[int] = set()  # rings to dispatch once (rescans, in-band kicks)
        self._generation = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        self._dispatched = False  # the last _dispatch ran a ring's handle_event
        # the served rings whose vring class bounds passes (begin_pass / yielded)
        self._passes = [
            (i, vrings[i])
            for i in self.queues
            if 0 <= i < len(vrings) and hasattr(vrings[i], "begin_pass")
        ]
        #: Busy-poll window in seconds (0: sleep in epoll right after each burst).
        self.busy_poll = max(0, int(getattr(backend, "busy_poll_us", 0) or 0)) / 1e6

    # --- back-end listeners (rust-vmm API) -----------------------------------------
    def register_listener(self, fd: int, events: int, data: int) -> None:
        """Watch `fd` for `events`; readiness calls `handle_event(data, evset, ...)`.

        `data` must not be a queue index (use `num_queues` and above).
        """
        if 0 <= data < len(self.vrings):
            raise BackendError(f"listener data {data} collides with a queue index")
        with self._lock:
            if fd in self._listeners or fd in self._kicks:
                raise BackendError(f"fd {fd} is already watched")
            self._epoll.register(fd, events)
            self._listeners[fd] = data
            self._generation += 1

    def unregister_listener(self, fd: int, events: int = 0, data: int | None = None) -> None:
        """Stop watching `fd` (call before closing it)."""
        with self._lock:
            if self._listeners.pop(fd, None) is None:
                raise BackendError(f"fd {fd} is not a registered listener")
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)
            self._generation += 1

    # --- control-thread API --------------------------------------------------------------
    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the dispatch lock: no `handle_event` runs on this worker meanwhile (drain)."""
        with self._lock:
            yield

    def set_kick(self, index: int, fd: int | None, *, polled: bool = False) -> None:
        """Watch `fd` as ring `index`'s kick fd (None: unwatch; `polled`: poll the ring).

        The new fd is registered first: when epoll refuses it (OSError) nothing changed and
        the old kick keeps working. The old fd is unregistered from epoll here, so its owner
        may close it afterwards. The fd stays owned by the caller.
        """
        with self._lock:
            if fd is not None:
                self._epoll.register(fd, _KICK_EVENTS)
            old = self._kick_of.pop(index, None)
            if old is not None:
                self._kicks.pop(old, None)
                with contextlib.suppress(OSError):
                    self._epoll.unregister(old)
            self._polled.discard(index)
            if fd is not None:
                self._kicks[fd] = index
                self._kick_of[index] = fd
            elif polled:
                self._polled.add(index)
            self._generation += 1
        if polled:
            self._wake()

    def rescan(self, index: int) -> None:
        """Dispatch ring `index` once, as if kicked (ring started or re-enabled, in-band kick)."""
        with self._lock:
            self._pending.add(index)
        self._wake()

    def kick_fd(self, index: int) -> int | None:
        """The kick fd watched for ring `index`, if any."""
        with self._lock:
            return self._kick_of.get(index)

    # --- thread ----------------------------------------------------------------------------
    def start(self) -> threading.Thread:
        """Run the loop in a new thread (named after the worker)."""
        thread = threading.Thread(
            target=self.run, name=f"vhsm-worker-{self.thread_id}", daemon=True
        )
        self._thread = thread
        thread.start()
        return thread

    def signal_exit(self) -> None:
        """Ask the loop to return (writes the exit eventfd)."""
        with contextlib.suppress(OSError):
            os.eventfd_write(self.exit_fd, 1)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread started by `start`."""
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._thread = None

    def close(self) -> None:
        """Release the epoll and the eventfds this handler created (after the loop ended)."""
        if self._closed:
            return
        self._closed = True
        self._epoll.close()
        os.close(self._wake_fd)
        if self._own_exit:
            os.close(self.exit_fd)

    def run(self) -> None:
        """The loop: wait, dispatch, until the exit fd is readable."""
        while True:
            with self._lock:
                generation = self._generation
                timeout = POLL_PERIOD if self._polled else -1
            try:
                events = self._epoll.poll(timeout)
            except InterruptedError:
                continue
            except OSError as err:
                if err.errno == errno.EBADF:
                    return
                raise
            with self._lock:
                if self._dispatch(events, stale=generation != self._generation):
                    return
                spin = self.busy_poll and self._dispatched
            if spin and self._spin(self.busy_poll):
                return

    # --- machinery -------------------------------------------------------------------------
    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake_fd, 1)

    def _dispatch(self, events: list[tuple[int, int]], *, stale: bool) -> bool:
        """Handle one poll's events under the lock; return True when asked to exit."""
        rings: list[int] = []
        for fd, evset in events:
            if fd == self.exit_fd:
                _drain_eventfd(fd)
                return True
            if fd == self._wake_fd:
                _drain_eventfd(fd)
                continue
            index = self._kicks.get(fd)
            if index is not None:
                if stale:
                    continue  # level-triggered: a live kick shows up again next poll
                if not evset & select.EPOLLIN:
                    log.warning("ring %d: kick fd %d reports %#x; unwatched", index, fd, evset)
                    self.set_kick(index, None)
                    continue
                if not _read_kick(fd):
                    log.warning("ring %d: kick fd %d at end of file; unwatched", index, fd)
                    self.set_kick(index, None)
                    continue
                rings.append(index)
                continue
            data = self._listeners.get(fd)
            if data is not None:
                self._serve(data, evset, None)
        rings.extend(self._polled)
        rings.extend(self._pending)
        self._pending.clear()
        self._dispatched = False
        for index in dict.fromkeys(rings):
            if self._is_active(index):
                self._dispatched = True
                self._serve(index, EPOLLIN, index)
        return False

    def _serve(self, device_event: int, evset: int, ring: int | None) -> None:
        """One bounded pass: a ring kick or a listener event (which may fill rings too).

        Every ring of this worker gets a fresh budget first; a ring that stopped at its
        budget with work left is dispatched again on the next turn of the loop.
        """
        for _, vring in self._passes:
            vring.begin_pass()
        self._call(device_event, evset, ring)
        again = [i for i, vring in self._passes if vring.yielded]
        if again:
            self._pending.update(again)
            self._wake()

    def _spin(self, window: float) -> bool:
        """Busy-poll the rings for new work for up to `window` s; True when asked to exit.

        Kicks stay suppressed while polling; the window restarts after each burst.
        It ends by re-enabling kicks on every polled ring, then re-checking them: a ring
        that got work meanwhile is served and the polling goes on.
        """
        backend = self.backend
        rings = [i for i in self.queues if backend.busy_poll_queue(i)]
        if not rings:
            return False
        clock = time.monotonic
        vrings = self.vrings
        active = self._is_active
        with self._lock:
            for i in rings:
                if active(i):
                    vrings[i].disable_notification()
        deadline = clock() + window
        while True:
            with self._lock:
                generation = self._generation
                ready = [i for i in rings if active(i) and vrings[i].has_available()]
                for i in ready:
                    self._serve(i, EPOLLIN, i)
                    if active(i):
                        vrings[i].disable_notification()  # the device re-enabled kicks
            try:
                events = self._epoll.poll(0)  # exit, control wake-ups, listeners, kicks
            except InterruptedError:
                events = []
            except OSError as err:
                if err.errno == errno.EBADF:
                    return True
                raise
            if events:
                with self._lock:
                    if self._dispatch(events, stale=generation != self._generation):
                        return True
                    if self._dispatched:
                        ready.append(-1)
            now = clock()
            if ready:
                deadline = now + window
            elif now >= deadline:
                with self._lock:
                    more = False
                    for i in rings:
                        if active(i) and vrings[i].enable_notification():
                            more = True
                if not more:
                    return False
                deadline = now + window

    def _call(self, device_event: int, evset: int, ring: int | None) -> None:
        try:
            self.backend.handle_event(device_event, evset, self.vrings, self.thread_id)
        except Exception as exc:
            what = f"ring {ring} (kick)" if ring is not None else f"listener event {device_event}"
            log.exception("worker %d: handle_event failed on %s: %s", self.thread_id, what, exc)
            if self._on_error is not None:
                try:
                    self._on_error(ring, exc)
                except Exception:
                    log.exception("worker %d: error reporting failed", self.thread_id)


def _read_kick(fd: int) -> bool:
    """Consume one kick (eventfd counter or pipe bytes); False at end of file."""
    try:
        return os.read(fd, 8) != b""
    except (BlockingIOError, InterruptedError):
        return True


def _drain_eventfd(fd: int) -> None:
    """Consume a readable eventfd (or pipe): 8 bytes; nothing if it raced empty."""
    with contextlib.suppress(BlockingIOError, InterruptedError):
        os.read(fd, 8)


__all__ = ["EPOLLIN", "POLL_PERIOD", "VringEpollHandler"]

"""VringEpollHandler: kicks, listeners, rescans, drains, failing hooks, exit."""

from __future__ import annotations

import os
import queue
import select
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from vhsm.backend import VhostUserBackend
from vhsm.errors import BackendError
from vhsm.worker import EPOLLIN, VringEpollHandler

WAIT = 10.0


class FakeRing:
    def __init__(self) -> None:
        self.started = True
        self.enabled = True


class Recorder(VhostUserBackend):
    """Puts every handle_event call on a queue; raises for events in `fail`."""

    def __init__(self, n: int = 4) -> None:
        self.n = n
        self.calls: queue.Queue[tuple[int, int, int]] = queue.Queue()
        self.fail: set[int] = set()
        self.inside = threading.Event()
        self.release = threading.Event()
        self.block: set[int] = set()

    def num_queues(self) -> int:
        return self.n

    def handle_event(
        self, device_event: int, evset: int, vrings: Sequence[Any], thread_id: int
    ) -> None:
        assert len(vrings) == self.n
        if device_event in self.block:
            self.inside.set()
            self.release.wait(WAIT)
        self.calls.put((device_event, evset, thread_id))
        if device_event in self.fail:
            raise BackendError(f"boom on {device_event}")

    def next_call(self) -> tuple[int, int, int]:
        return self.calls.get(timeout=WAIT)

    def no_call(self) -> bool:
        return self.calls.empty()


@pytest.fixture
def setup() -> Iterator[tuple[Recorder, list[FakeRing], VringEpollHandler, list[Any]]]:
    backend = Recorder()
    rings = [FakeRing() for _ in range(backend.n)]
    errors: list[Any] = []
    handler = VringEpollHandler(
        backend,
        rings,
        [0, 2],
        thread_id=1,
        is_active=lambda i: rings[i].started,
        on_error=lambda i, exc: errors.append((i, exc)),
    )
    handler.start()
    yield backend, rings, handler, errors
    handler.signal_exit()
    handler.join()
    handler.close()


def kick(fd: int) -> None:
    os.eventfd_write(fd, 1)


def new_eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC)


def test_kick_reaches_handle_event_with_global_index(setup) -> None:
    backend, _, handler, _ = setup
    fd = new_eventfd()
    handler.set_kick(2, fd)
    kick(fd)
    assert backend.next_call() == (2, EPOLLIN, 1)
    # the kick was consumed: the eventfd is empty again
    assert select.select([fd], [], [], 0)[0] == []
    handler.set_kick(2, None)
    os.close(fd)


def test_inactive_ring_is_not_dispatched_and_rescan_catches_up(setup) -> None:
    backend, rings, handler, _ = setup
    fd = new_eventfd()
    rings[0].started = False
    handler.set_kick(0, fd)
    kick(fd)
    handler.rescan(2)  # a barrier: ring 2 goes through once the kick was seen
    assert backend.next_call()[0] == 2
    assert backend.no_call()
    rings[0].started = True
    handler.rescan(0)
    assert backend.next_call()[0] == 0
    handler.set_kick(0, None)
    os.close(fd)


def test_replaced_kick_fd_is_unwatched(setup) -> None:
    backend, _, handler, _ = setup
    old, new = new_eventfd(), new_eventfd()
    handler.set_kick(0, old)
    handler.set_kick(0, new)
    assert handler.kick_fd(0) == new
    os.close(old)  # safe: unregistered before
    kick(new)
    assert backend.next_call()[0] == 0
    handler.set_kick(0, None)
    os.close(new)


def test_failing_hook_is_reported_and_the_loop_goes_on(setup, caplog) -> None:
    backend, _, handler, errors = setup
    fd = new_eventfd()
    handler.set_kick(0, fd)
    backend.fail.add(0)
    kick(fd)
    assert backend.next_call()[0] == 0
    backend.fail.clear()
    kick(fd)
    assert backend.next_call()[0] == 0
    assert [i for i, _ in errors] == [0]
    assert isinstance(errors[0][1], BackendError)
    assert "ring 0" in caplog.text
    handler.set_kick(0, None)
    os.close(fd)


def test_listener_events(setup) -> None:
    backend, _, handler, _ = setup
    r, w = os.pipe()
    with pytest.raises(BackendError, match="collides"):
        handler.register_listener(r, select.EPOLLIN, 1)
    handler.register_listener(r, select.EPOLLIN, 10)
    with pytest.raises(BackendError, match="already"):
        handler.register_listener(r, select.EPOLLIN, 11)
    os.write(w, b"x")
    assert backend.next_call() == (10, select.EPOLLIN, 1)
    os.read(r, 1)
    handler.unregister_listener(r, select.EPOLLIN, 10)
    with pytest.raises(BackendError, match="not a registered"):
        handler.unregister_listener(r)
    os.close(r)
    os.close(w)


def test_paused_drains_handle_event(setup) -> None:
    backend, _, handler, _ = setup
    backend.block.add(2)
    handler.rescan(2)
    assert backend.inside.wait(WAIT)
    acquired = threading.Event()

    def pause() -> None:
        with handler.paused():
            acquired.set()

    t = threading.Thread(target=pause)
    t.start()
    # the worker is inside handle_event: the pause cannot be taken yet
    assert not acquired.is_set()
    backend.release.set()
    t.join(WAIT)
    assert acquired.is_set()
    assert backend.next_call()[0] == 2


def test_polled_ring_without_kick_fd(setup) -> None:
    backend, _, handler, _ = setup
    handler.set_kick(0, None, polled=True)
    assert backend.next_call()[0] == 0
    assert backend.next_call()[0] == 0
    handler.set_kick(0, None)


def test_backend_exit_event_stops_the_loop() -> None:
    backend = Recorder()
    exit_fd = os.eventfd(0, os.EFD_CLOEXEC)
    handler = VringEpollHandler(backend, [FakeRing()] * 4, [0], 0, exit_fd=exit_fd)
    thread = handler.start()
    os.eventfd_write(exit_fd, 1)
    thread.join(WAIT)
    assert not thread.is_alive()
    handler.close()
    os.fstat(exit_fd)  # not ours: still open
    os.close(exit_fd)


def test_no_fd_leak_and_no_thread_left() -> None:
    before = len(os.listdir("/proc/self/fd"))
    threads = threading.active_count()
    for _ in range(50):
        handler = VringEpollHandler(Recorder(), [FakeRing()] * 4, [0, 1], 0)
        handler.start()
        handler.signal_exit()
        handler.join()
        handler.close()
    assert len(os.listdir("/proc/self/fd")) <= before
    assert threading.active_count() == threads


# --- bounded passes -----------------------------------------------------------------------
class BudgetRing(FakeRing):
    """A ring with more work than one pass may take: it yields `passes - 1` times."""

    def __init__(self, passes: int) -> None:
        super().__init__()
        self.left = passes
        self.begun = 0
        self.yielded = False

    def begin_pass(self) -> None:
        self.begun += 1
        self.yielded = False


class Yielding(Recorder):
    """Each dispatch of ring 0 is one pass; the ring yields until its work is done."""

    def handle_event(
        self, device_event: int, evset: int, vrings: Sequence[Any], thread_id: int
    ) -> None:
        super().handle_event(device_event, evset, vrings, thread_id)
        ring = vrings[device_event]
        ring.left -= 1
        ring.yielded = ring.left > 0


def test_a_ring_that_yields_is_dispatched_again_with_the_lock_released_between() -> None:
    backend = Yielding(n=1)
    ring = BudgetRing(passes=5)
    handler = VringEpollHandler(backend, [ring], [0], thread_id=0)
    handler.start()
    kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        handler.set_kick(0, kick_fd)
        with handler.paused():  # the control thread holds the lock: nothing runs
            kick(kick_fd)
        for _ in range(5):  # one kick, five passes
            assert backend.next_call()[0] == 0
            with handler.paused():  # between two passes the control thread gets in
                pass
        handler.rescan(0)  # the work is done: the next dispatch is a fresh pass
        assert backend.next_call()[0] == 0
        assert ring.begun == 6
    finally:
        handler.signal_exit()
        handler.join()
        handler.close()
        os.close(kick_fd)

"""VringEpollHandler busy polling: work found without kicks; kicks on again before sleeping."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from vhsm.backend import VhostUserBackend
from vhsm.worker import VringEpollHandler

WAIT = 10.0


class PolledRing:
    """A ring whose available work is a counter; records the notification calls."""

    def __init__(self) -> None:
        self.started = True
        self.enabled = True
        self.lock = threading.Lock()
        self.work = 0
        self.late = 0  # work that shows up while kicks are being re-enabled
        self.log: list[str] = []

    def has_available(self) -> bool:
        with self.lock:
            return self.work > 0

    def disable_notification(self) -> None:
        with self.lock:
            self.log.append("off")

    def enable_notification(self) -> bool:
        with self.lock:
            self.log.append("on")
            if self.late:
                self.work += self.late
                self.late = 0
        return self.has_available()


class Poller(VhostUserBackend):
    busy_poll_us = 2000

    def __init__(self) -> None:
        self.handled: list[int] = []
        self.idle = threading.Condition()

    def num_queues(self) -> int:
        return 2

    def busy_poll_queue(self, index: int) -> bool:
        return index == 1

    def handle_event(
        self, device_event: int, evset: int, vrings: Sequence[Any], thread_id: int
    ) -> None:
        ring = vrings[device_event]
        ring.disable_notification()
        with ring.lock:
            taken, ring.work = ring.work, 0
        ring.enable_notification()
        with self.idle:
            self.handled.append(taken)
            self.idle.notify_all()


@pytest.fixture
def worker() -> Iterator[tuple[Poller, list[PolledRing], VringEpollHandler, int]]:
    backend = Poller()
    rings = [PolledRing(), PolledRing()]
    handler = VringEpollHandler(backend, rings, [0, 1], 0)
    kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    handler.set_kick(1, kick)
    handler.start()
    yield backend, rings, handler, kick
    handler.signal_exit()
    handler.join(WAIT)
    handler.close()
    os.close(kick)


def wait_for(backend: Poller, what: Any) -> None:
    with backend.idle:
        assert backend.idle.wait_for(what, WAIT)


def test_work_found_without_a_kick_and_kicks_back_on_before_sleeping(
    worker: tuple[Poller, list[PolledRing], VringEpollHandler, int],
) -> None:
    backend, rings, handler, kick = worker
    assert handler.busy_poll == pytest.approx(0.002)
    ring = rings[1]
    with ring.lock:
        ring.work = 3
        ring.late = 2  # arrives while the worker re-enables kicks at the end of polling
    os.eventfd_write(kick, 1)
    wait_for(backend, lambda: sum(backend.handled) == 5)
    # the late work was served by polling, without a second kick
    assert backend.handled[0] == 3 and 2 in backend.handled[1:]
    # wait until the worker sleeps: the log stops changing
    log: list[str] = []
    for _ in range(int(WAIT / 0.2)):
        with ring.lock:
            now = list(ring.log)
        if now == log:
            break
        log = now
        threading.Event().wait(0.2)
    assert log[-1] == "on"
    assert "off" in log[log.index("on") :]  # suppressed again while polling
    assert rings[0].log == []  # a ring the back-end does not poll is left alone


def test_exit_while_polling(
    worker: tuple[Poller, list[PolledRing], VringEpollHandler, int],
) -> None:
    backend, rings, handler, kick = worker
    backend.busy_poll_us = 10**9
    handler.busy_poll = 1000.0  # effectively: poll until told to stop
    with rings[1].lock:
        rings[1].work = 1
    os.eventfd_write(kick, 1)
    wait_for(backend, lambda: backend.handled)
    handler.signal_exit()
    handler.join(WAIT)
    assert handler._thread is None  # the loop returned from inside the polling window


def test_off_by_default() -> None:
    class Plain(Poller):
        busy_poll_us = 0

    handler = VringEpollHandler(Plain(), [PolledRing(), PolledRing()], [0, 1], 0)
    try:
        assert handler.busy_poll == 0
    finally:
        handler.close()

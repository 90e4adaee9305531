"""Shared helpers of the fuzz, fault, soak and hardening tests (and the fuzz/ scripts).

Hypothesis budgets come from the environment so the same test functions run
briefly under pytest and for long in ``fuzz/*.py``: ``VHSM_FUZZ_EXAMPLES``
scales every ``max_examples``; ``VHSM_FUZZ_COUNTS`` names a JSON file where
each test adds how many inputs it ran.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings

from vhsm.backend import EPOLLIN, VhostUserBackend, drain
from vhsm.daemon import Listener, VhostUserDaemon
from vhsm.wire import ProtocolFeature, VirtioFeature

PF = ProtocolFeature
VF = VirtioFeature
WAIT = 10.0

_counts: Counter[str] = Counter()
_counts_lock = threading.Lock()


def budget(default: int) -> int:
    """``max_examples`` for a test: the default, or VHSM_FUZZ_EXAMPLES when set."""
    value = os.environ.get("VHSM_FUZZ_EXAMPLES")
    return int(value) if value else default


def fuzz_settings(default: int, **kwargs: Any) -> settings:
    """Hypothesis settings of a bounded fuzz test (no deadline: I/O timing varies)."""
    return settings(
        max_examples=budget(default),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        **kwargs,
    )


def count(name: str, n: int = 1) -> None:
    """Record that test `name` ran `n` more inputs (flushed to VHSM_FUZZ_COUNTS)."""
    with _counts_lock:
        _counts[name] += n
    path = os.environ.get("VHSM_FUZZ_COUNTS")
    if path:
        with _counts_lock:
            Path(path).write_text(json.dumps(dict(_counts), indent=1, sort_keys=True))


def counts() -> dict[str, int]:
    """Inputs run so far in this process, per test."""
    with _counts_lock:
        return dict(_counts)


def open_fds() -> int:
    """Number of fds open in this process."""
    return len(os.listdir("/proc/self/fd"))


def fd_table() -> dict[int, str]:
    """fd -> what it points at (for leak reports)."""
    out: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return out


def rss_kib() -> int:
    """Resident set size of this process, KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT, what: str = "") -> None:
    """Wait (bounded) for another thread to make `predicate` true; AssertionError if never."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        pause.wait(0.002)


def settle_fds(expected: int, timeout: float = WAIT) -> int:
    """Wait for the fd count to come back to at most `expected`; return it.

    Threads close fds asynchronously; fewer than before is no leak (the garbage
    collector may close another test's leftovers meanwhile).
    """
    deadline = time.monotonic() + timeout
    now = open_fds()
    while now > expected and time.monotonic() < deadline:
        time.sleep(0.005)
        now = open_fds()
    return now


@contextlib.contextmanager
def temp_dir() -> Iterator[Path]:
    """A short private directory (unix socket paths are limited to 107 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="vhsm-fz-", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class EchoBackend(VhostUserBackend):
    """Two queues; readable bytes come back in the writable part. Offers many features.

    Broad offers let fuzzed streams reach deep into the session: config space,
    inflight buffers, memory slots, logging, reset, status, device state.
    """

    def __init__(self) -> None:
        self.raise_on: bytes | None = None

    def num_queues(self) -> int:
        return 2

    def max_queue_size(self) -> int:
        return 1024

    def features(self) -> int:
        return int(
            VF.VERSION_1
            | VF.PROTOCOL_FEATURES
            | VF.RING_EVENT_IDX
            | VF.RING_INDIRECT_DESC
            | VF.LOG_ALL
            | VF.RING_PACKED
        )

    def protocol_features(self) -> int:
        return int(
            PF.MQ
            | PF.LOG_SHMFD
            | PF.REPLY_ACK
            | PF.BACKEND_REQ
            | PF.CONFIG
            | PF.BACKEND_SEND_FD
            | PF.INFLIGHT_SHMFD
            | PF.RESET_DEVICE
            | PF.CONFIGURE_MEM_SLOTS
            | PF.STATUS
            | PF.DEVICE_STATE
        )

    def get_config(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        return None

    def handle_event(
        self, device_event: int, evset: int, vrings: Sequence[Any], thread_id: int
    ) -> None:
        if evset != EPOLLIN:
            return
        drain(vrings[device_event], self._echo)

    def _echo(self, chain: Any) -> int:
        data = chain.read_all()
        if self.raise_on is not None and self.raise_on in data:
            raise RuntimeError("hook fails in the middle of a chain (on purpose)")
        return int(chain.write(data))


@contextlib.contextmanager
def running_daemon(
    backend: VhostUserBackend, name: str = "fuzz"
) -> Iterator[tuple[VhostUserDaemon, Path]]:
    """A daemon serving `backend` on a fresh socket, stopped at exit."""
    with temp_dir() as directory:
        path = directory / "vu.sock"
        daemon = VhostUserDaemon(name, backend)
        daemon.start(Listener(path))
        try:
            yield daemon, path
        finally:
            daemon.stop()


def wait_idle(daemon: VhostUserDaemon, timeout: float = WAIT) -> None:
    """Wait until the daemon has finished resetting the last connection's session."""
    wait_until(
        lambda: not daemon.serving and not _control_threads_alive(daemon),
        timeout,
        "the daemon to finish the previous session",
    )


def _control_threads_alive(daemon: VhostUserDaemon) -> bool:
    return any(
        t.is_alive() and t.name.endswith("-control") for t in getattr(daemon, "_threads", [])
    )

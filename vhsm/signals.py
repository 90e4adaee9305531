"""SIGINT and SIGTERM as a clean stop, for the processes that serve back-ends.

`VhostUserDaemon.serve` and `vhsm serve` route both signals to the daemon's
shutdown handle, so an interrupted daemon closes its connection, joins its
threads and removes its socket instead of dying with a traceback (SIGINT) or
leaving the socket file behind (SIGTERM).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

log = logging.getLogger(__name__)

#: The signals that stop a serving process.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stop_on_signals(stop: Callable[[], None]) -> Callable[[], None]:
    """Route SIGINT/SIGTERM to `stop` and return the function that restores the old handlers.

    Python delivers signals to the main thread only, so elsewhere this installs
    nothing (and the restorer does nothing). `stop` must be safe in a signal
    handler: `ShutdownHandle.shutdown` is (it writes an eventfd, takes no lock).
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stop()

    old = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}

    def restore() -> None:
        for sig, previous in old.items():
            signal.signal(sig, previous)

    return restore

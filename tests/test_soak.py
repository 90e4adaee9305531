"""A short soak (benchmarks/soak.py is the long one): reconnect cycles and I/O stay flat.

Flat means: the fd count after the run equals the count after warm-up, the
daemon keeps no per-connection objects (Thread objects alive in the process
stay bounded), and no thread is left behind after ``stop()``.
"""

from __future__ import annotations

import gc
import threading
from pathlib import Path

from fuzz_support import open_fds, running_daemon, settle_fds, temp_dir, wait_idle

from vhsm.devices.blk import BlkBackend
from vhsm.devices.rng import RngBackend
from vhsm.frontend import BlkDevice, Frontend, RngDevice
from vhsm.transport import PeerClosed

CYCLES = 300
WAIT = 10.0


def thread_objects() -> int:
    return sum(isinstance(o, threading.Thread) for o in gc.get_objects())


def one_cycle(path: Path) -> bool:
    """Connect, set up, one request, disconnect; False when refused (retry)."""
    with Frontend.connect(path, timeout=WAIT) as fe:
        try:
            fe.start(queues=1, size=64)
        except PeerClosed:
            return False
        assert len(RngDevice(fe).read(32)) == 32
        return True


def test_connect_disconnect_cycles_stay_flat() -> None:
    threads_before = set(threading.enumerate())
    with running_daemon(RngBackend(), "soak") as (daemon, path):
        for _ in range(20):  # warm-up
            one_cycle(path)
        wait_idle(daemon)
        fds, objects = open_fds(), thread_objects()
        done = 0
        while done < CYCLES:
            done += one_cycle(path)
        wait_idle(daemon)
        gc.collect()
        assert settle_fds(fds) <= fds
        assert thread_objects() <= objects + 2, "the daemon keeps objects per past connection"
        assert daemon.last_error is None
    left = [t.name for t in set(threading.enumerate()) - threads_before if t.is_alive()]
    assert not left, f"threads left after stop(): {left}"


def test_io_run_stays_flat() -> None:
    with temp_dir() as directory:
        image = directory / "disk.img"
        with image.open("wb") as f:
            f.truncate(4 << 20)
        backend = BlkBackend(str(image))
        try:
            with running_daemon(backend, "soak-io") as (daemon, path):
                with Frontend.connect(path, timeout=WAIT) as fe:
                    fe.start(queues=1, size=64)
                    blk = BlkDevice(fe)
                    blk.write(0, bytes(4096))
                    fds = open_fds()
                    for n in range(1000):
                        data = n.to_bytes(4, "little") * 1024
                        blk.write((n * 8) % 8000, data)
                        assert blk.read((n * 8) % 8000, 8) == data
                    assert open_fds() <= fds
                wait_idle(daemon)
                assert daemon.last_error is None
        finally:
            backend.close()

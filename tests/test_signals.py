"""`VhostUserDaemon.serve` in a script: signals stop it cleanly, a busy socket is one line."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhsm.daemon import VhostUserDaemon
from vhsm.devices.rng import RngBackend
from vhsm.errors import VhsmError
from vhsm.frontend import Frontend, RngDevice
from vhsm.signals import stop_on_signals

WAIT = 20.0
SCRIPT = """
import sys
from vhsm.daemon import VhostUserDaemon
from vhsm.devices.rng import RngBackend

VhostUserDaemon("my-rng", RngBackend()).serve(sys.argv[1])
print("serve returned", flush=True)
"""


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vhsm-sig-", dir="/tmp") as directory:
        yield Path(directory)


def run_script(path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_cleanly_on_a_signal_and_removes_its_socket(workdir, sig) -> None:
    path = workdir / "rng.sock"
    proc = run_script(path)
    try:
        with Frontend.connect(path, retry_for=WAIT, timeout=WAIT) as fe:
            fe.start(queues=1, size=32)
            assert len(RngDevice(fe).read(16)) == 16
    finally:
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert out == "serve returned\n"
    assert err.splitlines()[0] == f"my-rng: serving vhsm.devices.rng:RngBackend on {path}"
    assert not path.exists()


def test_serve_on_a_socket_in_use_is_one_line(workdir) -> None:
    path = workdir / "busy.sock"
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    busy.bind(str(path))
    busy.listen(1)
    try:
        proc = run_script(path)
        out, err = proc.communicate(timeout=WAIT)
    finally:
        busy.close()
    assert proc.returncode == 1
    assert err.strip() == f"my-rng: socket in use: {path} (another back-end is listening)"
    assert out == ""


def test_serve_outside_the_main_thread_raises(workdir) -> None:
    path = workdir / "busy.sock"
    path.write_text("not a socket")
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            VhostUserDaemon("t", RngBackend()).serve(path)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    thread.join(WAIT)
    assert len(errors) == 1 and isinstance(errors[0], VhsmError)


def test_stop_on_signals_installs_nothing_outside_the_main_thread() -> None:
    before = signal.getsignal(signal.SIGTERM)
    restorers = []
    thread = threading.Thread(target=lambda: restorers.append(stop_on_signals(lambda: None)))
    thread.start()
    thread.join()
    assert signal.getsignal(signal.SIGTERM) is before
    restorers[0]()
    assert signal.getsignal(signal.SIGTERM) is before


def test_stop_on_signals_routes_and_restores() -> None:
    calls: list[int] = []
    before = signal.getsignal(signal.SIGTERM)
    restore = stop_on_signals(lambda: calls.append(1))
    try:
        signal.raise_signal(signal.SIGTERM)
    finally:
        restore()
    assert calls == [1]
    assert signal.getsignal(signal.SIGTERM) is before

"""`vhsm serve`: argument errors in-process, real serving in a subprocess."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhsm.cli import build_parser, main
from vhsm.commands.serve import make_backend
from vhsm.devices.net import NetBackend
from vhsm.frontend import BlkDevice, Frontend, FrontendListener, NetDevice, RngDevice

WAIT = 20.0
VHSM = [sys.executable, "-m", "vhsm", "--log-level", "INFO"]


@pytest.fixture
def workdir() -> Iterator[Path]:
    directory = tempfile.mkdtemp(prefix="vhsm-serve-", dir="/tmp")
    yield Path(directory)
    shutil.rmtree(directory, ignore_errors=True)


def serve(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*VHSM, "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen[str], sig: int | None = signal.SIGTERM) -> tuple[int, str]:
    if sig is not None:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=WAIT)
    return proc.returncode, err


def connect(path: Path) -> Frontend:
    return Frontend.connect(path, retry_for=WAIT, timeout=WAIT)


# --- errors: one line, non-zero --------------------------------------------------------------
def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_missing_image(capsys, workdir) -> None:
    err = one_line_error(
        capsys, ["serve", "blk", "--socket", str(workdir / "s"), "--file", str(workdir / "no.img")]
    )
    assert "no.img" in err and "does not exist" in err


def test_bad_socket_directory(capsys, workdir) -> None:
    err = one_line_error(capsys, ["serve", "rng", "--socket", str(workdir / "nodir" / "s")])
    assert "does not exist" in err


def test_socket_in_use(capsys, workdir) -> None:
    path = workdir / "busy.sock"
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    busy.bind(str(path))
    busy.listen(1)
    try:
        err = one_line_error(capsys, ["serve", "rng", "--socket", str(path)])
        assert "socket in use" in err
    finally:
        busy.close()


def test_path_is_not_a_socket(capsys, workdir) -> None:
    path = workdir / "file"
    path.write_text("keep me")
    err = one_line_error(capsys, ["serve", "rng", "--socket", str(path)])
    assert "not a socket" in err
    assert path.read_text() == "keep me"


def test_help_lists_devices_and_options() -> None:
    out = subprocess.run(
        [*VHSM, "serve", "blk", "--help"], capture_output=True, text=True, timeout=WAIT
    )
    assert out.returncode == 0
    for option in ("--socket", "--file", "--read-only", "--queues", "--client", "--once"):
        assert option in out.stdout
    bad = subprocess.run(
        [*VHSM, "serve", "net", "--socket", "x", "--mode", "bridge"],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert bad.returncode == 2


@pytest.mark.parametrize(("argv", "checksum"), [([], True), (["--sink-reads", "copy"], False)])
def test_net_sink_reads(argv: list[str], checksum: bool) -> None:
    args = build_parser().parse_args(["serve", "net", "--socket", "s", "--mode", "sink", *argv])
    backend = make_backend(args)
    assert isinstance(backend, NetBackend) and backend.checksum is checksum


@pytest.mark.parametrize(
    ("argv", "window"),
    [
        (["rng"], 0),
        (["rng", "--busy-poll-us", "30"], 30),
        (["net"], 50),
        (["net", "--busy-poll-us", "0"], 0),
    ],
)
def test_busy_poll_window(argv: list[str], window: int) -> None:
    args = build_parser().parse_args(["serve", *argv, "--socket", "s"])
    assert make_backend(args).busy_poll_us == window


def test_busy_poll_window_out_of_range(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "rng", "--socket", "s", "--busy-poll-us", "-5"])
    assert exc.value.code == 2
    assert "-5 not in 0..1000000 microseconds" in capsys.readouterr().err


def test_net_sink_reads_offers_every_way_the_device_has() -> None:
    from vhsm.devices.net import SINK_READS

    for reads in SINK_READS:
        args = build_parser().parse_args(["serve", "net", "--socket", "s", "--sink-reads", reads])
        backend = make_backend(args)
        assert isinstance(backend, NetBackend) and backend.checksum is (reads == "checksum")


def test_net_sink_reads_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "net", "--socket", "s", "--sink-reads", "peek"])
    assert "invalid choice: 'peek'" in capsys.readouterr().err


# --- serving ------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_rng_serves_across_reconnects_and_stops_on_signal(workdir, sig) -> None:
    path = workdir / "rng.sock"
    proc = serve("rng", "--socket", str(path))
    try:
        for _ in range(2):
            with connect(path) as fe:
                fe.start(queues=1, size=64)
                assert len(RngDevice(fe).read(64)) == 64
    finally:
        code, err = finish(proc, sig)
    assert code == 0, err
    assert "Traceback" not in err
    assert not path.exists()


def test_blk_writes_reach_the_image(workdir) -> None:
    image = workdir / "disk.img"
    image.write_bytes(bytes(1 << 20))
    path = workdir / "blk.sock"
    proc = serve("blk", "--socket", str(path), "--file", str(image), "--queues", "2")
    try:
        with connect(path) as fe:
            fe.start(queues=2, size=64)
            dev = BlkDevice(fe, queue=1)
            dev.write(8, b"vhsm" * 128)
            assert dev.read(8) == b"vhsm" * 128
    finally:
        code, err = finish(proc)
    assert code == 0, err
    assert image.read_bytes()[8 * 512 : 8 * 512 + 4] == b"vhsm"


def test_once_exits_after_the_first_connection(workdir) -> None:
    path = workdir / "once.sock"
    proc = serve("rng", "--socket", str(path), "--once")
    with connect(path) as fe:
        fe.get_features()
    code, err = finish(proc, sig=None)
    assert code == 0, err
    assert not path.exists()


def test_client_mode(workdir) -> None:
    path = workdir / "client.sock"
    listener = FrontendListener(path)
    proc = serve("rng", "--socket", str(path), "--client", "--once")
    try:
        fe = Frontend(listener.accept_socket(WAIT), listener=listener, timeout=WAIT)
        with fe:
            fe.start(queues=1, size=32)
            assert len(RngDevice(fe).read(16)) == 16
        code, err = finish(proc, sig=None)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        listener.close()
    assert code == 0, err


def test_net_loopback(workdir) -> None:
    path = workdir / "net.sock"
    proc = serve("net", "--socket", str(path), "--mode", "loopback")
    try:
        with connect(path) as fe:
            fe.start(queues=2, size=64)
            dev = NetDevice(fe)
            dev.post_rx(4)
            frame = bytes(range(60))
            dev.send(frame)
            assert dev.receive(WAIT) == frame
    finally:
        code, err = finish(proc)
    assert code == 0, err

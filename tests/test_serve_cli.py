"""`vhsm serve`: argument errors in-process, real serving in a subprocess."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def test_socket_path_too_long(capsys, workdir) -> None:
    path = workdir / ("s" * 120)
    err = one_line_error(capsys, ["serve", "rng", "--socket", str(path)])
    assert "cannot listen" in err and "too long" in err


def test_stale_socket_that_cannot_be_removed(capsys, workdir, monkeypatch) -> None:
    """A stale socket in a directory we may not write: one line, not a traceback."""
    path = workdir / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()

    real_unlink = os.unlink

    def refuse(target: str, *args: Any, **kwargs: Any) -> None:
        if os.fspath(target) != str(path):
            return real_unlink(target, *args, **kwargs)
        raise PermissionError(13, "Permission denied", str(target))

    monkeypatch.setattr(os, "unlink", refuse)  # root ignores a read-only directory's mode
    err = one_line_error(capsys, ["serve", "rng", "--socket", str(path)])
    assert "cannot remove the stale socket" in err and "Permission denied" in err


@pytest.mark.parametrize("value", ["-1", "soon", "4000"])
def test_handshake_timeout_out_of_range(capsys: pytest.CaptureFixture[str], value: str) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "rng", "--socket", "s", "--handshake-timeout", value])
    assert "--handshake-timeout" in capsys.readouterr().err


def test_a_silent_client_is_dropped_and_sigterm_exits_0(workdir) -> None:
    path = workdir / "silent.sock"
    proc = serve("rng", "--socket", str(path), "--handshake-timeout", "0.5")
    try:
        with connect(path) as first:
            first.get_features()
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.connect(str(path))
        silent.settimeout(WAIT)
        with connect(path) as fe:  # waits behind the silent one for 0.5 s at most
            fe.start(queues=1, size=64)
            assert len(RngDevice(fe).read(16)) == 16
        assert silent.recv(1) == b"", "the silent client was not disconnected"
        silent.close()
    finally:
        code, err = finish(proc)
    assert code == 0, err
    assert "VU-FRAME-011" in err
    assert "Traceback" not in err


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


# --- your own back-end: MODULE:CLASS ---------------------------------------------------------
OWN_DEVICE = """
import os
from vhsm.backend import VhostUserBackend, drain
from vhsm.wire import ProtocolFeature, VirtioFeature


class Zeros(VhostUserBackend):
    def num_queues(self):
        return 1

    def max_queue_size(self):
        return 256

    def features(self):
        return int(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES)

    def protocol_features(self):
        return int(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK)

    def handle_event(self, device_event, evset, vrings, thread_id):
        drain(vrings[0], lambda chain: chain.writable_len)


def not_a_backend():
    return 42
"""


@pytest.mark.parametrize("form", ["module", "file"])
def test_own_backend_is_served_like_the_reference_devices(workdir, form) -> None:
    (workdir / "zeros_device.py").write_text(OWN_DEVICE)
    path = workdir / "own.sock"
    spec = "zeros_device:Zeros" if form == "module" else f"{workdir}/zeros_device.py:Zeros"
    proc = subprocess.Popen(
        [*VHSM, "serve", spec, "--socket", str(path), "--busy-poll-us", "10"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=workdir,
    )
    try:
        for _ in range(2):  # across reconnects
            with connect(path) as fe:
                fe.start(queues=1, size=64)
                assert RngDevice(fe).read(16) == bytes(16)
    finally:
        code, err = finish(proc, signal.SIGTERM)
    assert code == 0, err
    assert "Traceback" not in err
    assert not path.exists()
    assert f"vhsm serve: serving zeros_device:Zeros on {path}" in err.splitlines()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_here:X", "cannot import no_such_module_here: ModuleNotFoundError"),
        ("zeros_device:Nope", "module zeros_device has no 'Nope'"),
        ("zeros_device:not_a_backend", "not_a_backend() gave a int, not a VhostUserBackend"),
        ("zeros_device:os", "os is not a class or a factory"),
        ("missing_dir/x.py:Zeros", "no file missing_dir/x.py"),
        (":Zeros", "expected MODULE:CLASS"),
    ],
)
def test_own_backend_errors_are_one_line(capsys, workdir, monkeypatch, spec, message) -> None:
    (workdir / "zeros_device.py").write_text(OWN_DEVICE)
    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(workdir))
    err = one_line_error(capsys, ["serve", spec, "--socket", str(workdir / "s")])
    assert message in err
    assert not (workdir / "s").exists()


def test_start_up_line_names_the_reference_device(workdir) -> None:
    path = workdir / "rng.sock"
    proc = serve("rng", "--socket", str(path))
    with connect(path) as fe:
        fe.get_features()
    code, err = finish(proc)
    assert code == 0, err
    assert f"vhsm serve: serving rng on {path}" in err.splitlines()


# --- a hostile front-end against `vhsm serve`: it serves on, leaks nothing, exits 0 -------
def daemon_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def daemon_guest_mappings(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/maps").read_text()
    return [line for line in text.splitlines() if "vhsm-guest-" in line]


def test_hostile_front_end_fds_memory_and_silence_then_sigterm_exits_0(workdir) -> None:
    import os
    import struct

    from vhsm.frontend import FrontendMemory
    from vhsm.wire import FrontendReq, VhostUserMemory, VhostUserU64, VhostUserVringFd
    from vhsm.wire.payloads import VhostUserMemoryRegion

    path = workdir / "hostile.sock"
    image = workdir / "disk.img"
    image.write_bytes(bytes(1 << 20))
    proc = serve("blk", "--file", str(image), "--socket", str(path), "--handshake-timeout", "0.5")

    def io(fe: Frontend) -> None:
        dev = BlkDevice(fe)
        dev.write(3, b"\x5a" * 512)
        assert dev.read(3, 1) == b"\x5a" * 512

    def fresh(memory: FrontendMemory | None = None) -> Frontend:
        fe = Frontend.connect(path, retry_for=WAIT, timeout=WAIT, strict=False, memory=memory)
        fe.start(queues=1, size=64)
        return fe

    def nacked(fe: Frontend, req: FrontendReq, payload: object, fd: int) -> bool:
        try:
            reply = fe.request(req, payload, fds=[fd], need_reply=True)  # type: ignore[arg-type]
        finally:
            os.close(fd)
        return reply is not None and reply.payload == VhostUserU64(1)

    try:
        with fresh() as fe:
            io(fe)
        before = steady_fds(proc.pid)  # once the first session's reset is done
        with fresh() as fe:
            (workdir / "ro").write_bytes(b"x")
            for _ in range(10):  # a non-socket back-end channel fd used to leak every time
                fd = os.open(workdir / "ro", os.O_RDONLY)
                assert nacked(fe, FrontendReq.SET_BACKEND_REQ_FD, None, fd)
            fd = os.open(workdir / "ro", os.O_RDONLY)  # read-only "call" fd: refused up front
            assert nacked(fe, FrontendReq.SET_VRING_CALL, VhostUserVringFd(0), fd)
            fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
            assert nacked(fe, FrontendReq.SET_VRING_KICK, VhostUserVringFd(0), fd)
            full = os.eventfd(0, os.EFD_CLOEXEC)  # blocking, counter at its maximum
            os.eventfd_write(full, 0xFFFF_FFFF_FFFF_FFFE)
            fe.call(FrontendReq.SET_VRING_CALL, VhostUserVringFd(0), fds=[full])
            os.close(full)
            io(fe)
            top = os.memfd_create("top", os.MFD_CLOEXEC)
            os.ftruncate(top, 1 << 20)
            region = VhostUserMemoryRegion((1 << 64) - (1 << 20), 1 << 20, 0x7F00_0000_0000, 0)
            assert nacked(fe, FrontendReq.SET_MEM_TABLE, VhostUserMemory([region]), top)
        with fresh(FrontendMemory(sealing=False)) as fe:
            (guest,) = fe.memory.regions
            os.ftruncate(guest.fd, 0)  # shrunk under the daemon's mapping
            del guest
            os.eventfd_write(fe.vring(0).kick_fd, 1)
            assert fe.expect_closed(WAIT)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
            silent.connect(str(path))
            silent.sendall(struct.pack("<III", int(FrontendReq.SET_FEATURES), 1, 8)[:5])
            with fresh() as fe:  # served once the silent client timed out
                io(fe)
        after = before
        for _ in range(200):  # the last session's reset runs after its close
            after = daemon_fds(proc.pid)
            if after <= before and not daemon_guest_mappings(proc.pid):
                break
            pause()
        assert after <= before, f"the daemon kept fds: {before} -> {after}"
        assert daemon_guest_mappings(proc.pid) == [], "guest memory stayed mapped"
    finally:
        code, err = finish(proc)
    assert code == 0, err
    for rule in ("VU-FD-001", "VU-FD-002", "VU-MEM-004", "VU-FD-004", "VU-FRAME-011"):
        assert rule in err, f"{rule} not logged"
    assert "Traceback" not in err and "internal error" not in err


def pause() -> None:
    import threading

    threading.Event().wait(0.02)


def steady_fds(pid: int) -> int:
    """The daemon's fd count once it stopped changing (five equal looks in a row)."""
    seen = [daemon_fds(pid)]
    while len(seen) < 500 and not (len(seen) >= 5 and len(set(seen[-5:])) == 1):
        pause()
        seen.append(daemon_fds(pid))
    return seen[-1]


# --- Xen: `--xen` -----------------------------------------------------------------------------
def test_xen_without_privcmd_is_one_line_naming_the_device(capsys, workdir) -> None:
    xen_dir = workdir / "xen"
    err = one_line_error(
        capsys, ["serve", "rng", "--socket", str(workdir / "s"), "--xen", "--xen-dir", str(xen_dir)]
    )
    assert f"--xen needs {xen_dir / 'privcmd'}: No such file or directory" in err
    assert not (workdir / "s").exists()


def test_xen_dir_needs_xen(capsys, workdir) -> None:
    err = one_line_error(
        capsys, ["serve", "rng", "--socket", str(workdir / "s"), "--xen-dir", str(workdir)]
    )
    assert "--xen-dir needs --xen" in err


def test_xen_default_device_is_dev_xen_privcmd(capsys, workdir) -> None:
    if Path("/dev/xen/privcmd").exists():
        pytest.skip("a Xen domain: /dev/xen/privcmd exists")
    err = one_line_error(capsys, ["serve", "rng", "--socket", str(workdir / "s"), "--xen"])
    assert "--xen needs /dev/xen/privcmd" in err


def test_xen_offers_xen_mmap_and_refuses_a_grant_region_without_gntdev(workdir) -> None:
    from vhsm.errors import BackendError
    from vhsm.transport import PeerClosed
    from vhsm.wire import FrontendReq, ProtocolFeature
    from vhsm.wire.enums import XenMmapFlag
    from vhsm.wire.payloads import VhostUserMemory, VhostUserMemoryRegion

    xen_dir = workdir / "xen"
    xen_dir.mkdir()
    (xen_dir / "privcmd").write_bytes(b"")  # opens: the start-up check passes; no gntdev
    path = workdir / "rng.sock"
    proc = serve("rng", "--socket", str(path), "--xen", "--xen-dir", str(xen_dir))
    xen = int(ProtocolFeature.XEN_MMAP | ProtocolFeature.REPLY_ACK)

    def table(fe: Frontend, flags: int) -> None:
        regions, fds = fe.memory.table()
        descs = tuple(
            VhostUserMemoryRegion(r.guest_phys_addr, r.memory_size, r.userspace_addr,
                                  r.mmap_offset, flags, 1) for r in regions
        )  # fmt: skip
        fe.call(FrontendReq.SET_MEM_TABLE, VhostUserMemory(descs), fds=fds)

    try:
        with connect(path) as fe:
            assert fe.get_protocol_features() & ProtocolFeature.XEN_MMAP
            fe.negotiate(protocol_features=xen)
            with pytest.raises((BackendError, PeerClosed)):  # NACKed (then closed)
                table(fe, XenMmapFlag.GRANT | XenMmapFlag.NO_ADVANCE_MAP)
        with connect(path) as fe:  # still serving: a plain Xen-form table moves data
            fe.negotiate(protocol_features=xen)
            table(fe, 0)
            fe.setup_vring(0, 64)
            assert len(RngDevice(fe).read(64)) == 64
    finally:
        code, err = finish(proc)
    assert code == 0, err
    assert f"Xen grant mapping needs {xen_dir / 'gntdev'}: No such file or directory" in err


#: Run `vhsm serve blk --once` in the main thread; once its socket exists, a second
#: thread writes the daemon's module set, then connects and hangs up (which ends it).
_IMPORT_PROBE = """
import os, socket, sys, threading, time
from vhsm.cli import main
sock_path, out_path, image = sys.argv[1:4]
def probe():
    deadline = time.monotonic() + 30
    while not os.path.exists(sock_path) and time.monotonic() < deadline:
        time.sleep(0.01)
    with open(out_path, "w") as out:
        out.write("\\n".join(sorted(sys.modules)))
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sock_path)
threading.Thread(target=probe, daemon=True).start()
sys.exit(main(["serve", "blk", "--file", image, "--socket", sock_path, "--once"]))
"""


@pytest.mark.parametrize("pure", [False, True])
def test_an_idle_daemon_carries_no_numpy_yaml_or_cattrs(workdir: Path, pure: bool) -> None:
    """What an idle `vhsm serve blk` imports: no numpy, PyYAML, cattrs, attrs, transitions.

    They cost a daemon resident memory for nothing (numpy alone ~15 MiB): the session
    machinery (transitions, attrs payloads, framing) comes with the first front-end,
    numpy with the first ring, YAML only when the spec cache is stale, the rest never.
    """
    image = workdir / "disk.img"
    image.write_bytes(bytes(1 << 20))
    out = workdir / "modules.txt"
    env = {**os.environ, "VHSM_PURE_PYTHON": "1" if pure else "0"}
    # the first run may parse YAML to fill the spec cache; the second must not need to
    for _ in range(2):
        subprocess.run(
            [sys.executable, "-c", _IMPORT_PROBE, str(workdir / "s.sock"), str(out), str(image)],
            check=True,
            timeout=60,
            env=env,
        )
    modules = set(out.read_text().split())
    assert {"vhsm.daemon", "vhsm.devices.blk", "vhsm.vring"} <= modules  # it did serve
    heavy = (
        *("numpy", "yaml", "cattrs", "attrs", "attr", "transitions", "ctypes", "hashlib"),
        *("vhsm.session", "vhsm.wire.framing", "vhsm.wire.payloads", "vhsm.virtq.split"),
        *("vhsm.inflight", "vhsm.transport", "vhsm.backend_channel"),
    )
    assert sorted(m for m in modules if m.startswith(heavy)) == []

"""Hardening: socket file, one front-end at a time, caps before allocation, no guest data in logs.

Everything the front-end and the guest send is untrusted (DESIGN.md): sizes and
fd counts are capped before anything is allocated, guest-controlled lengths are
bounded before a copy, and the logs name requests, fields and addresses but
never echo guest data.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import struct
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fuzz_support import (
    EchoBackend,
    open_fds,
    running_daemon,
    settle_fds,
    temp_dir,
    wait_idle,
)

from vhsm.daemon import Listener
from vhsm.devices.blk import BlkBackend
from vhsm.errors import FramingError, VhsmError, WireError
from vhsm.frontend import BlkDevice, Frontend, FrontendMemory
from vhsm.transport import PeerClosed, send_with_fds
from vhsm.wire import (
    MAX_FDS,
    Decoder,
    FrontendReq,
    VhostUserConfig,
    VhostUserInflight,
    encode,
    make_request,
)
from vhsm.wire.framing import HEADER

WAIT = 10.0


@pytest.fixture
def directory() -> Iterator[Path]:
    with temp_dir() as d:
        yield d


@pytest.fixture
def echo() -> Iterator[tuple[EchoBackend, Any, Path]]:
    backend = EchoBackend()
    with running_daemon(backend, "hardening") as (daemon, path):
        yield backend, daemon, path


# --- the socket file ------------------------------------------------------------------
def test_socket_is_created_0600(directory: Path) -> None:
    path = directory / "vu.sock"
    with Listener(path):
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600


def test_socket_is_never_reachable_by_others_even_while_binding(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The socket file is 0600 from the instant bind() creates it, whatever the umask.

    The listener sets the mode on the socket itself (fchmod) before bind(), so no
    other user can connect in a window after bind(), and nothing is changed through
    the path afterwards (a chmod could follow a symlink swapped in by a writer of the
    directory).
    """
    at_bind: list[int] = []
    chmods: list[tuple[Any, ...]] = []
    real_bind = socket.socket.bind

    def spy_bind(sock: socket.socket, address: Any) -> None:
        real_bind(sock, address)
        if sock.family == socket.AF_UNIX:
            at_bind.append(stat.S_IMODE(os.stat(address).st_mode))

    def no_chmod(*args: Any, **kwargs: Any) -> None:
        chmods.append(args)

    monkeypatch.setattr(socket.socket, "bind", spy_bind)
    monkeypatch.setattr(os, "chmod", no_chmod)
    old = os.umask(0o000)  # a permissive umask, as a service manager may leave
    try:
        with Listener(directory / "vu.sock") as listener:
            final = stat.S_IMODE(os.stat(listener.path).st_mode)
    finally:
        os.umask(old)
    assert at_bind == [0o600], (
        f"socket file was mode {[oct(m) for m in at_bind]} right after bind: other users "
        "could connect before its mode was fixed (set the mode on the socket before bind)"
    )
    assert chmods == [], "the listener changed a mode through the path"
    assert final == 0o600


@pytest.mark.parametrize("kind", ["file", "directory", "symlink", "live-socket"])
def test_never_replaces_an_existing_non_socket_path(directory: Path, kind: str) -> None:
    path = directory / "vu.sock"
    target = directory / "precious"
    target.write_bytes(b"keep me")
    other: Listener | None = None
    if kind == "file":
        path.write_bytes(b"keep me too")
    elif kind == "directory":
        path.mkdir()
    elif kind == "symlink":
        path.symlink_to(target)
    else:
        other = Listener(path)
    try:
        with pytest.raises(VhsmError):
            Listener(path)
        assert target.read_bytes() == b"keep me"
        if kind == "file":
            assert path.read_bytes() == b"keep me too"
        elif kind == "directory":
            assert path.is_dir()
        elif kind == "symlink":
            assert path.is_symlink()
        else:
            assert stat.S_ISSOCK(os.stat(path).st_mode)
    finally:
        if other is not None:
            other.close()


# --- one front-end at a time ---------------------------------------------------------------
def echo_once(fe: Frontend, text: bytes) -> bytes:
    vq = fe.vring(0)
    src, dst = fe.memory.alloc(len(text)), fe.memory.alloc(len(text))
    fe.memory.write(src, text)
    vq.post([(src, len(text))], [(dst, len(text))])
    vq.kick(force=True)
    _, length = vq.wait_used(WAIT)
    return fe.memory.read(dst, length)


def test_second_frontend_is_refused_cleanly(echo: Any) -> None:
    _, daemon, path = echo
    with Frontend.connect(path, timeout=WAIT) as first:
        first.start(queues=1, size=64)
        for _ in range(3):
            with Frontend.connect(path, timeout=WAIT) as second:
                assert second.expect_closed(WAIT), "a second front-end was not refused"
        assert echo_once(first, b"still served") == b"still served"
    wait_idle(daemon)
    assert daemon.last_error is None


class SlowMemoryBackend(EchoBackend):
    """Takes a while to apply a memory table (a big table, a slow device)."""

    def __init__(self) -> None:
        super().__init__()
        self.applying = threading.Event()

    def memory_updated(self) -> None:
        self.applying.set()
        threading.Event().wait(0.5)


def test_reconnect_right_after_a_disconnect_is_served() -> None:
    """A front-end that closes and connects again must be served, not refused.

    The daemon is still finishing the old session's last request when the new
    connection arrives; it must wait for that session to end, not treat the
    newcomer as a second front-end.
    """
    backend = SlowMemoryBackend()
    with running_daemon(backend, "reconnect") as (_, path):
        first = Frontend.connect(path, timeout=WAIT)
        first.negotiate()
        regions, fds = first.memory.table()
        from vhsm.wire import VhostUserMemory

        first.send(make_request(FrontendReq.SET_MEM_TABLE, VhostUserMemory(regions), fds=fds))
        assert backend.applying.wait(WAIT)
        first.close()  # gone while the daemon still applies its last request
        with Frontend.connect(path, timeout=WAIT) as again:
            try:
                features = again.get_features()
            except VhsmError as err:
                pytest.fail(f"the reconnecting front-end was refused: {err}")
            assert features == backend.features()


# --- caps before allocation ----------------------------------------------------------------
def test_oversized_message_fails_at_the_header() -> None:
    decoder = Decoder()
    with pytest.raises(FramingError) as info:
        decoder.feed(HEADER.pack(int(FrontendReq.SET_MEM_TABLE), 1, 0xFFFF_FFFF))
    assert info.value.rule_id == "VU-FRAME-005"
    assert decoder.buffered == 0


def test_config_payload_size_is_capped() -> None:
    big = VhostUserConfig(0, 4000, 0, bytes(4000))
    msg = Decoder().feed(encode(make_request(FrontendReq.GET_CONFIG, big)))[0]
    assert isinstance(msg.error, WireError)
    assert msg.payload is None


def raw_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.connect(str(path))
    sock.settimeout(WAIT)
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return True


def test_oversized_size_over_the_socket_closes_and_serves_on(echo: Any) -> None:
    _, daemon, path = echo
    tracemalloc.start()
    try:
        with raw_socket(path) as sock:
            sock.sendall(HEADER.pack(int(FrontendReq.SET_MEM_TABLE), 1, 0x7FFF_FFFF) + bytes(64))
            assert closed_by_peer(sock)
        wait_idle(daemon)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak} bytes allocated for a message that claimed 2 GiB"
    with Frontend.connect(path, timeout=WAIT) as fe:
        assert fe.get_features() == EchoBackend().features()


@pytest.mark.parametrize("nfds", [MAX_FDS + 1, 64, 250])
def test_too_many_fds_are_closed_and_the_connection_dropped(echo: Any, nfds: int) -> None:
    _, daemon, path = echo
    wait_idle(daemon)
    before = open_fds()
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
    try:
        with raw_socket(path) as sock:
            msg = make_request(FrontendReq.SET_VRING_CALL, None)
            data = HEADER.pack(int(FrontendReq.SET_VRING_CALL), 1, 8) + struct.pack("<Q", 0)
            del msg
            send_with_fds(sock, data, fds)
            assert closed_by_peer(sock)
    finally:
        for fd in fds:
            os.close(fd)
    wait_idle(daemon)
    assert settle_fds(before) <= before, "fds of a message with too many fds were leaked"
    with Frontend.connect(path, timeout=WAIT) as fe:
        assert fe.get_features() == EchoBackend().features()


def test_inflight_geometry_is_capped_to_the_device(echo: Any) -> None:
    """GET_INFLIGHT_FD for far more queues than the device has must be refused.

    Otherwise a front-end makes the back-end allocate (and touch) up to
    65535 x 32768-entry regions: tens of GiB (the fuzzer OOM-killed a run).
    """
    _, daemon, path = echo
    with Frontend.connect(path, timeout=WAIT) as fe:
        fe.negotiate()
        try:
            reply = fe.request(
                FrontendReq.GET_INFLIGHT_FD,
                VhostUserInflight(0, 0, 512, 1024),  # the device has 2 queues of at most 1024
                need_reply=True,
            )
        except PeerClosed:
            reply = None  # refused: the reply has no status field, so the connection closes
        if reply is not None and isinstance(reply.payload, VhostUserInflight):
            for fd in reply.fds:
                os.close(fd)
            pytest.fail(
                f"inflight buffer of {reply.payload.mmap_size} bytes allocated for 512 queues "
                "of a 2-queue device"
            )
    wait_idle(daemon)
    assert daemon.last_error is None


# --- guest-controlled lengths ---------------------------------------------------------------
@pytest.fixture
def blk(directory: Path) -> Iterator[tuple[Any, Path, Path]]:
    image = directory / "disk.img"
    with image.open("wb") as f:
        f.truncate(8 << 20)
    backend = BlkBackend(str(image))
    try:
        with running_daemon(backend, "blk-hardening") as (daemon, path):
            yield daemon, path, image
    finally:
        backend.close()


def test_discard_payload_is_bounded_before_it_is_copied(blk: Any) -> None:
    """A DISCARD whose readable part is megabytes long is refused without copying it."""
    _, path, _ = blk
    with Frontend.connect(path, timeout=WAIT, memory=FrontendMemory(((0, 32 << 20),))) as fe:
        fe.start(queues=1, size=64)
        dev = BlkDevice(fe)
        payload = bytes(16 << 20)  # 16 MiB of "segments": the cap is 32 segments (512 bytes)
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            status, _ = dev.request(11, 0, payload)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert status != 0
        # the front-end side of this test copies the payload once (16 MiB) into guest memory
        assert peak < (16 << 20) + (2 << 20), (
            f"peak {peak >> 20} MiB: the device copied the guest's 16 MiB discard payload"
        )


def test_descriptor_lengths_are_checked_before_any_copy(echo: Any) -> None:
    """A descriptor claiming 4 GiB inside a 4 MiB region is an error, not a huge read."""
    _, daemon, path = echo
    with Frontend.connect(path, timeout=WAIT) as fe:
        fe.start(queues=1, size=64)
        vq = fe.vring(0)
        dst = fe.memory.alloc(16)
        vq.post([(0x2000, 0xFFFF_FFF0)], [(dst, 16)])
        vq.kick(force=True)
        _, length = vq.wait_used(WAIT)
        assert length == 0
        assert vq.error_signalled()
        del vq
    wait_idle(daemon)
    assert daemon.last_error is None


# --- logs --------------------------------------------------------------------------------
MARKER = b"GUEST-SECRET-7f3a9c"


def test_logs_never_print_guest_data(blk: Any, caplog: pytest.LogCaptureFixture) -> None:
    daemon, path, _ = blk
    data = (MARKER * (512 // len(MARKER) + 1))[:512] * 4
    with caplog.at_level(logging.DEBUG, logger="vhsm"):
        with Frontend.connect(path, timeout=WAIT) as fe:
            fe.start(queues=1, size=64)
            dev = BlkDevice(fe)
            dev.write(8, data)
            assert dev.read(8, 4) == data
            dev.request(1, (8 << 20) // 512 - 1, data)  # beyond the end: IOERR path
            dev.request(99, 0, data)  # unsupported type
            dev.request(11, 0, data)  # discard with garbage segments
            vq = fe.vring(0)
            src = fe.memory.alloc(len(data))
            fe.memory.write(src, data)
            vq.post([(src, len(data))], [])  # no status byte: a bad request
            vq.kick(force=True)
            vq.wait_used(WAIT)
            del vq
        wait_idle(daemon)
    text = "\n".join(r.getMessage() for r in caplog.records).encode()
    text += "\n".join(str(r.args) for r in caplog.records).encode()
    for form in (MARKER, MARKER.hex().encode(), repr(MARKER)[2:-1].encode()):
        assert form not in text, "guest data appeared in the logs"
    assert caplog.records, "nothing was logged: the check would be vacuous"

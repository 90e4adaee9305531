"""Front-end fds checked for kind and access mode when installed, and used non-blocking."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fuzz_support import EchoBackend, open_fds, running_daemon, settle_fds, temp_dir, wait_idle

from vhsm.errors import WireError
from vhsm.fdcheck import describe, take_notifier, take_stream_socket
from vhsm.frontend import Frontend
from vhsm.wire import FrontendReq, ProtocolFeature, VhostUserU64, VhostUserVringFd

WAIT = 10.0
EVENTFD_MAX = 0xFFFF_FFFF_FFFF_FFFE


def closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def nonblocking(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)


@pytest.fixture
def directory() -> Iterator[Path]:
    with temp_dir() as d:
        yield d


# --- fds of every kind -------------------------------------------------------------------
def blocking_eventfd(_: Path) -> int:
    return os.eventfd(0, os.EFD_CLOEXEC)


def read_only_file(d: Path) -> int:
    (d / "ro").write_bytes(b"x" * 8)
    return os.open(d / "ro", os.O_RDONLY | os.O_CLOEXEC)


def write_only_file(d: Path) -> int:
    return os.open(d / "wo", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)


def a_directory(d: Path) -> int:
    return os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def a_socket(_: Path) -> int:
    a, b = socket.socketpair()
    b.close()
    return a.detach()


def a_memfd(_: Path) -> int:
    fd = os.memfd_create("vhsm-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4096)
    return fd


def pipe_read_end(_: Path) -> int:
    r, w = os.pipe2(os.O_CLOEXEC)
    os.close(w)
    return r


def pipe_write_end(_: Path) -> int:
    r, w = os.pipe2(os.O_CLOEXEC)
    os.close(r)
    return w


Maker = Callable[[Path], int]
NOT_NOTIFIERS: list[Maker] = [read_only_file, write_only_file, a_directory, a_socket, a_memfd]


@pytest.mark.parametrize("make", NOT_NOTIFIERS)
@pytest.mark.parametrize("direction", ["read", "write"])
def test_anything_but_an_eventfd_or_pipe_is_refused_and_closed(
    directory: Path, make: Maker, direction: Any
) -> None:
    fd = make(directory)
    with pytest.raises(WireError) as info:
        take_notifier(fd, "SET_VRING_CALL", direction)
    assert info.value.rule_id == "VU-FD-001"
    assert "SET_VRING_CALL" in str(info.value)
    assert closed(fd)


def test_a_pipe_end_must_face_the_right_way(directory: Path) -> None:
    reader, writer = pipe_read_end(directory), pipe_write_end(directory)
    with pytest.raises(WireError, match="not open for writing"):
        take_notifier(reader, "SET_VRING_ERR", "write")
    with pytest.raises(WireError, match="not open for reading"):
        take_notifier(writer, "SET_VRING_KICK", "read")
    assert closed(reader) and closed(writer)
    ok_reader, ok_writer = pipe_read_end(directory), pipe_write_end(directory)
    assert take_notifier(ok_reader, "SET_VRING_KICK", "read") == ok_reader
    assert take_notifier(ok_writer, "SET_VRING_CALL", "write") == ok_writer
    assert nonblocking(ok_reader) and nonblocking(ok_writer)
    os.close(ok_reader)
    os.close(ok_writer)


def test_a_blocking_eventfd_is_accepted_and_made_non_blocking(directory: Path) -> None:
    fd = blocking_eventfd(directory)
    assert describe(fd) == "eventfd"
    assert take_notifier(fd, "SET_VRING_KICK", "read") == fd
    assert nonblocking(fd)
    with pytest.raises(BlockingIOError):
        os.eventfd_read(fd)  # nothing pending: returns at once instead of waiting
    os.eventfd_write(fd, EVENTFD_MAX)
    with pytest.raises(BlockingIOError):
        os.eventfd_write(fd, 1)  # counter full: refused at once instead of waiting
    os.close(fd)


@pytest.mark.parametrize("make", [blocking_eventfd, read_only_file, a_directory, pipe_read_end])
def test_backend_channel_needs_a_unix_stream_socket(directory: Path, make: Maker) -> None:
    fd = make(directory)
    with pytest.raises(WireError) as info:
        take_stream_socket(fd, "SET_BACKEND_REQ_FD")
    assert info.value.rule_id == "VU-FD-002"
    assert closed(fd)


def test_backend_channel_socket_of_the_wrong_type_is_refused() -> None:
    for family, kind in ((socket.AF_UNIX, socket.SOCK_DGRAM), (socket.AF_INET, socket.SOCK_STREAM)):
        sock = socket.socket(family, kind)
        fd = sock.detach()
        with pytest.raises(WireError, match="VU-FD-002"):
            take_stream_socket(fd, "SET_BACKEND_REQ_FD")
        assert closed(fd)
    a, b = socket.socketpair()
    fd = a.detach()
    wrapped = take_stream_socket(fd, "SET_BACKEND_REQ_FD")
    assert wrapped.fileno() == fd
    wrapped.close()
    b.close()


# --- through the daemon ----------------------------------------------------------------
@pytest.fixture
def echo() -> Iterator[tuple[Any, Path]]:
    with running_daemon(EchoBackend(), "fdcheck") as (daemon, path):
        yield daemon, path


def echo_once(fe: Frontend, text: bytes) -> bytes:
    vq = fe.vring(0)
    src, dst = fe.memory.alloc(len(text)), fe.memory.alloc(len(text))
    fe.memory.write(src, text)
    vq.post([(src, len(text))], [(dst, len(text))])
    vq.kick(force=True)
    _, length = vq.wait_used(WAIT)
    return fe.memory.read(dst, length)


def nack(fe: Frontend, req: FrontendReq, payload: Any, fd: int) -> int:
    reply = fe.request(req, payload, fds=[fd], need_reply=True)
    assert reply is not None and isinstance(reply.payload, VhostUserU64)
    return reply.payload.value


REQUESTS = [
    (FrontendReq.SET_VRING_KICK, VhostUserVringFd(0)),
    (FrontendReq.SET_VRING_CALL, VhostUserVringFd(0)),
    (FrontendReq.SET_VRING_ERR, VhostUserVringFd(0)),
    (FrontendReq.SET_LOG_FD, None),
    (FrontendReq.SET_BACKEND_REQ_FD, None),
]


def test_wrong_fds_are_nacked_closed_and_the_daemon_serves_on(
    echo: Any, directory: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vhsm")
    daemon, path = echo
    wait_idle(daemon)
    before = open_fds()
    with Frontend.connect(path, timeout=WAIT) as fe:
        fe.start(queues=1, size=64)
        for req, payload in REQUESTS:
            kinds = [*NOT_NOTIFIERS, pipe_write_end if req == FrontendReq.SET_VRING_KICK else None]
            if req == FrontendReq.SET_BACKEND_REQ_FD:
                kinds = [blocking_eventfd, read_only_file, a_directory, pipe_read_end, a_memfd]
            for make in filter(None, kinds):
                fd = make(directory)
                try:
                    assert nack(fe, req, payload, fd) == 1, f"{req.name} took a {make.__name__}"
                finally:
                    os.close(fd)
        assert echo_once(fe, b"still served") == b"still served"
    wait_idle(daemon)
    assert settle_fds(before) <= before, "a refused fd was kept"
    assert "VU-FD-001" in caplog.text and "VU-FD-002" in caplog.text
    assert "Traceback" not in caplog.text
    with Frontend.connect(path, timeout=WAIT) as fresh:
        fresh.start(queues=1, size=64)
        assert echo_once(fresh, b"fresh") == b"fresh"
    assert daemon.last_error is None


def test_a_call_fd_with_a_full_counter_never_blocks_the_worker(echo: Any) -> None:
    """The front-end's call eventfd is blocking and at its maximum: a write would wait forever."""
    daemon, path = echo
    # strict=False: the driver's own call eventfd is replaced, so it is never signalled
    with Frontend.connect(path, timeout=WAIT, strict=False) as fe:
        fe.start(queues=1, size=64)
        call = os.eventfd(0, os.EFD_CLOEXEC)
        os.eventfd_write(call, EVENTFD_MAX)
        try:
            fe.call(FrontendReq.SET_VRING_CALL, VhostUserVringFd(0), fds=[call])
            for text in (b"one", b"two", b"three"):
                assert echo_once(fe, text) == text
            fe.stop_vring(0)  # answered: no worker holds the ring
        finally:
            os.close(call)
    wait_idle(daemon)
    assert daemon.last_error is None


def test_a_kick_fd_drained_by_the_front_end_never_blocks_the_worker(echo: Any) -> None:
    """The front-end reads its own (blocking) kick eventfd right after writing it."""
    daemon, path = echo
    with Frontend.connect(path, timeout=WAIT) as fe:
        fe.start(queues=1, size=64)
        kick = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            fe.call(FrontendReq.SET_VRING_KICK, VhostUserVringFd(0), fds=[kick])
            assert nonblocking(kick), "the back-end reads a kick fd that may block"
            for _ in range(2000):
                os.eventfd_write(kick, 1)
                with contextlib.suppress(BlockingIOError):  # the back-end was quicker
                    os.eventfd_read(kick)
            fe.stop_vring(0)
        finally:
            os.close(kick)
    wait_idle(daemon)
    assert daemon.last_error is None


def test_backend_req_fd_that_is_not_a_socket_is_not_leaked(echo: Any, directory: Path) -> None:
    """Each refused SET_BACKEND_REQ_FD used to keep its fd: at the limit nobody was served."""
    daemon, path = echo
    wait_idle(daemon)
    before = open_fds()
    for _ in range(20):
        with Frontend.connect(path, timeout=WAIT) as fe:
            fe.negotiate(backend_req=False)
            assert fe.has_protocol(ProtocolFeature.BACKEND_REQ)
            fd = read_only_file(directory)
            try:
                assert nack(fe, FrontendReq.SET_BACKEND_REQ_FD, None, fd) == 1
            finally:
                os.close(fd)
        wait_idle(daemon)
    assert settle_fds(before) <= before
    assert daemon.last_error is None


def test_fd_limit_is_reported_as_such() -> None:
    """At the fd limit the kernel drops a message's fds: say so, not "more than 8 fds"."""
    from vhsm.transport import _truncation_cause

    assert "more than 8 fds" in _truncation_cause(8)
    text = _truncation_cause(0)
    assert "RLIMIT_NOFILE" in text and "more than" not in text

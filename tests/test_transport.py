"""transport: recvmsg/sendmsg with fds, truncation, MessageReader over partial reads."""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator

import pytest

from vhsm.errors import FramingError, VhsmError
from vhsm.transport import (
    MessageReader,
    PeerClosed,
    recv_with_fds,
    send_message,
    send_with_fds,
)
from vhsm.wire import (
    Decoder,
    FrontendReq,
    VhostUserU64,
    VhostUserVringFd,
    encode,
    make_request,
)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_fds_travel_and_are_cloexec(pair) -> None:
    a, b = pair
    r, w = os.pipe()
    send_with_fds(a, b"hello", [r, w])
    data, fds = recv_with_fds(b)
    assert data == b"hello"
    assert len(fds) == 2
    assert [os.fstat(fd).st_ino for fd in fds] == [os.fstat(r).st_ino, os.fstat(w).st_ino]
    for fd in fds:
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    for fd in (*fds, r, w):
        os.close(fd)


def test_end_of_stream(pair) -> None:
    a, b = pair
    a.shutdown(socket.SHUT_WR)
    assert recv_with_fds(b) == (b"", [])


def test_too_many_fds_is_an_error_and_leaks_nothing(pair) -> None:
    a, b = pair
    fds = [os.eventfd(0) for _ in range(12)]
    before = open_fds()
    send_with_fds(a, b"x", fds)
    with pytest.raises(VhsmError, match="truncated"):
        recv_with_fds(b)
    assert open_fds() <= before
    for fd in fds:
        os.close(fd)


def test_send_message_leaves_fds_open(pair) -> None:
    a, b = pair
    fd = os.eventfd(0)
    send_message(a, make_request(FrontendReq.SET_VRING_CALL, VhostUserVringFd(0, False), fds=[fd]))
    os.fstat(fd)
    msg = MessageReader(b, Decoder()).read()
    assert msg.name == "SET_VRING_CALL" and len(msg.fds) == 1
    for f in (fd, *msg.fds):
        os.close(f)


def test_reader_many_messages_in_one_read_and_split_reads(pair) -> None:
    a, b = pair
    features = encode(make_request(FrontendReq.SET_FEATURES, VhostUserU64(1 << 32)))
    owner = encode(make_request(FrontendReq.SET_OWNER))
    stream = features + owner + features
    a.sendall(stream[:5])
    reader = MessageReader(b, Decoder())
    a.sendall(stream[5:])
    names = [reader.read().name for _ in range(3)]
    assert names == ["SET_FEATURES", "SET_OWNER", "SET_FEATURES"]


def test_reader_peer_closed_and_partial_message(pair) -> None:
    a, b = pair
    reader = MessageReader(b, Decoder())
    a.sendall(encode(make_request(FrontendReq.SET_OWNER)))
    a.shutdown(socket.SHUT_WR)
    assert reader.read().name == "SET_OWNER"
    with pytest.raises(PeerClosed):
        reader.read()

    c, d = socket.socketpair()
    c.sendall(encode(make_request(FrontendReq.SET_FEATURES, VhostUserU64(0)))[:7])
    c.close()
    with pytest.raises(FramingError) as info:
        MessageReader(d, Decoder()).read()
    assert info.value.rule_id == "VU-FRAME-007"
    d.close()


def test_reader_close_releases_unconsumed_fds(pair) -> None:
    a, b = pair
    before = open_fds()
    fd = os.eventfd(0)
    call = make_request(FrontendReq.SET_VRING_CALL, VhostUserVringFd(0, False), fds=[fd])
    data = encode(make_request(FrontendReq.SET_OWNER)) + encode(call)
    send_with_fds(a, data, [fd])
    os.close(fd)
    reader = MessageReader(b, Decoder())
    assert reader.read().name == "SET_OWNER"
    reader.close()
    assert open_fds() <= before

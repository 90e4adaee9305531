"""BackendChannel over a real socket pair, with a scripted front-end on the other end."""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator

import pytest

from vhsm.backend_channel import BackendChannel, mark_control_thread
from vhsm.errors import BackendError
from vhsm.transport import recv_with_fds, send_message
from vhsm.wire import (
    BackendReq,
    Channel,
    Decoder,
    HeaderFlags,
    Message,
    ProtocolFeature,
    VhostUserU64,
    make_reply,
)

PF = ProtocolFeature
ALL = int(
    PF.REPLY_ACK
    | PF.BACKEND_REQ
    | PF.CONFIG
    | PF.INBAND_NOTIFICATIONS
    | PF.SHARED_OBJECT
    | PF.HOST_NOTIFIER
    | PF.BACKEND_SEND_FD
)

Answer = Callable[[Message], tuple[int, tuple[int, ...]] | None]


class FakeFrontend:
    """Reads back-end requests and answers NEED_REPLY ones with `answer(msg)`."""

    def __init__(self, sock: socket.socket, answer: Answer) -> None:
        self.sock = sock
        self.answer = answer
        self.received: list[Message] = []
        self.fds_seen: list[int] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        decoder = Decoder(Channel.BACKEND)
        while True:
            try:
                data, fds = recv_with_fds(self.sock)
            except OSError:
                return
            if not data:
                return
            for msg in decoder.feed(data, fds):
                self.received.append(msg)
                for fd in msg.fds:
                    self.fds_seen.append(os.fstat(fd).st_ino)
                    os.close(fd)
                if msg.need_reply or msg.request == BackendReq.BACKEND_SHARED_OBJECT_LOOKUP:
                    result = self.answer(msg)
                    if result is None:
                        continue
                    value, reply_fds = result
                    send_message(
                        self.sock,
                        make_reply(
                            msg.request,
                            VhostUserU64(value),
                            fds=reply_fds,
                            channel=Channel.BACKEND,
                        ),
                    )
                    for fd in reply_fds:
                        os.close(fd)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def make_channel(
    pair: tuple[socket.socket, socket.socket], features: int, answer: Answer, timeout: float = 5
) -> tuple[BackendChannel, FakeFrontend]:
    ours, theirs = pair
    channel = BackendChannel(os.dup(ours.fileno()), lambda: features, timeout=timeout)
    ours.close()
    return channel, FakeFrontend(theirs, answer)


def ack(value: int = 0) -> Answer:
    return lambda msg: (value, ())


def test_config_change_without_reply_ack_is_fire_and_forget(pair) -> None:
    channel, fe = make_channel(pair, ALL & ~PF.REPLY_ACK, ack())
    assert channel.request(BackendReq.BACKEND_CONFIG_CHANGE_MSG) == 0
    channel.close()
    fe.thread.join(5)
    assert [m.name for m in fe.received] == ["BACKEND_CONFIG_CHANGE_MSG"]
    assert fe.received[0].flags == HeaderFlags.VERSION_1


def test_reply_ack_sets_need_reply_and_waits(pair) -> None:
    channel, fe = make_channel(pair, ALL, ack(0))
    channel.config_change()
    channel.vring_call(3)
    channel.vring_err(2)
    channel.close()
    fe.thread.join(5)
    assert [m.name for m in fe.received] == [
        "BACKEND_CONFIG_CHANGE_MSG",
        "BACKEND_VRING_CALL",
        "BACKEND_VRING_ERR",
    ]
    # in-band notifications come from workers holding their dispatch lock: no ack awaited
    assert [m.need_reply for m in fe.received] == [True, False, False]
    assert fe.received[1].payload.index == 3
    assert fe.received[2].payload.index == 2


def test_inband_notifications_never_wait_for_a_silent_frontend(pair) -> None:
    ours, theirs = pair
    channel = BackendChannel(os.dup(ours.fileno()), lambda: ALL, timeout=60.0)
    ours.close()
    channel.vring_call(0)  # the peer never answers: returns at once (no 60 s wait)
    channel.vring_err(1)
    assert not channel.closed
    channel.close()
    theirs.close()


def test_nack_raises(pair) -> None:
    channel, _ = make_channel(pair, ALL, ack(1))
    with pytest.raises(BackendError, match="failure 1"):
        channel.shared_object_add(uuid.uuid4())
    # a NACK does not break the channel
    assert not channel.closed
    channel.close()


def test_gate_not_negotiated_sends_nothing(pair) -> None:
    channel, fe = make_channel(pair, int(PF.BACKEND_REQ | PF.REPLY_ACK), ack())
    with pytest.raises(BackendError, match="CONFIG"):
        channel.config_change()
    with pytest.raises(BackendError, match="INBAND_NOTIFICATIONS"):
        channel.vring_call(0)
    channel.close()
    fe.thread.join(5)
    assert fe.received == []


def test_timeout_breaks_the_channel(pair) -> None:
    channel, _ = make_channel(pair, ALL, lambda msg: None, timeout=0.2)
    with pytest.raises(BackendError, match="no reply"):
        channel.config_change()
    assert channel.closed
    with pytest.raises(BackendError, match="unusable"):
        channel.config_change()


def test_front_end_gone(pair) -> None:
    channel, fe = make_channel(pair, ALL, ack())
    pair[1].shutdown(socket.SHUT_RDWR)
    fe.thread.join(5)
    with pytest.raises(BackendError):
        channel.config_change()
    assert channel.closed


def test_shared_object_lookup_returns_the_fd(pair) -> None:
    r, w = os.pipe()
    ino = os.fstat(r).st_ino

    def answer(msg: Message) -> tuple[int, tuple[int, ...]]:
        return 0, (os.dup(r),)

    channel, _ = make_channel(pair, ALL, answer)
    fd = channel.shared_object_lookup(uuid.uuid4())
    assert fd is not None
    assert os.fstat(fd).st_ino == ino
    for f in (fd, r, w):
        os.close(f)
    channel.close()


def test_shared_object_lookup_failure_is_none(pair) -> None:
    channel, _ = make_channel(pair, ALL, ack(1))
    assert channel.shared_object_lookup(uuid.uuid4()) is None
    channel.close()


def test_host_notifier_fd_needs_backend_send_fd(pair) -> None:
    channel, _ = make_channel(pair, ALL & ~PF.BACKEND_SEND_FD, ack())
    r, w = os.pipe()
    with pytest.raises(BackendError, match="BACKEND_SEND_FD"):
        channel.host_notifier(0, r)
    channel.host_notifier(0, None)  # unregistering needs no fd
    for f in (r, w):
        os.close(f)
    channel.close()


def test_host_notifier_sends_the_fd(pair) -> None:
    channel, fe = make_channel(pair, ALL, ack())
    fd = os.memfd_create("notify")
    os.ftruncate(fd, 4096)
    channel.host_notifier(5, fd, offset=0)
    assert os.fstat(fd)  # still ours
    channel.close()
    fe.thread.join(5)
    (msg,) = fe.received
    assert msg.payload.index == 5 and not msg.payload.nofd
    assert msg.payload.size == os.sysconf("SC_PAGE_SIZE")
    assert fe.fds_seen == [os.fstat(fd).st_ino]
    os.close(fd)


def test_control_thread_does_not_wait_for_acks(pair) -> None:
    channel, fe = make_channel(pair, ALL, lambda msg: None)
    mark_control_thread(True)
    try:
        channel.config_change()  # would time out if it waited
    finally:
        mark_control_thread(False)
    channel.close()
    fe.thread.join(5)
    assert not fe.received[0].need_reply


def test_concurrent_senders_each_get_their_ack(pair) -> None:
    channel, fe = make_channel(pair, ALL, ack(0))
    errors: list[BaseException] = []

    def send(index: int) -> None:
        try:
            for _ in range(50):
                channel.vring_call(index)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    channel.close()
    fe.thread.join(5)
    assert errors == []
    assert len(fe.received) == 200
    assert sorted({m.payload.index for m in fe.received}) == [0, 1, 2, 3]


def test_suspended_device_sends_nothing(pair) -> None:
    ours, theirs = pair
    suspended = [True]
    channel = BackendChannel(os.dup(ours.fileno()), lambda: ALL, suspended=lambda: suspended[0])
    ours.close()
    fe = FakeFrontend(theirs, ack())
    with pytest.raises(BackendError, match="VU-STATE-007"):
        channel.config_change()
    with pytest.raises(BackendError, match="VU-STATE-007"):
        channel.vring_call(0)
    with pytest.raises(BackendError, match="VU-STATE-007"):
        channel.shared_object_lookup(uuid.uuid4())
    assert not channel.closed  # refused, not broken: usable once a ring starts
    suspended[0] = False
    channel.config_change()
    channel.close()
    fe.thread.join(5)
    assert [m.name for m in fe.received] == ["BACKEND_CONFIG_CHANGE_MSG"]

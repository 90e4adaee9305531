"""`Connection`: bytes and fds in, requests and replies out, decoder flags owned inside."""

from __future__ import annotations

from vhsm.backend import VhostUserBackend
from vhsm.session.connection import Connection
from vhsm.wire import (
    FrontendReq,
    ProtocolFeature,
    VhostUserU64,
    VirtioFeature,
    encode,
    make_reply,
    make_request,
)

FEATURES = int(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES)


class Device(VhostUserBackend):
    def num_queues(self) -> int:
        return 1

    def max_queue_size(self) -> int:
        return 256

    def features(self) -> int:
        return FEATURES

    def protocol_features(self) -> int:
        return int(ProtocolFeature.REPLY_ACK | ProtocolFeature.XEN_MMAP)


def test_bytes_in_any_cut_give_requests_and_replies() -> None:
    connection = Connection(Device())
    data = encode(make_request(FrontendReq.GET_FEATURES)) * 2
    assert connection.receive_data(data[:5]) == []
    assert connection.buffered == 5
    first, second = connection.receive_data(data[5:])
    reply = connection.handle(first)
    assert reply == make_reply(FrontendReq.GET_FEATURES, VhostUserU64(FEATURES))
    assert connection.encode(reply) == encode(reply)
    assert connection.handle(second) == reply
    connection.close()


def test_decoder_follows_what_was_negotiated() -> None:
    connection = Connection(Device())
    assert not connection.xen_mmap
    for msg in (
        make_request(FrontendReq.GET_FEATURES),
        make_request(FrontendReq.GET_PROTOCOL_FEATURES),
        make_request(
            FrontendReq.SET_PROTOCOL_FEATURES, VhostUserU64(int(ProtocolFeature.XEN_MMAP))
        ),
    ):
        (received,) = connection.receive_data(encode(msg))
        connection.handle(received)
    assert connection.xen_mmap

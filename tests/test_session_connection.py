"""`Connection`: bytes and fds in, requests and replies out, decoder flags owned inside."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from vhsm.backend import VhostUserBackend
from vhsm.session.connection import Connection, RelayedConnection
from vhsm.wire import (
    Channel,
    FrontendReq,
    Message,
    ProtocolFeature,
    VhostUserMemoryRegion,
    VhostUserSingleMemoryRegion,
    VhostUserU64,
    VhostUserVringState,
    VirtioFeature,
    encode,
    make_reply,
    make_request,
)
from vhsm.wire.framing import Unframed

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


# --- a relay's connection -----------------------------------------------------------------
def _stream() -> tuple[bytes, list[int]]:
    msgs = [
        make_request(FrontendReq.GET_FEATURES),
        make_request(FrontendReq.SET_FEATURES, VhostUserU64(1 << 32)),
        make_request(FrontendReq.SET_VRING_NUM, VhostUserVringState(0, 256)),
        make_request(FrontendReq.GET_FEATURES),
    ]
    data = [encode(m) for m in msgs]
    return b"".join(data), [len(d) for d in data]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=40))
def test_relayed_stream_cuts_messages_whatever_the_reads(cuts: list[int]) -> None:
    data, sizes = _stream()
    stream = RelayedConnection().stream(Channel.MAIN)
    units: list[Message | Unframed] = []
    pos = 0
    for cut in cuts:
        units += stream.receive_data(data[pos : pos + cut])
        pos += cut
    units += stream.receive_data(data[pos:])
    assert all(isinstance(u, Message) and u.error is None for u in units)
    raws = [u.raw for u in units if isinstance(u, Message)]
    assert [len(r) for r in raws] == sizes
    assert b"".join(raws) == data


def test_relayed_stream_gives_fds_to_the_message_they_came_with() -> None:
    data, sizes = _stream()
    stream = RelayedConnection().stream(Channel.MAIN)
    fd = os.eventfd(0)
    try:
        first = stream.receive_data(data[: sizes[0] + 5])  # GET_FEATURES + part of SET_FEATURES
        rest = stream.receive_data(data[sizes[0] + 5 :], [fd])  # fds arrive with the rest
    finally:
        os.close(fd)
    assert [u.fds for u in first] == [()]
    # the last header starting in the second chunk is the 4th message
    assert [len(u.fds) for u in rest] == [0, 0, 1]


def test_relayed_stream_keeps_the_fds_of_a_malformed_message() -> None:
    stream = RelayedConnection().stream(Channel.MAIN)
    fd = os.eventfd(0)
    try:
        (msg,) = stream.receive_data(encode(make_request(FrontendReq.GET_FEATURES)), [fd])
        assert isinstance(msg, Message)
        assert msg.error is not None and msg.error.rule_id == "VU-FRAME-008"
        assert msg.fds == (fd,)
        os.fstat(fd)  # still open: the relay passes it on
    finally:
        os.close(fd)


def test_relayed_stream_passes_oversized_streams_uncut() -> None:
    stream = RelayedConnection(max_payload=4096).stream(Channel.MAIN)
    good = encode(make_request(FrontendReq.GET_FEATURES))
    bad = (99).to_bytes(4, "little") + (1).to_bytes(4, "little") + (1 << 20).to_bytes(4, "little")
    first, lost = stream.receive_data(good + bad + b"xyz")
    assert isinstance(first, Message) and first.raw == good
    assert lost == Unframed(bad + b"xyz", (), 99, 1 << 20)
    assert stream.receive_data(b"more") == [Unframed(b"more", (), 99, 1 << 20)]
    stream.close()


def test_every_stream_of_a_relayed_connection_follows_the_acked_xen_form() -> None:
    relayed = RelayedConnection()
    front, back = relayed.stream(Channel.MAIN), relayed.stream(Channel.MAIN)
    region = VhostUserSingleMemoryRegion(VhostUserMemoryRegion(0, 0x1000, 0, 0, 1, 3))
    ack = make_request(
        FrontendReq.SET_PROTOCOL_FEATURES, VhostUserU64(int(ProtocolFeature.XEN_MMAP))
    )
    add = make_request(FrontendReq.ADD_MEM_REG, region)
    # one read carries the ack and the first Xen region: the region is read in Xen form
    fd = os.eventfd(0)
    try:
        units = front.receive_data(encode(ack) + encode(add), [fd])
    finally:
        os.close(fd)
    assert [u.error for u in units if isinstance(u, Message)] == [None, None]
    assert relayed.acked_protocol_features == ProtocolFeature.XEN_MMAP
    # the back-end's postcopy reply to ADD_MEM_REG echoes the region in the same form
    (echo,) = back.receive_data(encode(make_reply(FrontendReq.ADD_MEM_REG, region)))
    assert isinstance(echo, Message) and echo.error is None and echo.payload == region

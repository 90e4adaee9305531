from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

try:
    from tests.wire_strategies import example
except ImportError:  # tests/ is not a package
    from wire_strategies import example  # type: ignore[no-redef,import-not-found,unused-ignore]

from vhsm.errors import FramingError
from vhsm.specs import load_spec
from vhsm.wire import (
    BackendReq,
    Channel,
    Decoder,
    FrontendReq,
    HeaderFlags,
    Message,
    ProtocolFeature,
    decode_message,
    encode,
    make_reply,
    make_request,
)
from vhsm.wire import payloads as p
from vhsm.wire.catalogue import catalogue
from vhsm.wire.framing import HEADER

F = FrontendReq


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """Pipes to pass as fds; whatever the test leaves open is closed afterwards."""
    made: list[int] = []
    yield made
    for fd in made:
        if is_open(fd):
            os.close(fd)


def new_fds(made: list[int], n: int) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        r, w = os.pipe()
        os.close(w)
        made.append(r)
        out.append(r)
    return out


def raw(code: int, flags: int, body: bytes) -> bytes:
    return HEADER.pack(code, flags, len(body)) + body


REGION = p.VhostUserMemoryRegion(0, 0x1000, 0x7F00_0000_0000, 0)


def stream_messages() -> list[tuple[Message, int]]:
    """A realistic start-up sequence: (message, number of fds it carries)."""
    table = p.VhostUserMemory((REGION, p.VhostUserMemoryRegion(0x1000, 0x1000, 0x8000, 0)))
    return [
        (make_request(F.GET_FEATURES), 0),
        (make_request(F.SET_OWNER), 0),
        (make_request(F.SET_BACKEND_REQ_FD, need_reply=True), 1),
        (make_request(F.SET_FEATURES, p.VhostUserU64(1 << 32 | 1 << 30)), 0),
        (make_request(F.SET_MEM_TABLE, table, need_reply=True), 2),
        (make_request(F.SET_VRING_NUM, p.VhostUserVringState(0, 256)), 0),
        (make_request(F.SET_VRING_BASE, p.VhostUserVringState(0, 0)), 0),
        (make_request(F.SET_VRING_ADDR, example(p.VhostUserVringAddr)), 0),
        (make_request(F.SET_VRING_KICK, p.VhostUserVringFd(0)), 1),
        (make_request(F.SET_VRING_CALL, p.VhostUserVringFd(0)), 1),
        (make_request(F.SET_VRING_ERR, p.VhostUserVringFd(0, nofd=True)), 0),
        (make_request(F.SET_VRING_ENABLE, p.VhostUserVringState(0, 1)), 0),
        (make_request(F.GET_CONFIG, example(p.VhostUserConfig)), 0),
        (make_request(F.SET_LOG_BASE, p.VhostUserLog(0x1000, 0)), 1),
        (make_request(F.ADD_MEM_REG, p.VhostUserSingleMemoryRegion(REGION)), 1),
        (make_request(F.GET_VRING_BASE, p.VhostUserVringState(0, 0)), 0),
    ]


class FakeUnixStream:
    """Linux AF_UNIX stream semantics: fds arrive with the first read touching their
    segment, and a read ends after a segment that carried fds."""

    def __init__(self, segments: list[tuple[bytes, list[int]]]) -> None:
        self.segments = [(bytearray(data), list(fds)) for data, fds in segments]

    def recv(self, n: int) -> tuple[bytes, list[int]]:
        out = bytearray()
        got: list[int] = []
        while self.segments and len(out) < n:
            data, fds = self.segments[0]
            take = min(n - len(out), len(data))
            out += data[:take]
            del data[:take]
            had_fds = bool(fds)
            got += fds
            fds.clear()
            if not data:
                self.segments.pop(0)
            if had_fds:
                break
        return bytes(out), got


def check_decoded(decoded: list[Message], sent: list[tuple[Message, list[int]]]) -> None:
    assert len(decoded) == len(sent)
    for got, (want, want_fds) in zip(decoded, sent, strict=True):
        assert got.error is None, got.error
        assert (got.request, got.flags, got.payload) == (want.request, want.flags, want.payload)
        assert list(got.fds) == want_fds
        assert got.raw == encode(want)


@settings(max_examples=60, deadline=None)
@given(
    reads=st.lists(st.integers(1, 200), min_size=1, max_size=50),
    header_apart=st.booleans(),
)
def test_random_splits_with_fds(reads: list[int], header_apart: bool) -> None:
    made: list[int] = []
    try:
        sent: list[tuple[Message, list[int]]] = []
        segments: list[tuple[bytes, list[int]]] = []
        for msg, n in stream_messages():
            fds = new_fds(made, n)
            sent.append((msg, fds))
            data = encode(msg)
            if header_apart:  # header with the fds, payload in a second write
                segments += [(data[:12], fds), (data[12:], [])]
            else:
                segments.append((data, fds))
        sock = FakeUnixStream(segments)
        decoder = Decoder()
        decoded: list[Message] = []
        i = 0
        while sock.segments:
            data, fds = sock.recv(reads[i % len(reads)])
            i += 1
            decoded += decoder.feed(data, fds)
        decoder.close()
        check_decoded(decoded, sent)
    finally:
        for fd in made:
            if is_open(fd):
                os.close(fd)


def test_several_messages_per_read(fds: list[int]) -> None:
    sent = [(msg, new_fds(fds, n)) for msg, n in stream_messages()]
    decoder = Decoder()
    out: list[Message] = []
    # one big read per fd-carrying segment boundary, the way Linux delivers them
    chunk = b""
    for msg, msg_fds in sent:
        chunk += encode(msg)
        if msg_fds:
            out += decoder.feed(chunk, msg_fds)
            chunk = b""
    out += decoder.feed(chunk)
    check_decoded(out, sent)
    # without any fds, the whole stream in one read
    plain = [m for m, n in stream_messages() if n == 0]
    out = Decoder().feed(b"".join(encode(m) for m in plain))
    assert [m.payload for m in out] == [m.payload for m in plain]


def test_byte_by_byte(fds: list[int]) -> None:
    msg = make_request(F.SET_VRING_CALL, p.VhostUserVringFd(3))
    (fd,) = new_fds(fds, 1)
    data = encode(msg)
    decoder = Decoder()
    assert decoder.feed(data[:1], [fd]) == []
    out: list[Message] = []
    for i in range(1, len(data)):
        out += decoder.feed(data[i : i + 1])
    assert len(out) == 1 and out[0].fds == (fd,) and out[0].payload == p.VhostUserVringFd(3)


def test_oversized_size_is_fatal(fds: list[int]) -> None:
    (fd,) = new_fds(fds, 1)
    decoder = Decoder()
    with pytest.raises(FramingError) as exc:
        decoder.feed(HEADER.pack(F.SET_MEM_TABLE, 1, 4097), [fd])
    assert exc.value.rule_id == "VU-FRAME-005" and exc.value.value == 4097
    assert not is_open(fd)
    with pytest.raises(FramingError):
        decoder.feed(b"\x00" * 12)
    # a custom limit
    with pytest.raises(FramingError):
        Decoder(max_payload=64).feed(HEADER.pack(F.SET_CONFIG, 1, 65))


def test_oversized_after_good_messages_closes_their_fds(fds: list[int]) -> None:
    (fd,) = new_fds(fds, 1)
    good = encode(make_request(F.SET_LOG_BASE, p.VhostUserLog(0x1000, 0)))
    decoder = Decoder()
    # fds go with the last header of the chunk: here the oversized one
    with pytest.raises(FramingError):
        decoder.feed(good + HEADER.pack(1, 1, 1 << 20), [fd])
    assert not is_open(fd)


# (message bytes, number of fds, rule id, field)
BAD: list[tuple[bytes, int, str, str]] = [
    (raw(F.SET_FEATURES, 1, b"\x00" * 4), 0, "VU-FRAME-006", "size"),
    (raw(F.GET_FEATURES, 1, b"\x00"), 0, "VU-FRAME-006", "size"),
    (raw(F.SET_LOG_BASE, 1, b"\x00" * 8), 1, "VU-FRAME-006", "size"),
    (raw(F.GET_FEATURES, 1, b""), 1, "VU-FRAME-008", "nfds"),
    (raw(F.SET_VRING_NUM, 1, struct.pack("<II", 0, 8)), 2, "VU-FRAME-008", "nfds"),
    (raw(F.SET_MEM_TABLE, 1, p.VhostUserMemory((REGION,)).to_bytes()), 2, "VU-MEM-002", "nfds"),
    (raw(F.SET_MEM_TABLE, 1, p.VhostUserMemory((REGION,)).to_bytes()), 0, "VU-MEM-002", "nfds"),
    (raw(F.SET_MEM_TABLE, 1, struct.pack("<II", 0, 0)), 0, "VU-MEM-001", "nregions"),
    (
        raw(F.ADD_MEM_REG, 1, p.VhostUserSingleMemoryRegion(REGION).to_bytes()),
        0,
        "VU-MEM-006",
        "nfds",
    ),
    (
        raw(F.REM_MEM_REG, 1, p.VhostUserSingleMemoryRegion(REGION).to_bytes()),
        2,
        "VU-MEM-009",
        "nfds",
    ),
    (raw(F.SET_VRING_KICK, 1, struct.pack("<Q", 0x100)), 1, "VU-RING-008", "nfds"),
    (raw(F.SET_VRING_CALL, 1, struct.pack("<Q", 0x1)), 0, "VU-RING-008", "nfds"),
    (raw(F.SET_VRING_ERR, 1, struct.pack("<Q", 0x1)), 2, "VU-RING-008", "nfds"),
    (raw(F.SET_VRING_KICK, 1, struct.pack("<Q", 0x401)), 1, "VU-RING-005", "u64"),
    (raw(F.SET_LOG_BASE, 1, struct.pack("<QQ", 0x1000, 0)), 0, "VU-MEM-010", "nfds"),
    (raw(F.SET_LOG_FD, 1, b""), 0, "VU-MEM-011", "nfds"),
    (raw(F.SET_BACKEND_REQ_FD, 1, b""), 2, "VU-MEM-011", "nfds"),
    (raw(F.SET_VRING_ENABLE, 1, struct.pack("<II", 0, 2)), 0, "VU-RING-006", "num"),
    (raw(F.SET_VRING_ENDIAN, 1, struct.pack("<II", 0, 7)), 0, "VU-RING-007", "num"),
    (raw(F.SET_STATUS, 1, struct.pack("<Q", 0x100)), 0, "VU-PAY-004", "value"),
    (raw(F.NET_SET_MTU, 1, struct.pack("<Q", 67)), 0, "VU-PAY-010", "value"),
    (raw(F.IOTLB_MSG, 1, struct.pack("<QQQBB6x", 0, 1, 0, 3, 1)), 0, "VU-PAY-007", "type"),
    (raw(F.SET_CONFIG, 1, struct.pack("<III", 0, 4, 0) + b"\x00"), 0, "VU-PAY-001", "size"),
    (raw(F.GET_INFLIGHT_FD, 1, struct.pack("<QQHH4x", 0, 0, 0, 1)), 0, "VU-PAY-003", "num_queues"),
    (raw(F.GET_SHARED_OBJECT, 1, b""), 0, "VU-FRAME-006", "size"),
    (raw(F.SET_DEVICE_STATE_FD, 1, struct.pack("<II", 3, 0)), 1, "VU-PAY-005", "direction"),
    (raw(99, 1, b""), 0, "VU-FRAME-004", "request"),
    (raw(0, 1, b""), 1, "VU-FRAME-004", "request"),
    (raw(F.GET_FEATURES, 0x2, b""), 0, "VU-FRAME-001", "flags"),
    (raw(F.GET_FEATURES, 0x0, b""), 0, "VU-FRAME-001", "flags"),
    (raw(F.GET_FEATURES, 0x11, b""), 0, "VU-FRAME-002", "flags"),
    (raw(F.GET_FEATURES, 1, b""), 9, "VU-FRAME-008", "nfds"),
]


@pytest.mark.parametrize(
    ("data", "nfds", "rule", "field"), BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)]
)
def test_bad_message_is_returned_with_error_and_fds_closed(
    fds: list[int], data: bytes, nfds: int, rule: str, field: str
) -> None:
    passed = new_fds(fds, nfds)
    follow = encode(make_request(F.GET_FEATURES))
    out = Decoder().feed(data + follow, passed) if not passed else []
    if passed:  # fds travel with the read holding the bad header
        decoder = Decoder()
        out = decoder.feed(data, passed) + decoder.feed(follow)
    bad, good = out
    assert bad.error is not None and bad.payload is None and bad.fds == ()
    assert (bad.error.rule_id, bad.error.field) == (rule, field)
    assert bad.raw == data
    assert all(not is_open(fd) for fd in passed)
    # the stream goes on: the next message decodes fine
    assert good.error is None and good.request == F.GET_FEATURES


def test_unknown_code_name() -> None:
    (msg,) = Decoder().feed(raw(99, 1, b"\x01\x02"))
    assert msg.name == "UNKNOWN_99" and msg.req == 99
    assert msg.error is not None and msg.error.request == "UNKNOWN_99"
    (msg,) = Decoder(Channel.BACKEND).feed(raw(11, 1, b""))
    assert msg.error is not None and msg.error.rule_id == "VU-FRAME-004"


def test_accepted_fd_variants(fds: list[int]) -> None:
    region = p.VhostUserSingleMemoryRegion(REGION).to_bytes()
    cases = [
        (raw(F.REM_MEM_REG, 1, region), 1),
        (raw(F.REM_MEM_REG, 1, region), 0),
        (raw(F.SET_VRING_KICK, 1, struct.pack("<Q", 0x105)), 0),
        (raw(F.SET_VRING_KICK, 1, struct.pack("<Q", 0x5)), 1),
        (raw(F.GPU_SET_SOCKET, 1, b""), 1),
        (raw(F.SET_INFLIGHT_FD, 1, struct.pack("<QQHH4x", 4096, 0, 1, 8)), 1),
    ]
    for data, n in cases:
        passed = tuple(new_fds(fds, n))
        (msg,) = Decoder().feed(data, passed)
        assert msg.error is None and msg.fds == passed


def test_reply_decoding(fds: list[int]) -> None:
    d = Decoder()
    r = HeaderFlags.VERSION_1 | HeaderFlags.REPLY
    log = p.VhostUserLog(4096, 0)
    inflight = p.VhostUserInflight(8192, 0, 2, 128)
    table = p.VhostUserMemory((REGION,))
    (ufd, infd, statefd, objfd) = new_fds(fds, 4)
    cases: list[tuple[bytes, tuple[int, ...], Any]] = [
        (raw(F.GET_FEATURES, r, struct.pack("<Q", 7)), (), p.VhostUserU64(7)),
        (raw(F.SET_VRING_NUM, r, struct.pack("<Q", 0)), (), p.VhostUserU64(0)),
        (
            raw(F.GET_VRING_BASE, r, struct.pack("<II", 1, 47840)),
            (),
            p.VhostUserVringState(1, 47840),
        ),
        (raw(F.SET_LOG_BASE, r, log.to_bytes()), (), log),
        (raw(F.SET_LOG_BASE, r, b""), (), None),
        (raw(F.SET_LOG_BASE, r, struct.pack("<Q", 0)), (), p.VhostUserU64(0)),
        (raw(F.GET_CONFIG, r, b""), (), None),
        (
            raw(F.GET_CONFIG, r, example(p.VhostUserConfig).to_bytes()),
            (),
            example(p.VhostUserConfig),
        ),
        (raw(F.POSTCOPY_ADVISE, r, b""), (ufd,), None),
        (raw(F.GET_INFLIGHT_FD, r, inflight.to_bytes()), (infd,), inflight),
        (raw(F.GET_INFLIGHT_FD, r, p.VhostUserInflight(0, 0, 2, 128).to_bytes()), (), None),
        (raw(F.SET_DEVICE_STATE_FD, r, struct.pack("<Q", 0)), (statefd,), p.VhostUserU64(0)),
        (raw(F.SET_DEVICE_STATE_FD, r, struct.pack("<Q", 0x100)), (), p.VhostUserU64(0x100)),
        (raw(F.SET_DEVICE_STATE_FD, r, struct.pack("<Q", 0x101)), (), p.VhostUserU64(0x101)),
        (raw(F.GET_SHARED_OBJECT, r, b""), (objfd,), None),
        (raw(F.SET_MEM_TABLE, r, table.to_bytes()), (), table),
        (
            raw(F.GET_SHMEM_CONFIG, r, example(p.VhostUserShMemConfig).to_bytes()),
            (),
            example(p.VhostUserShMemConfig),
        ),
    ]
    for data, passed, payload in cases:
        (msg,) = d.feed(data, passed)
        assert msg.error is None, (msg.name, msg.error)
        assert msg.is_reply and not msg.need_reply and msg.fds == passed
        if payload is not None:
            assert msg.payload == payload
        else:
            assert msg.payload is None or isinstance(msg.payload, p.VhostUserInflight)


def test_bad_replies(fds: list[int]) -> None:
    r = 5
    (fd1, fd2) = new_fds(fds, 2)
    (msg,) = Decoder().feed(raw(F.SET_DEVICE_STATE_FD, r, struct.pack("<Q", 0x101)), [fd1])
    assert msg.error is not None and msg.error.rule_id == "VU-PAY-008" and not is_open(fd1)
    (msg,) = Decoder().feed(raw(F.POSTCOPY_ADVISE, r, b""))
    assert msg.error is not None and msg.error.rule_id == "VU-FRAME-008"
    (msg,) = Decoder().feed(raw(F.GET_FEATURES, r, b"\x00" * 4), [fd2])
    assert msg.error is not None and msg.error.rule_id == "VU-FRAME-006" and not is_open(fd2)


def test_postcopy_and_xen(fds: list[int]) -> None:
    ack = raw(F.SET_MEM_TABLE, 1, struct.pack("<Q", 0))
    (msg,) = Decoder().feed(ack)
    assert msg.error is not None and msg.error.rule_id == "VU-MEM-001"
    decoder = Decoder(postcopy=True)
    (msg,) = decoder.feed(ack)
    assert msg.error is None and msg.payload == p.VhostUserU64(0)
    xen_region = p.VhostUserMemoryRegion(0, 0x1000, 0, 0, 1, 3)
    table = p.VhostUserMemory((xen_region,))
    decoder = Decoder()
    (msg,) = decoder.feed(raw(F.SET_MEM_TABLE, 1, table.to_bytes()), new_fds(fds, 1))
    assert msg.error is not None
    decoder.follow(int(ProtocolFeature.XEN_MMAP))
    (msg,) = decoder.feed(raw(F.SET_MEM_TABLE, 1, table.to_bytes()), new_fds(fds, 1))
    assert msg.error is None and msg.payload == table
    single = p.VhostUserSingleMemoryRegion(xen_region)
    (msg,) = decoder.feed(raw(F.ADD_MEM_REG, 1, single.to_bytes()), new_fds(fds, 1))
    assert msg.error is None and msg.payload == single


def test_backend_channel(fds: list[int]) -> None:
    decoder = Decoder(Channel.BACKEND)
    area = p.VhostUserVringArea(2, 4096, 0)
    (fd,) = new_fds(fds, 1)
    msg = make_request(BackendReq.BACKEND_VRING_HOST_NOTIFIER_MSG, area, need_reply=True)
    assert msg.channel is Channel.BACKEND and msg.flags == 0x9
    (got,) = decoder.feed(encode(msg), [fd])
    assert got.error is None and got.payload == area and got.fds == (fd,)
    assert got.name == "BACKEND_VRING_HOST_NOTIFIER_MSG"
    assert got.req is BackendReq.BACKEND_VRING_HOST_NOTIFIER_MSG
    bad = encode(make_request(BackendReq.BACKEND_IOTLB_MSG, p.VhostUserIotlb(0, 0, 0, 1, 2)))
    (got,) = decoder.feed(bad)
    assert got.error is not None and got.error.rule_id == "VU-PAY-007"


def test_partial_message_at_close(fds: list[int]) -> None:
    decoder = Decoder()
    data = encode(make_request(F.SET_VRING_KICK, p.VhostUserVringFd(0)))
    (fd,) = new_fds(fds, 1)
    assert decoder.feed(data[:15], [fd]) == []
    assert decoder.buffered == 15
    with pytest.raises(FramingError) as exc:
        decoder.close()
    assert exc.value.rule_id == "VU-FRAME-007"
    assert not is_open(fd)
    partial_header = Decoder()
    partial_header.feed(b"\x01\x00")
    with pytest.raises(FramingError):
        partial_header.close()
    Decoder().close()  # nothing buffered: no error


def test_make_and_encode() -> None:
    reply = make_reply(F.GET_FEATURES, p.VhostUserU64(5))
    assert reply.flags == 0x5 and reply.is_reply and reply.channel is Channel.MAIN
    assert encode(reply) == struct.pack("<IIIQ", 1, 5, 8, 5)
    req = make_request(F.SET_OWNER, need_reply=True)
    assert encode(req) == struct.pack("<III", 3, 9, 0)
    assert req.need_reply and req.req is F.SET_OWNER and req.name == "SET_OWNER"
    back = make_reply(BackendReq.BACKEND_SHARED_OBJECT_LOOKUP, p.VhostUserU64(0))
    assert back.channel is Channel.BACKEND and back.flags == 5
    assert decode_message(1, 5, encode(reply)).payload == p.VhostUserU64(5)


def test_catalogue_is_complete_and_precise() -> None:
    main = catalogue(Channel.MAIN)
    back = catalogue(Channel.BACKEND)
    assert sorted(main) == list(range(1, 46)) and sorted(back) == list(range(1, 11))
    raw_spec = load_spec("requests")
    for entry in raw_spec["frontend"] + raw_spec["backend"]:
        for key in ("code", "name", "payload", "reply", "reply_payload", "fds", "gate"):
            assert key in entry
        assert entry["section"] and entry["summary"]
    log = main[F.SET_LOG_BASE]
    assert (log.payload, log.fds, log.reply, log.gate_protocol) == (
        p.VhostUserLog,
        "1",
        "always",
        p_flag("LOG_SHMFD"),
    )
    inflight = main[F.GET_INFLIGHT_FD]
    assert (inflight.reply_payload, inflight.reply_fds) == (p.VhostUserInflight, "1")
    assert main[F.REM_MEM_REG].fds == "0-1"
    assert {main[c].fds for c in (12, 13, 14)} == {"nofd-bit"}
    assert main[F.SET_MEM_TABLE].fds == "n"
    always = {s.name for s in main.values() if s.reply == "always"}
    assert always == {
        "GET_FEATURES", "SET_LOG_BASE", "GET_VRING_BASE", "GET_PROTOCOL_FEATURES",
        "GET_QUEUE_NUM", "IOTLB_MSG", "GET_CONFIG", "CREATE_CRYPTO_SESSION",
        "POSTCOPY_ADVISE", "POSTCOPY_END", "GET_INFLIGHT_FD", "GET_MAX_MEM_SLOTS",
        "GET_STATUS", "GET_SHARED_OBJECT", "SET_DEVICE_STATE_FD", "CHECK_DEVICE_STATE",
        "GET_SHMEM_CONFIG", "GET_VRING_BASE_SKIP_DRAIN",
    }  # fmt: skip
    with_fds = {s.code for s in main.values() if s.fds != "0"}
    assert with_fds == {5, 6, 7, 12, 13, 14, 21, 32, 33, 37, 38, 42}
    assert back[BackendReq.BACKEND_SHARED_OBJECT_LOOKUP].reply_fds == "0-1"


def p_flag(name: str) -> object:
    from vhsm.wire import ProtocolFeature

    return ProtocolFeature[name]

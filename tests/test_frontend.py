"""The Python front-end against a real daemon: orders, memory, rings, recording, raw input."""

from __future__ import annotations

import json
import os
import socket
import struct
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from vhsm.backend import EPOLLIN, VhostUserBackend, drain
from vhsm.daemon import Listener, VhostUserDaemon
from vhsm.errors import GuestMemoryError, VhsmError
from vhsm.frontend import (
    B2F,
    F2B,
    SECTOR_SIZE,
    BlkDevice,
    Frontend,
    FrontendListener,
    FrontendMemory,
    NetDevice,
    RngDevice,
    connect_unix,
)
from vhsm.transport import PeerClosed
from vhsm.wire import (
    BackendReq,
    FrontendReq,
    ProtocolFeature,
    VhostUserU64,
    VhostUserVringState,
    VirtioFeature,
    make_request,
)
from vhsm.wire.jsonconv import record_to_message

PROTOCOL = (
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.STATUS
    | ProtocolFeature.CONFIG
)


class UpperBackend(VhostUserBackend):
    """Tiny test device: each chain's readable bytes come back upper-cased in its writable part."""

    def __init__(self, protocol: int = PROTOCOL) -> None:
        self._protocol = protocol
        self.channel: Any = None

    def num_queues(self) -> int:
        return 2

    def max_queue_size(self) -> int:
        return 256

    def features(self) -> int:
        return int(
            VirtioFeature.VERSION_1
            | VirtioFeature.RING_INDIRECT_DESC
            | VirtioFeature.RING_EVENT_IDX
            | VirtioFeature.RING_PACKED
            | VirtioFeature.PROTOCOL_FEATURES
        )

    def protocol_features(self) -> int:
        return int(self._protocol)

    def get_config(self, offset: int, size: int) -> bytes:
        return bytes(range(offset, offset + size))

    def set_backend_req_fd(self, channel: Any) -> None:
        self.channel = channel

    def handle_event(
        self, device_event: int, evset: int, vrings: Sequence[Any], thread_id: int
    ) -> None:
        assert evset == EPOLLIN
        drain(vrings[device_event], lambda chain: chain.write(chain.read_all().upper()))


def _upper(fe: Frontend, text: bytes, *, queue: int = 0, indirect: bool = False) -> bytes:
    """Round-trip one chain (two readable pieces, one writable) through UpperBackend."""
    mem, vq = fe.memory, fe.vring(queue)
    half = len(text) // 2
    a, b, out = mem.alloc(half), mem.alloc(len(text) - half), mem.alloc(len(text))
    mem.write(a, text[:half])
    mem.write(b, text[half:])
    head = vq.post([(a, half), (b, len(text) - half)], [(out, len(text))], indirect=indirect)
    vq.kick()
    used, length = vq.wait_used()
    assert used == head
    data = mem.read(out, length)
    for gpa in (a, b, out):
        mem.free(gpa)
    return data


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vhsm-fe-") as d:
        yield Path(d)


@pytest.fixture
def served(sockdir: Path) -> Iterator[tuple[Path, UpperBackend]]:
    backend = UpperBackend()
    daemon = VhostUserDaemon("upper", backend)
    path = sockdir / "upper.sock"
    daemon.start(Listener(path))
    yield path, backend
    daemon.stop()


def _names(fe: Frontend, direction: str) -> list[str]:
    return [r["name"] for r in fe.transcript if r.get("dir") == direction and "channel" not in r]


# --- guest memory ---------------------------------------------------------------------


def test_memory_allocates_inside_regions_and_reuses_freed_space() -> None:
    mem = FrontendMemory([(0, 1 << 16), (1 << 32, 1 << 16)])
    try:
        a = mem.alloc(100)
        b = mem.alloc(1 << 16, region=1 << 32)
        assert 0 <= a < 1 << 16 and b == 1 << 32
        mem.write(a, b"hello")
        assert mem.read(a, 5) == b"hello"
        mem.free(a)
        assert mem.alloc(100) == a
        assert mem.gpa_to_uva(b) != b
        with pytest.raises(GuestMemoryError):
            mem.translate((1 << 16) - 4, 8)
        with pytest.raises(ValueError):
            mem.add_region(4096, 4096)
        regions, fds = mem.table()
        assert [r.guest_phys_addr for r in regions] == [0, 1 << 32] and len(fds) == 2
    finally:
        mem.close()


# --- negotiation, rings, recording --------------------------------------------------


@pytest.mark.parametrize("owner_first", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_negotiates_in_both_orders_and_moves_data(
    served: tuple[Path, UpperBackend], owner_first: bool, packed: bool
) -> None:
    path, _ = served
    with Frontend.connect(path) as fe:
        fe.start(queues=2, size=64, owner_first=owner_first, packed=packed)
        sent = _names(fe, F2B)
        assert sent[0] == ("SET_OWNER" if owner_first else "GET_FEATURES")
        assert sent.index("SET_OWNER") > sent.index("SET_BACKEND_REQ_FD") or owner_first
        assert fe.packed is packed and fe.reply_ack
        assert _upper(fe, b"hello vhost-user") == b"HELLO VHOST-USER"
        assert _upper(fe, b"indirect chain!", queue=1, indirect=True) == b"INDIRECT CHAIN!"
        # REPLY_ACK in use: every ack-type request asked for (and got) an ack
        for rec in fe.transcript:
            if rec.get("dir") == F2B and rec["name"] == "SET_VRING_KICK":
                assert rec["need_reply"] and rec["nfds"] == 1


def test_transcript_is_recorded_to_a_file_in_the_transcript_format(
    served: tuple[Path, UpperBackend], sockdir: Path
) -> None:
    path, _ = served
    out = sockdir / "session.jsonl"
    with Frontend.connect(path, record_path=out) as fe:
        fe.start(queues=1, size=32)
        assert _upper(fe, b"abc") == b"ABC"
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert lines == fe.transcript
    assert lines[0]["event"] == "open"
    messages = [r for r in lines if "dir" in r]
    assert {r["dir"] for r in messages} == {F2B, B2F}
    features = next(r for r in messages if r["dir"] == B2F and r["name"] == "GET_FEATURES")
    assert "RING_PACKED" in features["decoded"]["bits"]
    for rec in messages:
        assert rec["conn"] == 1 and rec["flags"] in ("0x1", "0x5", "0x9")
        assert record_to_message(rec).error is None
    mem_table = next(r for r in messages if r["name"] == "SET_MEM_TABLE")
    assert mem_table["nfds"] == 1 and mem_table["size"] == 8 + 32


def test_config_status_and_queue_queries(served: tuple[Path, UpperBackend]) -> None:
    path, _ = served
    with Frontend.connect(path) as fe:
        fe.start(queues=1, size=16)
        assert fe.queue_num == 2
        assert fe.max_mem_slots is not None and fe.max_mem_slots >= 8
        assert fe.get_config(4, 4) == bytes([4, 5, 6, 7])
        assert fe.get_status() & 0x0F == 0x0F  # ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK


# --- memory tables --------------------------------------------------------------------


def test_several_regions_replaced_by_set_mem_table_and_add_rem_mem_reg(
    served: tuple[Path, UpperBackend],
) -> None:
    path, _ = served
    mem = FrontendMemory([(0, 1 << 20), (1 << 30, 1 << 20)])
    with Frontend.connect(path, memory=mem) as fe:
        fe.start(queues=1, size=32)
        # buffers in the second region
        vq = fe.vring(0)
        src, dst = mem.alloc(8, region=1 << 30), mem.alloc(8, region=1 << 30)
        mem.write(src, b"region 2")
        vq.post([(src, 8)], [(dst, 8)])
        vq.kick()
        assert vq.wait_used()[1] == 8 and mem.read(dst, 8) == b"REGION 2"
        # hot-plug a third region, use it, remove it
        fe.add_mem_region(1 << 31, 1 << 20)
        buf = mem.alloc(4, region=1 << 31)
        mem.write(buf, b"abcd")
        vq.post([(buf, 4)], [(buf, 4)])
        vq.kick()
        assert vq.wait_used()[1] == 4 and mem.read(buf, 4) == b"ABCD"
        fe.remove_mem_region(1 << 31)
        # a whole new table: add a region and send SET_MEM_TABLE again
        mem.add_region(1 << 32, 1 << 20)
        fe.set_mem_table()
        assert _upper(fe, b"after replace") == b"AFTER REPLACE"
        names = _names(fe, F2B)
        assert names.count("SET_MEM_TABLE") == 2
        assert "ADD_MEM_REG" in names and "REM_MEM_REG" in names


# --- back-end channel -------------------------------------------------------------------


def test_backend_requests_are_answered_on_the_channel(served: tuple[Path, UpperBackend]) -> None:
    path, backend = served
    seen: list[int] = []

    def handler(msg: Any) -> int:
        seen.append(msg.request)
        return 0

    with Frontend.connect(path, backend_request_handler=handler) as fe:
        fe.start(queues=1, size=16)
        assert fe.backend_channel is not None and backend.channel is not None
        backend.channel.config_change()
        got = fe.backend_channel.wait_for(BackendReq.BACKEND_CONFIG_CHANGE_MSG, 5.0)
        assert got is not None and seen == [BackendReq.BACKEND_CONFIG_CHANGE_MSG]
        recorded = [r for r in fe.transcript if r.get("channel") == "backend"]
        assert recorded[0]["dir"] == B2F and recorded[0]["name"] == "BACKEND_CONFIG_CHANGE_MSG"


# --- stop, reset, reconnect -----------------------------------------------------------


def test_stop_restart_and_reset(served: tuple[Path, UpperBackend]) -> None:
    path, _ = served
    with Frontend.connect(path) as fe:
        fe.start(queues=1, size=16)
        for _ in range(3):
            assert _upper(fe, b"x") == b"X"
        assert fe.stop_vring(0) == 3
        fe.restart_vring(0)
        assert _upper(fe, b"y") == b"Y"
        fe.reset_device()
        fe.negotiate()
        fe.set_mem_table()
        fe.setup_vring(0, 16)
        assert _upper(fe, b"after reset") == b"AFTER RESET"


def test_disconnect_and_reconnect_resumes_the_rings(served: tuple[Path, UpperBackend]) -> None:
    path, _ = served
    with Frontend.connect(path) as fe:
        fe.start(queues=1, size=16)
        assert _upper(fe, b"before") == b"BEFORE"
        fe.reconnect()
        assert _upper(fe, b"after") == b"AFTER"
        # conn 2 (or a later one, if the daemon was still closing conn 1 and refused it)
        last = fe.conn_id
        assert last >= 2 and {r["conn"] for r in fe.transcript} == set(range(1, last + 1))
        base = next(
            r
            for r in fe.transcript
            if r["conn"] == last and r.get("name") == "SET_VRING_BASE" and r["dir"] == F2B
        )
        assert base["decoded"]["num"] == 1  # resumed at the used index


def test_client_mode_backend_connects_to_the_frontend(sockdir: Path) -> None:
    path = sockdir / "fe.sock"
    listener = FrontendListener(path)
    daemon = VhostUserDaemon("upper-client", UpperBackend())
    try:
        daemon.start_client(path)
        with listener.accept() as fe:
            fe.start(queues=1, size=16)
            assert _upper(fe, b"client") == b"CLIENT"
    finally:
        daemon.stop()
        listener.close()


# --- raw and malformed input --------------------------------------------------------------


def test_bad_payload_with_need_reply_gets_a_nack(served: tuple[Path, UpperBackend]) -> None:
    path, _ = served
    with Frontend.connect(path) as fe:
        fe.negotiate()
        reply = fe.request(FrontendReq.SET_VRING_NUM, VhostUserVringState(99, 64), need_reply=True)
        assert reply is not None and reply.payload == VhostUserU64(1)
        assert fe.get_features() & VirtioFeature.VERSION_1  # the connection survived


def test_reserved_header_flags_close_the_connection(served: tuple[Path, UpperBackend]) -> None:
    path, _ = served
    with Frontend.connect(path) as fe:
        fe.send_raw(struct.pack("<III", FrontendReq.GET_FEATURES, 0x1 | 0x100, 0))
        assert fe.expect_closed(5.0)
        raw = [r for r in fe.transcript if r.get("raw")]
        assert raw and raw[0]["flags"] == "0x101"
        with pytest.raises(PeerClosed):
            fe.recv(0.1)


def test_oversized_message_closes_and_raw_fds_are_ours(served: tuple[Path, UpperBackend]) -> None:
    path, _ = served
    efd = os.eventfd(0)
    try:
        with Frontend.connect(path) as fe:
            fe.send_raw(struct.pack("<III", FrontendReq.SET_OWNER, 0x1, 1 << 20), [efd])
            assert fe.expect_closed(5.0)
        os.fstat(efd)  # still open: the caller owns fds it sends
    finally:
        os.close(efd)


def test_send_of_a_request_without_reply_and_recv_timeout(
    served: tuple[Path, UpperBackend],
) -> None:
    path, _ = served
    with Frontend.connect(path) as fe:
        fe.send(make_request(FrontendReq.SET_OWNER))
        with pytest.raises(TimeoutError):
            fe.recv(0.05)
        assert _names(fe, F2B) == ["SET_OWNER"]


def test_rng_device_helper(sockdir: Path) -> None:
    from vhsm.devices.rng import RngBackend

    daemon = VhostUserDaemon("rng", RngBackend())
    path = sockdir / "rng.sock"
    daemon.start(Listener(path))
    try:
        with Frontend.connect(path) as fe:
            fe.start()
            rng = RngDevice(fe)
            assert len(rng.read(64)) == 64
            assert len(rng.read(8, indirect=True)) == 8
    finally:
        daemon.stop()


def test_connect_retries_until_the_socket_listens(sockdir: Path) -> None:
    path = sockdir / "late.sock"
    with pytest.raises(FileNotFoundError):
        Frontend.connect(path, retry_for=0.05)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    try:
        with Frontend.connect(path, retry_for=0.5) as fe:
            assert fe.transcript[0]["event"] == "open"
    finally:
        server.close()


def test_blk_helper_and_inflight_reconnect(sockdir: Path) -> None:
    from vhsm.devices.blk import BlkBackend

    image = sockdir / "disk.img"
    image.write_bytes(bytes(1 << 20))
    backend = BlkBackend(str(image), serial="fe-test")
    daemon = VhostUserDaemon("blk", backend)
    path = sockdir / "blk.sock"
    daemon.start(Listener(path))
    try:
        with Frontend.connect(path) as fe:
            fe.start(size=32, inflight=True)
            blk = BlkDevice(fe)
            assert blk.get_id() == b"fe-test"
            assert blk.capacity() == (1 << 20) // SECTOR_SIZE
            blk.write(2, b"\x5a" * 1024, indirect=True)
            blk.flush()
            assert blk.read(2, 2) == b"\x5a" * 1024
            blk.discard(2, 1)
            fe.reconnect()
            assert blk.read(3, 1) == b"\x5a" * 512
            set_inflight = [r["conn"] for r in fe.transcript if r.get("name") == "SET_INFLIGHT_FD"]
            assert set_inflight[0] == 1 and set_inflight[-1] == fe.conn_id > 1
        assert image.read_bytes()[3 * 512 : 4 * 512] == b"\x5a" * 512
    finally:
        daemon.stop()
        backend.close()


class LoopbackNet(VhostUserBackend):
    """Tiny net device: every frame sent on TX (queue 1) comes back on RX (queue 0)."""

    def num_queues(self) -> int:
        return 2

    def max_queue_size(self) -> int:
        return 64

    def features(self) -> int:
        return int(
            VirtioFeature.VERSION_1
            | VirtioFeature.PROTOCOL_FEATURES
            | VirtioFeature.RING_INDIRECT_DESC
        )

    def protocol_features(self) -> int:
        return int(ProtocolFeature.REPLY_ACK)

    def handle_event(
        self, device_event: int, evset: int, vrings: Sequence[Any], thread_id: int
    ) -> None:
        rx, tx = vrings[0], vrings[1]
        while (chain := tx.pop()) is not None:
            packet = chain.read_all()
            tx.add_used(chain.head, 0)
            slot = rx.pop()
            if slot is not None:
                rx.add_used(slot.head, slot.write(packet))
        tx.signal_used_queue()
        rx.signal_used_queue()


def test_net_helper_sends_and_receives_frames(sockdir: Path) -> None:
    daemon = VhostUserDaemon("net", LoopbackNet())
    path = sockdir / "net.sock"
    daemon.start(Listener(path))
    try:
        with Frontend.connect(path) as fe:
            fe.start(queues=2, size=16)
            net = NetDevice(fe)
            net.post_rx(2)
            frame = bytes(range(60))
            net.send(frame)
            assert net.receive() == frame
            net.send(frame[::-1], indirect=True)
            assert net.receive() == frame[::-1]
    finally:
        daemon.stop()


def test_net_in_qemu_order_enables_rings_before_set_features(sockdir: Path) -> None:
    """QEMU 7.2 vhost-user-net's order is served: the early enables govern the started rings."""
    from vhsm.devices.net import NetBackend

    daemon = VhostUserDaemon("net", NetBackend("loopback"))
    path = sockdir / "net.sock"
    daemon.start(Listener(path))
    try:
        with Frontend.connect(path) as fe:
            fe.start(queues=2, size=64, enable_first=True)
            names = _names(fe, F2B)
            assert names.count("SET_VRING_ENABLE") == 2
            assert names.index("SET_VRING_ENABLE") < names.index("SET_FEATURES")
            assert names[-1] != "SET_VRING_ENABLE"
            net = NetDevice(fe)
            net.post_rx(2)
            for n in (60, 1514):
                frame = bytes(i & 0xFF for i in range(n))
                net.send(frame)
                assert net.receive() == frame
            fe.reconnect()  # the same order again on the new connection
            net.post_rx(1)
            net.send(b"\x01" * 64)
            assert net.receive() == b"\x01" * 64
    finally:
        daemon.stop()


def test_enable_first_needs_the_queues(served: tuple[Path, UpperBackend]) -> None:
    with Frontend.connect(served[0]) as fe, pytest.raises(VhsmError, match="pass queues"):
        fe.start(enable_first=True)


def test_connect_unix_retries_until_a_back_end_listens_or_it_is_stopped(tmp_path: Path) -> None:
    stop_r, stop_w = os.pipe()
    try:
        os.write(stop_w, b"x")
        with pytest.raises(ConnectionAbortedError):
            connect_unix(tmp_path / "nobody.sock", retry_for=60.0, stop_fd=stop_r)
    finally:
        os.close(stop_r)
        os.close(stop_w)
    with pytest.raises(FileNotFoundError):
        connect_unix(tmp_path / "nobody.sock", retry_for=0.0)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.fspath(tmp_path / "b.sock"))
    listener.listen(1)
    with listener, connect_unix(tmp_path / "b.sock") as sock:
        assert sock.getpeername() == os.fspath(tmp_path / "b.sock")

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vhsm.daemon import Listener, VhostUserDaemon
from vhsm.devices.vsock import VsockBackend
from vhsm.devices.vsock_conn import BUF_ALLOC
from vhsm.devices.vsock_packet import HOST_CID, Header, Op, Shutdown
from vhsm.errors import VhsmError
from vhsm.frontend import Frontend
from vhsm.frontend.vsock import VsockDevice
from vhsm.wire.enums import ProtocolFeature

CID = 42
PROTO = int(ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG | ProtocolFeature.DEVICE_STATE)


@dataclass
class Env:
    dir: Path
    uds: Path
    backend: VsockBackend
    daemon: VhostUserDaemon
    fe: Frontend
    dev: VsockDevice

    def listen(self, port: int) -> socket.socket:
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(f"{self.uds}_{port}")
        srv.listen(64)
        srv.settimeout(10)
        return srv

    def host_connect(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(str(self.uds))
        sock.sendall(f"CONNECT {port}\n".encode())
        return sock


def start_env(
    d: Path, *, rx_buffers: int = 32, buf_alloc: int = 256 * 1024, packed: bool = False
) -> Env:
    backend = VsockBackend(CID, d / "v.sock", claim_cid=False)
    daemon = VhostUserDaemon("vsock-test", backend)
    daemon.start(Listener(d / "vu.sock"))
    fe = Frontend.connect(d / "vu.sock", timeout=10)
    fe.start(queues=[0, 1], protocol_features=PROTO, packed=packed)
    dev = VsockDevice(fe, CID, rx_buffers=rx_buffers, buf_alloc=buf_alloc)
    return Env(d, d / "v.sock", backend, daemon, fe, dev)


def stop_env(env: Env) -> None:
    env.fe.close()
    env.daemon.stop()
    env.backend.close()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vs-", dir="/tmp"))  # unix paths: 107 bytes at most
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def env(sockdir: Path) -> Iterator[Env]:
    e = start_env(sockdir)
    yield e
    stop_env(e)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


def guest_connect(env: Env, src: int, dst: int) -> Header:
    env.dev.send(env.dev.header(Op.REQUEST, src, dst))
    hdr, _ = env.dev.recv()
    return hdr


def guest_read(env: Env, src: int, dst: int, n: int) -> bytes:
    """Receive n bytes of RW payload for (src, dst), crediting the device as Linux does."""
    out = bytearray()
    while len(out) < n:
        hdr, payload = env.dev.recv()
        if hdr.op == Op.CREDIT_REQUEST:
            env.dev.send(env.dev.header(Op.CREDIT_UPDATE, src, dst))
            continue
        if hdr.op == Op.CREDIT_UPDATE:  # the device forwarded guest bytes: information only
            continue
        assert (hdr.op, hdr.dst_port, hdr.src_port) == (Op.RW, src, dst), hdr
        out += payload
        env.dev.send(env.dev.header(Op.CREDIT_UPDATE, src, dst))
    return bytes(out)


def pattern(n: int, seed: int) -> bytes:
    return bytes((seed * 31 + i * 7) & 0xFF for i in range(n))


# --- negotiation ---------------------------------------------------------------------------
def test_config_space_is_the_guest_cid_and_read_only(env: Env) -> None:
    assert int.from_bytes(env.fe.get_config(0, 8), "little") == CID
    assert env.fe.get_config(4, 4) == bytes(4)  # high half of a 64-bit CID
    assert env.backend.num_queues() == 3
    assert env.backend.protocol_features() & ProtocolFeature.CONFIG


@pytest.mark.parametrize("cid", [0, 1, 2, 0xFFFF_FFFF, 1 << 40])
def test_reserved_cids_are_refused(sockdir: Path, cid: int) -> None:
    with pytest.raises(VhsmError, match=f"guest CID {cid}"):
        VsockBackend(cid, sockdir / "v.sock", claim_cid=False)


def test_busy_uds_path_and_cid_clash_are_refused(sockdir: Path) -> None:
    first = VsockBackend(7777, sockdir / "a.sock")
    try:
        with pytest.raises(VhsmError, match="socket in use"):
            VsockBackend(7778, sockdir / "a.sock")
        with pytest.raises(VhsmError, match="CID 7777 is already served"):
            VsockBackend(7777, sockdir / "b.sock")
        assert not (sockdir / "b.sock").exists()
    finally:
        first.close()
    VsockBackend(7777, sockdir / "b.sock").close()  # released with the first device


# --- guest-initiated -----------------------------------------------------------------------
def test_guest_connects_to_a_host_listener_and_data_flows_both_ways(env: Env) -> None:
    srv = env.listen(5000)
    hdr = guest_connect(env, 1234, 5000)
    assert (hdr.op, hdr.src_cid, hdr.dst_cid) == (Op.RESPONSE, HOST_CID, CID)
    assert (hdr.src_port, hdr.dst_port, hdr.buf_alloc) == (5000, 1234, BUF_ALLOC)
    host, _ = srv.accept()
    host.settimeout(10)
    up = pattern(10000, 1)
    for i in range(0, len(up), 3000):
        chunk = up[i : i + 3000]
        env.dev.send(env.dev.header(Op.RW, 1234, 5000, length=len(chunk)), chunk)
    assert recv_exact(host, len(up)) == up
    down = pattern(50000, 2)
    host.sendall(down)
    assert guest_read(env, 1234, 5000, len(down)) == down
    host.close()
    srv.close()


def test_guest_connect_without_listener_is_reset(env: Env) -> None:
    hdr = guest_connect(env, 1234, 6000)
    assert (hdr.op, hdr.src_port, hdr.dst_port) == (Op.RST, 6000, 1234)


def test_packets_for_unknown_connections_and_bad_types_are_reset(env: Env) -> None:
    env.dev.send(env.dev.header(Op.RW, 1, 2, length=3), b"abc")
    hdr, _ = env.dev.recv()
    assert (hdr.op, hdr.src_port, hdr.dst_port) == (Op.RST, 2, 1)
    env.dev.send(dataclasses.replace(env.dev.header(Op.REQUEST, 5, 6), type=2))  # SEQPACKET
    hdr, _ = env.dev.recv()
    assert (hdr.op, hdr.src_port, hdr.dst_port) == (Op.RST, 6, 5)
    env.dev.send(env.dev.header(Op.RST, 9, 9))  # an RST is never answered
    env.dev.send(env.dev.header(Op.CREDIT_REQUEST, 9, 9))
    hdr, _ = env.dev.recv()
    assert (hdr.op, hdr.src_port) == (Op.RST, 9)


def test_guest_past_its_credit_is_reset(env: Env) -> None:
    srv = env.listen(5001)
    guest_connect(env, 1, 5001)
    host, _ = srv.accept()  # never reads: the device keeps what the socket does not take
    chunk = bytes(60000)
    sent = 0
    while True:
        env.dev.send(env.dev.header(Op.RW, 1, 5001, length=len(chunk)), chunk)
        sent += len(chunk)
        if sent > BUF_ALLOC + 300_000:  # past any socket buffer plus the credit
            break
    hdr, _ = env.dev.recv()
    while hdr.op == Op.CREDIT_UPDATE:
        hdr, _ = env.dev.recv()
    assert (hdr.op, hdr.dst_port) == (Op.RST, 1)
    host.close()
    srv.close()


def test_shutdown_both_directions(env: Env) -> None:
    srv = env.listen(5002)
    guest_connect(env, 7, 5002)
    host, _ = srv.accept()
    host.settimeout(10)
    env.dev.send(env.dev.header(Op.RW, 7, 5002, length=5), b"hello")
    env.dev.send(env.dev.header(Op.SHUTDOWN, 7, 5002, flags=Shutdown.SEND))
    assert recv_exact(host, 5) == b"hello"
    assert host.recv(10) == b""  # the guest sends no more: EOF on the host
    host.sendall(b"still here")  # ... while the other direction goes on
    assert guest_read(env, 7, 5002, 10) == b"still here"
    host.shutdown(socket.SHUT_WR)
    hdr, _ = env.dev.recv()
    assert hdr.op == Op.SHUTDOWN and hdr.flags == Shutdown.SEND | Shutdown.RCV
    env.dev.send(env.dev.header(Op.RST, 7, 5002))
    assert env.backend.conns == {}
    host.close()
    srv.close()


def test_guest_close_is_answered_with_rst_after_the_data(env: Env) -> None:
    srv = env.listen(5003)
    guest_connect(env, 8, 5003)
    host, _ = srv.accept()
    host.settimeout(10)
    env.dev.send(env.dev.header(Op.RW, 8, 5003, length=3), b"bye")
    env.dev.send(env.dev.header(Op.SHUTDOWN, 8, 5003, flags=Shutdown.SEND | Shutdown.RCV))
    hdr, _ = env.dev.recv()
    assert (hdr.op, hdr.dst_port) == (Op.RST, 8)
    assert recv_exact(host, 3) == b"bye" and host.recv(1) == b""
    host.close()
    srv.close()


def test_host_closing_first_tells_the_guest(env: Env) -> None:
    srv = env.listen(5004)
    guest_connect(env, 9, 5004)
    host, _ = srv.accept()
    host.sendall(b"last words")
    host.close()
    assert guest_read(env, 9, 5004, 10) == b"last words"
    hdr, _ = env.dev.recv()
    while hdr.op == Op.CREDIT_REQUEST:
        hdr, _ = env.dev.recv()
    assert hdr.op == Op.SHUTDOWN and hdr.flags & Shutdown.SEND
    srv.close()


# --- host-initiated ------------------------------------------------------------------------
def test_host_connects_to_a_guest_port(env: Env) -> None:
    host = env.host_connect(1024)
    hdr, _ = env.dev.recv()
    assert (hdr.op, hdr.src_cid, hdr.dst_cid, hdr.dst_port) == (Op.REQUEST, HOST_CID, CID, 1024)
    local = hdr.src_port
    env.dev.send(env.dev.header(Op.RESPONSE, 1024, local))
    line = b""
    while not line.endswith(b"\n"):
        line += host.recv(1)
    assert line == f"OK {local}\n".encode()
    host.sendall(b"ping")
    assert guest_read(env, 1024, local, 4) == b"ping"
    env.dev.send(env.dev.header(Op.RW, 1024, local, length=4), b"pong")
    assert recv_exact(host, 4) == b"pong"
    host.close()


def test_guest_refusal_closes_the_host_socket(env: Env) -> None:
    host = env.host_connect(1025)
    hdr, _ = env.dev.recv()
    env.dev.send(env.dev.header(Op.RST, 1025, hdr.src_port))
    assert host.recv(10) == b""
    assert env.backend.conns == {}
    host.close()


@pytest.mark.parametrize("line", [b"CONNECT x\n", b"HELLO 5\n", b"CONNECT " + b"9" * 40])
def test_bad_connect_lines_are_closed(env: Env, line: bytes) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(env.uds))
    sock.sendall(line)
    with contextlib.suppress(ConnectionResetError):  # closed with the line unread
        assert sock.recv(10) == b""
    sock.close()
    good = env.host_connect(77)  # the device goes on serving
    hdr, _ = env.dev.recv()
    assert (hdr.op, hdr.dst_port) == (Op.REQUEST, 77)
    good.close()


# --- flow control ----------------------------------------------------------------------------
def test_host_data_waits_for_guest_credit_and_buffers(sockdir: Path) -> None:
    env = start_env(sockdir, rx_buffers=4, buf_alloc=8192)
    try:
        srv = env.listen(5005)
        guest_connect(env, 11, 5005)
        host, _ = srv.accept()
        data = pattern(200_000, 3)
        writer = threading.Thread(target=host.sendall, args=(data,))
        writer.start()
        got = bytearray()
        in_flight = 0
        while len(got) < len(data):
            hdr, payload = env.dev.recv()
            if hdr.op == Op.CREDIT_REQUEST:
                env.dev.send(env.dev.header(Op.CREDIT_UPDATE, 11, 5005))
                continue
            assert hdr.op == Op.RW
            in_flight += len(payload)
            assert in_flight <= 8192  # never past the credit the guest gave
            got += payload
            if in_flight >= 4096:  # the guest application reads: credit goes back
                env.dev.send(env.dev.header(Op.CREDIT_UPDATE, 11, 5005))
                in_flight = 0
        writer.join()
        assert bytes(got) == data
        host.close()
        srv.close()
    finally:
        stop_env(env)


def test_no_receive_buffers_means_the_host_socket_is_left_alone(sockdir: Path) -> None:
    env = start_env(sockdir, rx_buffers=1)
    try:
        srv = env.listen(5006)
        guest_connect(env, 12, 5006)  # consumed the buffer; recv posted a new one
        host, _ = srv.accept()
        host.sendall(b"a" * 100)
        _, payload = env.dev.recv(repost=False)
        assert payload == b"a" * 100
        host.sendall(b"b" * 100)  # no buffer now: must wait, not be lost
        with pytest.raises(TimeoutError):
            env.dev.recv(timeout=0.3)
        env.dev.post_rx(1)
        _, payload = env.dev.recv()
        assert payload == b"b" * 100
        host.close()
        srv.close()
    finally:
        stop_env(env)


def test_many_concurrent_connections(env: Env) -> None:
    srv = env.listen(5007)
    n = 24
    hosts = []
    for i in range(n):
        assert guest_connect(env, 2000 + i, 5007).op == Op.RESPONSE
        host, _ = srv.accept()
        host.settimeout(10)
        hosts.append(host)
    # the listener accepts in connect order: host i serves guest port 2000 + i
    for round_ in range(3):
        for i in range(n):
            msg = f"r{round_} c{i} ".encode() * (i + 1)
            env.dev.send(env.dev.header(Op.RW, 2000 + i, 5007, length=len(msg)), msg)
    for i, host in enumerate(hosts):
        expected = b"".join(f"r{r} c{i} ".encode() * (i + 1) for r in range(3))
        assert recv_exact(host, len(expected)) == expected
        host.sendall(f"answer {i}".encode())
    answers: dict[int, bytes] = {}
    while len(answers) < n or any(len(v) < len(f"answer {p - 2000}") for p, v in answers.items()):
        hdr, payload = env.dev.recv()
        if hdr.op == Op.RW:
            answers[hdr.dst_port] = answers.get(hdr.dst_port, b"") + payload
    assert answers == {2000 + i: f"answer {i}".encode() for i in range(n)}
    for host in hosts:
        host.close()
    srv.close()


# --- device state ------------------------------------------------------------------------------
def test_device_state_moves_a_stream_to_a_second_daemon(sockdir: Path) -> None:
    env = start_env(sockdir)
    srv = env.listen(5100)
    guest_connect(env, 300, 5100)
    old_host, _ = srv.accept()
    old_host.settimeout(10)
    # a small socket buffer and a host program that does not read: what the socket
    # does not take stays in the device
    env.backend.conns[(5100, 300)].sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sent = bytearray()
    for i in range(5):
        chunk = pattern(40000, 10 + i)
        env.dev.send(env.dev.header(Op.RW, 300, 5100, length=len(chunk)), chunk)
        sent += chunk
    assert env.backend.conns[(5100, 300)].pending  # some bytes are still the device's
    refused = env.host_connect(99)  # a host-initiated stream, accepted by the guest
    hdr, _ = env.dev.recv()
    env.dev.send(env.dev.header(Op.RESPONSE, 99, hdr.src_port))
    host_port = hdr.src_port
    for index in (0, 1):
        env.fe.stop_vring(index)
    state = env.fe.save_device_state()
    assert b"vhsm-vsock-state" in state
    env.fe.disconnect()
    env.daemon.stop()
    env.backend.close()
    # what the old daemon handed to the host, then the second daemon on the same paths
    got = bytearray()
    old_host.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while chunk := old_host.recv(1 << 16):
            got += chunk
    backend = VsockBackend(CID, sockdir / "v.sock", claim_cid=False)
    daemon = VhostUserDaemon("vsock-dst", backend)
    daemon.start(Listener(sockdir / "vu.sock"))
    # the destination front-end: same guest memory, the state before the rings start
    fe = Frontend.connect(sockdir / "vu.sock", memory=env.fe.memory, timeout=10)
    try:
        fe.negotiate(protocol_features=PROTO)
        fe.set_mem_table()
        assert fe.load_device_state(b"not json") != 0  # a broken state fails the check
        other = state.replace(b'"guest_cid": 42', b'"guest_cid": 43')
        assert fe.load_device_state(other) != 0  # ... as does another guest's
        assert fe.load_device_state(state) == 0
        fe.vrings, env.fe.vrings = env.fe.vrings, {}
        for index in (0, 1):
            fe.restart_vring(index)  # resumed where GET_VRING_BASE stopped them
            fe.enable_vring(index)
        env.dev.frontend = fe
        new_host, _ = srv.accept()
        new_host.settimeout(10)
        assert bytes(got) + recv_exact(new_host, len(sent) - len(got)) == bytes(sent)
        env.dev.send(env.dev.header(Op.RW, 300, 5100, length=5), b"after")  # same stream
        assert recv_exact(new_host, 5) == b"after"
        hdr, _ = env.dev.recv()  # the host-initiated stream could not follow its program
        while hdr.op == Op.CREDIT_UPDATE:
            hdr, _ = env.dev.recv()
        assert (hdr.op, hdr.src_port, hdr.dst_port) == (Op.RST, host_port, 99)
        new_host.sendall(b"back")
        assert guest_read(env, 300, 5100, 4) == b"back"
        new_host.close()
    finally:
        fe.close()
        daemon.stop()
        backend.close()
        old_host.close()
        refused.close()
        srv.close()


# --- command line ------------------------------------------------------------------------------
def test_serve_vsock_refuses_a_busy_uds_path(sockdir: Path) -> None:
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    busy.bind(str(sockdir / "busy.sock"))
    busy.listen(1)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "vhsm", "serve", "vsock", "--socket", str(sockdir / "vu"),
             "--guest-cid", "9123", "--uds-path", str(sockdir / "busy.sock")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        busy.close()
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "socket in use" in lines[0], proc.stderr
    assert not os.path.exists(sockdir / "vu")


def test_serve_vsock_refuses_a_reserved_cid(sockdir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vhsm", "serve", "vsock", "--socket", str(sockdir / "vu"),
         "--guest-cid", "2", "--uds-path", str(sockdir / "v.sock")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1 and "guest CID 2" in proc.stderr


def test_packed_rings_move_data_both_ways(sockdir: Path) -> None:
    env = start_env(sockdir, packed=True)
    try:
        assert env.fe.packed
        srv = env.listen(5200)
        assert guest_connect(env, 40, 5200).op == Op.RESPONSE
        host, _ = srv.accept()
        host.settimeout(10)
        env.dev.send(env.dev.header(Op.RW, 40, 5200, length=6), b"packed")
        assert recv_exact(host, 6) == b"packed"
        host.sendall(pattern(20000, 9))
        assert guest_read(env, 40, 5200, 20000) == pattern(20000, 9)
        host.close()
        srv.close()
    finally:
        stop_env(env)

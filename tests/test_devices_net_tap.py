from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from netns_support import NetNs, netns_problem, tap_name

from vhsm.audit.backend_suite import run_suite
from vhsm.daemon import Listener, VhostUserDaemon
from vhsm.devices.net_tap import TapNetBackend, parse_mac
from vhsm.devices.tap import Tap, check_name
from vhsm.errors import VhsmError
from vhsm.frontend import Frontend, NetDevice
from vhsm.wire.enums import NetFeature, ProtocolFeature, VirtioFeature

pytestmark = pytest.mark.skipif(netns_problem() is not None, reason=str(netns_problem()))

ETH_P_ALL = 0x0003
GUEST_MAC = bytes.fromhex("020000aabbcc")


@dataclass
class Env:
    ns: NetNs
    ifname: str
    backend: TapNetBackend
    daemon: VhostUserDaemon
    fe: Frontend
    net: NetDevice
    wire: socket.socket  # a packet socket on the TAP: the host network's side

    def inject(self, frame: bytes) -> None:
        """A frame the host network sends toward the guest."""
        self.wire.send(frame)

    def capture(self, want: int = 1, timeout: float = 10.0) -> list[bytes]:
        """Frames the guest sent out of the TAP (IPv6 chatter of the host skipped)."""
        got: list[bytes] = []
        deadline = time.monotonic() + timeout
        while len(got) < want:
            self.wire.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data, addr = self.wire.recvfrom(70000)
            except TimeoutError:
                break
            if addr[2] == socket.PACKET_OUTGOING or data[6:12] != GUEST_MAC:
                continue
            got.append(data)
        return got


HOST_MAC = bytes.fromhex("020000112233")


def frame(n: int, seed: int, *, outgoing: bool = False) -> bytes:
    """An n-byte frame to the guest (or, ``outgoing``, from it); EtherType 0x88b5 (local)."""
    payload = bytes((seed + i * 3) & 0xFF for i in range(n - 14))
    dst, src = (HOST_MAC, GUEST_MAC) if outgoing else (GUEST_MAC, HOST_MAC)
    return dst + src + b"\x88\xb5" + payload


def start(sockdir: Path, *, pairs: int = 1, mtu: int | None = None, buffer: int = 1526) -> Env:
    ns = NetNs()
    name = tap_name()
    backend = ns.call(lambda: TapNetBackend(name, pairs, mac=GUEST_MAC, mtu=mtu))
    ns.ip("link", "set", name, "up")
    wire = ns.call(
        lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    )
    wire.bind((name, 0))
    daemon = VhostUserDaemon("net-tap", backend)
    daemon.start(Listener(sockdir / "net.sock"))
    fe = Frontend.connect(sockdir / "net.sock", timeout=10)
    fe.start(queues=2 * pairs)
    net = NetDevice(fe, buffer_size=buffer)
    return Env(ns, name, backend, daemon, fe, net, wire)


def stop(env: Env) -> None:
    env.fe.close()
    env.daemon.stop()
    env.backend.close()
    env.wire.close()
    env.ns.close()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vt-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
def env(sockdir: Path) -> Iterator[Env]:
    e = start(sockdir)
    yield e
    stop(e)


def test_names_macs_and_mtus_are_checked() -> None:
    for bad in ("", "a" * 16, "a/b"):
        with pytest.raises(VhsmError, match="bad TAP name"):
            check_name(bad)
    assert parse_mac("02:00:00:aa:bb:cc") == GUEST_MAC
    for bad in ("02:00:00:aa:bb", "zz:00:00:aa:bb:cc", "020000aabbcc"):
        with pytest.raises(VhsmError, match="bad MAC"):
            parse_mac(bad)
    with pytest.raises(VhsmError, match="unicast"):
        TapNetBackend("x", mac=b"\x01" * 6)
    with pytest.raises(VhsmError, match="MTU 20"):
        TapNetBackend("x", mtu=20)


def test_features_config_and_offloads(env: Env) -> None:
    offered = env.backend.features()
    for bit in (NetFeature.MAC, NetFeature.MTU, NetFeature.MRG_RXBUF, VirtioFeature.VERSION_1):
        assert offered & bit, bit
    assert env.backend.tap.offloads  # a Linux TAP takes checksum and TSO offloads
    for bit in (
        NetFeature.CSUM,
        NetFeature.GUEST_CSUM,
        NetFeature.HOST_TSO4,
        NetFeature.GUEST_TSO4,
    ):
        assert offered & bit, bit
    assert not offered & VirtioFeature.RING_PACKED  # chains are put back: split rings only
    assert not offered & NetFeature.MQ
    mac, status, pairs, mtu = struct.unpack("<6sHHH", env.fe.get_config(0, 12))
    assert (mac, status, pairs, mtu) == (GUEST_MAC, 1, 1, 1500)
    assert env.fe.offered_protocol_features & ProtocolFeature.CONFIG


def test_guest_frames_reach_the_tap(env: Env) -> None:
    sent = [frame(60 + 100 * i, i, outgoing=True) for i in range(5)]
    for f in sent:
        env.net.send(f)
    assert env.capture(5) == sent
    assert env.backend.pair_stats[0].tx_packets == 5


def test_tap_frames_reach_the_guest_and_wait_for_buffers(env: Env) -> None:
    env.net.post_rx(2)
    sent = [frame(200 + i, 10 + i) for i in range(5)]
    for f in sent:
        env.inject(f)
    got = [env.net.receive() for _ in range(2)]  # two buffers: two frames, three wait
    assert got == sent[:2]
    deadline = time.monotonic() + 30
    while env.backend.pair_stats[0].rx_waits == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # the third frame reaches the device (softirq may lag under load)
    env.net.post_rx(3)
    got += [env.net.receive() for _ in range(3)]
    assert got == sent  # nothing lost, nothing reordered
    assert env.backend.pair_stats[0].rx_waits >= 1
    assert env.backend.pair_stats[0].rx_dropped == 0


def test_num_buffers_is_one_per_frame_in_one_buffer(env: Env) -> None:
    head_gpa = env.fe.memory.alloc(1526)
    head = env.net.rx.post([], [(head_gpa, 1526)])
    env.net.rx.kick()
    env.inject(frame(100, 7))
    used, length = env.net.rx.wait_used()
    assert used == head
    data = env.fe.memory.read(head_gpa, length)
    assert struct.unpack_from("<H", data, 10)[0] == 1  # num_buffers
    assert data[12:] == frame(100, 7)


def test_big_frame_spans_several_buffers_with_mrg_rxbuf(sockdir: Path) -> None:
    env = start(sockdir, mtu=9000)
    try:
        assert struct.unpack_from("<H", env.fe.get_config(10, 2))[0] == 9000
        big = frame(4000, 5)
        bufs = []
        for _ in range(4):
            gpa = env.fe.memory.alloc(1526)
            bufs.append((env.net.rx.post([], [(gpa, 1526)]), gpa))
        env.net.rx.kick()
        env.inject(big)
        first, length = env.net.rx.wait_used()
        gpa = dict(bufs)[first]
        data = env.fe.memory.read(gpa, length)
        count = struct.unpack_from("<H", data, 10)[0]
        assert count == 3  # 12 + 4000 bytes in 1526-byte buffers
        out = data[12:]
        for _ in range(count - 1):
            head, n = env.net.rx.wait_used()
            out += env.fe.memory.read(dict(bufs)[head], n)
        assert out == big
    finally:
        stop(env)


def test_two_queue_pairs_use_two_tap_queues(sockdir: Path) -> None:
    env = start(sockdir, pairs=2)
    try:
        assert env.backend.features() & NetFeature.MQ
        assert len(env.backend.tap.fds) == 2
        # QEMU sends the memory table once per pair as ADD_MEM_REG: SET_MEM_TABLE instead
        assert not env.fe.offered_protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS
        second = NetDevice(env.fe, 2, 3)
        second.send(frame(80, 1, outgoing=True))
        env.net.send(frame(81, 2, outgoing=True))
        got = sorted(env.capture(2))
        assert got == sorted([frame(80, 1, outgoing=True), frame(81, 2, outgoing=True)])
        assert [s.tx_packets for s in env.backend.pair_stats] == [1, 1]
    finally:
        stop(env)


def udp_frame(sport: int, dport: int) -> bytes:
    """An IPv4/UDP frame to the guest: the TAP hashes its flow to pick a queue."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 36, 0, 0, 64, 17, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))  # fmt: skip
    udp = struct.pack("!HHHH", sport, dport, 16, 0) + bytes(8)
    return GUEST_MAC + HOST_MAC + b"\x08\x00" + ip + udp


def test_a_pair_not_enabled_leaves_its_flows_to_the_others(sockdir: Path) -> None:
    env = start(sockdir, pairs=2)
    try:
        for ring in (2, 3):  # what a one-CPU Linux guest does with its second pair
            env.fe.enable_vring(ring, False)
        flows = [udp_frame(40000 + i, 50000 + 7 * i) for i in range(24)]
        env.net.post_rx(len(flows))
        for f in flows:
            env.inject(f)
        got = sorted(env.net.receive() for _ in flows)  # every flow reaches pair 0
        assert got == sorted(flows)
        assert [s.rx_packets for s in env.backend.pair_stats] == [24, 0]
        for ring in (2, 3):  # enabled again: the TAP shares the flows between both queues
            env.fe.enable_vring(ring, True)
        second = NetDevice(env.fe, 2, 3)
        second.post_rx(len(flows))
        env.net.post_rx(len(flows))
        for f in flows:
            env.inject(f)
        deadline = time.monotonic() + 30
        while sum(s.rx_packets for s in env.backend.pair_stats) < 48:
            assert time.monotonic() < deadline, env.backend.pair_stats
            time.sleep(0.01)
        assert env.backend.pair_stats[1].rx_packets > 0
    finally:
        stop(env)


def test_an_existing_tap_is_attached(sockdir: Path) -> None:
    ns = NetNs()
    try:
        name = tap_name()
        ns.ip("tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr")
        backend = ns.call(lambda: TapNetBackend(name))
        assert backend.tap.name == name and backend.mtu == 1500
        backend.close()
        assert name in ns.ip("link", "show", name)  # persistent: still there
    finally:
        ns.close()


def test_cli_without_permission_to_create_is_one_line(sockdir: Path) -> None:
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-m", "vhsm", "serve", "net", "--tap", tap_name(),
         "--socket", str(sockdir / "n.sock")],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )  # fmt: skip
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "cannot create or attach TAP" in lines[0] and "CAP_NET_ADMIN" in lines[0]


def serve_in(ns: NetNs, sockdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ns.argv([sys.executable, "-m", "vhsm", "serve", "net", "--socket",
                 str(sockdir / "n.sock"), *args]),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_cli_bad_tap_mac_and_mtu_are_one_line_errors(sockdir: Path) -> None:
    ns = NetNs()
    try:
        single = tap_name()
        ns.ip("tuntap", "add", "dev", single, "mode", "tap", "vnet_hdr")  # no multi_queue
        busy = ns.call(lambda: Tap(tap_name()))  # held open by this process, one queue
        try:
            cases = {
                (f"cannot attach 2 queues to TAP {single}", "not a multiqueue TAP"):
                    ("--tap", single, "--queues", "2"),
                (f"TAP {busy.name} is busy", "another process"): ("--tap", busy.name),
                ("bad MAC address 'zz:00'",): ("--tap", tap_name(), "--mac", "zz:00"),
                ("MAC 01:00:00:00:00:01 is not", "unicast"):
                    ("--tap", tap_name(), "--mac", "01:00:00:00:00:01"),
                ("MTU 20 not in 68..65535",): ("--tap", tap_name(), "--mtu", "20"),
                ("MTU 70000 not in 68..65535",): ("--tap", tap_name(), "--mtu", "70000"),
            }  # fmt: skip
            for wanted, args in cases.items():
                proc = serve_in(ns, sockdir, *args)
                lines = proc.stderr.strip().splitlines()
                assert proc.returncode != 0 and len(lines) == 1, (args, proc.stderr)
                for text in wanted:
                    assert text in lines[0], (args, lines[0])
        finally:
            busy.close()
    finally:
        ns.close()


def test_cli_refuses_mode_with_tap(sockdir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vhsm", "serve", "net", "--tap", "x", "--mode", "sink",
         "--socket", str(sockdir / "n.sock")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0 and "--mode" in proc.stderr


def test_tap_keeps_working_across_reconnect(env: Env) -> None:
    env.fe.reconnect()
    env.net.post_rx(1)
    env.inject(frame(64, 3))
    assert env.net.receive() == frame(64, 3)
    env.net.send(frame(64, 4, outgoing=True))
    assert env.capture(1) == [frame(64, 4, outgoing=True)]


def test_tap_opened_in_a_namespace_stays_there(sockdir: Path) -> None:
    ns = NetNs()
    try:
        name = tap_name()
        tap = ns.call(lambda: Tap(name))
        assert name in ns.ip("link", "show")
        tap.close()
    finally:
        ns.close()


def test_audit_backend_passes_every_case(sockdir: Path) -> None:
    ns = NetNs()
    try:
        name = tap_name()
        backend = ns.call(lambda: TapNetBackend(name))
        ns.ip("link", "set", name, "up")
        daemon = VhostUserDaemon("net-tap", backend)
        daemon.start(Listener(sockdir / "a.sock"))
        try:
            report = run_suite(sockdir / "a.sock", "net", timeout=5.0)
            assert daemon.last_error is None
        finally:
            daemon.stop()
            backend.close()
    finally:
        ns.close()
    assert [(c.name, c.outcome, c.detail) for c in report.cases if c.failed] == []
    assert report.findings == [] and report.exit_status() == 0
    got = {c.title: c.outcome for c in report.cases}
    for case in ("data round trip (net)", "ring stop/start cycles", "reconnect and resume",
                 "RESET_DEVICE and re-initialisation", "config space read"):  # fmt: skip
        assert got[case] == "pass", case

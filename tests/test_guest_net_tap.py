"""`vhsm serve net --tap`: a QEMU guest on a host network, and DPDK virtio-user frames on the TAP.

Each test makes its own network namespace; `vhsm serve net --tap` runs inside
it and creates the TAP there.

* QEMU 7.2 (TCG), `virtio-net-pci` on a `vhost-user` netdev with two queue
  pairs (`--queues 2`, `mq=on`): the guest gets its address from busybox
  udhcpd on the TAP, pings the host side of the TAP, and answers the pings the
  host sends it; then it enables its second pair (a static `net_tool`, as
  `ethtool -L` would) and UDP flows cross both ways. The device's per-pair
  counters (logged when it closes) show frames on both pairs in both
  directions; the guest's MAC is the one given to both `--mac` and `-device`,
  and QEMU's log has nothing but its expected note that it does not use the
  CONFIG protocol feature (docs/devices.md says why it stays).
* DPDK testpmd with a virtio-user port in txonly mode: its UDP frames appear on
  the TAP (counted by the interface, and one captured and decoded).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from guest.harness import (
    boot_guest,
    in_ci,
    require_guest_env,
    running_backend,
    short_socket_dir,
)
from guest.initramfs import VIRTIO_MODULES
from guest.static_tool import build_static
from guest.tap import (
    DHCP_SCRIPT,
    GUEST_IP,
    GUEST_MAC,
    HOST_IP,
    HostPinger,
    HostUdp,
    guest_script,
    multiqueue_script,
    start_dhcp,
    vhost_user_net,
)
from netns_support import NetNs, netns_problem, tap_name

from vhsm.commands.bench import load

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(400)]

VHSM = [sys.executable, "-m", "vhsm"]


def require_netns() -> None:
    problem = netns_problem()
    if problem is not None:
        if in_ci():
            pytest.fail(problem)
        pytest.skip(problem)


@pytest.fixture
def ns() -> Iterator[NetNs]:
    require_netns()
    space = NetNs()
    yield space
    space.close()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with short_socket_dir() as path:
        yield path


def serve_tap_argv(ns: NetNs, ifname: str, sock: Path, *extra: str) -> list[str]:
    return ns.argv([*VHSM, "serve", "net", "--tap", ifname, "--socket", str(sock), *extra])


#: QEMU 7.2 on a back-end that offers CONFIG to virtio-net, which keeps its own config.
QEMU_CONFIG_WARNING = "vhost-user backend supports VHOST_USER_PROTOCOL_F_CONFIG but QEMU does not."
#: What `TapNetBackend.close` logs for each pair.
PAIR_STATS = re.compile(r"net-tap \S+ pair (\d+): TapStats\((.*?)\)")


def pair_stats(log: str) -> dict[int, dict[str, int]]:
    """The per-pair counters the device logged when it closed."""
    found = {}
    for pair, fields in PAIR_STATS.findall(log):
        found[int(pair)] = {k: int(v) for k, v in (f.split("=") for f in fields.split(", "))}
    return found


def test_guest_on_two_queue_pairs_gets_an_address_and_talks_both_ways(
    ns: NetNs, sock_dir: Path, tmp_path: Path
) -> None:
    env = require_guest_env()
    tool = build_static(Path(__file__).parent / "guest" / "net_tool.c", tmp_path)
    if isinstance(tool, str):
        pytest.fail(tool) if in_ci() else pytest.skip(tool)
    ifname, sock = tap_name(), sock_dir / "net.sock"
    argv = serve_tap_argv(
        ns, ifname, sock, "--queues", "2", "--mac", GUEST_MAC, "--log-level", "INFO"
    )
    with running_backend(argv, sock, tmp_path / "vhsm.log") as be:
        ns.ip("addr", "add", f"{HOST_IP}/24", "dev", ifname)
        ns.ip("link", "set", ifname, "up")
        dhcp = start_dhcp(ns, ifname, tmp_path)
        pinger, udp = HostPinger(ns), HostUdp(ns)
        pinger.start()
        udp.start()
        try:
            result = boot_guest(
                env,
                script=guest_script() + multiqueue_script(2, flows=64, want_udp=64),
                devices=[vhost_user_net(sock, queues=2)],
                backends=[be],
                workdir=tmp_path / "guest",
                modules=(*VIRTIO_MODULES, "virtio_net"),
                files={"bin/dhcp.sh": DHCP_SCRIPT, "bin/net_tool": tool},
                timeout=300,
            )
        finally:
            udp.stop()
            pinger.stop()
            dhcp.terminate()
            dhcp.wait(10)
    log = be.log()
    result.assert_passed()
    assert result.values["guest_addr"] == f"{GUEST_IP}/24"  # from udhcpd, over the TAP
    assert result.values["ping_host"] == "ok"
    assert int(result.values["host_echoes"]) >= 3
    assert pinger.error is None and pinger.replies >= 3, (pinger, result.report())
    assert result.values["guest_mac"] == GUEST_MAC
    assert int(result.values["udp_received"]) >= 64
    stats = pair_stats(log)
    assert sorted(stats) == [0, 1], log
    for pair in (0, 1):  # frames crossed both TAP queues, in both directions
        assert stats[pair]["tx_packets"] > 0 and stats[pair]["rx_packets"] > 0, log
        assert stats[pair]["tx_errors"] == 0 and stats[pair]["rx_dropped"] == 0, log
    # QEMU's only word on the protocol features: it does not use CONFIG (docs/devices.md)
    warnings = {line.split("warning: ", 1)[-1] for line in result.qemu_log.splitlines()}
    assert warnings <= {"", QEMU_CONFIG_WARNING}, result.qemu_log
    assert "Traceback" not in log, log


def test_dpdk_virtio_user_frames_appear_on_the_tap(
    ns: NetNs, sock_dir: Path, tmp_path: Path
) -> None:
    testpmd = shutil.which("dpdk-testpmd")
    if testpmd is None:
        if in_ci():
            pytest.fail("dpdk-testpmd not found (run .ci/install-deps)")
        pytest.skip("dpdk-testpmd not found (run .ci/install-deps)")
    net_dpdk = load("net")  # the benchmark's EAL and testpmd options
    eal_args, testpmd_args = net_dpdk.eal_args, net_dpdk.testpmd_args

    ifname, sock = tap_name(), sock_dir / "net.sock"
    with running_backend(serve_tap_argv(ns, ifname, sock), sock, tmp_path / "vhsm.log") as be:
        ns.ip("link", "set", ifname, "up")
        wire = ns.call(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)))
        wire.bind((ifname, 0))
        wire.settimeout(60)
        vdev = f"net_virtio_user0,path={sock},queues=1,queue_size=256"
        argv = [testpmd, *eal_args(None, f"vhsmtap{id(ns)}", vdev),
                *testpmd_args(1, "txonly", ["--txpkts=128"])]  # fmt: skip
        log_path = tmp_path / "testpmd.log"
        with open(log_path, "wb") as log:
            pmd = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            captured = wire.recv(2048)
            deadline = time.monotonic() + 60
            while rx_packets(ns, ifname) < 1000 and time.monotonic() < deadline:
                time.sleep(0.2)
            counted = rx_packets(ns, ifname)
        finally:
            pmd.terminate()
            try:
                pmd.wait(20)
            except subprocess.TimeoutExpired:
                pmd.kill()
                pmd.wait()
            wire.close()
    assert counted >= 1000, log_path.read_text(errors="replace")[-2000:]
    # testpmd's txonly frame: IPv4 (0x0800), UDP (17), 128 bytes in all
    assert len(captured) == 128 and captured[12:14] == b"\x08\x00" and captured[23] == 17
    assert "Traceback" not in be.log(), be.log()


def rx_packets(ns: NetNs, ifname: str) -> int:
    """Frames the TAP interface received (what the device wrote into it)."""
    out = subprocess.run(
        ns.argv(["cat", f"/sys/class/net/{ifname}/statistics/rx_packets"]),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(out.stdout)

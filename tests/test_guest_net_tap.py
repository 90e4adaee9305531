"""`vhsm serve net --tap`: a QEMU guest on a host network, and DPDK virtio-user frames on the TAP.

Each test makes its own network namespace; `vhsm serve net --tap` runs inside
it and creates the TAP there.

* QEMU 7.2 (TCG), `virtio-net-pci` on a `vhost-user` netdev: the guest gets its
  address from busybox udhcpd on the TAP, pings the host side of the TAP, and
  answers the pings the host sends it.
* DPDK testpmd with a virtio-user port in txonly mode: its UDP frames appear on
  the TAP (counted by the interface, and one captured and decoded).
"""

from __future__ import annotations

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
from guest.tap import (
    DHCP_SCRIPT,
    GUEST_IP,
    HOST_IP,
    HostPinger,
    guest_script,
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


def serve_tap_argv(ns: NetNs, ifname: str, sock: Path) -> list[str]:
    return ns.argv([*VHSM, "serve", "net", "--tap", ifname, "--socket", str(sock)])


def test_guest_gets_an_address_and_pings_both_ways(
    ns: NetNs, sock_dir: Path, tmp_path: Path
) -> None:
    env = require_guest_env()
    ifname, sock = tap_name(), sock_dir / "net.sock"
    with running_backend(serve_tap_argv(ns, ifname, sock), sock, tmp_path / "vhsm.log") as be:
        ns.ip("addr", "add", f"{HOST_IP}/24", "dev", ifname)
        ns.ip("link", "set", ifname, "up")
        dhcp = start_dhcp(ns, ifname, tmp_path)
        pinger = HostPinger(ns)
        pinger.start()
        try:
            result = boot_guest(
                env,
                script=guest_script(),
                devices=[vhost_user_net(sock)],
                backends=[be],
                workdir=tmp_path / "guest",
                modules=(*VIRTIO_MODULES, "virtio_net"),
                files={"bin/dhcp.sh": DHCP_SCRIPT},
                timeout=300,
            )
        finally:
            pinger.stop()
            dhcp.terminate()
            dhcp.wait(10)
    log = be.log()
    result.assert_passed()
    assert result.values["guest_addr"] == f"{GUEST_IP}/24"  # from udhcpd, over the TAP
    assert result.values["ping_host"] == "ok"
    assert int(result.values["host_echoes"]) >= 3
    assert pinger.error is None and pinger.replies >= 3, (pinger, result.report())
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

"""The TAP guest test's pieces: the host network in a namespace, DHCP, pings, the guest script.

The host side lives in a network namespace of its own (`netns_support.NetNs`):
``vhsm serve net --tap`` runs there and creates the TAP, which gets the host
address; busybox ``udhcpd`` hands the guest its address; a thread pings the
guest from the namespace while the guest pings the host.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from netns_support import NetNs

from .harness import GuestDevice

HOST_IP = "10.55.0.1"
GUEST_IP = "10.55.0.10"  # the first (only) lease of the pool
GUEST_MAC = "52:54:00:12:34:56"
#: busybox udhcpc calls this with the lease in its environment; it sets the address.
DHCP_SCRIPT = b"""#!/bin/sh
case "$1" in
bound|renew) ip addr add "$ip/$mask" dev "$interface" ;;
esac
exit 0
"""


def vhost_user_net(socket: Path, *, id: str = "vunet0", queues: int = 1) -> GuestDevice:
    """virtio-net-pci on a vhost-user netdev (vectors=0: QEMU 7.2 TCG and MSI-X on net crash).

    With several queue pairs the netdev gets ``queues=N`` and the device ``mq=on``.
    """
    mq = f",queues={queues}" if queues > 1 else ""
    return GuestDevice(
        id=id,
        args=(
            "-chardev", f"socket,id={id}-chr,path={socket}",
            "-netdev", f"vhost-user,id={id}-net,chardev={id}-chr{mq}",
            "-device", f"virtio-net-pci,netdev={id}-net,mac={GUEST_MAC},vectors=0"
            + (",mq=on" if queues > 1 else ""),
        ),
    )  # fmt: skip


def start_dhcp(ns: NetNs, ifname: str, workdir: Path) -> subprocess.Popen[bytes]:
    """busybox udhcpd in the namespace, leasing GUEST_IP on ``ifname``."""
    conf = workdir / "udhcpd.conf"
    conf.write_text(
        f"start {GUEST_IP}\nend {GUEST_IP}\ninterface {ifname}\n"
        f"lease_file {workdir / 'leases'}\npidfile {workdir / 'udhcpd.pid'}\n"
        "option subnet 255.255.255.0\noption lease 600\n"
    )
    (workdir / "leases").write_bytes(b"")
    log = open(workdir / "udhcpd.log", "wb")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        ns.argv(["busybox", "udhcpd", "-f", str(conf)]), stdout=log, stderr=subprocess.STDOUT
    )


@dataclass
class HostPinger:
    """Pings the guest from the namespace until ``want`` replies came (or ``stop``)."""

    ns: NetNs
    want: int = 3
    replies: int = 0
    tries: int = 0
    error: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        """Begin pinging on a thread."""
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self.replies < self.want and not self._stop.is_set():
            self.tries += 1
            try:
                ping = subprocess.run(
                    self.ns.argv(["busybox", "ping", "-c", "1", "-W", "1", GUEST_IP]),
                    capture_output=True,
                )
            except OSError as err:
                self.error = str(err)
                return
            if ping.returncode == 0:
                self.replies += 1
            else:
                time.sleep(0.5)

    def stop(self) -> None:
        """Stop and wait."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)


@dataclass
class HostUdp:
    """Sends UDP datagrams to the guest from the namespace, ``flows`` ports per round.

    Every datagram leaves from a fresh socket (a new source port) to one of
    ``flows`` destination ports: many flows, which a multiqueue TAP spreads over
    its queues. Rounds repeat until ``stop`` (errors before the guest has its
    address are expected and ignored).
    """

    ns: NetNs
    flows: int = 32
    port: int = 30000
    sent: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        """Begin sending on a thread that entered the namespace."""
        self._thread = threading.Thread(target=self.ns.call, args=(self._run,), daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.3):
            for i in range(self.flows):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    try:
                        sock.sendto(b"h" * 64, (GUEST_IP, self.port + i))
                    except OSError:
                        continue
                    self.sent += 1

    def stop(self) -> None:
        """Stop and wait."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)


#: The guest's UDP datagrams received, to open ports or not (InDatagrams + NoPorts).
UDP_IN = (
    'awk \'/^Udp:/ { if (!n) { for (j = 1; j <= NF; j++) { if ($j == "InDatagrams") a = j;'
    ' if ($j == "NoPorts") b = j }; n = 1 } else print $a + $b }\' /proc/net/snmp'
)

#: The guest's count of echo requests received (InEchos of /proc/net/snmp).
ECHOES = (
    'awk \'/^Icmp:/ { if (!n) { for (j = 1; j <= NF; j++) if ($j == "InEchos") c = j; n = 1 }'
    " else print $c }' /proc/net/snmp"
)


def guest_script(want_echoes: int = 3) -> str:
    """Link up, DHCP, ping the host, then wait until the host's pings were answered."""
    return f"""
set -e
ip link set eth0 up
udhcpc -i eth0 -n -q -t 20 -T 1 -s /bin/dhcp.sh
addr=$(ip -4 -o addr show dev eth0 | awk '{{print $4}}')
echo "VHSM-KV guest_addr=$addr"
ping -c 3 -W 5 {HOST_IP}
echo "VHSM-KV ping_host=ok"
i=0
while :; do
    echoes=$({ECHOES})
    [ "$echoes" -ge {want_echoes} ] && break
    i=$((i + 1))
    [ $i -lt 240 ] || {{ echo "VHSM-KV host_echoes=$echoes"; exit 1; }}
    sleep 0.5
done
echo "VHSM-KV host_echoes=$echoes"
"""


def multiqueue_script(pairs: int, flows: int, want_udp: int) -> str:
    """Enable ``pairs`` queue pairs, send ``flows`` UDP flows to the host, await the host's.

    Runs after `guest_script`. The guest has one CPU, so Linux starts with one
    pair; ``net_tool channels`` enables the rest (what ``ethtool -L`` does).
    """
    return f"""
echo "VHSM-KV guest_mac=$(cat /sys/class/net/eth0/address)"
/bin/net_tool channels eth0 {pairs}
echo "VHSM-KV channels={pairs}"
base=$({UDP_IN})
/bin/net_tool udp {HOST_IP} 20000 {flows}
echo "VHSM-KV udp_sent={flows}"
i=0
while :; do
    got=$(( $({UDP_IN}) - base ))
    [ "$got" -ge {want_udp} ] && break
    i=$((i + 1))
    [ $i -lt 240 ] || {{ echo "VHSM-KV udp_received=$got"; exit 1; }}
    sleep 0.5
done
echo "VHSM-KV udp_received=$got"
"""


__all__ = [
    "DHCP_SCRIPT",
    "GUEST_IP",
    "GUEST_MAC",
    "HOST_IP",
    "HostPinger",
    "HostUdp",
    "guest_script",
    "multiqueue_script",
    "start_dhcp",
    "vhost_user_net",
]

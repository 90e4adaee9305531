"""The TAP guest test's pieces: the host network in a namespace, DHCP, pings, the guest script.

The host side lives in a network namespace of its own (`netns_support.NetNs`):
``vhsm serve net --tap`` runs there and creates the TAP, which gets the host
address; busybox ``udhcpd`` hands the guest its address; a thread pings the
guest from the namespace while the guest pings the host.
"""

from __future__ import annotations

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


def vhost_user_net(socket: Path, *, id: str = "vunet0") -> GuestDevice:
    """virtio-net-pci on a vhost-user netdev (vectors=0: QEMU 7.2 TCG and MSI-X on net crash)."""
    return GuestDevice(
        id=id,
        args=(
            "-chardev", f"socket,id={id}-chr,path={socket}",
            "-netdev", f"vhost-user,id={id}-net,chardev={id}-chr",
            "-device", f"virtio-net-pci,netdev={id}-net,mac={GUEST_MAC},vectors=0",
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


__all__ = [
    "DHCP_SCRIPT",
    "GUEST_IP",
    "GUEST_MAC",
    "HOST_IP",
    "HostPinger",
    "guest_script",
    "start_dhcp",
    "vhost_user_net",
]

"""A Linux TAP interface opened for a virtio-net device: queues, vnet headers, offloads.

``/dev/net/tun`` with ``TUNSETIFF`` creates the interface when it does not
exist (CAP_NET_ADMIN needed) or attaches to an existing one (its owner, or
CAP_NET_ADMIN). Each open file is one queue: with ``IFF_MULTI_QUEUE`` every
queue pair of the device gets its own. ``IFF_VNET_HDR`` puts a virtio-net
header before every frame, in both directions, so checksum and segmentation
offloads pass through unchanged; ``TUNSETVNETHDRSZ`` makes it the 12-byte
VERSION_1 header the guest uses. ``TUNSETOFFLOAD`` tells the TAP which
offloads the reader (here: the guest) accepts. ``TUNSETQUEUE`` detaches a queue
(the TAP stops steering frames to it) and attaches it again: a queue pair the
guest has not enabled must not swallow the frames of the flows hashed to it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import struct

from vhsm.errors import VhsmError
from vhsm.ioctl import ior, iow

TUN_DEVICE = "/dev/net/tun"
IFNAMSIZ = 16
#: struct ifreq: the name, then a 24-byte union (flags, MTU, hardware address ...).
IFREQ = struct.Struct("16s24s")
TUNSETIFF = iow("T", 202, 4)
TUNGETFEATURES = ior("T", 207, 4)
TUNSETOFFLOAD = iow("T", 208, 4)
TUNSETVNETHDRSZ = iow("T", 216, 4)
TUNSETQUEUE = iow("T", 217, 4)
SIOCGIFMTU, SIOCSIFMTU = 0x8921, 0x8922
SIOCGIFHWADDR = 0x8927

IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08

#: The VERSION_1 virtio-net header (num_buffers included).
VNET_HDR_SIZE = 12


def check_name(name: str) -> bytes:
    """The interface name as ``ifr_name`` bytes; VhsmError when it cannot be one."""
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b"\0" in raw or raw.isspace():
        raise VhsmError(f"bad TAP name {name!r}: 1 to {IFNAMSIZ - 1} bytes, no '/'")
    return raw


class Tap:
    """An open TAP interface: one non-blocking file per queue.

    Args:
        name: the interface name (created when missing).
        queues: how many queues (files); more than one needs IFF_MULTI_QUEUE.

    Raises:
        VhsmError: the interface cannot be created or attached (the message names
            it and the reason, e.g. missing CAP_NET_ADMIN).
    """

    def __init__(self, name: str, queues: int = 1) -> None:
        raw = check_name(name)
        self.name = name
        self.fds: list[int] = []
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
        try:
            for _ in range(queues):
                fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                self.fds.append(fd)
                fcntl.ioctl(fd, TUNSETIFF, IFREQ.pack(raw, struct.pack("<H", flags)))
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("<i", VNET_HDR_SIZE))
        except OSError as err:
            self.close()
            raise VhsmError(_open_error(name, queues, err)) from None
        #: TUN_F_* offloads the TAP accepts (probed once: offered only when accepted).
        self.offloads = self._probe_offloads()
        self.set_offload(0)

    def _probe_offloads(self) -> int:
        accepted = 0
        for bit in (TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN):
            wanted = accepted | bit | (TUN_F_CSUM if bit != TUN_F_CSUM else 0)
            try:
                fcntl.ioctl(self.fds[0], TUNSETOFFLOAD, wanted)
            except OSError:
                continue
            accepted = wanted
        return accepted

    def set_offload(self, flags: int) -> None:
        """TUNSETOFFLOAD on every queue: what the TAP may hand the guest."""
        for fd in self.fds:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags & self.offloads)

    def set_attached(self, queue: int, attached: bool) -> None:
        """Attach or detach queue ``queue`` of a multiqueue TAP (TUNSETQUEUE).

        A detached queue gets no frames from the TAP and cannot send; the others
        share its flows. Only multiqueue TAPs have queues to detach.

        Raises:
            OSError: the TAP refused (already in that state, or not multiqueue).
        """
        flag = IFF_ATTACH_QUEUE if attached else IFF_DETACH_QUEUE
        fcntl.ioctl(self.fds[queue], TUNSETQUEUE, IFREQ.pack(b"", struct.pack("<H", flag)))

    def mtu(self) -> int:
        """The interface's MTU."""
        return int(struct.unpack_from("<i", self._ifreq(SIOCGIFMTU, b""), IFNAMSIZ)[0])

    def set_mtu(self, mtu: int) -> None:
        """Set the interface's MTU (VhsmError when refused)."""
        try:
            self._ifreq(SIOCSIFMTU, struct.pack("<i", mtu))
        except OSError as err:
            raise VhsmError(f"cannot set MTU {mtu} on {self.name}: {err.strerror}") from None

    def _ifreq(self, request: int, data: bytes) -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            return fcntl.ioctl(sock, request, IFREQ.pack(self.name.encode(), data))

    def close(self) -> None:
        """Close every queue (a TAP this device created goes away with its last file)."""
        fds, self.fds = self.fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _open_error(name: str, queues: int, err: OSError) -> str:
    reason = err.strerror or str(err)
    if err.errno == errno.EPERM:
        return (
            f"cannot create or attach TAP {name}: {reason} (creating one needs CAP_NET_ADMIN;"
            " an existing one must belong to this user)"
        )
    if err.errno == errno.EBUSY:
        return f"TAP {name} is busy: {reason} (another process holds it open)"
    if err.errno == errno.EINVAL and queues > 1:
        return f"cannot attach {queues} queues to TAP {name}: {reason} (not a multiqueue TAP?)"
    if err.errno == errno.ENOENT:
        return f"cannot open {TUN_DEVICE} for TAP {name}: {reason} (tun module not loaded?)"
    return f"cannot open TAP {name}: {reason}"


__all__ = ["VNET_HDR_SIZE", "Tap", "check_name"]

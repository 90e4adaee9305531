"""virtio-vsock packets: the 44-byte header every packet starts with, and its codes.

The device and the guest driver exchange packets on two queues: the guest posts
device-writable buffers on the receive queue (0) for what the host sends, and
device-readable packets on the transmit queue (1). Each packet is a
``virtio_vsock_hdr`` (little-endian, packed) followed by ``len`` payload bytes
(only ``RW`` packets carry a payload). Every header also carries the sender's
receive-buffer accounting, ``buf_alloc`` and ``fwd_cnt``, which is how the
credit-based flow control works: a sender may have at most ``buf_alloc`` bytes
that the receiver has not yet forwarded (``tx_cnt - fwd_cnt``) in flight.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

#: struct virtio_vsock_hdr: src_cid, dst_cid, src_port, dst_port, len, type, op,
#: flags, buf_alloc, fwd_cnt.
HEADER = struct.Struct("<QQIIIHHIII")
HEADER_SIZE = HEADER.size  # 44

#: The host's context id (VMADDR_CID_HOST); 0 and 1 are reserved, u32 max means "any".
HOST_CID = 2
#: Context ids a guest may not use: hypervisor, local, host; and VMADDR_CID_ANY.
RESERVED_CIDS = frozenset({0, 1, 2, 0xFFFF_FFFF})
#: The largest context id (the config field is 64-bit, addresses use 32 bits).
MAX_CID = 0xFFFF_FFFE

#: Queue indices.
RX_QUEUE, TX_QUEUE, EVENT_QUEUE = 0, 1, 2

#: Socket type of a stream connection (VIRTIO_VSOCK_TYPE_STREAM).
TYPE_STREAM = 1

_U32 = 0xFFFF_FFFF


class Op(enum.IntEnum):
    """``op`` of a packet (VIRTIO_VSOCK_OP_*)."""

    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


class Shutdown(enum.IntFlag):
    """``flags`` of a SHUTDOWN packet: the sender will receive / send no more."""

    RCV = 1
    SEND = 2


@dataclass(frozen=True)
class Header:
    """One decoded ``virtio_vsock_hdr``."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    @classmethod
    def from_bytes(cls, data: bytes) -> Header:
        """Decode the first 44 bytes of ``data`` (ValueError when shorter)."""
        if len(data) < HEADER_SIZE:
            raise ValueError(f"vsock packet of {len(data)} bytes is shorter than its header")
        return cls(*HEADER.unpack_from(data))

    def to_bytes(self) -> bytes:
        """Encode the header."""
        return HEADER.pack(
            self.src_cid,
            self.dst_cid,
            self.src_port,
            self.dst_port,
            self.len,
            self.type,
            self.op,
            self.flags,
            self.buf_alloc & _U32,
            self.fwd_cnt & _U32,
        )

    def reply(self, op: Op, *, flags: int = 0, buf_alloc: int = 0, fwd_cnt: int = 0) -> Header:
        """A payload-less header going back to this one's sender (addresses swapped)."""
        return Header(
            self.dst_cid,
            self.src_cid,
            self.dst_port,
            self.src_port,
            0,
            TYPE_STREAM,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        )


def check_guest_cid(cid: int) -> None:
    """Raise ValueError unless ``cid`` may name a guest (3 .. 2^32 - 2)."""
    if cid in RESERVED_CIDS or not 0 < cid <= MAX_CID:
        raise ValueError(
            f"guest CID {cid} is reserved or out of range (0 hypervisor, 1 local, 2 host, "
            f"{_U32} any; use 3..{MAX_CID})"
        )


def wrapping_sub(a: int, b: int) -> int:
    """``a - b`` modulo 2^32: the byte counters wrap."""
    return (a - b) & _U32


__all__ = [
    "EVENT_QUEUE",
    "HEADER",
    "HEADER_SIZE",
    "HOST_CID",
    "MAX_CID",
    "RESERVED_CIDS",
    "RX_QUEUE",
    "TX_QUEUE",
    "TYPE_STREAM",
    "Header",
    "Op",
    "Shutdown",
    "check_guest_cid",
    "wrapping_sub",
]

"""Small guest-driver helpers on top of `Frontend`: virtio-blk, virtio-rng, virtio-net.

Each builds the requests the virtio spec defines for its device, posts them
as descriptor chains (direct or indirect), kicks, waits for the used element
and returns the result. Buffers are allocated in guest memory per request.
"""

from __future__ import annotations

import struct
from typing import Final

from vhsm.errors import BackendError
from vhsm.frontend.frontend import Frontend
from vhsm.frontend.virtqueue import Virtqueue

SECTOR_SIZE: Final = 512

# virtio-blk request types and status values (virtio spec 5.2.6).
VIRTIO_BLK_T_IN: Final = 0
VIRTIO_BLK_T_OUT: Final = 1
VIRTIO_BLK_T_FLUSH: Final = 4
VIRTIO_BLK_T_GET_ID: Final = 8
VIRTIO_BLK_T_DISCARD: Final = 11
VIRTIO_BLK_T_WRITE_ZEROES: Final = 13
VIRTIO_BLK_S_OK: Final = 0
VIRTIO_BLK_S_IOERR: Final = 1
VIRTIO_BLK_S_UNSUPP: Final = 2
VIRTIO_BLK_ID_BYTES: Final = 20

_BLK_OUTHDR = struct.Struct("<IIQ")  # type, reserved (ioprio), sector
_BLK_SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags
#: The 12-byte ``virtio_net_hdr_v1`` that precedes every frame (VERSION_1).
NET_HDR_SIZE: Final = 12


class _Device:
    def __init__(self, frontend: Frontend, *, timeout: float | None = None) -> None:
        self.frontend = frontend
        self.timeout = frontend.timeout if timeout is None else timeout

    def _run(
        self,
        vq: Virtqueue,
        readable: list[bytes],
        writable: list[int],
        *,
        indirect: bool = False,
    ) -> tuple[int, list[bytes]]:
        """Post one chain (readable contents, writable sizes), kick, wait; return (len, data)."""
        mem = self.frontend.memory
        out_bufs = []
        in_bufs = []
        try:
            for data in readable:
                gpa = mem.alloc(len(data))
                mem.write(gpa, data)
                out_bufs.append((gpa, len(data)))
            for size in writable:
                in_bufs.append((mem.alloc(size), size))
            head = vq.post(out_bufs, in_bufs, indirect=indirect)
            vq.kick()
            used_head, length = vq.wait_used(self.timeout)
            if used_head != head:
                raise BackendError(f"ring {vq.index}: used id {used_head}, expected {head}")
            return length, [mem.read(gpa, size) for gpa, size in in_bufs]
        finally:
            for gpa, _ in (*out_bufs, *in_bufs):
                mem.free(gpa)


class BlkDevice(_Device):
    """A virtio-blk driver on queue ``queue`` (requests: header, data, status byte)."""

    def __init__(self, frontend: Frontend, queue: int = 0, *, timeout: float | None = None) -> None:
        super().__init__(frontend, timeout=timeout)
        self.vq = frontend.vring(queue)

    def request(
        self,
        kind: int,
        sector: int = 0,
        data: bytes = b"",
        in_len: int = 0,
        *,
        indirect: bool = False,
    ) -> tuple[int, bytes]:
        """Run one request; return (status byte, bytes read)."""
        readable = [_BLK_OUTHDR.pack(kind, 0, sector)]
        if data:
            readable.append(data)
        writable = [in_len, 1] if in_len else [1]
        _length, got = self._run(self.vq, readable, writable, indirect=indirect)
        return got[-1][0], got[0] if in_len else b""

    def _ok(self, what: str, status: int) -> None:
        if status != VIRTIO_BLK_S_OK:
            names = {VIRTIO_BLK_S_IOERR: "IOERR", VIRTIO_BLK_S_UNSUPP: "UNSUPP"}
            raise BackendError(f"virtio-blk {what}: status {names.get(status, status)}")

    def read(self, sector: int, count: int = 1, *, indirect: bool = False) -> bytes:
        """Read ``count`` sectors from ``sector``."""
        status, data = self.request(
            VIRTIO_BLK_T_IN, sector, in_len=count * SECTOR_SIZE, indirect=indirect
        )
        self._ok(f"read {sector}+{count}", status)
        return data

    def write(self, sector: int, data: bytes, *, indirect: bool = False) -> None:
        """Write whole sectors at ``sector``."""
        if not data or len(data) % SECTOR_SIZE:
            raise ValueError(f"write length {len(data)} is not a positive multiple of 512")
        status, _ = self.request(VIRTIO_BLK_T_OUT, sector, data, indirect=indirect)
        self._ok(f"write {sector}+{len(data) // SECTOR_SIZE}", status)

    def flush(self) -> None:
        """Flush the device's write cache."""
        status, _ = self.request(VIRTIO_BLK_T_FLUSH)
        self._ok("flush", status)

    def discard(self, sector: int, count: int) -> None:
        """Discard ``count`` sectors from ``sector`` (one segment)."""
        status, _ = self.request(VIRTIO_BLK_T_DISCARD, 0, _BLK_SEGMENT.pack(sector, count, 0))
        self._ok(f"discard {sector}+{count}", status)

    def write_zeroes(self, sector: int, count: int) -> None:
        """Write zeroes over ``count`` sectors from ``sector`` (one segment)."""
        status, _ = self.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, _BLK_SEGMENT.pack(sector, count, 0))
        self._ok(f"write zeroes {sector}+{count}", status)

    def get_id(self) -> bytes:
        """The device id string (up to 20 bytes, NUL padding stripped)."""
        status, data = self.request(VIRTIO_BLK_T_GET_ID, in_len=VIRTIO_BLK_ID_BYTES)
        self._ok("get id", status)
        return data.rstrip(b"\0")

    def capacity(self) -> int:
        """Capacity in 512-byte sectors, from config space (needs the CONFIG protocol feature)."""
        return int.from_bytes(self.frontend.get_config(0, 8), "little")


class RngDevice(_Device):
    """A virtio-rng driver: one queue of device-writable buffers."""

    def __init__(self, frontend: Frontend, queue: int = 0, *, timeout: float | None = None) -> None:
        super().__init__(frontend, timeout=timeout)
        self.vq = frontend.vring(queue)

    def read(self, n: int, *, indirect: bool = False) -> bytes:
        """Ask for ``n`` random bytes; return what the device wrote (possibly fewer)."""
        length, got = self._run(self.vq, [], [n], indirect=indirect)
        return got[0][:length]


class NetDevice(_Device):
    """A virtio-net driver: receive queue ``rx`` and transmit queue ``tx`` (12-byte header)."""

    def __init__(
        self,
        frontend: Frontend,
        rx: int = 0,
        tx: int = 1,
        *,
        timeout: float | None = None,
        buffer_size: int = 1526,
    ) -> None:
        super().__init__(frontend, timeout=timeout)
        self.rx = frontend.vring(rx)
        self.tx = frontend.vring(tx)
        self.buffer_size = buffer_size
        self._rx_bufs: dict[int, int] = {}

    def send(self, frame: bytes, *, indirect: bool = False) -> None:
        """Transmit one frame (a zeroed header, then the frame)."""
        self._run(self.tx, [bytes(NET_HDR_SIZE), frame], [], indirect=indirect)

    def post_rx(self, count: int = 1) -> None:
        """Give the device ``count`` receive buffers."""
        mem = self.frontend.memory
        for _ in range(count):
            gpa = mem.alloc(self.buffer_size)
            head = self.rx.post([], [(gpa, self.buffer_size)])
            self._rx_bufs[head] = gpa
        self.rx.kick()

    def receive(self, timeout: float | None = None) -> bytes:
        """Wait for one received frame (posting a buffer first if none is posted)."""
        if not self._rx_bufs:
            self.post_rx(1)
        head, length = self.rx.wait_used(self.timeout if timeout is None else timeout)
        gpa = self._rx_bufs.pop(head)
        mem = self.frontend.memory
        data = mem.read(gpa, length)
        mem.free(gpa)
        return data[NET_HDR_SIZE:]

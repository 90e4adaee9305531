"""A virtio-vsock guest driver on top of `Frontend`: packets in, packets out.

The guest side of the device protocol, as small as tests need: receive
buffers kept posted on queue 0, packets (header and payload) sent on queue 1,
and received packets decoded. Stream logic (credit, ports) stays with the
caller, who builds headers with `VsockDevice.header`.
"""

from __future__ import annotations

from vhsm.devices.vsock_packet import (
    HEADER_SIZE,
    HOST_CID,
    RX_QUEUE,
    TX_QUEUE,
    TYPE_STREAM,
    Header,
    Op,
)
from vhsm.errors import BackendError
from vhsm.frontend.frontend import Frontend

#: Receive buffer size the Linux driver posts (4 KiB of payload after the header).
RX_BUFFER = HEADER_SIZE + 4096


class VsockDevice:
    """The guest's vsock driver for CID ``guest_cid`` (rings 0 and 1 set up on ``frontend``).

    Args:
        frontend: a started front-end.
        guest_cid: the guest's context id (put in every header sent).
        buf_alloc: the receive buffer advertised in every header sent.
        rx_buffers: receive buffers kept posted.
    """

    def __init__(
        self,
        frontend: Frontend,
        guest_cid: int,
        *,
        buf_alloc: int = 256 * 1024,
        rx_buffers: int = 32,
        timeout: float | None = None,
    ) -> None:
        self.frontend = frontend
        self.guest_cid = guest_cid
        self.buf_alloc = buf_alloc
        self.fwd_cnt = 0
        self.timeout = frontend.timeout if timeout is None else timeout
        self.rx = frontend.vring(RX_QUEUE)
        self.tx = frontend.vring(TX_QUEUE)
        self._rx_bufs: dict[int, int] = {}
        self.post_rx(rx_buffers)

    def header(
        self, op: Op, src_port: int, dst_port: int, *, length: int = 0, flags: int = 0
    ) -> Header:
        """A header from the guest to the host, with this driver's accounting."""
        return Header(
            self.guest_cid, HOST_CID, src_port, dst_port, length, TYPE_STREAM, op, flags,
            self.buf_alloc, self.fwd_cnt,
        )  # fmt: skip

    def post_rx(self, count: int = 1) -> None:
        """Give the device ``count`` more receive buffers."""
        mem = self.frontend.memory
        for _ in range(count):
            gpa = mem.alloc(RX_BUFFER)
            self._rx_bufs[self.rx.post([], [(gpa, RX_BUFFER)])] = gpa
        self.rx.kick()

    def send(self, hdr: Header, payload: bytes = b"") -> None:
        """Transmit one packet (header then payload, two descriptors) and wait for it."""
        mem = self.frontend.memory
        bufs = []
        for part in (hdr.to_bytes(), payload):
            if part:
                gpa = mem.alloc(len(part))
                mem.write(gpa, part)
                bufs.append((gpa, len(part)))
        try:
            head = self.tx.post(bufs, [])
            self.tx.kick()
            used, _ = self.tx.wait_used(self.timeout)
            if used != head:
                raise BackendError(f"vsock TX: used id {used}, expected {head}")
        finally:
            for gpa, _ in bufs:
                mem.free(gpa)

    def recv(self, timeout: float | None = None, *, repost: bool = True) -> tuple[Header, bytes]:
        """Wait for one received packet; its buffer is posted again unless ``repost`` is off."""
        head, length = self.rx.wait_used(self.timeout if timeout is None else timeout)
        gpa = self._rx_bufs.pop(head)
        mem = self.frontend.memory
        data = mem.read(gpa, length)
        mem.free(gpa)
        if repost:
            self.post_rx(1)
        hdr = Header.from_bytes(data)
        payload = data[HEADER_SIZE : HEADER_SIZE + hdr.len]
        if hdr.op == Op.RW:
            self.fwd_cnt = (self.fwd_cnt + len(payload)) & 0xFFFF_FFFF
        return hdr, payload


__all__ = ["RX_BUFFER", "VsockDevice"]

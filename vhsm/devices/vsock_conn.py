"""One vsock stream: its host-side unix socket and both directions' credit accounting.

A connection joins a guest port to a host port. Its host side is a non-blocking
unix stream socket: one the device accepted on the ``uds`` path (the host program
asked for a guest port with ``CONNECT <port>``), or one it opened to
``<uds>_<port>`` (the guest connected to host port ``port``).

Flow control, both ways, with byte counters that wrap at 2^32:

* guest to host: the device advertises ``buf_alloc`` bytes; ``rx_cnt`` counts what
  the guest sent, ``fwd_cnt`` what reached the host socket. Bytes the socket did not
  take wait in ``pending`` (never more than ``buf_alloc``: a guest that sends past
  its credit is reset).
* host to guest: the guest advertises ``peer_buf_alloc`` and ``peer_fwd_cnt``;
  ``tx_cnt`` counts what the device sent. The host socket is read only while the
  guest has credit (``peer_credit``), so nothing is ever buffered on this side.
"""

from __future__ import annotations

import enum
import socket
from dataclasses import dataclass, field

from vhsm.devices.vsock_packet import HOST_CID, TYPE_STREAM, Header, Op, wrapping_sub

#: Receive buffer the device advertises per connection (Linux's default too).
BUF_ALLOC = 256 * 1024
#: Send a CREDIT_UPDATE once this many forwarded bytes are unannounced.
CREDIT_UPDATE_THRESHOLD = BUF_ALLOC // 4


class State(enum.Enum):
    """Where a connection is in its life."""

    AWAIT_CONNECT = "await-connect"  # host socket accepted, reading "CONNECT <port>\n"
    REQUESTED = "requested"  # REQUEST sent to the guest, no answer yet
    ESTABLISHED = "established"


@dataclass
class VsockConnection:
    """A stream between guest port ``peer_port`` and host port ``local_port``."""

    sock: socket.socket
    token: int  # the worker listener id of ``sock``
    guest_cid: int
    local_port: int = 0
    peer_port: int = 0
    state: State = State.AWAIT_CONNECT
    host_initiated: bool = True
    # guest -> host
    rx_cnt: int = 0
    fwd_cnt: int = 0
    announced_fwd_cnt: int = 0
    pending: bytearray = field(default_factory=bytearray)
    # host -> guest
    tx_cnt: int = 0
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    credit_requested: bool = False
    # shutdown
    guest_shut: int = 0  # Shutdown flags the guest sent
    host_eof: bool = False
    hup: bool = False  # the host socket hung up (epoll HUP/ERR)
    write_shut: bool = False  # the host socket's write side was shut after guest SEND
    closing: bool = False  # guest closed both ways: RST once ``pending`` is flushed
    # readiness
    rx_blocked: bool = False  # no receive buffer: not read until the guest posts some
    events: int = 0  # the epoll events registered for ``sock`` (0: unregistered)
    line: bytearray = field(default_factory=bytearray)  # the CONNECT line so far

    @property
    def key(self) -> tuple[int, int]:
        """(host port, guest port): how packets find their connection."""
        return (self.local_port, self.peer_port)

    def header(self, op: Op, *, length: int = 0, flags: int = 0) -> Header:
        """A header from the host side of this connection, with current accounting."""
        self.announced_fwd_cnt = self.fwd_cnt
        return Header(
            HOST_CID,
            self.guest_cid,
            self.local_port,
            self.peer_port,
            length,
            TYPE_STREAM,
            op,
            flags,
            BUF_ALLOC,
            self.fwd_cnt,
        )

    def learn_peer(self, hdr: Header) -> None:
        """Take the guest's receive accounting from any header it sent."""
        self.peer_buf_alloc = hdr.buf_alloc
        self.peer_fwd_cnt = hdr.fwd_cnt
        if self.peer_credit():
            self.credit_requested = False

    def peer_credit(self) -> int:
        """How many bytes the guest can take now."""
        in_flight = wrapping_sub(self.tx_cnt, self.peer_fwd_cnt)
        return max(0, self.peer_buf_alloc - in_flight)

    def credit_update_due(self) -> bool:
        """Whether enough bytes were forwarded that the guest should hear of it."""
        return wrapping_sub(self.fwd_cnt, self.announced_fwd_cnt) >= CREDIT_UPDATE_THRESHOLD

    def readable_wanted(self) -> bool:
        """Whether the host socket should be read now."""
        if self.state is State.AWAIT_CONNECT:
            return True
        return (
            self.state is State.ESTABLISHED
            and not self.host_eof
            and not self.closing
            and not self.guest_shut & 1  # Shutdown.RCV: the guest reads no more
            and not self.rx_blocked
            and self.peer_credit() > 0
        )

    def accept_from_guest(self, payload: bytes) -> bool:
        """Queue guest bytes for the host; False if the guest overran its credit."""
        if wrapping_sub(self.rx_cnt + len(payload), self.fwd_cnt) > BUF_ALLOC:
            return False
        self.rx_cnt = (self.rx_cnt + len(payload)) & 0xFFFF_FFFF
        self.pending += payload
        return True

    def flush(self) -> None:
        """Write what the host socket takes of ``pending`` (OSError: the socket is broken)."""
        while self.pending:
            try:
                sent = self.sock.send(self.pending)
            except (BlockingIOError, InterruptedError):
                return
            if sent <= 0:
                return
            del self.pending[:sent]
            self.fwd_cnt = (self.fwd_cnt + sent) & 0xFFFF_FFFF


__all__ = ["BUF_ALLOC", "CREDIT_UPDATE_THRESHOLD", "State", "VsockConnection"]

"""virtio-vsock over unix sockets, for QEMU's ``vhost-user-vsock-pci``.

The host side follows the convention of Firecracker and vhost-device-vsock:

* a host program that wants guest port P connects to the ``uds`` path and writes
  the line ``CONNECT P``; once the guest accepts, it reads ``OK <host port>`` and the
  socket carries the stream (the guest refusing closes the socket);
* a guest connecting to host port P (CID 2) reaches the program listening on the
  unix socket ``<uds>_P``; no listener there: the guest gets a reset.

Teaching notes:

* Three queues: receive (0, host to guest), transmit (1, guest to host) and event
  (2, left to the front-end: QEMU keeps it). Config space is the 64-bit guest CID.
* Every socket is non-blocking and watched by the device's one worker
  (``set_vring_workers``): the ``uds`` listener and each connection's socket are
  worker listeners, so kicks and socket readiness are handled on one thread and
  no lock is ever held while waiting for a peer.
* Credit flow control (`vhsm.devices.vsock_conn`): a host socket is read only
  while the guest has credit and receive buffers; guest bytes the host socket
  does not take at once wait, within the credit the device advertised.
* Packets the device sends without payload (RESPONSE, RST, SHUTDOWN, credit
  messages) queue in order and go out before any data, as receive buffers arrive.
* Every loop over guest data is bounded by what the rings hold; each accept pass
  by ``ACCEPT_BURST``; connections by ``max_connections``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vhsm.backend import CONFIG_DEVICE_PROTOCOL_FEATURES, RING_FEATURES, VhostUserBackend, drain
from vhsm.daemon import Listener
from vhsm.devices.vsock_conn import BUF_ALLOC, State, VsockConnection
from vhsm.devices.vsock_packet import (
    HEADER_SIZE,
    HOST_CID,
    RX_QUEUE,
    TX_QUEUE,
    TYPE_STREAM,
    Header,
    Op,
    Shutdown,
    check_guest_cid,
)
from vhsm.devices.vsock_state import VsockStateTransfer
from vhsm.errors import BackendError, VhsmError, VirtqError
from vhsm.wire.enums import ProtocolFeature

if TYPE_CHECKING:
    from vhsm.virtq.chain import DescriptorChain
    from vhsm.vring import VringT
    from vhsm.worker import VringEpollHandler

log = logging.getLogger(__name__)

NUM_QUEUES = 3
MAX_QUEUE_SIZE = 1024
#: Worker listener id of the ``uds`` listener; connection sockets count up from the next.
LISTENER_TOKEN = NUM_QUEUES
#: Largest payload put in one receive buffer (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
MAX_PAYLOAD = 64 * 1024
#: Connections accepted from the ``uds`` listener per readiness event.
ACCEPT_BURST = 16
#: Longest "CONNECT <port>\n" line read from a host program.
MAX_CONNECT_LINE = 32
#: Control packets (RST for unknown connections included) queued for the guest at most.
MAX_CONTROL_QUEUE = 4096
#: First host port handed out for host-initiated connections (Firecracker's choice too).
FIRST_LOCAL_PORT = 1 << 30
_CID_LOCK_PREFIX = "vhsm-vsock-cid-"


class VsockBackend(VhostUserBackend):
    """vhost-user-vsock: guest stream sockets joined to unix sockets under ``uds_path``.

    Args:
        guest_cid: the guest's context id (3 .. 2^32 - 2), reported in config space.
        uds_path: the host-side unix socket path (listened on; ``<uds_path>_<port>``
            is where guest connections to host port ``port`` go).
        max_connections: connections open at once (more are refused).
        claim_cid: hold a per-CID lock (an abstract unix socket) so that a second
            device for the same CID on this host fails to start.

    Raises:
        VhsmError: a reserved CID, a CID already served here, or a ``uds_path`` in use.
    """

    def __init__(
        self,
        guest_cid: int,
        uds_path: str | os.PathLike[str],
        *,
        max_connections: int = 1024,
        claim_cid: bool = True,
    ) -> None:
        try:
            check_guest_cid(guest_cid)
        except ValueError as err:
            raise VhsmError(str(err)) from None
        self.guest_cid = guest_cid
        self.uds_path = Path(uds_path)
        self.max_connections = max_connections
        self._cid_lock = _claim_cid(guest_cid) if claim_cid else None
        try:
            self.listener = Listener(self.uds_path, backlog=64)
        except VhsmError:
            if self._cid_lock is not None:
                self._cid_lock.close()
            raise
        self.listener.sock.setblocking(False)
        self._worker: VringEpollHandler | None = None
        self._own_lock = threading.RLock()
        self._vrings: Sequence[VringT] = ()
        self.conns: dict[tuple[int, int], VsockConnection] = {}
        self._by_token: dict[int, VsockConnection] = {}
        self._next_token = LISTENER_TOKEN + 1
        self._next_port = FIRST_LOCAL_PORT
        self._control: deque[bytes] = deque()
        self._credit_due: dict[tuple[int, int], None] = {}
        self.state_transfer = VsockStateTransfer(self)
        self.closed = False

    # --- wiring -------------------------------------------------------------------------
    def set_vring_workers(self, workers: Sequence[VringEpollHandler]) -> None:
        """Serve the sockets on the daemon's one worker (called when the daemon is built)."""
        if self._worker is not None:
            raise BackendError("vsock: a device serves one daemon")
        worker = workers[0]
        self._worker = worker
        self._vrings = worker.vrings
        worker.register_listener(self.listener.fileno(), select.EPOLLIN, LISTENER_TOKEN)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """The worker's dispatch lock (control hooks take it; handle_event already has it)."""
        if self._worker is not None:
            with self._worker.paused():
                yield
        else:
            with self._own_lock:
                yield

    # --- negotiation --------------------------------------------------------------------
    def num_queues(self) -> int:
        """Receive, transmit, event."""
        return NUM_QUEUES

    def max_queue_size(self) -> int:
        """Largest ring accepted."""
        return MAX_QUEUE_SIZE

    def features(self) -> int:
        """Ring features; stream sockets need no device bit."""
        return RING_FEATURES

    def protocol_features(self) -> int:
        """Config space (QEMU reads the CID from it), acks, and device-state transfer."""
        return CONFIG_DEVICE_PROTOCOL_FEATURES | int(ProtocolFeature.DEVICE_STATE)

    def queues_per_thread(self) -> Sequence[Sequence[int]]:
        """One worker for the queues and every socket."""
        return [list(range(NUM_QUEUES))]

    def get_config(self, offset: int, size: int) -> bytes:
        """``struct virtio_vsock_config``: the guest CID, 64-bit little-endian."""
        config = self.guest_cid.to_bytes(8, "little")
        return (config[offset : offset + size] if offset < 8 else b"").ljust(size, b"\0")

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        """The CID is the device's: config space is read-only."""
        raise BackendError("vsock config space (guest CID) is read-only")

    def reset_device(self) -> None:
        """The driver reset the device: every connection ends."""
        with self._guard():
            self._drop_all()

    def disconnected(self) -> None:
        """The front-end went away (the guest with it): every connection ends."""
        with self._guard():
            self._drop_all()

    # --- device state -------------------------------------------------------------------
    def set_device_state_fd(self, direction: int, phase: int, fd: int) -> int | None:
        """Save or load the connection table (see `vhsm.devices.vsock_state`)."""
        self.state_transfer.start(direction, fd)
        return None

    def check_device_state(self) -> None:
        """Finish the transfer; BackendError if it failed."""
        self.state_transfer.finish()

    # --- events -------------------------------------------------------------------------
    def handle_event(
        self, device_event: int, evset: int, vrings: Sequence[VringT], thread_id: int
    ) -> None:
        """Kicks on the rings, readiness of the listener and of connection sockets."""
        self._vrings = vrings
        if device_event == TX_QUEUE:
            self._process_tx()
        elif device_event == RX_QUEUE:
            for conn in self._by_token.values():
                if conn.rx_blocked:
                    conn.rx_blocked = False
                    self._watch(conn)
        elif device_event == LISTENER_TOKEN:
            self._accept()
        elif device_event in self._by_token:
            self._socket_ready(self._by_token[device_event], evset)
        elif device_event >= NUM_QUEUES:
            log.debug("vsock: event for a closed connection (%d)", device_event)
        self._flush_control()

    # --- guest to host ------------------------------------------------------------------
    def _process_tx(self) -> None:
        drain(self._vrings[TX_QUEUE], self._tx_chain, _bad_tx_chain)

    def _tx_chain(self, chain: DescriptorChain) -> int:
        """Take one guest packet; a TX chain is completed with length 0."""
        self._guest_packet(chain)
        return 0

    def _guest_packet(self, chain: DescriptorChain) -> None:
        if chain.readable_len < HEADER_SIZE:
            log.warning("vsock: TX packet of %d bytes has no header", chain.readable_len)
            return
        hdr = Header.from_bytes(chain.read(HEADER_SIZE))
        if hdr.src_cid != self.guest_cid:
            log.warning("vsock: packet from CID %d, the guest is %d: dropped", hdr.src_cid,
                        self.guest_cid)  # fmt: skip
            return
        if hdr.op == Op.RST:
            conn = self.conns.get((hdr.dst_port, hdr.src_port))
            if conn is not None:
                self._close(conn)
            return
        if hdr.dst_cid != HOST_CID or hdr.type != TYPE_STREAM:
            self._reset_reply(hdr)
            return
        if hdr.op == Op.REQUEST:
            self._guest_connects(hdr)
            return
        conn = self.conns.get((hdr.dst_port, hdr.src_port))
        if conn is None:
            self._reset_reply(hdr)
            return
        conn.learn_peer(hdr)
        if hdr.op == Op.RESPONSE and conn.state is State.REQUESTED:
            self._guest_accepted(conn)
        elif hdr.op == Op.RW and conn.state is State.ESTABLISHED:
            payload = chain.read(min(hdr.len, chain.readable_len - HEADER_SIZE), HEADER_SIZE)
            if conn.guest_shut & Shutdown.SEND or not conn.accept_from_guest(payload):
                log.warning("vsock: port %d sent past its credit or shutdown: reset",
                            hdr.src_port)  # fmt: skip
                self._reset(conn)
                return
            self._flush_host(conn)
        elif hdr.op == Op.SHUTDOWN and conn.state is State.ESTABLISHED:
            self._guest_shutdown(conn, hdr.flags)
        elif hdr.op == Op.CREDIT_REQUEST:
            self._credit_due[conn.key] = None
        elif hdr.op == Op.CREDIT_UPDATE:
            pass
        else:
            self._reset(conn)
            return
        if conn.key in self.conns:
            self._watch(conn)

    def _guest_connects(self, hdr: Header) -> None:
        key = (hdr.dst_port, hdr.src_port)
        if key in self.conns or len(self._by_token) >= self.max_connections:
            self._reset_reply(hdr)
            return
        try:
            conn = self._connect_host_port(key)
        except OSError as err:
            log.info("vsock: guest port %d to host port %d refused: %s", hdr.src_port,
                     hdr.dst_port, err.strerror or err)  # fmt: skip
            self._reset_reply(hdr)
            return
        conn.learn_peer(hdr)
        self.conns[key] = conn
        self._send_control(conn.header(Op.RESPONSE))
        self._watch(conn)

    def _guest_accepted(self, conn: VsockConnection) -> None:
        line = f"OK {conn.local_port}\n".encode()
        try:
            sent = conn.sock.send(line)
        except OSError:
            sent = 0
        if sent != len(line):
            self._reset(conn)
            return
        conn.state = State.ESTABLISHED

    def _guest_shutdown(self, conn: VsockConnection, flags: int) -> None:
        conn.guest_shut |= flags & (Shutdown.RCV | Shutdown.SEND)
        if conn.guest_shut == Shutdown.RCV | Shutdown.SEND:
            conn.closing = True  # closed on the guest's side: RST once the host has it all
        self._flush_host(conn)

    def _flush_host(self, conn: VsockConnection) -> None:
        """Push pending guest bytes to the host; finish half or full closes once empty."""
        try:
            conn.flush()
        except OSError as err:
            log.info("vsock: host side of port %d failed: %s", conn.local_port,
                     err.strerror or err)  # fmt: skip
            self._reset(conn)
            return
        if conn.pending:
            return
        if conn.closing:
            self._reset(conn)
            return
        if conn.guest_shut & Shutdown.SEND and not conn.write_shut:
            conn.write_shut = True
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
        if conn.credit_update_due():
            self._credit_due[conn.key] = None

    # --- host to guest ------------------------------------------------------------------
    def _accept(self) -> None:
        for _ in range(ACCEPT_BURST):
            try:
                sock, _ = self.listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                log.warning("vsock: accept on %s failed: %s", self.uds_path,
                            err.strerror or err)  # fmt: skip
                return
            if len(self._by_token) >= self.max_connections:
                log.warning("vsock: %d connections open: refusing one more", len(self._by_token))
                sock.close()
                continue
            sock.setblocking(False)
            self._watch(self._adopt(sock, host_initiated=True))

    def _socket_ready(self, conn: VsockConnection, evset: int) -> None:
        if conn.state is State.AWAIT_CONNECT:
            self._read_connect_line(conn)
            return
        hangup = bool(evset & (select.EPOLLHUP | select.EPOLLERR))
        if conn.state is State.REQUESTED:
            if hangup:  # the host program gave up before the guest answered
                self._reset(conn)
            return
        if evset & select.EPOLLOUT or (hangup and conn.pending):
            self._flush_host(conn)
            if conn.token not in self._by_token:
                return
        if hangup:
            conn.hup = True  # reported whatever the mask: watched again only to read
        if (evset & select.EPOLLIN or hangup) and conn.readable_wanted():
            self._host_to_guest(conn)
            return
        self._watch(conn)

    def _read_connect_line(self, conn: VsockConnection) -> None:
        try:
            peek = conn.sock.recv(MAX_CONNECT_LINE, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            peek = b""
        end = peek.find(b"\n")
        if not peek or (end < 0 and len(conn.line) + len(peek) >= MAX_CONNECT_LINE):
            self._close(conn)
            return
        chunk = conn.sock.recv(end + 1 if end >= 0 else len(peek))
        conn.line += chunk
        if end < 0:
            return
        port = _connect_port(bytes(conn.line))
        if port is None:
            log.info("vsock: bad request %r on %s: closed", bytes(conn.line), self.uds_path)
            self._close(conn)
            return
        conn.local_port, conn.peer_port = self._free_port(port), port
        conn.state = State.REQUESTED
        self.conns[conn.key] = conn
        self._send_control(conn.header(Op.REQUEST))
        self._watch(conn)

    def _host_to_guest(self, conn: VsockConnection) -> None:
        """Move host bytes into receive buffers while the guest has credit and buffers.

        A peek comes first: a receive buffer is taken only when bytes are there, and
        the end of the stream needs none (its SHUTDOWN queues as a control packet).
        """
        rx = self._vrings[RX_QUEUE] if self._vrings else None
        sent = False
        for _ in range(MAX_QUEUE_SIZE):
            if rx is None or not self._flush_control() or not conn.readable_wanted():
                break
            try:
                ready = conn.sock.recv(1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                ready = b""
            if not ready:
                self._host_eof(conn)
                break
            chain = self._pop_rx(rx)
            if chain is None:
                conn.rx_blocked = True
                break
            room = min(chain.writable_len - HEADER_SIZE, conn.peer_credit(), MAX_PAYLOAD)
            data = conn.sock.recv(room)  # at least the peeked byte: this worker alone reads
            conn.tx_cnt = (conn.tx_cnt + len(data)) & 0xFFFF_FFFF
            packet = conn.header(Op.RW, length=len(data)).to_bytes() + data
            rx.add_used(chain.head, chain.write(packet))
            sent = True
        if sent and rx is not None:
            rx.signal_used_queue()
        if conn.key in self.conns and conn.state is State.ESTABLISHED:
            if not conn.peer_credit() and not conn.credit_requested:
                conn.credit_requested = True
                self._send_control(conn.header(Op.CREDIT_REQUEST))
            self._watch(conn)

    def _host_eof(self, conn: VsockConnection) -> None:
        conn.host_eof = True
        flags = Shutdown.SEND | (Shutdown.RCV if conn.guest_shut & Shutdown.SEND else 0)
        self._send_control(conn.header(Op.SHUTDOWN, flags=int(flags)))
        self._watch(conn)

    # --- receive queue ------------------------------------------------------------------
    def _pop_rx(self, rx: VringT) -> DescriptorChain | None:
        """A receive buffer big enough for a header; too small ones are returned empty."""
        if not (rx.started and rx.enabled):
            return None
        for _ in range(MAX_QUEUE_SIZE):
            try:
                chain = rx.pop()
            except VirtqError as exc:
                log.warning("vsock: bad RX chain: %s", str(exc))
                rx.complete_error(exc)
                if exc.head is None:
                    return None
                continue
            if chain is None:
                if rx.enable_notification():  # ask for a kick; buffers may have come meanwhile
                    continue
                return None
            if chain.writable_len > HEADER_SIZE:
                return chain
            rx.add_used(chain.head, 0)
        return None

    def _send_control(self, hdr: Header) -> None:
        if len(self._control) >= MAX_CONTROL_QUEUE:
            log.warning("vsock: %d control packets wait for receive buffers: dropped one",
                        len(self._control))  # fmt: skip
            return
        self._control.append(hdr.to_bytes())

    def _flush_control(self) -> bool:
        """Send queued control packets and due credit updates; True when none is left."""
        for key in list(self._credit_due):
            conn = self.conns.get(key)
            if conn is not None and conn.state is State.ESTABLISHED:
                self._send_control(conn.header(Op.CREDIT_UPDATE))
        self._credit_due.clear()
        if not self._control:
            return True
        if not self._vrings:
            return False
        rx = self._vrings[RX_QUEUE]
        sent = False
        while self._control:
            chain = self._pop_rx(rx)
            if chain is None:
                break
            rx.add_used(chain.head, chain.write(self._control.popleft()))
            sent = True
        if sent:
            rx.signal_used_queue()
        return not self._control

    # --- connections --------------------------------------------------------------------
    def _connect_host_port(self, key: tuple[int, int]) -> VsockConnection:
        """Connect the guest to host port ``key[0]`` (its listener ``<uds_path>_<port>``).

        Returns the adopted, established connection ``key`` (host port, guest
        port); raises OSError, the socket closed, when the port has no listener.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            sock.connect(f"{self.uds_path}_{key[0]}")
        except OSError:
            sock.close()
            raise
        conn = self._adopt(sock, host_initiated=False)
        conn.local_port, conn.peer_port = key
        conn.state = State.ESTABLISHED
        return conn

    def _adopt(self, sock: socket.socket, *, host_initiated: bool) -> VsockConnection:
        token = self._next_token
        self._next_token += 1
        conn = VsockConnection(sock, token, self.guest_cid, host_initiated=host_initiated)
        self._by_token[token] = conn
        return conn

    def _free_port(self, peer_port: int) -> int:
        for _ in range(len(self.conns) + 1):
            port = self._next_port
            self._next_port = FIRST_LOCAL_PORT if port >= 0xFFFF_FFFE else port + 1
            if (port, peer_port) not in self.conns:
                return port
        raise BackendError("vsock: no free host port")  # unreachable: more ports than conns

    def _watch(self, conn: VsockConnection) -> None:
        """Register the socket for the events it needs now (none: unregistered)."""
        if conn.token not in self._by_token:
            return
        events = (select.EPOLLIN if conn.readable_wanted() else 0) | (
            select.EPOLLOUT if conn.pending and not conn.hup else 0
        )
        if events == conn.events or self._worker is None:
            conn.events = events
            return
        if conn.events:
            self._unwatch(conn.sock.fileno())
        if events:
            self._worker.register_listener(conn.sock.fileno(), events, conn.token)
        conn.events = events

    def _unwatch(self, fd: int) -> None:
        """Stop watching ``fd`` (quietly once the daemon has closed its worker)."""
        if self._worker is not None:
            with contextlib.suppress(BackendError, ValueError, OSError):
                self._worker.unregister_listener(fd)

    def _reset(self, conn: VsockConnection) -> None:
        """End a connection with an RST to the guest (if the guest knows it)."""
        if conn.state is not State.AWAIT_CONNECT:
            self._send_control(conn.header(Op.RST))
        self._close(conn)

    def _reset_reply(self, hdr: Header) -> None:
        self._send_control(hdr.reply(Op.RST))

    def _close(self, conn: VsockConnection) -> None:
        if self._by_token.pop(conn.token, None) is None:
            return
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
        if conn.events:
            self._unwatch(conn.sock.fileno())
        conn.events = 0
        conn.sock.close()

    def _drop_all(self) -> None:
        for conn in list(self._by_token.values()):
            self._close(conn)
        self._control.clear()
        self._credit_due.clear()

    def close(self) -> None:
        """Close every socket and the ``uds`` listener (removing its path)."""
        with self._guard():
            if self.closed:
                return
            self.closed = True
            self._drop_all()
            self._unwatch(self.listener.fileno())
        self.listener.close()
        if self._cid_lock is not None:
            self._cid_lock.close()


def _connect_port(line: bytes) -> int | None:
    """The port of a ``CONNECT <port>`` line, or None."""
    parts = line.strip().split()
    if len(parts) != 2 or parts[0] != b"CONNECT" or not parts[1].isdigit():
        return None
    port = int(parts[1])
    return port if port <= 0xFFFF_FFFF else None


def _bad_tx_chain(exc: VirtqError) -> None:
    log.warning("vsock: bad TX chain: %s", str(exc))


def _claim_cid(cid: int) -> socket.socket:
    """Bind the abstract unix name of ``cid``: a second device for it fails here."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(f"\0{_CID_LOCK_PREFIX}{cid}")
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise VhsmError(
                f"guest CID {cid} is already served by another vhsm vsock device on this host"
            ) from None
        raise VhsmError(f"cannot claim guest CID {cid}: {err.strerror or err}") from err
    return sock


__all__ = ["BUF_ALLOC", "LISTENER_TOKEN", "NUM_QUEUES", "VsockBackend"]

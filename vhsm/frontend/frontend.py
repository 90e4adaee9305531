"""`Frontend`: a vhost-user front-end (the VMM's role) in Python, to drive back-ends without a VM.

It negotiates features (QEMU's order, or Cloud Hypervisor's SET_OWNER-first
order), owns memfd guest memory, lays out split or packed rings,
sends the ring set-up, serves the back-end request channel, stops rings,
resets, disconnects and reconnects (with SET_INFLIGHT_FD). It
uses REPLY_ACK when offered. Every message is recorded (`transcript`).

Typed helpers raise `BackendError` on a NACK; the raw layer (`send`,
`send_raw`, `recv`, `request`, `expect_closed`) lets callers put anything on
the wire, malformed messages included, and look at what comes back.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time
from collections.abc import Sequence
from enum import IntFlag
from pathlib import Path
from typing import Any, Self

import attrs

from vhsm.backend import SPLIT_RING_FEATURES
from vhsm.errors import BackendError, VhsmError
from vhsm.frontend.connection import Connection, Recorder
from vhsm.frontend.memory import FrontendMemory
from vhsm.frontend.reqchannel import BackendRequestHandler, BackendRequestServer
from vhsm.frontend.virtqueue import DEFAULT_TIMEOUT, Virtqueue
from vhsm.transport import PeerClosed
from vhsm.wire import (
    Channel,
    DeviceStatus,
    FrontendReq,
    Message,
    Payload,
    ProtocolFeature,
    VhostUserConfig,
    VhostUserInflight,
    VhostUserMemory,
    VhostUserSingleMemoryRegion,
    VhostUserTransferDeviceState,
    VhostUserU64,
    VhostUserVringAddr,
    VhostUserVringFd,
    VhostUserVringState,
    VirtioFeature,
    make_request,
    request_spec,
)
from vhsm.wire.enums import DEVICE_FEATURE_MASK

#: Virtio feature bits the driver side implements (device-specific bits are added as offered):
#: the split-ring features the runtime implements on both sides.
SUPPORTED_FEATURES = SPLIT_RING_FEATURES
#: Protocol features accepted by default (when offered).
SUPPORTED_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.CONFIG
    | ProtocolFeature.BACKEND_SEND_FD
    | ProtocolFeature.INFLIGHT_SHMFD
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.STATUS
)


def connect_unix(
    path: str | Path, *, retry_for: float = 5.0, stop_fd: int | None = None
) -> socket.socket:
    """Connect to a back-end's socket, retrying while it does not exist / listen yet.

    Args:
        path: the back-end's listening socket.
        retry_for: seconds to keep retrying.
        stop_fd: when it becomes readable the wait ends early (the recorder's stop pipe).

    Raises:
        FileNotFoundError, ConnectionRefusedError: still nobody listening after ``retry_for``.
        ConnectionAbortedError: ``stop_fd`` became readable first.
    """
    deadline = time.monotonic() + retry_for
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(os.fspath(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() >= deadline:
                raise
        readable, _, _ = select.select([] if stop_fd is None else [stop_fd], [], [], 0.01)
        if readable:
            raise ConnectionAbortedError("stopped while connecting")


class FrontendListener:
    """A listening socket for client-mode back-ends (they connect to the front-end)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.bind(os.fspath(self.path))
        self.sock.listen(1)

    def accept_socket(self, timeout: float = DEFAULT_TIMEOUT) -> socket.socket:
        """Wait for a back-end to connect; TimeoutError after ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            conn, _ = self.sock.accept()
        except TimeoutError:
            raise TimeoutError(f"no back-end connected to {self.path} within {timeout} s") from None
        conn.settimeout(None)
        return conn

    def accept(self, timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> Frontend:
        """Wait for a back-end and return a `Frontend` on that connection."""
        return Frontend(self.accept_socket(timeout), listener=self, **kwargs)

    def close(self) -> None:
        """Stop listening and remove the socket file."""
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class Frontend:
    """A vhost-user front-end on one back-end connection.

    Args:
        sock: A connected stream socket (see `connect`, `FrontendListener.accept`).
        memory: Guest memory (default: one 4 MiB memfd region at guest address 0).
        recorder: Where messages are recorded (default: a fresh `Recorder`).
        record_path: A JSON-lines file to also write the transcript to.
        timeout: Default seconds to wait for replies and used buffers.
        backend_request_handler: Answers back-end requests (returns the ack u64).
        path: The back-end's socket path, for `reconnect` (set by `connect`).
        listener: For client-mode back-ends, the listener `reconnect` accepts on.
        device_features: Flag enums naming device bits in the transcript's ``decoded``.
        strict: Rings fail `Virtqueue.wait_used` when the back-end skips a call it owed
            the driver (a real guest would hang); False turns the check off.
        num_queues: How many rings the device has, when the caller knows (the
            ``frontend`` fixture passes the back-end's ``num_queues()``): `start` sets up
            that many by default.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        memory: FrontendMemory | None = None,
        recorder: Recorder | None = None,
        record_path: str | Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        backend_request_handler: BackendRequestHandler | None = None,
        path: str | Path | None = None,
        listener: FrontendListener | None = None,
        device_features: Sequence[type[IntFlag]] = (),
        strict: bool = True,
        num_queues: int | None = None,
    ) -> None:
        self.memory = memory if memory is not None else FrontendMemory()
        self.strict = strict
        self.num_queues = num_queues
        self._own_recorder = recorder is None
        self.recorder = (
            recorder
            if recorder is not None
            else Recorder(record_path, device_features=device_features)
        )
        self.timeout = timeout
        self.backend_request_handler = backend_request_handler
        self.path = Path(path) if path is not None else None
        self.listener = listener
        self.conn_id = 0
        self.vrings: dict[int, Virtqueue] = {}
        self.backend_channel: BackendRequestServer | None = None
        self.inflight: VhostUserInflight | None = None
        self.inflight_fd: int | None = None
        self._negotiation: dict[str, Any] = {}
        self._start_opts: dict[str, Any] = {}
        self._reset_session_state()
        self._attach(sock)

    # --- construction --------------------------------------------------------------------
    @classmethod
    def connect(cls, path: str | Path, *, retry_for: float = 5.0, **kwargs: Any) -> Frontend:
        """Connect to a back-end listening on ``path`` (retrying until it listens)."""
        return cls(connect_unix(path, retry_for=retry_for), path=path, **kwargs)

    def _attach(self, sock: socket.socket) -> None:
        self.conn_id += 1
        self.connection = Connection(sock, self.recorder, self.conn_id)
        self.recorder.event("open", self.conn_id)

    def _reset_session_state(self) -> None:
        self.offered_features = 0
        self.acked_features = 0
        self.offered_protocol_features = 0
        self.acked_protocol_features = 0
        self.protocol_features_set = False
        self.queue_num: int | None = None
        self.max_mem_slots: int | None = None
        self.status = 0
        #: Rings enabled before SET_FEATURES (QEMU net's order): not enabled again at start.
        self.enabled_first: set[int] = set()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- state ---------------------------------------------------------------------------
    @property
    def transcript(self) -> list[dict[str, Any]]:
        """Every message (and open/close event) so far, as transcript lines."""
        return self.recorder.records

    @property
    def sock(self) -> socket.socket:
        """The main socket."""
        return self.connection.sock

    @property
    def reply_ack(self) -> bool:
        """Whether REPLY_ACK was negotiated (the front-end then asks for acks)."""
        return bool(self.acked_protocol_features & ProtocolFeature.REPLY_ACK)

    def has_protocol(self, feature: ProtocolFeature) -> bool:
        """Whether a protocol feature was negotiated."""
        return bool(self.acked_protocol_features & feature)

    # --- raw layer ---------------------------------------------------------------------
    def send(self, msg: Message) -> None:
        """Send any message as it is (no reply awaited); its fds stay ours."""
        self.connection.send(msg)

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send arbitrary bytes with fds attached to the first byte."""
        self.connection.send_raw(data, fds)

    def recv(self, timeout: float | None = None) -> Message:
        """Read the next message from the back-end (TimeoutError / PeerClosed)."""
        return self.connection.recv(self.timeout if timeout is None else timeout)

    def expect_closed(self, timeout: float | None = None) -> bool:
        """Whether the back-end closes the connection within ``timeout`` seconds."""
        return self.connection.wait_closed(self.timeout if timeout is None else timeout)

    def request(
        self,
        req: int,
        payload: Payload | None = None,
        *,
        fds: Sequence[int] = (),
        need_reply: bool | None = None,
        flags: int | None = None,
        expect_reply: bool | None = None,
        timeout: float | None = None,
    ) -> Message | None:
        """Send a request and return its reply, if one is expected.

        ``need_reply`` defaults to "REPLY_ACK negotiated and the request has no
        reply of its own"; ``flags`` overrides the header flags verbatim;
        ``expect_reply`` defaults to what the catalogue says for those flags.
        """
        spec = request_spec(int(req), Channel.MAIN)
        if need_reply is None:
            need_reply = self.reply_ack and spec is not None and spec.reply == "ack"
        msg = make_request(req, payload, need_reply=need_reply, fds=fds, channel=Channel.MAIN)
        if flags is not None:
            msg = attrs.evolve(msg, flags=flags)
        if expect_reply is None:
            expect_reply = spec is not None and (
                spec.reply == "always" or (msg.need_reply and spec.reply == "ack")
            )
        self.send(msg)
        if not expect_reply:
            return None
        reply = self.recv(timeout)
        if reply.request != msg.request or not reply.is_reply:
            _close_fds(reply.fds)
            raise VhsmError(
                f"expected the reply to {msg.name}, got {reply.name} (flags {reply.flags:#x})"
            )
        return reply

    def call(
        self, req: FrontendReq, payload: Payload | None = None, *, fds: Sequence[int] = ()
    ) -> Message | None:
        """Send a well-formed request; raise BackendError on a NACK or a malformed reply."""
        reply = self.request(req, payload, fds=fds)
        if reply is None:
            return None
        if reply.error is not None:
            raise BackendError(f"{req.name}: malformed reply: {reply.error}")
        spec = request_spec(int(req), Channel.MAIN)
        if (
            spec is not None
            and spec.reply == "ack"
            and isinstance(reply.payload, VhostUserU64)
            and reply.payload.value != 0
        ):
            raise BackendError(f"{req.name} failed: the back-end answered {reply.payload.value}")
        return reply

    def _u64(self, req: FrontendReq, payload: Payload | None = None) -> int:
        reply = self.call(req, payload)
        if reply is None or not isinstance(reply.payload, VhostUserU64):
            raise BackendError(f"{req.name}: no u64 reply")
        return reply.payload.value

    # --- single requests ---------------------------------------------------------------
    def get_features(self) -> int:
        """GET_FEATURES."""
        self.offered_features = self._u64(FrontendReq.GET_FEATURES)
        return self.offered_features

    def set_features(self, features: int) -> None:
        """SET_FEATURES."""
        self.call(FrontendReq.SET_FEATURES, VhostUserU64(features))
        self.acked_features = features

    def set_owner(self) -> None:
        """SET_OWNER."""
        self.call(FrontendReq.SET_OWNER)

    def get_protocol_features(self) -> int:
        """GET_PROTOCOL_FEATURES."""
        self.offered_protocol_features = self._u64(FrontendReq.GET_PROTOCOL_FEATURES)
        return self.offered_protocol_features

    def set_protocol_features(self, features: int) -> None:
        """SET_PROTOCOL_FEATURES (REPLY_ACK takes effect from the next request)."""
        self.call(FrontendReq.SET_PROTOCOL_FEATURES, VhostUserU64(features))
        self.acked_protocol_features = features
        self.protocol_features_set = True

    def get_queue_num(self) -> int:
        """GET_QUEUE_NUM (needs MQ)."""
        self.queue_num = self._u64(FrontendReq.GET_QUEUE_NUM)
        return self.queue_num

    def get_max_mem_slots(self) -> int:
        """GET_MAX_MEM_SLOTS (needs CONFIGURE_MEM_SLOTS)."""
        self.max_mem_slots = self._u64(FrontendReq.GET_MAX_MEM_SLOTS)
        return self.max_mem_slots

    def set_backend_req_fd(self) -> BackendRequestServer:
        """SET_BACKEND_REQ_FD with a fresh socket pair; answers back-end requests on a thread."""
        if self.backend_channel is not None:
            self.backend_channel.close()
        channel = BackendRequestServer(self.recorder, self.conn_id, self.backend_request_handler)
        self.backend_channel = channel
        try:
            self.call(FrontendReq.SET_BACKEND_REQ_FD, fds=[channel.take_backend_end()])
        finally:
            channel.handed_over()
        return channel

    def get_status(self) -> int:
        """GET_STATUS (needs STATUS)."""
        self.status = self._u64(FrontendReq.GET_STATUS)
        return self.status

    def set_status(self, status: int) -> None:
        """SET_STATUS (needs STATUS)."""
        self.call(FrontendReq.SET_STATUS, VhostUserU64(status))
        self.status = status

    def get_config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG: ``size`` bytes of device config space from ``offset`` (needs CONFIG)."""
        reply = self.call(FrontendReq.GET_CONFIG, VhostUserConfig(offset, size, 0, bytes(size)))
        if reply is None or not isinstance(reply.payload, VhostUserConfig):
            raise BackendError("GET_CONFIG: the back-end answered with an empty payload")
        return reply.payload.payload

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        """SET_CONFIG (needs CONFIG)."""
        self.call(FrontendReq.SET_CONFIG, VhostUserConfig(offset, len(data), flags, data))

    def reset_device(self) -> None:
        """RESET_DEVICE (needs RESET_DEVICE): every ring disabled and stopped."""
        self.call(FrontendReq.RESET_DEVICE)
        for vq in self.vrings.values():
            vq.base = None

    def set_device_state_fd(self, direction: int, fd: int) -> int | None:
        """SET_DEVICE_STATE_FD (needs DEVICE_STATE): hand over ``fd`` (a pipe end, phase 0).

        Returns the back-end's own fd to use instead, or None to use ``fd``'s pipe.
        ``fd`` stays the caller's to close.
        """
        reply = self.call(
            FrontendReq.SET_DEVICE_STATE_FD, VhostUserTransferDeviceState(direction, 0), fds=[fd]
        )
        if reply is None or not isinstance(reply.payload, VhostUserU64):
            raise BackendError("SET_DEVICE_STATE_FD: no u64 reply")
        if reply.payload.value & 0xFF:
            _close_fds(reply.fds)
            raise BackendError(f"SET_DEVICE_STATE_FD refused: {reply.payload.value:#x}")
        return reply.fds[0] if reply.fds else None

    def check_device_state(self) -> int:
        """CHECK_DEVICE_STATE: 0 when the last transfer succeeded."""
        return self._u64(FrontendReq.CHECK_DEVICE_STATE)

    def save_device_state(self) -> bytes:
        """Read the device state (rings stopped): SET_DEVICE_STATE_FD save, read to EOF.

        Raises BackendError when CHECK_DEVICE_STATE reports a failure.
        """
        source = self._transfer_fd(0)
        chunks = []
        try:
            while chunk := os.read(source, 1 << 16):
                chunks.append(chunk)
        finally:
            os.close(source)
        if self.check_device_state() != 0:
            raise BackendError("CHECK_DEVICE_STATE reported a failed save")
        return b"".join(chunks)

    def load_device_state(self, data: bytes) -> int:
        """Send a saved state (SET_DEVICE_STATE_FD load); return CHECK_DEVICE_STATE's answer."""
        sink = self._transfer_fd(1)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(sink, view) :]
        finally:
            os.close(sink)
        return self.check_device_state()

    def _transfer_fd(self, direction: int) -> int:
        """Start a transfer over a pipe; return the fd this side reads (0, save) or writes (1).

        The back-end is sent the other end of the pipe; when it answers with an
        fd of its own, that one is used instead and the pipe is closed.
        """
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        theirs, ours = (write_end, read_end) if direction == 0 else (read_end, write_end)
        try:
            own = self.set_device_state_fd(direction, theirs)
        except BaseException:
            os.close(ours)
            raise
        finally:
            os.close(theirs)
        if own is None:
            return ours
        os.close(ours)
        return own

    # --- negotiation -------------------------------------------------------------------
    def default_features(self, offered: int, *, packed: bool = False) -> int:
        """The virtio bits this driver accepts from ``offered``."""
        wanted = SUPPORTED_FEATURES | DEVICE_FEATURE_MASK
        if packed:
            wanted |= VirtioFeature.RING_PACKED
        return offered & wanted

    def negotiate(
        self,
        features: int | None = None,
        protocol_features: int | None = None,
        *,
        owner_first: bool = False,
        packed: bool = False,
        backend_req: bool = True,
        enable_first: Sequence[int] = (),
    ) -> None:
        """Negotiate virtio and protocol features.

        ``owner_first=False`` is QEMU's order (GET_FEATURES, protocol features,
        queries, SET_BACKEND_REQ_FD, then SET_OWNER, SET_FEATURES);
        ``owner_first=True`` is Cloud Hypervisor's (SET_OWNER first). Explicit
        ``features`` / ``protocol_features`` are sent verbatim. With STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK is set afterwards. ``enable_first``:
        rings enabled with SET_VRING_ENABLE just before SET_FEATURES (and not again
        when they start), as QEMU 7.2's vhost-user-net does at realize.
        """
        self._negotiation = {
            "features": features,
            "protocol_features": protocol_features,
            "owner_first": owner_first,
            "packed": packed,
            "backend_req": backend_req,
            "enable_first": tuple(enable_first),
        }
        if owner_first:
            self.set_owner()
        offered = self.get_features()
        if offered & VirtioFeature.PROTOCOL_FEATURES:
            pf_offered = self.get_protocol_features()
            pf = (
                pf_offered & SUPPORTED_PROTOCOL_FEATURES
                if protocol_features is None
                else protocol_features
            )
            self.set_protocol_features(pf)
            if self.has_protocol(ProtocolFeature.MQ):
                self.get_queue_num()
            if self.has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS):
                self.get_max_mem_slots()
            if backend_req and self.has_protocol(ProtocolFeature.BACKEND_REQ):
                self.set_backend_req_fd()
        if not owner_first:
            self.set_owner()
        self.enabled_first = set(enable_first) if self.protocol_features_set else set()
        for index in sorted(self.enabled_first):
            self.enable_vring(index, True)
        self.set_features(
            self.default_features(offered, packed=packed) if features is None else features
        )
        if self.has_protocol(ProtocolFeature.STATUS):
            self.set_status(
                DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
            )

    # --- memory ------------------------------------------------------------------------
    def set_mem_table(self) -> None:
        """SET_MEM_TABLE with every region of `memory` (replaces the back-end's whole map)."""
        regions, fds = self.memory.table()
        self.call(FrontendReq.SET_MEM_TABLE, VhostUserMemory(regions), fds=fds)

    def add_mem_region(self, gpa: int, size: int) -> None:
        """Create a region and send ADD_MEM_REG (needs CONFIGURE_MEM_SLOTS)."""
        region = self.memory.add_region(gpa, size)
        self.call(
            FrontendReq.ADD_MEM_REG,
            VhostUserSingleMemoryRegion(region.descriptor()),
            fds=[region.fd],
        )

    def remove_mem_region(self, gpa: int) -> None:
        """Send REM_MEM_REG for the region at ``gpa``, then unmap it here."""
        region = self.memory.region_at(gpa)
        self.call(FrontendReq.REM_MEM_REG, VhostUserSingleMemoryRegion(region.descriptor()))
        self.memory.remove_region(region.guest_phys_addr).close()

    # --- rings ------------------------------------------------------------------------
    @property
    def packed(self) -> bool:
        """Whether VIRTIO_F_RING_PACKED was negotiated."""
        return bool(self.acked_features & VirtioFeature.RING_PACKED)

    @property
    def protocol_features_in_use(self) -> bool:
        """VF 30 acked: rings must be enabled explicitly with SET_VRING_ENABLE."""
        return bool(self.acked_features & VirtioFeature.PROTOCOL_FEATURES)

    def setup_vring(
        self, index: int, size: int = 256, *, enable: bool = True, base: int | None = None
    ) -> Virtqueue:
        """Lay out ring ``index`` in guest memory and send its set-up.

        NUM, BASE, ADDR, KICK (starts it), CALL, ERR, then ENABLE when protocol
        features are in use.
        """
        old = self.vrings.pop(index, None)
        if old is not None:
            old.close()
        event_idx = bool(self.acked_features & VirtioFeature.RING_EVENT_IDX)
        vq = Virtqueue(
            self.memory, index, size, packed=self.packed, event_idx=event_idx, strict=self.strict
        )
        self.vrings[index] = vq
        self._send_vring(vq, vq.initial_base() if base is None else base, enable)
        return vq

    def _send_vring(self, vq: Virtqueue, base: int, enable: bool) -> None:
        i, mem = vq.index, self.memory
        self.call(FrontendReq.SET_VRING_NUM, VhostUserVringState(i, vq.size))
        self.call(FrontendReq.SET_VRING_BASE, VhostUserVringState(i, base))
        addr = VhostUserVringAddr(
            i, 0, mem.gpa_to_uva(vq.desc_gpa), mem.gpa_to_uva(vq.used_gpa),
            mem.gpa_to_uva(vq.avail_gpa), vq.used_gpa,
        )  # fmt: skip
        self.call(FrontendReq.SET_VRING_ADDR, addr)
        self.call(FrontendReq.SET_VRING_KICK, VhostUserVringFd(i), fds=[vq.kick_fd])
        self.call(FrontendReq.SET_VRING_CALL, VhostUserVringFd(i), fds=[vq.call_fd])
        self.call(FrontendReq.SET_VRING_ERR, VhostUserVringFd(i), fds=[vq.err_fd])
        vq.base = None
        if enable and self.protocol_features_in_use and i not in self.enabled_first:
            self.enable_vring(i, True)

    def enable_vring(self, index: int, enabled: bool = True) -> None:
        """SET_VRING_ENABLE."""
        self.call(FrontendReq.SET_VRING_ENABLE, VhostUserVringState(index, int(enabled)))

    def stop_vring(self, index: int) -> int:
        """GET_VRING_BASE: stop ring ``index``; return its base."""
        reply = self.call(FrontendReq.GET_VRING_BASE, VhostUserVringState(index, 0))
        if reply is None or not isinstance(reply.payload, VhostUserVringState):
            raise BackendError("GET_VRING_BASE: no vring state in the reply")
        base = reply.payload.num
        if index in self.vrings:
            self.vrings[index].base = base
        return base

    def restart_vring(self, index: int) -> None:
        """Start a stopped ring again from its base (BASE, ADDR, KICK, CALL, ERR)."""
        vq = self.vrings[index]
        self._send_vring(vq, vq.resume_base(), enable=False)

    def vring(self, index: int) -> Virtqueue:
        """The ring set up at ``index`` (VhsmError, saying how to set it up, if none is)."""
        try:
            return self.vrings[index]
        except KeyError:
            have = ", ".join(map(str, sorted(self.vrings))) or "none"
            raise VhsmError(
                f"ring {index} is not set up (rings set up: {have}): call "
                f"start(queues={index + 1}) or start(queues=[..., {index}]), or "
                f"setup_vring({index}, size) after negotiating"
            ) from None

    # --- inflight ------------------------------------------------------------------------
    def get_inflight_fd(self, num_queues: int, queue_size: int) -> VhostUserInflight:
        """GET_INFLIGHT_FD: the back-end allocates the inflight buffer; we keep its fd."""
        reply = self.call(
            FrontendReq.GET_INFLIGHT_FD, VhostUserInflight(0, 0, num_queues, queue_size)
        )
        if reply is None or not isinstance(reply.payload, VhostUserInflight):
            raise BackendError("GET_INFLIGHT_FD: no inflight description in the reply")
        if self.inflight_fd is not None:
            os.close(self.inflight_fd)
        self.inflight, self.inflight_fd = reply.payload, (reply.fds[0] if reply.fds else None)
        for fd in reply.fds[1:]:
            os.close(fd)
        return reply.payload

    def set_inflight_fd(self) -> None:
        """SET_INFLIGHT_FD with the buffer obtained earlier (before the rings start)."""
        if self.inflight is None or self.inflight_fd is None:
            raise VhsmError("no inflight buffer: call get_inflight_fd first")
        self.call(FrontendReq.SET_INFLIGHT_FD, self.inflight, fds=[self.inflight_fd])

    # --- whole sequences ----------------------------------------------------------------
    def start(
        self,
        queues: int | Sequence[int] | None = None,
        size: int = 256,
        *,
        features: int | None = None,
        protocol_features: int | None = None,
        owner_first: bool = False,
        packed: bool = False,
        inflight: bool = False,
        backend_req: bool = True,
        enable_first: bool = False,
    ) -> Self:
        """Negotiate, send the memory table and set up rings: a device ready for I/O.

        ``queues``: a count or indices. Default: every ring the device has — the
        ``num_queues`` given to the constructor (the ``frontend`` fixture passes the
        back-end's), else GET_QUEUE_NUM's answer, else 1. A net device answers
        GET_QUEUE_NUM in queue pairs: pass ``queues`` for one reached by its socket.
        ``inflight``: GET_INFLIGHT_FD + SET_INFLIGHT_FD when INFLIGHT_SHMFD is negotiated.
        ``enable_first``: QEMU 7.2 vhost-user-net's order, every ring enabled before
        SET_FEATURES and none after it starts (needs ``queues`` given).
        """
        if enable_first and queues is None:
            raise VhsmError("enable_first needs the queues to enable (pass queues)")
        early = [] if queues is None else _indices(queues)
        self.negotiate(
            features,
            protocol_features,
            owner_first=owner_first,
            packed=packed,
            backend_req=backend_req,
            enable_first=early if enable_first else (),
        )
        if queues is None:
            queues = self.num_queues or self.queue_num or 1
        indices = _indices(queues)
        self._start_opts = {"indices": indices, "size": size, "inflight": inflight}
        if inflight and self.has_protocol(ProtocolFeature.INFLIGHT_SHMFD):
            self.get_inflight_fd(max(indices) + 1, size)
            self.set_inflight_fd()
        self.set_mem_table()
        for i in indices:
            self.setup_vring(i, size)
        self._driver_ok()
        return self

    def _driver_ok(self) -> None:
        if self.has_protocol(ProtocolFeature.STATUS):
            self.set_status(self.status | DeviceStatus.DRIVER_OK)

    def disconnect(self) -> None:
        """Close the connection (and the back-end channel); rings and memory stay ours."""
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None
        self.connection.close()

    def reconnect(self, timeout: float | None = None) -> None:
        """Connect again and redo the whole set-up, resuming rings where they were.

        Uses the same negotiation options; sends SET_INFLIGHT_FD (with the buffer
        kept from GET_INFLIGHT_FD) before the rings, so the back-end can resubmit.
        """
        if not self.connection.peer_closed:
            self.disconnect()
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        opts = dict(self._negotiation)
        while True:
            if self.listener is not None:
                sock = self.listener.accept_socket(wait)
            elif self.path is not None:
                sock = connect_unix(self.path, retry_for=wait)
            else:
                raise VhsmError("reconnect needs the back-end's socket path or a listener")
            self._reset_session_state()
            self._attach(sock)
            try:
                self.negotiate(
                    opts.get("features"),
                    opts.get("protocol_features"),
                    owner_first=bool(opts.get("owner_first", False)),
                    packed=bool(opts.get("packed", False)),
                    backend_req=bool(opts.get("backend_req", True)),
                    enable_first=opts.get("enable_first", ()),
                )
                break
            except PeerClosed:
                # a daemon still tearing the old session down refuses the new one: retry
                self.disconnect()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)
        if self.inflight is not None and self.has_protocol(ProtocolFeature.INFLIGHT_SHMFD):
            self.set_inflight_fd()
        self.set_mem_table()
        for vq in self.vrings.values():
            self._send_vring(vq, vq.resume_base(), enable=True)
        self._driver_ok()

    def close(self) -> None:
        """Disconnect and free everything: rings' eventfds, inflight fd, guest memory."""
        with contextlib.suppress(OSError):
            self.disconnect()
        for vq in self.vrings.values():
            vq.close()
        self.vrings.clear()
        if self.inflight_fd is not None:
            os.close(self.inflight_fd)
            self.inflight_fd = None
        self.memory.close()
        if self._own_recorder:
            self.recorder.close()


def _indices(queues: int | Sequence[int]) -> list[int]:
    return list(range(queues)) if isinstance(queues, int) else list(queues)


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)

"""`BackendChannel`: the back-end request channel (back-end → front-end requests).

The front-end hands one end of a socket pair over with SET_BACKEND_REQ_FD; the
back-end sends requests on it and, when REPLY_ACK is negotiated and NEED_REPLY
set, waits for the front-end's u64 ack. Sends are serialised by one lock so
workers and device threads may share the channel. Deadlock hazard: a
request sent from the connection's control thread (inside a hook) cannot wait
for its ack, because the front-end may itself be waiting for our reply on the
main channel; such requests are sent without NEED_REPLY.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence

from vhsm.errors import BackendError, VhsmError
from vhsm.transport import recv_with_fds, send_message
from vhsm.wire import (
    BackendReq,
    Channel,
    Decoder,
    Message,
    Payload,
    ProtocolFeature,
    VhostUserShared,
    VhostUserU64,
    VhostUserVringArea,
    VhostUserVringState,
    make_request,
    request_spec,
)
from vhsm.wire.enums import VRING_NOFD_MASK

log = logging.getLogger(__name__)

#: Seconds to wait for the front-end's ack before giving up on the channel.
DEFAULT_TIMEOUT = 5.0

_control = threading.local()


def mark_control_thread(active: bool) -> None:
    """Flag the calling thread as a connection's control thread (acks are not awaited there)."""
    _control.active = active


def on_control_thread() -> bool:
    """Whether the calling thread is a connection's control thread."""
    return bool(getattr(_control, "active", False))


class BackendChannel:
    """The back-end request channel socket, with gate checks, acks and a timeout.

    Args:
        fd: the socket received with SET_BACKEND_REQ_FD (owned from now on).
        protocol_features: returns the negotiated protocol features when called.
        timeout: seconds to wait for a reply before the channel is declared broken.
        suspended: returns whether the device is suspended (all rings stopped);
            requests are refused then (VU-STATE-007).
    """

    def __init__(
        self,
        fd: int,
        protocol_features: Callable[[], int],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        suspended: Callable[[], bool] | None = None,
    ) -> None:
        self._sock = socket.socket(fileno=fd)
        self._suspended = suspended
        # a front-end that stops reading must not hold a sender (a worker) forever:
        # a send that cannot complete within the timeout breaks the channel
        self._sock.settimeout(timeout)
        self._features = protocol_features
        self.timeout = timeout
        self._lock = threading.Lock()
        self._decoder = Decoder(Channel.BACKEND)
        self._broken: str | None = None

    # --- public requests -------------------------------------------------------------
    def config_change(self) -> None:
        """Tell the front-end the config space changed (BACKEND_CONFIG_CHANGE_MSG)."""
        self.request(BackendReq.BACKEND_CONFIG_CHANGE_MSG)

    def vring_call(self, index: int) -> None:
        """In-band used-buffer notification for ring `index`.

        Sent without NEED_REPLY: it comes from a worker holding its dispatch lock,
        which must never wait on the front-end (as an eventfd write does not).
        """
        self.request(BackendReq.BACKEND_VRING_CALL, VhostUserVringState(index, 0), ack=False)

    def vring_err(self, index: int) -> None:
        """In-band error notification for ring `index`; no ack awaited (see above)."""
        self.request(BackendReq.BACKEND_VRING_ERR, VhostUserVringState(index, 0), ack=False)

    def shared_object_add(self, object_id: uuid.UUID) -> None:
        """Register this back-end as exporter of `object_id`."""
        self.request(BackendReq.BACKEND_SHARED_OBJECT_ADD, VhostUserShared(object_id))

    def shared_object_remove(self, object_id: uuid.UUID) -> None:
        """Withdraw `object_id` (added earlier by this back-end)."""
        self.request(BackendReq.BACKEND_SHARED_OBJECT_REMOVE, VhostUserShared(object_id))

    def shared_object_lookup(self, object_id: uuid.UUID) -> int | None:
        """Look up a dma-buf by UUID: its fd (the caller owns it), or None when not found."""
        self._check_running("BACKEND_SHARED_OBJECT_LOOKUP")
        reply = self._exchange(
            make_request(
                BackendReq.BACKEND_SHARED_OBJECT_LOOKUP,
                VhostUserShared(object_id),
                need_reply=True,
                channel=Channel.BACKEND,
            ),
            wait=True,
        )
        assert reply is not None
        value = _ack_value(reply)
        if value != 0 or not reply.fds:
            _close_fds(reply.fds)
            return None
        first, *rest = reply.fds
        _close_fds(rest)
        return first

    def host_notifier(
        self, index: int, fd: int | None, *, offset: int = 0, size: int | None = None
    ) -> None:
        """Map `fd` at `offset` as ring `index`'s notify page; `fd=None` unregisters it.

        The fd stays owned by the caller. `size` defaults to the host page size.
        """
        if not 0 <= index <= 0xFF:
            raise BackendError(f"host notifier: ring index {index} out of 0..255")
        area = VhostUserVringArea(
            index | (VRING_NOFD_MASK if fd is None else 0),
            os.sysconf("SC_PAGE_SIZE") if size is None else size,
            offset,
        )
        fds = () if fd is None else (fd,)
        self.request(BackendReq.BACKEND_VRING_HOST_NOTIFIER_MSG, area, fds)

    # --- generic request -------------------------------------------------------------
    def request(
        self,
        req: BackendReq,
        payload: Payload | None = None,
        fds: Sequence[int] = (),
        *,
        ack: bool = True,
    ) -> int:
        """Send one request; return the front-end's ack (0 when no ack was awaited).

        With REPLY_ACK negotiated, an ack is asked for (NEED_REPLY) and awaited unless
        `ack` is False or the caller is the control thread.

        Raises BackendError when the request's gate was not negotiated, the
        device is suspended, the channel is broken or closed, the ack times out,
        or the front-end NACKs.
        """
        spec = request_spec(req, Channel.BACKEND)
        if spec is None:
            raise BackendError(f"unknown back-end request {req!r}")
        self._check_running(spec.name)
        features = self._features()
        gate = spec.gate_protocol
        if gate is not None and not features & gate:
            raise BackendError(f"{spec.name} needs protocol feature {gate.name}, not negotiated")
        if fds and not features & ProtocolFeature.BACKEND_SEND_FD:
            raise BackendError(f"{spec.name}: sending an fd needs BACKEND_SEND_FD, not negotiated")
        ack = ack and bool(features & ProtocolFeature.REPLY_ACK) and spec.reply == "ack"
        wait = spec.reply == "always" or (ack and not on_control_thread())
        msg = make_request(req, payload, need_reply=wait, fds=fds, channel=Channel.BACKEND)
        reply = self._exchange(msg, wait=wait)
        if reply is None:
            return 0
        value = _ack_value(reply)
        _close_fds(reply.fds)
        if value != 0:
            raise BackendError(f"front-end answered {spec.name} with failure {value}")
        return value

    @property
    def closed(self) -> bool:
        """Whether the channel was closed or broke."""
        return self._broken is not None

    def close(self) -> None:
        """Close the socket (idempotent)."""
        with self._lock:
            if self._broken is None:
                self._broken = "closed"
            self._close_socket()

    # --- machinery -------------------------------------------------------------------
    def _check_running(self, name: str) -> None:
        """Refuse to send while the device is suspended (all rings stopped)."""
        if self._suspended is not None and self._suspended():
            raise BackendError(
                f"VU-STATE-007: {name} not sent: the device is suspended (all rings stopped)"
            )

    def _exchange(self, msg: Message, *, wait: bool) -> Message | None:
        with self._lock:
            if self._broken is not None:
                raise BackendError(f"back-end channel unusable: {self._broken}")
            try:
                send_message(self._sock, msg)
                if not wait:
                    return None
                return self._read_reply(msg)
            except (OSError, VhsmError) as err:
                self._broken = f"{msg.name}: {err}"
                self._close_socket()
                if isinstance(err, BackendError):
                    raise
                raise BackendError(f"back-end channel failed on {msg.name}: {err}") from err

    def _read_reply(self, msg: Message) -> Message:
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BackendError(f"no reply to {msg.name} within {self.timeout:g}s")
            readable, _, _ = select.select([self._sock], [], [], left)
            if not readable:
                continue
            data, fds = recv_with_fds(self._sock)
            if not data:
                _close_fds(fds)
                raise BackendError(f"front-end closed the back-end channel awaiting {msg.name}")
            for reply in self._decoder.feed(data, fds):
                if reply.error is not None:
                    raise BackendError(f"bad reply to {msg.name}: {reply.error}")
                if not reply.is_reply or reply.request != msg.request:
                    _close_fds(reply.fds)
                    raise BackendError(f"unexpected {reply.name} while awaiting {msg.name}")
                return reply

    def _close_socket(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
        with contextlib.suppress(VhsmError):
            self._decoder.close()


def _ack_value(reply: Message) -> int:
    payload = reply.payload
    return payload.value if isinstance(payload, VhostUserU64) else 1


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


__all__ = ["DEFAULT_TIMEOUT", "BackendChannel", "mark_control_thread", "on_control_thread"]

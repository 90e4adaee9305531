"""The front-end end of the back-end request channel, served by a thread.

`BackendRequestServer` makes the socket pair of SET_BACKEND_REQ_FD, keeps one
end, and answers every back-end request in a thread: the handler's u64 is sent
back as the ack when the back-end set NEED_REPLY (and always for
SHARED_OBJECT_LOOKUP, which expects an answer). Requests and replies are
recorded like main-channel messages, with ``"channel": "backend"``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable

from vhsm.errors import FramingError, VhsmError
from vhsm.frontend.connection import Connection, Recorder
from vhsm.transport import PeerClosed
from vhsm.wire import BackendReq, Channel, Message, VhostUserU64, make_reply

log = logging.getLogger(__name__)

#: Answers one back-end request: return the u64 ack value (0 = success).
BackendRequestHandler = Callable[[Message], int]


class BackendRequestServer:
    """Owns the front-end end of the back-end request channel and answers on a thread."""

    def __init__(
        self, recorder: Recorder, conn: int, handler: BackendRequestHandler | None = None
    ) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.backend_end: socket.socket | None = theirs
        self.connection = Connection(ours, recorder, conn, Channel.BACKEND)
        self.handler = handler
        #: Every back-end request received, in order (fds already closed).
        self.requests: list[Message] = []
        #: Set whenever a request arrives (tests wait on it).
        self.received = threading.Condition()
        self._thread = threading.Thread(
            target=self._run, name="vhsm-frontend-backend-req", daemon=True
        )
        self._stopping = False
        self._thread.start()

    def take_backend_end(self) -> int:
        """The fd to send with SET_BACKEND_REQ_FD (closed here by `handed_over`)."""
        if self.backend_end is None:
            raise VhsmError("the back-end end of the channel was already handed over")
        return self.backend_end.fileno()

    def handed_over(self) -> None:
        """Close our copy of the back-end's end once it was sent."""
        if self.backend_end is not None:
            self.backend_end.close()
            self.backend_end = None

    def wait_for(self, request: int, timeout: float) -> Message | None:
        """Wait until a back-end request with code ``request`` arrived; return it."""
        with self.received:
            self.received.wait_for(
                lambda: any(m.request == request for m in self.requests), timeout
            )
            return next((m for m in self.requests if m.request == request), None)

    def _run(self) -> None:
        conn = self.connection
        while not self._stopping:
            try:
                msg = conn.recv(None)
            except (PeerClosed, FramingError, OSError, ValueError):
                return
            ack = self._answer(msg)
            for fd in msg.fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            with self.received:
                self.requests.append(msg)
                self.received.notify_all()
            if ack is not None and not self._stopping:
                with contextlib.suppress(OSError):
                    conn.send(make_reply(msg.request, VhostUserU64(ack), channel=Channel.BACKEND))

    def _answer(self, msg: Message) -> int | None:
        value = 0 if msg.error is None else 1
        if msg.error is None and self.handler is not None:
            try:
                value = self.handler(msg)
            except Exception:  # a test's handler must not kill the channel
                log.exception("back-end request handler failed")
                value = 1
        if msg.need_reply or msg.request == BackendReq.BACKEND_SHARED_OBJECT_LOOKUP:
            return value
        return None

    def close(self) -> None:
        """Stop the thread and close both ends."""
        self._stopping = True
        self.connection.closing = True
        self.handed_over()
        with contextlib.suppress(OSError):
            self.connection.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)
        self.connection.close()

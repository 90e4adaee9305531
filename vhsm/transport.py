"""Unix-socket I/O with file descriptors: the only place bytes meet the kernel.

`socket.recv_fds` ignores its flags (no MSG_CMSG_CLOEXEC) and a plain
`recv()` silently drops fds, so both directions go through `recvmsg` /
`sendmsg` here, with SCM_RIGHTS, close-on-exec, and truncation checks.
"""

from __future__ import annotations

import array
import os
import resource
import select
import socket
from collections.abc import Sequence
from typing import Protocol

from vhsm.errors import FramingError, VhsmError
from vhsm.wire import MAX_FDS, Message, encode

#: Bytes asked for per read: a whole 8-region memory table fits in one.
READ_SIZE = 65536
_FD_SIZE = array.array("i").itemsize
_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * _FD_SIZE)


class PeerClosed(VhsmError):
    """The peer closed the connection (end of stream)."""


def recv_with_fds(sock: socket.socket, size: int = READ_SIZE) -> tuple[bytes, list[int]]:
    """Read up to `size` bytes and the fds that came with them (close-on-exec).

    Returns ``(b"", [])`` at end of stream. Fds beyond the control buffer
    (MSG_CTRUNC) are lost by the kernel, so that is reported as an error.
    """
    data, ancdata, flags, _ = sock.recvmsg(size, _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_SIZE
            fds.extend(array.array("i", payload[:usable]))
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise VhsmError(_truncation_cause(len(fds)))
    return data, fds


def _truncation_cause(received: int) -> str:
    """Why the kernel cut the fds of a message short, in words.

    The control buffer holds `MAX_FDS` fds, so fewer than that received means the
    kernel could not install them here: this process is at its fd limit.
    """
    if received >= MAX_FDS:
        return f"more than {MAX_FDS} fds in one message: control data truncated"
    try:
        in_use: int | str = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = "?"
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (
        f"the fds attached to a message could not be received: this process has {in_use} fds "
        f"open and may open {soft} (RLIMIT_NOFILE); raise the limit or look for a leak"
    )


def send_with_fds(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send `data` with `fds` attached to its first byte; loop on short writes."""
    ancillary = (
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    )
    sent = sock.sendmsg([data], ancillary)
    while sent < len(data):
        sent += sock.send(data[sent:])


def send_message(sock: socket.socket, msg: Message) -> None:
    """Encode and send one message with its fds (which stay owned by the caller)."""
    send_with_fds(sock, encode(msg), msg.fds)


class FrameSource(Protocol):
    """What `MessageReader` reads through: a `Decoder`, or a `Connection` that owns one."""

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete message held."""
        ...

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> list[Message]:
        """Add received bytes and fds; return every message now complete."""
        ...

    def close(self) -> None:
        """Close every fd still held."""
        ...


class MessageReader:
    """Reads whole messages from a socket through an incremental `Decoder`.

    `patience` (seconds, None: forever) bounds how long a peer may stay silent
    before its first message and how long it may take to finish a message it
    started (rule VU-FRAME-011). Between whole messages a peer may be idle for
    as long as it likes: a front-end sends nothing while its guest runs.
    """

    def __init__(
        self, sock: socket.socket, decoder: FrameSource, *, patience: float | None = None
    ) -> None:
        self.sock = sock
        self.decoder = decoder
        self.patience = patience
        #: Whether a whole message has arrived on this connection yet.
        self.greeted = False
        self._ready: list[Message] = []

    def read(self) -> Message:
        """Block until one whole message arrived; raise PeerClosed at end of stream.

        Raises FramingError (VU-FRAME-011) when the peer is silent too long
        before its first message or in the middle of one.
        """
        while not self._ready:
            self._await_bytes()
            data, fds = recv_with_fds(self.sock)
            if not data:
                for fd in fds:
                    os.close(fd)
                self.decoder.close()
                raise PeerClosed("peer closed the connection")
            self._ready.extend(self.decoder.feed(data, fds))
        self.greeted = True
        return self._ready.pop(0)

    def _await_bytes(self) -> None:
        """Wait for bytes, within `patience` while greeting or inside a message."""
        if self.patience is None or (self.greeted and not self.decoder.buffered):
            return
        readable, _, _ = select.select([self.sock], [], [], self.patience)
        if readable:
            return
        where = "inside a message" if self.decoder.buffered else "before its first message"
        raise FramingError(
            "-",
            "stream",
            f"silent {where} for {self.patience:g}s",
            f"bytes within the hand-shake timeout ({self.patience:g}s)",
            "VU-FRAME-011",
        )

    def close(self) -> None:
        """Close the fds of messages read but not consumed."""
        for msg in self._ready:
            for fd in msg.fds:
                os.close(fd)
        self._ready.clear()

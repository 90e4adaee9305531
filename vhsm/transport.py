"""Unix-socket I/O with file descriptors: the only place bytes meet the kernel.

`socket.recv_fds` ignores its flags (no MSG_CMSG_CLOEXEC) and a plain
`recv()` silently drops fds, so both directions go through `recvmsg` /
`sendmsg` here, with SCM_RIGHTS, close-on-exec, and truncation checks.
"""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Sequence

from vhsm.errors import VhsmError
from vhsm.wire import MAX_FDS, Decoder, Message, encode

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
        raise VhsmError(f"more than {MAX_FDS} fds in one message: control data truncated")
    return data, fds


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


class MessageReader:
    """Reads whole messages from a socket through an incremental `Decoder`."""

    def __init__(self, sock: socket.socket, decoder: Decoder) -> None:
        self.sock = sock
        self.decoder = decoder
        self._ready: list[Message] = []

    def read(self) -> Message:
        """Block until one whole message arrived; raise PeerClosed at end of stream."""
        while not self._ready:
            data, fds = recv_with_fds(self.sock)
            if not data:
                for fd in fds:
                    os.close(fd)
                self.decoder.close()
                raise PeerClosed("peer closed the connection")
            self._ready.extend(self.decoder.feed(data, fds))
        return self._ready.pop(0)

    def close(self) -> None:
        """Close the fds of messages read but not consumed."""
        for msg in self._ready:
            for fd in msg.fds:
                os.close(fd)
        self._ready.clear()

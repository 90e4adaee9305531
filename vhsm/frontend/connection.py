"""The front-end's side of one socket: send messages or raw bytes, read with a timeout, record.

Every message that crosses the socket, both ways, is written to a `Recorder`
as a transcript line (the format of ``tests/data/README.md``, built by
`vhsm.wire.jsonconv.message_to_record`). Raw sends exist so the compliance
auditor can put malformed bytes on the wire and watch what the back-end does.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from enum import IntFlag
from pathlib import Path
from typing import IO, Any

import attrs

from vhsm.errors import FramingError
from vhsm.transport import PeerClosed, recv_with_fds, send_with_fds
from vhsm.wire import HEADER_SIZE, Channel, Decoder, Message, decode_message, encode
from vhsm.wire.framing import HEADER
from vhsm.wire.jsonconv import message_to_record

#: Transcript directions (tests/data/README.md).
F2B = "F>B"
B2F = "B>F"

RecordListener = Callable[[dict[str, Any]], None]


class Recorder:
    """Collects transcript lines in `records` and, optionally, a JSON-lines file.

    Thread-safe: the back-end channel thread records too. `listeners` are called
    with each new line (the demo prints them live).
    """

    def __init__(
        self, path: str | Path | None = None, *, device_features: Iterable[type[IntFlag]] = ()
    ) -> None:
        self.records: list[dict[str, Any]] = []
        self.listeners: list[RecordListener] = []
        self.device_features = tuple(device_features)
        self._start = time.monotonic()
        self._lock = threading.Lock()
        self._file: IO[str] | None = open(path, "w", encoding="utf-8") if path else None  # noqa: SIM115

    def now(self) -> float:
        """Seconds since the recorder was created (the ``t`` of each line)."""
        return round(time.monotonic() - self._start, 6)

    def add(self, record: dict[str, Any]) -> None:
        """Append one line, write it to the file and tell the listeners."""
        with self._lock:
            self.records.append(record)
            if self._file is not None:
                self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
                self._file.flush()
            listeners = list(self.listeners)
        for listener in listeners:
            listener(record)

    def event(self, kind: str, conn: int, **fields: Any) -> None:
        """Record a bookkeeping line (``open``, ``close``)."""
        self.add({"t": self.now(), "conn": conn, "event": kind, **fields})

    def message(self, msg: Message, direction: str, conn: int, nfds: int | None = None) -> None:
        """Record one message."""
        self.add(
            message_to_record(
                msg,
                direction=direction,
                t=self.now(),
                conn=conn,
                nfds=nfds,
                device_features=self.device_features,
            )
        )

    def raw(self, data: bytes, nfds: int, direction: str, conn: int, channel: Channel) -> None:
        """Record raw bytes: decoded as a message when they hold a header, else as hex."""
        if len(data) >= HEADER_SIZE:
            request, flags, _size = HEADER.unpack_from(data)
            msg = decode_message(request, flags, data, channel=channel, nfds=nfds)
            record = message_to_record(msg, direction=direction, t=self.now(), conn=conn, nfds=nfds)
            record["raw"] = True
            self.add(record)
        else:
            self.add(
                {
                    "t": self.now(),
                    "conn": conn,
                    "dir": direction,
                    "raw": True,
                    "size": len(data),
                    "nfds": nfds,
                    "bytes": data.hex(),
                }
            )

    def close(self) -> None:
        """Close the file, if any."""
        if self._file is not None:
            self._file.close()
            self._file = None


class Connection:
    """One stream socket to the peer, with a decoder, timeouts and recording.

    ``outgoing`` is the transcript direction of what we send (``F>B`` on the
    main socket; on the back-end channel we send replies, also ``F>B``).
    """

    def __init__(
        self,
        sock: socket.socket,
        recorder: Recorder,
        conn: int,
        channel: Channel = Channel.MAIN,
    ) -> None:
        self.sock = sock
        self.recorder = recorder
        self.conn = conn
        self.channel = channel
        self.decoder = Decoder(channel)
        self._ready: list[Message] = []
        self.peer_closed = False
        #: Set before a local shutdown so the end of stream is recorded as ours.
        self.closing = False

    def fileno(self) -> int:
        """The socket's fd."""
        return self.sock.fileno()

    def send(self, msg: Message) -> None:
        """Encode and send a message with its fds (still owned by the caller), record it."""
        data = encode(msg)
        self.recorder.message(attrs.evolve(msg, raw=data), F2B, self.conn)  # before the peer acts
        self._send(data, msg.fds)

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send arbitrary bytes (even a broken header) with fds attached, record them."""
        self.recorder.raw(data, len(fds), F2B, self.conn, self.channel)
        self._send(data, fds)

    def _send(self, data: bytes, fds: Sequence[int]) -> None:
        """Send; a peer that already closed the connection raises PeerClosed."""
        try:
            send_with_fds(self.sock, data, fds)
        except (BrokenPipeError, ConnectionResetError):
            if not self.peer_closed:
                self._eof()
            raise PeerClosed("the back-end closed the connection") from None

    def poll(self, timeout: float | None) -> bool:
        """Wait until the socket is readable (or a message is buffered); False on timeout."""
        if self._ready:
            return True
        readable, _, _ = select.select([self.sock], [], [], timeout)
        return bool(readable)

    def recv(self, timeout: float | None = None) -> Message:
        """Return the next message; raise TimeoutError, or PeerClosed at end of stream."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready:
            if self.peer_closed:
                raise PeerClosed("the back-end closed the connection")
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self.poll(left):
                raise TimeoutError(f"no message from the back-end within {timeout} s")
            try:
                data, fds = recv_with_fds(self.sock)
            except ConnectionResetError:
                data, fds = b"", []
            if not data:
                self._eof()
                continue
            for msg in self.decoder.feed(data, fds):
                self.recorder.message(msg, B2F, self.conn)
                self._ready.append(msg)
        return self._ready.pop(0)

    def wait_closed(self, timeout: float) -> bool:
        """Read (recording) until the peer closes; True if it did within ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self.peer_closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                msg = self.recv(left)
            except (TimeoutError, PeerClosed, FramingError):
                continue
            _close_fds(msg.fds)
        return True

    def _eof(self) -> None:
        self.peer_closed = True
        by = "F" if self.closing else "B"
        self.recorder.event("close", self.conn, by=by, channel=self.channel.value, why="eof")
        with contextlib.suppress(FramingError):
            self.decoder.close()

    def close(self) -> None:
        """Close the socket and every fd of unread messages."""
        for msg in self._ready:
            _close_fds(msg.fds)
        self._ready.clear()
        self.closing = True
        if not self.peer_closed:
            self.recorder.event("close", self.conn, by="F", channel=self.channel.value, why="close")
            self.peer_closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)

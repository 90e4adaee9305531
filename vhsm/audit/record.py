"""`vhsm record`: a recording relay between a real front-end and a real back-end.

The relay listens where the front-end expects the back-end and, for each
front-end connection, connects to the back-end. Bytes and fds pass through
unchanged in both directions, one whole message at a time (its exact bytes,
its own fds), and each message becomes one transcript line
(tests/data/README.md). The back-end request channel is relayed too: the
socket in SET_BACKEND_REQ_FD is swapped for one end of the relay's own socket
pair, whose traffic is copied to the front-end's socket and recorded with
``"channel": "backend"``. Connections are served concurrently, numbered in
accept order; every end of a connection is recorded with who ended it and why.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import threading
from collections.abc import Iterable
from enum import IntFlag
from pathlib import Path
from typing import IO, Any

import attrs

from vhsm.daemon import Listener
from vhsm.frontend.connection import Recorder
from vhsm.frontend.frontend import connect_unix
from vhsm.session.connection import RelayedConnection, RelayedStream
from vhsm.transport import recv_with_fds, send_with_fds
from vhsm.wire import Channel, FrontendReq, Message, message_to_record
from vhsm.wire.framing import Unframed

log = logging.getLogger(__name__)

#: Largest payload the relay buffers to keep a message whole; beyond it bytes pass raw.
RELAY_MAX_PAYLOAD = 1 << 20
F2B = "F>B"
B2F = "B>F"


@attrs.define(eq=False)
class _Leg:
    """One readable socket of a relayed pair and where its bytes go."""

    src: socket.socket
    dst: socket.socket
    direction: str
    channel: Channel
    side: str  # "F" or "B": who writes into src
    stream: RelayedStream
    partner: _Leg | None = None


class _Ended(Exception):
    """A relayed socket pair ended: who ended it and why."""

    def __init__(self, by: str, why: str) -> None:
        super().__init__(why)
        self.by = by
        self.why = why


class RelayConnection:
    """One front-end connection relayed to one back-end connection (runs on its own thread)."""

    def __init__(self, relay: Relay, front: socket.socket, back: socket.socket, conn: int) -> None:
        self.relay = relay
        self.conn = conn
        self.messages = 0
        self.protocol = RelayedConnection(RELAY_MAX_PAYLOAD)
        self._legs: dict[int, _Leg] = {}
        self._poll = select.poll()
        fwd = self._leg(front, back, F2B, Channel.MAIN, "F")
        rev = self._leg(back, front, B2F, Channel.MAIN, "B")
        self._pair(fwd, rev)
        self._main = (fwd, rev)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._poll.register(self._wake_r, select.POLLIN)
        self.ended = threading.Event()

    def _leg(
        self, src: socket.socket, dst: socket.socket, direction: str, channel: Channel, side: str
    ) -> _Leg:
        return _Leg(src, dst, direction, channel, side, self.protocol.stream(channel))

    def _pair(self, a: _Leg, b: _Leg) -> None:
        a.partner, b.partner = b, a
        for leg in (a, b):
            self._legs[leg.src.fileno()] = leg
            self._poll.register(leg.src, select.POLLIN)

    def stop(self) -> None:
        """Ask the loop to end (from another thread)."""
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # --- the loop -------------------------------------------------------------------
    def run(self) -> None:
        """Relay until the main connection ends; record who ended it and why."""
        rec = self.relay.recorder
        by = "relay"
        try:
            while True:
                events = self._poll.poll()
                for fd, _mask in events:
                    if fd == self._wake_r:
                        raise _Ended("relay", "relay stopped")
                    leg = self._legs.get(fd)
                    if leg is None:
                        continue
                    try:
                        self._pump(leg)
                    except _Ended as end:
                        if leg.channel is Channel.MAIN:
                            raise
                        rec.event("close", self.conn, by=end.by, why=end.why, channel="backend")
                        self._drop(leg)
        except _Ended as end:
            rec.event("close", self.conn, by=end.by, why=end.why)
            by = end.by
        except Exception as exc:  # keep the relay serving other connections
            log.exception("relay connection %d failed", self.conn)
            rec.event("close", self.conn, by="relay", why=f"relay error: {exc}")
            by = "relay"
        finally:
            for leg in list(self._legs.values()):
                if leg.channel is Channel.BACKEND and leg.src.fileno() in self._legs:
                    rec.event(
                        "close", self.conn, by=by, why="main connection ended", channel="backend"
                    )
                self._drop(leg)
            os.close(self._wake_r)
            os.close(self._wake_w)
            self.ended.set()

    def _drop(self, leg: _Leg) -> None:
        for one in (leg, leg.partner):
            if one is None or self._legs.pop(one.src.fileno(), None) is None:
                continue
            self._poll.unregister(one.src)
            one.stream.close()
            with contextlib.suppress(OSError):
                one.src.shutdown(socket.SHUT_RDWR)
            one.src.close()

    def _pump(self, leg: _Leg) -> None:
        try:
            data, fds = recv_with_fds(leg.src)
        except ConnectionResetError:
            raise _Ended(leg.side, "connection reset") from None
        except OSError as exc:
            raise _Ended(leg.side, f"read failed: {exc}") from None
        t = self.relay.recorder.now()
        if not data:
            _close_fds(fds)
            why = "eof"
            if leg.stream.buffered:
                why = f"eof inside a message ({leg.stream.buffered} bytes buffered)"
            raise _Ended(leg.side, why)
        for unit in leg.stream.receive_data(data, fds):
            self._forward(leg, unit, t)

    def _forward(self, leg: _Leg, unit: Message | Unframed, t: float) -> None:
        fds = unit.fds
        data = unit.raw if isinstance(unit, Message) else unit.data
        swapped: tuple[int, ...] | None = None
        if (
            isinstance(unit, Message)
            and unit.req is FrontendReq.SET_BACKEND_REQ_FD
            and leg.direction == F2B
            and not unit.is_reply
            and len(fds) == 1
        ):
            swapped = self._relay_channel(fds[0])
        other = leg.partner
        assert other is not None
        try:
            send_with_fds(leg.dst, data, fds if swapped is None else swapped)
        except OSError as exc:
            self._record(leg, unit, t, undelivered=True)
            raise _Ended(other.side, f"write failed: {exc.strerror or exc}") from None
        finally:
            _close_fds(fds if swapped is None else swapped)  # the front-end's end is kept
        self._record(leg, unit, t)

    def _relay_channel(self, frontend_end: int) -> tuple[int]:
        """Keep the front-end's channel socket; give the back-end one end of our own pair."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        original = socket.socket(fileno=frontend_end)
        up = self._leg(ours, original, B2F, Channel.BACKEND, "B")
        down = self._leg(original, ours, F2B, Channel.BACKEND, "F")
        self._pair(up, down)
        self.relay.recorder.event("open", self.conn, channel="backend")
        fd = os.dup(theirs.fileno())
        theirs.close()
        return (fd,)

    def front_gone(self) -> bool:
        """Whether the front-end already closed (its EOF is waiting to be read)."""
        front = self._main[0].src
        try:
            return front.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _record(
        self, leg: _Leg, unit: Message | Unframed, t: float, *, undelivered: bool = False
    ) -> None:
        rec = self.relay.recorder
        self.messages += 1
        if isinstance(unit, Unframed):
            fields: dict[str, Any] = {
                "direction": leg.direction,
                "size": len(unit.data),
                "nfds": len(unit.fds),
                "bytes": unit.data.hex(),
                "why": f"size field {unit.size} of request {unit.request} beyond the relay's cap",
                "rule": "VU-FRAME-005",
            }
            if leg.channel is not Channel.MAIN:
                fields["channel"] = leg.channel.value
            rec.add({"t": t, "conn": self.conn, "event": "raw", **fields})
            return
        msg = unit
        line = message_to_record(
            msg,
            direction=leg.direction,
            t=t,
            conn=self.conn,
            nfds=len(unit.fds),
            device_features=rec.device_features,
        )
        rec.add(line)
        if undelivered:
            fields = {"direction": leg.direction, "name": msg.name}
            if leg.channel is not Channel.MAIN:
                fields["channel"] = leg.channel.value
            rec.event("undelivered", self.conn, why="the receiving side was gone", **fields)


class Relay:
    """Accepts front-ends at `listen`, relays each to a new connection to `connect`.

    Args:
        listen: where the front-end connects (a stale socket there is replaced).
        connect: the back-end's listening socket.
        out: transcript file path or an open text stream.
        once: end after the first connection ends.
        connect_timeout: seconds to keep retrying the back-end for each connection.
        device_features: flag enums naming device bits in the ``decoded`` fields.
    """

    def __init__(
        self,
        listen: str | os.PathLike[str],
        connect: str | os.PathLike[str],
        out: str | os.PathLike[str] | IO[str] | None,
        *,
        once: bool = False,
        connect_timeout: float = 5.0,
        device_features: Iterable[type[IntFlag]] = (),
    ) -> None:
        self.listen_path = Path(listen)
        self.connect_path = Path(connect)
        self.once = once
        self.connect_timeout = connect_timeout
        if out is None or isinstance(out, str | os.PathLike):
            self.recorder = Recorder(
                None if out is None else Path(out), device_features=device_features
            )
        else:
            self.recorder = Recorder(None, device_features=device_features)
            stream = out
            self.recorder.listeners.append(lambda line: _write_line(stream, line))
        self.connections: list[RelayConnection] = []
        self._listener: Listener | None = None
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._threads: list[threading.Thread] = []
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._exit_why = "stopped"
        self._stopped = False

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every transcript line so far."""
        return self.recorder.records

    def start(self) -> None:
        """Listen and accept front-ends on a background thread."""
        self._listener = Listener(self.listen_path)
        self.recorder.add(
            {
                "t": self.recorder.now(),
                "event": "listen",
                "listen": str(self.listen_path),
                "backend": str(self.connect_path),
                "pid": os.getpid(),
            }
        )
        thread = threading.Thread(target=self._accept_loop, name="vhsm-record-accept", daemon=True)
        self._threads.append(thread)
        thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the relay ended (`stop`, or the first connection with `once`)."""
        return self._done.wait(timeout)

    def stop(self, why: str = "stopped") -> None:
        """Stop accepting, end every connection, record the exit (idempotent)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._exit_why = why
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        for connection in list(self.connections):
            connection.stop()
        for thread in list(self._threads):
            if thread is not threading.current_thread():
                thread.join()
        if self._listener is not None:
            self._listener.close()
        self.recorder.add({"t": self.recorder.now(), "event": "exit", "why": self._exit_why})
        self.recorder.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
        self._done.set()

    # --- threads ---------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        listener = self._listener
        conn = 0
        while True:
            readable, _, _ = select.select([listener.fileno(), self._stop_r], [], [])
            if self._stop_r in readable:
                return
            try:
                front = listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EINTR, errno.ECONNABORTED):
                    continue
                raise
            conn += 1
            thread = threading.Thread(
                target=self._serve, args=(front, conn), name=f"vhsm-record-{conn}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
            if self.once:
                return

    def _serve(self, front: socket.socket, conn: int) -> None:
        rec = self.recorder
        rec.event("open", conn)
        for old in list(self.connections):
            # A front-end that reconnects closed its last connection first: let that end
            # reach the back-end before the new one does (a back-end serving one
            # front-end at a time may refuse an overlap).
            if not old.ended.is_set() and old.front_gone():
                old.ended.wait(1.0)
        try:
            back = connect_unix(
                self.connect_path, retry_for=self.connect_timeout, stop_fd=self._stop_r
            )
        except OSError as exc:
            rec.event("close", conn, by="B", why=f"cannot connect to the back-end: {exc}")
            front.close()
            self._connection_done()
            return
        relayed = RelayConnection(self, front, back, conn)
        with self._lock:
            self.connections.append(relayed)
            if self._stopped:
                relayed.stop()
        relayed.run()
        self._connection_done()

    def _connection_done(self) -> None:
        if self.once:
            self._exit_why = "once: first connection ended"
            self._done.set()


def _write_line(stream: IO[str], line: dict[str, Any]) -> None:
    import json

    stream.write(json.dumps(line, separators=(",", ":")) + "\n")
    stream.flush()


def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


__all__ = ["RELAY_MAX_PAYLOAD", "Relay", "RelayConnection"]

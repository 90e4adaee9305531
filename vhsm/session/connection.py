"""`Connection`: one vhost-user connection, sans-IO (bytes and fds in; messages and replies out).

As h11's `Connection` owns its bytes, this object owns the incremental
`Decoder` of a connection and its `Session`: the caller feeds what it read
(`receive_data`), handles each request (`handle`) and sends the reply's bytes
(`encode`). Decoder settings that depend on what was negotiated (the Xen
mmap region form) follow the session here; nobody sets them from outside.
The daemon drives one per front-end; the trace auditor one per recorded
connection. A relay (`vhsm record`) sits between two peers and decides
nothing: it drives a `RelayedConnection`, whose streams cut and decode every
message while passing its exact bytes and fds on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from vhsm.backend import VhostUserBackend
from vhsm.errors import FramingError
from vhsm.session.dataplane import DataPlane
from vhsm.session.session import Session
from vhsm.wire import MAX_PAYLOAD, Channel, Decoder, Message, encode
from vhsm.wire.framing import Unframed


class Connection:
    """The protocol state of one connection: its decoder and its session.

    Args:
        backend: the device.
        dataplane: what the session's callbacks act on (None: `NullDataPlane`).
        observer: collect every violation as a finding instead of raising (the auditor).
    """

    def __init__(
        self,
        backend: VhostUserBackend,
        dataplane: DataPlane | None = None,
        *,
        observer: bool = False,
    ) -> None:
        self.session = Session(backend, dataplane, observer=observer)
        self._decoder = Decoder()

    def receive_data(
        self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()
    ) -> list[Message]:
        """Feed received bytes (and their fds); return every request now complete.

        Raises:
            FramingError: the stream cannot be resynchronised (the connection must close).
        """
        return self._decoder.feed(data, fds)

    # `MessageReader` reads through any object with feed / buffered / close.
    feed = receive_data

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete message held."""
        return self._decoder.buffered

    @property
    def xen_mmap(self) -> bool:
        """Whether memory regions are decoded in their Xen form (XEN_MMAP negotiated)."""
        return self._decoder.xen_mmap

    def handle(self, msg: Message) -> Message | None:
        """Process one request through the session; return the reply to send, if any."""
        try:
            return self.session.handle(msg)
        finally:
            self._decoder.follow(self.session.acked_protocol_features)

    @staticmethod
    def encode(reply: Message) -> bytes:
        """The bytes of a reply (its fds travel beside them)."""
        return encode(reply)

    def close(self) -> None:
        """Close every fd the decoder still holds."""
        self._decoder.close()


class RelayedConnection:
    """A relay's view of one front-end connection and its back-end connection.

    Each direction of each channel is a `RelayedStream`. All streams of one
    connection read memory regions in the form the front-end's last
    SET_PROTOCOL_FEATURES selected, since both peers act on it.

    Args:
        max_payload: a size field above it ends framing on that stream; the
            rest passes uncut (a relay may keep larger messages whole than a
            back-end accepts, to record them).
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._acked = 0

    @property
    def acked_protocol_features(self) -> int:
        """What the front-end's last SET_PROTOCOL_FEATURES acked (0 before one)."""
        return self._acked

    def stream(self, channel: Channel) -> RelayedStream:
        """A new stream of this connection: one direction of one channel."""
        return RelayedStream(self, Decoder(channel, max_payload=self.max_payload))


class RelayedStream:
    """One direction of a relayed channel: bytes and fds in, messages or unframed bytes out."""

    def __init__(self, connection: RelayedConnection, decoder: Decoder) -> None:
        self._connection = connection
        self._decoder = decoder

    def receive_data(
        self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()
    ) -> list[Message | Unframed]:
        """Feed received bytes and fds; return every unit now ready to pass on, in order.

        A `Message` carries its exact bytes (``raw``) and the fds that came
        with it, a malformed one too (``error`` says why); after a framing
        loss the rest of the stream comes out as `Unframed`. The caller owns
        every fd returned.
        """
        connection = self._connection
        self._decoder.follow(connection.acked_protocol_features)
        out = self._decoder.relay(data, fds)
        connection._acked = self._decoder.acked_protocol_features
        return out

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete message held."""
        return self._decoder.buffered

    def close(self) -> None:
        """Close every fd still held (a message cut short by the end is not an error here)."""
        with contextlib.suppress(FramingError):
            self._decoder.close()

"""`Connection`: one vhost-user connection, sans-IO (bytes and fds in; messages and replies out).

As h11's `Connection` owns its bytes, this object owns the incremental
`Decoder` of a connection and its `Session`: the caller feeds what it read
(`receive_data`), handles each request (`handle`) and sends the reply's bytes
(`encode`). Decoder settings that depend on what was negotiated (the Xen
mmap region form) follow the session here; nobody sets them from outside.
The daemon drives one per front-end; the trace auditor one per recorded
connection.
"""

from __future__ import annotations

from collections.abc import Sequence

from vhsm.backend import VhostUserBackend
from vhsm.session.dataplane import DataPlane
from vhsm.session.session import Session
from vhsm.wire import Decoder, Message, ProtocolFeature, encode


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
            self._decoder.xen_mmap = bool(
                self.session.acked_protocol_features & ProtocolFeature.XEN_MMAP
            )

    @staticmethod
    def encode(reply: Message) -> bytes:
        """The bytes of a reply (its fds travel beside them)."""
        return encode(reply)

    def close(self) -> None:
        """Close every fd the decoder still holds."""
        self._decoder.close()

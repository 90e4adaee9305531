"""Message framing (rules VU-FRAME-*): the 12-byte header and an incremental decoder.

Sans-IO: :class:`Decoder` takes the bytes and fds a transport received and
returns :class:`Message` objects; :func:`encode` turns a message into bytes.
Payload types, fd counts and reply rules come from ``specs/requests.yaml``.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator, Sequence
from typing import Final, NoReturn

import attrs

from vhsm.errors import FramingError, WireError
from vhsm.wire.catalogue import RequestSpec, request_spec
from vhsm.wire.enums import (
    MAX_PAYLOAD,
    RESERVED_FLAGS_MASK,
    VERSION_MASK,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    BackendReq,
    Channel,
    FrontendReq,
    HeaderFlags,
    ProtocolFeature,
    request_name,
)
from vhsm.wire.payloads import (
    Payload,
    VhostUserConfig,
    VhostUserInflight,
    VhostUserMemory,
    VhostUserOpaque,
    VhostUserSingleMemoryRegion,
    VhostUserU64,
)

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "MAX_FDS",
    "Channel",
    "Decoder",
    "Message",
    "Unframed",
    "decode_message",
    "encode",
    "make_reply",
    "make_request",
]

HEADER: Final = struct.Struct("<III")
HEADER_SIZE: Final = 12
MAX_FDS: Final = 8
REPLY_FLAGS: Final = HeaderFlags.VERSION_1 | HeaderFlags.REPLY


@attrs.frozen
class Message:
    """One vhost-user message; ``error`` is set (and ``payload`` None) when it was malformed."""

    request: int
    flags: int = HeaderFlags.VERSION_1
    payload: Payload | None = None
    fds: tuple[int, ...] = ()
    raw: bytes = b""
    channel: Channel = Channel.MAIN
    error: WireError | None = None

    @property
    def name(self) -> str:
        """The spec name of the request, ``UNKNOWN_<code>`` for unknown codes."""
        return request_name(self.request, self.channel)

    @property
    def is_reply(self) -> bool:
        """Whether the REPLY flag is set."""
        return bool(self.flags & HeaderFlags.REPLY)

    @property
    def need_reply(self) -> bool:
        """Whether the NEED_REPLY flag is set."""
        return bool(self.flags & HeaderFlags.NEED_REPLY)

    @property
    def req(self) -> FrontendReq | BackendReq | int:
        """The request code as an enum member when it is known."""
        table = FrontendReq if self.channel is Channel.MAIN else BackendReq
        member = table._value2member_map_.get(self.request)
        return member if isinstance(member, FrontendReq | BackendReq) else self.request


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _fits(cls: type[Payload] | None, size: int, xen: bool) -> bool:
    """Return whether a payload of ``size`` bytes could be of type ``cls``."""
    if cls is None:
        return size == 0
    if cls is VhostUserMemory:
        return size >= VhostUserMemory.HEADER_SIZE
    if cls is VhostUserConfig:
        return size >= VhostUserConfig.HEADER_SIZE
    if cls is VhostUserSingleMemoryRegion:
        return size == VhostUserSingleMemoryRegion.size_for(xen)
    if cls is VhostUserOpaque:
        return True
    return size == getattr(cls, "SIZE", -1)


def _decode_payload(
    spec: RequestSpec, body: memoryview, is_reply: bool, xen: bool, postcopy: bool
) -> tuple[Payload | None, bool]:
    """Decode the body; return the payload and whether it is an alternative form."""
    if is_reply:
        candidates = (spec.reply_payload, *spec.reply_payload_alt)
        primary = 0
    elif postcopy and spec.postcopy_payload is not None:
        candidates = (spec.postcopy_payload, spec.payload)  # the u64 ack fits size 8 only
        primary = 1
    else:
        candidates = (spec.payload,)
        primary = 0
    size = len(body)
    for position, cls in enumerate(candidates):
        if _fits(cls, size, xen):
            alt = position != primary
            if cls is None:
                return None, alt
            return cls.from_bytes(body, spec.name, xen), alt
    main = candidates[primary]
    if main is None:
        raise WireError(spec.name, "size", size, "0 bytes", "VU-FRAME-006")
    main.from_bytes(body, spec.name, xen)  # raises the precise size error
    raise WireError(spec.name, "size", size, f"a {main.__name__}", "VU-FRAME-006")


def _expected_fds(spec: RequestSpec, payload: Payload | None, is_reply: bool, alt: bool) -> str:
    """Return the allowed fd count as text ("0", "1", "0-1") for this message."""
    rule = spec.reply_fds if is_reply else spec.fds
    if alt and not is_reply:
        return "0"  # the postcopy acknowledgement carries no fd
    if rule == "n":
        return str(len(payload.regions)) if isinstance(payload, VhostUserMemory) else "0"
    if rule == "nofd-bit":
        return "0" if getattr(payload, "nofd", False) else "1"
    if is_reply and isinstance(payload, VhostUserInflight) and payload.mmap_size == 0:
        return "0"  # GET_INFLIGHT_FD reply without a buffer
    if is_reply and spec.code == FrontendReq.SET_DEVICE_STATE_FD and spec.channel is Channel.MAIN:
        value = payload.value if isinstance(payload, VhostUserU64) else 0
        return "0" if value & (VRING_NOFD_MASK | VRING_IDX_MASK) else "1"
    return rule


def _check_fds(
    spec: RequestSpec, payload: Payload | None, is_reply: bool, alt: bool, nfds: int
) -> None:
    expected = _expected_fds(spec, payload, is_reply, alt)
    rule = spec.reply_fd_rule if is_reply else spec.fd_rule
    if nfds > MAX_FDS:
        raise WireError(spec.name, "nfds", nfds, f"at most {MAX_FDS}", "VU-FRAME-008")
    if expected == "0-1":
        if nfds > 1:
            raise WireError(spec.name, "nfds", nfds, "0 or 1", rule)
    elif nfds != int(expected):
        raise WireError(spec.name, "nfds", nfds, f"exactly {expected}", rule)


def decode_message(
    request: int,
    flags: int,
    raw: bytes,
    *,
    channel: Channel = Channel.MAIN,
    fds: tuple[int, ...] = (),
    nfds: int | None = None,
    xen: bool = False,
    postcopy: bool = False,
) -> Message:
    """Decode one whole message (``raw`` = header + payload) and check it.

    On any error the fds are closed and the message comes back with ``error``
    set. ``nfds`` overrides ``len(fds)`` for the fd-count rules (transcripts
    record the count but not the fds).
    """
    count = len(fds) if nfds is None else nfds
    try:
        name = request_name(request, channel)
        if flags & VERSION_MASK != HeaderFlags.VERSION_1:
            raise WireError(name, "flags", flags, "version bits = 1", "VU-FRAME-001")
        if flags & RESERVED_FLAGS_MASK:
            raise WireError(name, "flags", flags, "bits 4-31 clear", "VU-FRAME-002")
        spec = request_spec(request, channel)
        if spec is None:
            last = len(FrontendReq) if channel is Channel.MAIN else len(BackendReq)
            raise WireError(name, "request", request, f"1..{last}", "VU-FRAME-004")
        is_reply = bool(flags & HeaderFlags.REPLY)
        payload, alt = _decode_payload(spec, memoryview(raw)[HEADER_SIZE:], is_reply, xen, postcopy)
        if not is_reply and not alt:
            for check in spec.checks:
                value = getattr(payload, check.field)
                if not check.allows(value):
                    raise WireError(name, check.field, value, check.describe(), check.rule)
        _check_fds(spec, payload, is_reply, alt, count)
    except WireError as exc:
        _close_fds(fds)
        return Message(request, flags, None, (), raw, channel, exc)
    return Message(request, flags, payload, fds, raw, channel, None)


@attrs.frozen
class Unframed:
    """Bytes a relay passes on uncut: the stream lost its framing at an oversized header.

    ``request`` and ``size`` are the header fields that broke framing; ``fds``
    are every fd held when it broke (then the fds that came with ``data``).
    """

    data: bytes
    fds: tuple[int, ...]
    request: int
    size: int


class Decoder:
    """Incremental decoder: complete messages across partial reads, many per read.

    It owns the fds fed to it until it hands them out in a message. fds go to
    the last message whose header starts in the chunk they came with (Linux
    ends a read with the segment that carried fds), else to the message in
    progress. How memory regions are read follows the protocol features its
    owner says were acked (`follow`); nobody sets its flags one by one.

    Args:
        channel: the channel whose requests and replies it decodes.
        max_payload: a size field above it breaks framing (VU-FRAME-005).
        postcopy: decode the postcopy acknowledgements of SET_MEM_TABLE / ADD_MEM_REG.
    """

    def __init__(
        self,
        channel: Channel = Channel.MAIN,
        *,
        max_payload: int = MAX_PAYLOAD,
        postcopy: bool = False,
    ) -> None:
        self.channel = channel
        self.max_payload = max_payload
        self._acked = 0  # the protocol features regions are decoded by
        self._postcopy = postcopy
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0]
        self._fds_at: dict[int, list[int]] = {}
        self._failed: FramingError | None = None
        self._lost: Unframed | None = None  # what followed the header that broke framing
        self._broken: tuple[int, int] | None = None  # (request, size) that broke framing

    @property
    def xen_mmap(self) -> bool:
        """Whether memory regions are decoded in their Xen form."""
        return bool(self._acked & ProtocolFeature.XEN_MMAP)

    @property
    def acked_protocol_features(self) -> int:
        """The protocol features the decoder follows (`follow`, or what a relay passed)."""
        return self._acked

    @property
    def postcopy(self) -> bool:
        """Whether postcopy acknowledgements are decoded."""
        return self._postcopy

    def follow(self, acked_protocol_features: int) -> None:
        """Decode what follows as the acked protocol features say (XEN_MMAP: Xen regions)."""
        self._acked = acked_protocol_features

    def feed(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> list[Message]:
        """Add received bytes (and their fds); return every message now complete.

        Raises:
            FramingError: a size field beyond ``max_payload`` (the stream is lost).
        """
        if self._failed is not None:
            _close_fds(fds)
            raise self._failed
        out: list[Message] = []
        try:
            for request, flags, raw, held in self._cut(data, fds):
                out.append(self._decode(request, flags, raw, held))
        except FramingError:
            for msg in out:
                _close_fds(msg.fds)
            if self._lost is not None:
                _close_fds(self._lost.fds)
                self._lost = None
            raise
        return out

    def relay(
        self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()
    ) -> list[Message | Unframed]:
        """Like `feed`, for a relay that passes every byte and fd on unchanged.

        A malformed message keeps its fds (its ``error`` says what is wrong);
        after a framing loss the rest of the stream comes out as `Unframed`.
        A relay has no session deciding what was negotiated: the protocol
        features a SET_PROTOCOL_FEATURES request acks are followed as it passes.
        """
        if self._broken is not None:
            return [Unframed(bytes(data), tuple(fds), *self._broken)]
        if self._failed is not None:
            _close_fds(fds)
            raise self._failed
        out: list[Message | Unframed] = []
        try:
            for request, flags, raw, held in self._cut(data, fds):
                msg = decode_message(
                    request,
                    flags,
                    raw,
                    channel=self.channel,
                    nfds=len(held),
                    xen=self.xen_mmap,
                    postcopy=self._postcopy,
                )
                out.append(attrs.evolve(msg, fds=held))
                if (
                    msg.req is FrontendReq.SET_PROTOCOL_FEATURES
                    and not msg.is_reply
                    and isinstance(msg.payload, VhostUserU64)
                ):
                    self.follow(msg.payload.value)
        except FramingError:
            assert self._lost is not None
            out.append(self._lost)
            self._lost = None
        return out

    def _decode(self, request: int, flags: int, raw: bytes, held: tuple[int, ...]) -> Message:
        return decode_message(
            request,
            flags,
            raw,
            channel=self.channel,
            fds=held,
            xen=self.xen_mmap,
            postcopy=self._postcopy,
        )

    def _cut(
        self, data: bytes | bytearray | memoryview, fds: Sequence[int]
    ) -> Iterator[tuple[int, int, bytes, tuple[int, ...]]]:
        """Yield (request, flags, header + payload, fds) of each whole message, in order."""
        buf = self._buf
        chunk_start = len(buf)
        buf += data
        if fds:
            self._attach(chunk_start, list(fds))
        pos = 0
        try:
            while len(buf) - pos >= HEADER_SIZE:
                request, flags, size = HEADER.unpack_from(buf, pos)
                if size > self.max_payload:
                    self._fail(request, size, pos)
                end = pos + HEADER_SIZE + size
                if end > len(buf):
                    break
                held = self._fds_at.pop(self._base + pos, None)
                yield request, flags, bytes(buf[pos:end]), tuple(held) if held else ()
                pos = end
        finally:
            if pos and self._failed is None:
                del buf[:pos]
                self._base += pos

    def _attach(self, chunk_start: int, fds: list[int]) -> None:
        """Hold ``fds`` for the last message whose header starts in the new chunk."""
        buf = self._buf
        target = 0  # the message in progress (or the next one when the buffer is empty)
        pos = 0
        while pos < len(buf):
            if pos >= chunk_start:
                target = pos
            if len(buf) - pos < HEADER_SIZE:
                break
            size = HEADER.unpack_from(buf, pos)[2]
            if size > self.max_payload:
                break
            pos += HEADER_SIZE + size
        self._fds_at.setdefault(self._base + target, []).extend(fds)

    def _fail(self, request: int, size: int, pos: int) -> NoReturn:
        name = request_name(request, self.channel)
        error = FramingError(name, "size", size, f"0..{self.max_payload}", "VU-FRAME-005")
        self._failed = error
        self._broken = (request, size)
        held = tuple(fd for fds in self._fds_at.values() for fd in fds)
        self._lost = Unframed(bytes(self._buf[pos:]), held, request, size)
        self._fds_at.clear()
        self._buf.clear()
        raise error

    def _release(self) -> None:
        for held in self._fds_at.values():
            _close_fds(held)
        self._fds_at.clear()
        self._buf.clear()

    @property
    def buffered(self) -> int:
        """Number of bytes of an incomplete message held."""
        return len(self._buf)

    def close(self) -> None:
        """Close every fd still held; raise FramingError if a message was cut short."""
        partial = len(self._buf)
        self._release()
        if partial and self._failed is None:
            self._failed = FramingError(
                "-", "buffered", partial, "0 bytes at end of stream", "VU-FRAME-007"
            )
            raise self._failed


def encode(msg: Message) -> bytes:
    """Return the header and payload bytes of a message (fds travel separately)."""
    body = msg.payload.to_bytes() if msg.payload is not None else b""
    return HEADER.pack(msg.request, msg.flags, len(body)) + body


def _channel_of(req: int, channel: Channel | None) -> Channel:
    if channel is not None:
        return channel
    return Channel.BACKEND if isinstance(req, BackendReq) else Channel.MAIN


def make_request(
    req: int,
    payload: Payload | None = None,
    *,
    need_reply: bool = False,
    fds: Sequence[int] = (),
    channel: Channel | None = None,
) -> Message:
    """Build a request (flags 0x1, or 0x9 with NEED_REPLY); channel from the enum type."""
    flags = HeaderFlags.VERSION_1 | (HeaderFlags.NEED_REPLY if need_reply else 0)
    return Message(int(req), int(flags), payload, tuple(fds), b"", _channel_of(req, channel))


def make_reply(
    req: int,
    payload: Payload | None = None,
    *,
    fds: Sequence[int] = (),
    channel: Channel | None = None,
) -> Message:
    """Build a reply: flags exactly 0x5, same request code."""
    return Message(int(req), int(REPLY_FLAGS), payload, tuple(fds), b"", _channel_of(req, channel))

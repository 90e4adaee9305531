"""Message framing (digest §2, §11.1): the 12-byte header and an incremental decoder.

Sans-IO: :class:`Decoder` takes the bytes and fds a transport received and
returns :class:`Message` objects; :func:`encode` turns a message into bytes.
Payload types, fd counts and reply rules come from ``specs/requests.yaml``.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Sequence
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


class Decoder:
    """Incremental decoder: complete messages across partial reads, many per read.

    It owns the fds fed to it until it hands them out in a message. fds go to
    the last message whose header starts in the chunk they came with (Linux
    ends a read with the segment that carried fds), else to the message in
    progress.
    """

    def __init__(self, channel: Channel = Channel.MAIN, *, max_payload: int = MAX_PAYLOAD) -> None:
        self.channel = channel
        self.max_payload = max_payload
        self.xen_mmap = False
        self.postcopy = False
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0]
        self._fds_at: dict[int, list[int]] = {}
        self._failed: FramingError | None = None

    def feed(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> list[Message]:
        """Add received bytes (and their fds); return every message now complete."""
        if self._failed is not None:
            _close_fds(fds)
            raise self._failed
        buf = self._buf
        chunk_start = len(buf)
        buf += data
        if fds:
            self._attach(chunk_start, list(fds))
        out: list[Message] = []
        pos = 0
        end_of_data = len(buf)
        while end_of_data - pos >= HEADER_SIZE:
            request, flags, size = HEADER.unpack_from(buf, pos)
            if size > self.max_payload:
                for msg in out:
                    _close_fds(msg.fds)
                self._fail(request, size)
            end = pos + HEADER_SIZE + size
            if end > end_of_data:
                break
            held = self._fds_at.pop(self._base + pos, None)
            out.append(
                decode_message(
                    request,
                    flags,
                    bytes(buf[pos:end]),
                    channel=self.channel,
                    fds=tuple(held) if held else (),
                    xen=self.xen_mmap,
                    postcopy=self.postcopy,
                )
            )
            pos = end
        if pos:
            del buf[:pos]
            self._base += pos
        return out

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

    def _fail(self, request: int, size: int) -> NoReturn:
        name = request_name(request, self.channel)
        error = FramingError(name, "size", size, f"0..{self.max_payload}", "VU-FRAME-005")
        self._failed = error
        self._release()
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

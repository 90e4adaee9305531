"""JSON forms of payloads and messages: strict cattrs conversion and transcript records.

The record format is the one of ``tests/data/README.md`` (one JSON object per
message). ``payload`` (hex) is authoritative; ``decoded`` is a readable helper
with feature names and hexadecimal addresses, never read back.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntFlag
from typing import Any
from uuid import UUID

import attrs
import cattrs
from cattrs.preconf.json import make_converter

from vhsm.errors import VhsmError
from vhsm.wire.enums import (
    Channel,
    DeviceStatus,
    FrontendReq,
    HeaderFlags,
    ProtocolFeature,
    VirtioFeature,
    feature_names,
    request_name,
)
from vhsm.wire.framing import HEADER, Message, decode_message
from vhsm.wire.payloads import (
    PAYLOAD_CLASSES,
    Payload,
    VhostUserU64,
    VhostUserVringFd,
)

__all__ = [
    "RecordError",
    "converter",
    "describe_payload",
    "message_to_record",
    "payload_from_dict",
    "payload_to_dict",
    "record_to_message",
]


class RecordError(VhsmError, ValueError):
    """A JSON payload or transcript record that does not have the expected shape or types."""


def _strict_int(value: object, _type: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _strict_bool(value: object, _type: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r}")
    return value


def _strict_float(value: object, _type: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _strict_str(value: object, _type: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _hex_bytes(value: object, _type: object) -> bytes:
    return bytes.fromhex(_strict_str(value, _type))


def _uuid(value: object, _type: object) -> UUID:
    return UUID(_strict_str(value, _type))


def _make_converter() -> cattrs.Converter:
    conv = make_converter(forbid_extra_keys=True)
    conv.register_structure_hook(int, _strict_int)
    conv.register_structure_hook(bool, _strict_bool)
    conv.register_structure_hook(float, _strict_float)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook(bytes, _hex_bytes)
    conv.register_unstructure_hook(bytes, bytes.hex)
    conv.register_structure_hook(UUID, _uuid)
    conv.register_unstructure_hook(UUID, str)
    return conv


converter = _make_converter()
"""The strict converter: ``"12"`` is not an int and ``"false"`` is not a bool."""


def payload_to_dict(payload: Payload) -> dict[str, Any]:
    """Return the JSON-ready field dict of a payload (bytes as hex, UUID as text)."""
    result: dict[str, Any] = converter.unstructure(payload)
    return result


def payload_from_dict(cls_name: str, d: dict[str, Any]) -> Payload:
    """Build a payload of class ``cls_name`` from its field dict, strictly typed."""
    cls = PAYLOAD_CLASSES.get(cls_name)
    if cls is None:
        raise RecordError(f"unknown payload class {cls_name!r}")
    try:
        payload: Payload = converter.structure(d, cls)
    except (cattrs.BaseValidationError, ValueError, TypeError) as exc:
        raise RecordError(f"{cls_name}: {_explain(exc)}") from exc
    return payload


def _explain(exc: BaseException) -> str:
    if isinstance(exc, cattrs.BaseValidationError):
        return "; ".join(cattrs.transform_error(exc))
    return str(exc)


_HEX_FIELDS = frozenset(
    {
        "guest_phys_addr",
        "memory_size",
        "userspace_addr",
        "mmap_offset",
        "mmap_size",
        "desc_user_addr",
        "used_user_addr",
        "avail_user_addr",
        "log_guest_addr",
        "iova",
        "uaddr",
        "fd_offset",
        "shm_offset",
        "len",
        "offset",
        "u64",
    }
)
_FEATURE_WORDS: dict[int, tuple[type[IntFlag], ...]] = {
    FrontendReq.GET_FEATURES: (VirtioFeature,),
    FrontendReq.SET_FEATURES: (VirtioFeature,),
    FrontendReq.GET_PROTOCOL_FEATURES: (ProtocolFeature,),
    FrontendReq.SET_PROTOCOL_FEATURES: (ProtocolFeature,),
    FrontendReq.GET_STATUS: (DeviceStatus,),
    FrontendReq.SET_STATUS: (DeviceStatus,),
}


def _hexify(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: hex(v) if k in _HEX_FIELDS and isinstance(v, int) else _hexify(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_hexify(v) for v in value]
    return value


def describe_payload(
    msg: Message, device_features: Iterable[type[IntFlag]] = ()
) -> dict[str, Any] | None:
    """Return the readable ``decoded`` helper of a message, None when it has no payload."""
    if msg.error is not None:
        return {"error": msg.error.rule_id, "detail": msg.error.detail}
    payload = msg.payload
    if payload is None:
        return None
    if isinstance(payload, VhostUserVringFd):
        return {"index": payload.index, "nofd": payload.nofd}
    if isinstance(payload, VhostUserU64):
        enums = _FEATURE_WORDS.get(msg.request) if msg.channel is Channel.MAIN else None
        if enums is None:
            return {"u64": payload.value}
        if enums[0] is VirtioFeature:
            enums = (*device_features, VirtioFeature)
        return {"u64": hex(payload.value), "bits": feature_names(payload.value, *enums)}
    described: dict[str, Any] = _hexify(payload_to_dict(payload))
    return described


def message_to_record(
    msg: Message,
    *,
    direction: str,
    t: float,
    conn: int,
    nfds: int | None = None,
    device_features: Iterable[type[IntFlag]] = (),
) -> dict[str, Any]:
    """Return the transcript line of a message (``nfds`` overrides ``len(msg.fds)``)."""
    if msg.raw:
        body = msg.raw[HEADER.size :]
    else:
        body = msg.payload.to_bytes() if msg.payload is not None else b""
    record: dict[str, Any] = {
        "t": t,
        "conn": conn,
        "dir": direction,
        "req": msg.request,
        "name": msg.name,
        "flags": hex(msg.flags),
        "reply": msg.is_reply,
        "need_reply": msg.need_reply,
        "size": len(body),
        "nfds": len(msg.fds) if nfds is None else nfds,
        "payload": body.hex(),
    }
    if msg.channel is not Channel.MAIN:
        record["channel"] = msg.channel.value
    decoded = describe_payload(msg, device_features)
    if decoded is not None:
        record["decoded"] = decoded
    return record


@attrs.frozen
class _Record:
    t: float
    conn: int
    dir: str
    req: int
    name: str
    flags: str
    reply: bool
    need_reply: bool
    size: int
    nfds: int
    payload: str
    decoded: dict[str, Any] | None = None
    channel: str = "main"


def record_to_message(d: dict[str, Any], *, xen: bool = False, postcopy: bool = False) -> Message:
    """Rebuild a message from a transcript line (``fds=()``; the count stays in the record).

    The payload is decoded from its hex with the same checks as the live
    decoder (fd rules use the record's ``nfds``); a malformed payload gives a
    message with ``error`` set, a malformed record raises :class:`RecordError`.
    """
    try:
        rec = converter.structure(d, _Record)
        channel = Channel(rec.channel)
        flags = int(rec.flags, 16)
        body = bytes.fromhex(rec.payload)
    except (cattrs.BaseValidationError, ValueError, TypeError) as exc:
        raise RecordError(f"bad record: {_explain(exc)}") from exc
    expected = {
        "reply": bool(flags & HeaderFlags.REPLY),
        "need_reply": bool(flags & HeaderFlags.NEED_REPLY),
        "size": len(body),
        "name": request_name(rec.req, channel),
    }
    for key, value in expected.items():
        if getattr(rec, key) != value:
            raise RecordError(f"record field {key}={getattr(rec, key)!r} contradicts {value!r}")
    raw = HEADER.pack(rec.req, flags, len(body)) + body
    return decode_message(
        rec.req, flags, raw, channel=channel, nfds=rec.nfds, xen=xen, postcopy=postcopy
    )

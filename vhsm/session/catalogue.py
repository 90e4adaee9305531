"""The request catalogue of ``specs/requests.yaml``, as the session reads it."""

from __future__ import annotations

import functools
from typing import Any, Literal

import attrs

from vhsm.specs import load_spec
from vhsm.wire import VirtioFeature


@attrs.frozen
class Gate:
    """What must be negotiated before a request is legal.

    kind: "protocol" (a protocol feature acked), "virtio" (a virtio bit acked),
    "protocol_features_in_use" (VHOST_USER_F_PROTOCOL_FEATURES in use, §7.2) or
    "offered" (the back-end offers a bit; checked by a named condition instead).
    """

    kind: Literal["protocol", "virtio", "protocol_features_in_use", "offered"]
    feature: str

    @property
    def mask(self) -> int:
        """The virtio bit mask for "virtio" gates."""
        return int(VirtioFeature[self.feature])


@attrs.frozen
class RequestInfo:
    """One catalogue entry: the facts the session needs about a request."""

    code: int
    name: str
    reply: Literal["always", "ack", "never"]
    gate: Gate | None
    section: str

    @property
    def trigger(self) -> str:
        """The machine trigger named after the request."""
        return self.name.lower()


def _gate(raw: Any) -> Gate | None:
    if not raw:
        return None
    (kind, feature), *_ = raw.items()
    if kind == "virtio" and feature == "PROTOCOL_FEATURES":
        return Gate("protocol_features_in_use", feature)
    if kind not in ("protocol", "virtio"):
        return Gate("offered", str(feature))
    return Gate(kind, str(feature))


@functools.cache
def frontend_catalogue() -> dict[int, RequestInfo]:
    """Front-end requests (main channel) by code."""
    return _catalogue("frontend")


@functools.cache
def backend_catalogue() -> dict[int, RequestInfo]:
    """Back-end requests (back-end channel) by code."""
    return _catalogue("backend")


def _catalogue(side: str) -> dict[int, RequestInfo]:
    entries = load_spec("requests")[side]
    return {
        int(e["code"]): RequestInfo(
            code=int(e["code"]),
            name=e["name"],
            reply=e["reply"],
            gate=_gate(e.get("gate")),
            section=str(e.get("section", "")),
        )
        for e in entries
    }

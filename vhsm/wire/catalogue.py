"""Typed, validated view of ``specs/requests.yaml``: one :class:`RequestSpec` per request."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import attrs

from vhsm.errors import VhsmError
from vhsm.specs import load_spec
from vhsm.wire.enums import BackendReq, Channel, FrontendReq, ProtocolFeature, VirtioFeature
from vhsm.wire.payloads import PAYLOAD_CLASSES, Payload

FD_RULES = frozenset({"0", "1", "n", "0-1", "nofd-bit"})
REPLY_RULES = frozenset({"always", "ack", "never"})
DEFAULT_FD_RULE = "VU-FRAME-008"
DEFAULT_GATE_RULE = "VU-NEG-002"


@attrs.frozen
class Check:
    """A stateless range check on one payload field of a request."""

    field: str
    rule: str
    values: frozenset[int] | None = None
    lo: int = 0
    hi: int = 0

    def allows(self, value: int) -> bool:
        """Return whether ``value`` passes."""
        if self.values is not None:
            return value in self.values
        return self.lo <= value <= self.hi

    def describe(self) -> str:
        """Return the allowed values as text for error messages."""
        if self.values is not None:
            return " or ".join(str(v) for v in sorted(self.values))
        return f"{self.lo}..{self.hi}"


@attrs.frozen
class RequestSpec:
    """One catalogue entry (see the key reference at the top of ``specs/requests.yaml``)."""

    code: int
    name: str
    channel: Channel
    payload: type[Payload] | None
    reply: str
    reply_payload: type[Payload] | None
    fds: str
    reply_fds: str
    gate: Mapping[str, str] | None
    section: str
    summary: str
    gate_rule: str = DEFAULT_GATE_RULE
    fd_rule: str = DEFAULT_FD_RULE
    reply_fd_rule: str = DEFAULT_FD_RULE
    reply_payload_alt: tuple[type[Payload] | None, ...] = ()
    postcopy_payload: type[Payload] | None = None
    checks: tuple[Check, ...] = ()
    note: str = ""

    @property
    def gate_protocol(self) -> ProtocolFeature | None:
        """The protocol feature that gates the request, if any."""
        if self.gate and "protocol" in self.gate:
            return ProtocolFeature[self.gate["protocol"]]
        return None


def _payload_class(name: object, where: str) -> type[Payload] | None:
    if name is None:
        return None
    if not isinstance(name, str) or name not in PAYLOAD_CLASSES:
        raise VhsmError(f"requests.yaml {where}: unknown payload class {name!r}")
    return PAYLOAD_CLASSES[name]


def _check(raw: Mapping[str, Any], where: str) -> Check:
    if "in" in raw:
        return Check(raw["field"], raw["rule"], values=frozenset(raw["in"]))
    lo, hi = raw["range"]
    return Check(raw["field"], raw["rule"], lo=lo, hi=hi)


def _entry(raw: Mapping[str, Any], channel: Channel) -> RequestSpec:
    where = f"{channel.value} {raw.get('name')}"
    codes: type[FrontendReq] | type[BackendReq] = (
        FrontendReq if channel is Channel.MAIN else BackendReq
    )
    if codes(raw["code"]).name != raw["name"]:
        raise VhsmError(f"requests.yaml {where}: code {raw['code']} has another name")
    if raw["reply"] not in REPLY_RULES or {raw["fds"], raw["reply_fds"]} - FD_RULES:
        raise VhsmError(f"requests.yaml {where}: bad reply or fds rule")
    gate = raw.get("gate")
    if gate is not None:
        (kind, name), *rest = gate.items()
        members = {
            "protocol": ProtocolFeature.__members__,
            "virtio": VirtioFeature.__members__,
            "offered": VirtioFeature.__members__,
        }
        known = name.count(".") == 1 if kind == "state" else name in members.get(kind, {})
        if rest or not known:
            raise VhsmError(f"requests.yaml {where}: bad gate {gate!r}")
    return RequestSpec(
        code=raw["code"],
        name=raw["name"],
        channel=channel,
        payload=_payload_class(raw["payload"], where),
        reply=raw["reply"],
        reply_payload=_payload_class(raw["reply_payload"], where),
        fds=raw["fds"],
        reply_fds=raw["reply_fds"],
        gate=gate,
        gate_rule=raw.get("gate_rule", DEFAULT_GATE_RULE),
        section=str(raw["section"]),
        summary=raw["summary"],
        fd_rule=raw.get("fd_rule", DEFAULT_FD_RULE),
        reply_fd_rule=raw.get("reply_fd_rule", DEFAULT_FD_RULE),
        reply_payload_alt=tuple(
            _payload_class(name, where) for name in raw.get("reply_payload_alt", ())
        ),
        postcopy_payload=_payload_class(raw.get("postcopy_payload"), where),
        checks=tuple(_check(c, where) for c in raw.get("checks", ())),
        note=raw.get("note", ""),
    )


@functools.cache
def catalogue(channel: Channel = Channel.MAIN) -> Mapping[int, RequestSpec]:
    """Return the requests of a channel by code, loaded and checked once."""
    key = "frontend" if channel is Channel.MAIN else "backend"
    return {raw["code"]: _entry(raw, channel) for raw in load_spec("requests")[key]}


def request_spec(code: int, channel: Channel = Channel.MAIN) -> RequestSpec | None:
    """Return the catalogue entry of a request code, None when the code is unknown."""
    return catalogue(channel).get(code)

"""The exception hierarchy: one root, one class per party at fault."""

from __future__ import annotations


class VhsmError(Exception):
    """Root of every error vhsm raises on purpose."""


class ProtocolViolation(VhsmError):
    """The front-end (or, in an audit, any peer) broke a rule of the protocol.

    Carries the stable rule id from ``specs/rules.yaml`` so the runtime, the
    logs and the auditor all name the same rule.
    """

    def __init__(self, rule_id: str, request: str, state: str, detail: str) -> None:
        self.rule_id = rule_id
        self.request = request
        self.state = state
        self.detail = detail
        super().__init__(f"{rule_id}: {request} in state {state}: {detail}")


class WireError(ProtocolViolation, ValueError):
    """A message or payload that cannot be decoded: names request, field, value and range."""

    def __init__(
        self,
        request: str,
        field: str,
        value: object,
        allowed: str,
        rule_id: str = "VU-FRAME-006",
    ) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        shown = hex(value) if isinstance(value, int) and value > 9 else repr(value)
        super().__init__(rule_id, request, "-", f"field {field}={shown}, allowed {allowed}")


class FramingError(WireError):
    """The byte stream cannot be resynchronised: the connection must be closed."""


class BackendError(VhsmError):
    """A back-end hook failed (raised, or returned something unusable)."""


class GuestMemoryError(VhsmError, ValueError):
    """A guest address range is not wholly inside one mapped region, or a region is unusable.

    `rule_id` names the broken rule when the front-end is at fault (VU-MEM-...).
    """

    def __init__(self, detail: str, rule_id: str | None = None) -> None:
        self.rule_id = rule_id
        super().__init__(detail)


class VirtqError(VhsmError, ValueError):
    """The guest wrote something invalid into a virtqueue (a bad descriptor chain...)."""

    #: The rule the guest broke: rings and descriptor chains are valid.
    rule_id = "VU-RING-009"

    def __init__(self, queue: int, detail: str, head: int | None = None) -> None:
        self.queue = queue
        self.head = head
        self.detail = detail
        where = f"queue {queue}" + (f" head {head}" if head is not None else "")
        super().__init__(f"{where}: {detail}")

"""What every condition and callback reads from a trigger's `EventData`.

Conditions and callbacks are plain functions ``(session, event)``; each machine's
module lists them in an explicit table (`Handlers`), which `vhsm.session.dispatch`
gathers and a test holds against the YAML. No name is looked up with `getattr`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, TypeVar

import attrs
from transitions import EventData

from vhsm.wire import Message

if TYPE_CHECKING:
    from vhsm.session.session import Session

P = TypeVar("P")

Condition = Callable[["Session", EventData], bool]
Callback = Callable[["Session", EventData], None]


@attrs.frozen
class Handlers:
    """One machine's named conditions and callbacks, as declared in its YAML."""

    conditions: Mapping[str, Condition] = attrs.field(factory=dict)
    callbacks: Mapping[str, Callback] = attrs.field(factory=dict)


def named(*handlers: Callback) -> dict[str, Callback]:
    """A table keyed by each function's name, the name the YAML gives it."""
    return {handler.__name__: handler for handler in handlers}


def checks(*conditions: Condition) -> dict[str, Condition]:
    """A table of conditions keyed by each function's name, the name the YAML gives it."""
    return {condition.__name__: condition for condition in conditions}


def msg_of(event: EventData) -> Message:
    """The request being handled."""
    msg: Message = event.kwargs["msg"]
    return msg


def payload_of(event: EventData, cls: type[P]) -> P:
    """The message's payload as the class the catalogue gives its request."""
    payload = msg_of(event).payload
    if not isinstance(payload, cls):  # the decoder guarantees it; a bug otherwise
        raise TypeError(f"{msg_of(event).name}: payload {payload!r} is not a {cls.__name__}")
    return payload


def ring_of(event: EventData) -> int:
    """The ring index of the vring model an event concerns."""
    return int(getattr(event.model, "index", -1))


def num_of(event: EventData) -> int:
    """The ``num`` of a ring-state payload (0 when absent)."""
    return int(getattr(msg_of(event).payload, "num", 0))


def value_of(event: EventData) -> int:
    """The ``value`` of a u64 payload (0 when absent: RESET_DEVICE has none)."""
    return int(getattr(msg_of(event).payload, "value", 0))

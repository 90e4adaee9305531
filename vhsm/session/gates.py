"""The gates of ``specs/requests.yaml``, evaluated from the declaration.

A request's ``gate`` names what makes it legal and its ``gate_rule`` the rule
broken otherwise. One table maps each gate kind to the test it stands for:

- ``protocol: X`` — protocol feature X was negotiated (SET_PROTOCOL_FEATURES);
- ``virtio: X`` — virtio feature X was acked (SET_FEATURES);
- ``offered: X`` — the back-end offers virtio feature X (GET_FEATURES);
- ``state: machine.STATE`` — that machine of the session is in that state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from vhsm.wire import ProtocolFeature, RequestSpec, VirtioFeature

if TYPE_CHECKING:
    from vhsm.session.session import Session


def _protocol(s: Session, name: str) -> bool:
    return bool(s.acked_protocol_features & ProtocolFeature[name])


def _virtio(s: Session, name: str) -> bool:
    return bool(s.acked_features & VirtioFeature[name])


def _offered(s: Session, name: str) -> bool:
    return bool(s.offered_features & VirtioFeature[name])


def _state(s: Session, name: str) -> bool:
    machine, state = name.split(".")
    return s.machine_state(machine).name == state


#: What each gate kind tests, and how its violation reads.
GATE_KINDS: dict[str, tuple[Callable[[Session, str], bool], str]] = {
    "protocol": (_protocol, "needs protocol feature {} negotiated"),
    "virtio": (_virtio, "needs virtio feature {} negotiated"),
    "offered": (_offered, "needs the back-end to offer {}"),
    "state": (_state, "needs {}"),
}


def gate_violation(s: Session, info: RequestSpec) -> tuple[str, str] | None:
    """(rule id, detail) when the request's gate is closed, else None."""
    if not info.gate:
        return None
    ((kind, name),) = info.gate.items()
    test, detail = GATE_KINDS[kind]
    return None if test(s, name) else (info.gate_rule, detail.format(name))

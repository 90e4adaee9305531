"""Conditions and callbacks of the ownership, virtio-feature and protocol-feature machines."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from transitions import EventData

from vhsm.session.events import Handlers, checks, msg_of, named, value_of
from vhsm.session.machines import load_machine_spec
from vhsm.wire import ProtocolFeature, VhostUserU64, VirtioFeature, feature_names

if TYPE_CHECKING:
    from vhsm.session.session import Session

PF = ProtocolFeature


@functools.cache
def tolerated_unoffered() -> int:
    """Bits real front-ends ack without their being offered (features.yaml)."""
    bits = load_machine_spec("features").conditions["acks_offered_bits"]["tolerated_unoffered"]
    return sum(1 << int(bit) for bit in bits)


def _unoffered(s: Session, event: EventData) -> int:
    return value_of(event) & ~s.offered_features


# --- ownership -------------------------------------------------------------------------
def first_set_owner(s: Session, event: EventData) -> bool:
    """Only reached in OWNED: a second SET_OWNER (its rule warns)."""
    return False


# --- virtio features -------------------------------------------------------------------
def acks_offered_bits(s: Session, event: EventData) -> bool:
    """No acked bit is un-offered, but for the tolerated ring bits."""
    unoffered = _unoffered(s, event) & ~tolerated_unoffered()
    if unoffered:
        s.guard_detail = "acked bits never offered: " + ", ".join(
            feature_names(unoffered, VirtioFeature)
        )
    return not unoffered


def acks_only_offered_bits(s: Session, event: EventData) -> bool:
    """None of the tolerated ring bits is acked without being offered."""
    unoffered = _unoffered(s, event) & tolerated_unoffered()
    if unoffered:
        s.guard_detail = "acked bits never offered: " + ", ".join(
            feature_names(unoffered, VirtioFeature)
        )
    return not unoffered


def acks_vf30_with_protocol_features(s: Session, event: EventData) -> bool:
    """Protocol features in use imply VHOST_USER_F_PROTOCOL_FEATURES acked."""
    return not s.protocol_features_in_use or bool(value_of(event) & VirtioFeature.PROTOCOL_FEATURES)


def rings_stopped(s: Session, event: EventData) -> bool:
    """No ring is started."""
    return not s.started_rings()


def rings_running(s: Session, event: EventData) -> bool:
    """At least one ring is started."""
    return bool(s.started_rings())


def changes_only_log_all(s: Session, event: EventData) -> bool:
    """The new word differs from the acked one in VHOST_F_LOG_ALL at most."""
    return (value_of(event) ^ s.acked_features) & ~VirtioFeature.LOG_ALL == 0


def reply_features(s: Session, event: EventData) -> None:
    """Answer the offered virtio and vhost bits."""
    s.reply_with(msg_of(event), VhostUserU64(s.offered_features))


def apply_features(s: Session, event: EventData) -> None:
    """Record the acked bits and apply them to the data plane and the device."""
    acked = value_of(event)
    s.acked_features = acked
    s.dataplane.set_features(acked)
    s.backend.acked_features(acked)
    s.backend.set_event_idx(bool(acked & VirtioFeature.RING_EVENT_IDX))


def forget_features(s: Session, event: EventData) -> None:
    """RESET_DEVICE: no feature is acked any more."""
    s.acked_features = 0


# --- protocol features -----------------------------------------------------------------
def sets_offered_bits(s: Session, event: EventData) -> bool:
    """Every protocol bit set was offered."""
    return value_of(event) & ~s.offered_protocol_features == 0


def inband_has_prerequisites(s: Session, event: EventData) -> bool:
    """INBAND_NOTIFICATIONS comes with REPLY_ACK and BACKEND_REQ."""
    bits, needed = value_of(event), PF.REPLY_ACK | PF.BACKEND_REQ
    return not bits & PF.INBAND_NOTIFICATIONS or bits & needed == needed


def inflight_extensions_have_prerequisites(s: Session, event: EventData) -> bool:
    """GET_VRING_BASE_INFLIGHT / SKIP_DRAIN need INFLIGHT_SHMFD; SKIP_DRAIN needs INFLIGHT."""
    bits = value_of(event)
    inflight, skip = PF.GET_VRING_BASE_INFLIGHT, PF.GET_VRING_BASE_SKIP_DRAIN
    if bits & (inflight | skip) and not bits & PF.INFLIGHT_SHMFD:
        return False
    return not (bits & skip and not bits & inflight)


def reply_protocol_features(s: Session, event: EventData) -> None:
    """Answer the offered protocol bits."""
    s.reply_with(msg_of(event), VhostUserU64(s.offered_protocol_features))


def apply_protocol_features(s: Session, event: EventData) -> None:
    """Record the protocol bits in use."""
    s.acked_protocol_features = value_of(event)


HANDLERS: dict[str, Handlers] = {
    "ownership": Handlers(conditions=checks(first_set_owner)),
    "features": Handlers(
        conditions=checks(
            acks_offered_bits,
            acks_only_offered_bits,
            acks_vf30_with_protocol_features,
            rings_stopped,
            rings_running,
            changes_only_log_all,
        ),
        callbacks=named(reply_features, apply_features, forget_features),
    ),
    "protocol_features": Handlers(
        conditions=checks(
            sets_offered_bits, inband_has_prerequisites, inflight_extensions_have_prerequisites
        ),
        callbacks=named(reply_protocol_features, apply_protocol_features),
    ),
}

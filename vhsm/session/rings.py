"""Conditions and callbacks of the per-vring machine (started/stopped x enabled/disabled)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from transitions import EventData

from vhsm.errors import GuestMemoryError
from vhsm.session.events import (
    Handlers,
    checks,
    msg_of,
    named,
    num_of,
    payload_of,
    ring_of,
    value_of,
)
from vhsm.session.machines import FeaturesState
from vhsm.wire import VhostUserVringAddr, VhostUserVringState, VirtioFeature

if TYPE_CHECKING:
    from vhsm.session.session import Session

log = logging.getLogger(__name__)


def features_acked(s: Session, event: EventData) -> bool:
    """SET_FEATURES came first."""
    return s.machine_state("features") is FeaturesState.ACKED


def features_acked_first(s: Session, event: EventData) -> bool:
    """SET_FEATURES came first (an enable before it is kept, with a finding)."""
    return features_acked(s, event)


def queue_size_valid(s: Session, event: EventData) -> bool:
    """A size the ring layout and the device can have (`check_queue_size` states the rule)."""
    from vhsm.virtq.common import check_queue_size  # numpy: with the first ring, not the session

    packed = bool(s.acked_features & VirtioFeature.RING_PACKED)
    try:
        check_queue_size(num_of(event), packed=packed, limit=s.backend.max_queue_size())
    except ValueError as exc:
        s.guard_detail = str(exc)
        return False
    return True


def packed_driver_area_aligned(s: Session, event: EventData) -> bool:
    """A packed ring's driver event area holds two 16-bit words: 4-byte aligned."""
    packed = s.acked_features & VirtioFeature.RING_PACKED
    return not packed or payload_of(event, VhostUserVringAddr).avail_user_addr % 4 == 0


def base_valid(s: Session, event: EventData) -> bool:
    """A split ring's base uses bits 0-15 only."""
    return bool(s.acked_features & VirtioFeature.RING_PACKED) or num_of(event) >> 16 == 0


def base_request_reserved_zero(s: Session, event: EventData) -> bool:
    """GET_VRING_BASE's num is reserved and zero."""
    return num_of(event) == 0


def enable_requested(s: Session, event: EventData) -> bool:
    """SET_VRING_ENABLE num 1."""
    return num_of(event) == 1


def disable_requested(s: Session, event: EventData) -> bool:
    """SET_VRING_ENABLE num 0."""
    return num_of(event) == 0


def lacks_protocol_features(s: Session, event: EventData) -> bool:
    """SET_FEATURES without VHOST_USER_F_PROTOCOL_FEATURES."""
    return not value_of(event) & VirtioFeature.PROTOCOL_FEATURES


def has_protocol_features(s: Session, event: EventData) -> bool:
    """SET_FEATURES with VHOST_USER_F_PROTOCOL_FEATURES."""
    return not lacks_protocol_features(s, event)


def configure_num(s: Session, event: EventData) -> None:
    """Store the ring size (a packed base set earlier may not fit the new size)."""
    with _ring_layout(s):
        s.dataplane.set_vring_num(ring_of(event), num_of(event))


def configure_addr(s: Session, event: EventData) -> None:
    """Store and translate the ring addresses (the ring may not fit at its base)."""
    with _ring_layout(s):
        s.dataplane.set_vring_addr(ring_of(event), payload_of(event, VhostUserVringAddr))


@contextlib.contextmanager
def _ring_layout(s: Session) -> Iterator[None]:
    """Turn a ring-layout change's failures into the rules they break.

    Ring memory the guest table does not cover breaks VU-RING-004; a ring that
    cannot be built from its size, addresses and base (a ValueError) VU-RING-005.
    """
    try:
        yield
    except GuestMemoryError as err:
        raise s.memory_violation(err, "VU-RING-004") from err
    except ValueError as err:
        raise s.violation("VU-RING-005", str(err)) from err


def configure_base(s: Session, event: EventData) -> None:
    """Store the next indices."""
    try:
        s.dataplane.set_vring_base(ring_of(event), num_of(event))
    except ValueError as err:  # a packed ring's index past its size
        raise s.violation("VU-RING-005", str(err)) from err


def configure_endian(s: Session, event: EventData) -> None:
    """Record the legacy ring endianness (vhsm rings are little-endian virtio 1.x)."""
    log.info("ring %d: legacy endianness %s", ring_of(event), "BE" if num_of(event) else "LE")


def _ring_fd(s: Session, event: EventData) -> int | None:
    msg = msg_of(event)
    if getattr(msg.payload, "nofd", False):
        return None
    (fd,) = s.take_fds(msg)
    return fd


def install_kick(s: Session, event: EventData) -> None:
    """Install the kick eventfd (None: poll the ring); a refused fd leaves the old one."""
    s.dataplane.set_vring_kick(ring_of(event), _ring_fd(s, event))


def start_ring(s: Session, event: EventData) -> None:
    """Mark the ring started and process what is already available."""
    s.dataplane.start_vring(ring_of(event))


def inband_kick(s: Session, event: EventData) -> None:
    """An in-band kick wakes the ring."""
    s.dataplane.kick_vring(ring_of(event))


def stop_ring(s: Session, event: EventData) -> None:
    """Stop and drain the ring, then report its base."""
    s.dataplane.stop_vring(ring_of(event))
    report_base(s, event)


def report_base(s: Session, event: EventData) -> None:
    """Answer the ring's index and base."""
    index = ring_of(event)
    s.reply_with(msg_of(event), VhostUserVringState(index, s.dataplane.get_vring_base(index)))


def enable_ring(s: Session, event: EventData) -> None:
    """Set the ring's enabled flag."""
    s.dataplane.enable_vring(ring_of(event), True)


def disable_ring(s: Session, event: EventData) -> None:
    """Clear the ring's enabled flag."""
    s.dataplane.enable_vring(ring_of(event), False)


def install_call(s: Session, event: EventData) -> None:
    """Install the used-buffer notifier."""
    s.dataplane.set_vring_call(ring_of(event), _ring_fd(s, event))


def install_err(s: Session, event: EventData) -> None:
    """Install the error notifier."""
    s.dataplane.set_vring_err(ring_of(event), _ring_fd(s, event))


def reset_ring(s: Session, event: EventData) -> None:
    """Back to the initial state, fds dropped."""
    s.dataplane.reset_vring(ring_of(event))


HANDLERS: dict[str, Handlers] = {
    "vring": Handlers(
        conditions=checks(
            features_acked,
            features_acked_first,
            queue_size_valid,
            packed_driver_area_aligned,
            base_valid,
            base_request_reserved_zero,
            enable_requested,
            disable_requested,
            lacks_protocol_features,
            has_protocol_features,
        ),
        callbacks=named(
            configure_num,
            configure_addr,
            configure_base,
            configure_endian,
            install_kick,
            start_ring,
            inband_kick,
            stop_ring,
            report_base,
            enable_ring,
            disable_ring,
            install_call,
            install_err,
            reset_ring,
        ),
    )
}

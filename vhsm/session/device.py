"""Conditions and callbacks of the device-side machines.

The back-end channel, the inflight region, the status byte, device-state
transfer, and the stateless device requests (config space, MTU, RARP, shared
objects, and the requests vhsm answers by policy).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from transitions import EventData

from vhsm.backend import get_config, set_config
from vhsm.errors import BackendError, GuestMemoryError
from vhsm.session.events import Handlers, checks, msg_of, named, payload_of, value_of
from vhsm.wire import (
    MAX_QUEUE_SIZE,
    VRING_NOFD_MASK,
    DeviceStatus,
    ProtocolFeature,
    VhostUserConfig,
    VhostUserInflight,
    VhostUserShared,
    VhostUserTransferDeviceState,
    VhostUserU64,
)

if TYPE_CHECKING:
    from vhsm.session.session import Session

log = logging.getLogger(__name__)


# --- back-end channel ------------------------------------------------------------------
def apply_backend_req_fd(s: Session, event: EventData) -> None:
    """Install (or replace) the back-end request channel."""
    (fd,) = s.take_fds(msg_of(event))
    s.dataplane.set_backend_req_fd(fd)


# --- inflight region -------------------------------------------------------------------
def no_ring_started(s: Session, event: EventData) -> bool:
    """No ring is started."""
    return not s.started_rings()


def geometry_fits_device(s: Session, event: EventData) -> bool:
    """The buffer a front-end makes us allocate or map is bounded by the device."""
    desc = payload_of(event, VhostUserInflight)
    queues, size = s.backend.num_queues(), min(MAX_QUEUE_SIZE, s.backend.max_queue_size())
    if desc.num_queues > queues or desc.queue_size > size:
        s.guard_detail = (
            f"{desc.num_queues} queues x {desc.queue_size} exceeds the device's {queues} x {size}"
        )
        return False
    return True


def reply_inflight_fd(s: Session, event: EventData) -> None:
    """Allocate the inflight buffer and answer its description and fd."""
    desc, fd = s.dataplane.get_inflight_fd(payload_of(event, VhostUserInflight))
    s.reply_with(msg_of(event), desc, (fd,) if fd >= 0 else ())


def apply_inflight_fd(s: Session, event: EventData) -> None:
    """Adopt the buffer handed back after a reconnect."""
    (fd,) = s.take_fds(msg_of(event))
    try:
        s.dataplane.set_inflight_fd(payload_of(event, VhostUserInflight), fd)
    except GuestMemoryError as err:
        raise s.memory_violation(err, "VU-PAY-003") from err


# --- device status ---------------------------------------------------------------------
def status_zero(s: Session, event: EventData) -> bool:
    """The status written is 0 (reset)."""
    return value_of(event) == 0


def status_nonzero(s: Session, event: EventData) -> bool:
    """The status written is not 0."""
    return value_of(event) != 0


def apply_status(s: Session, event: EventData) -> None:
    """Record the status byte (RESET_DEVICE carries none: 0)."""
    s.status = value_of(event)


def reset_device_status(s: Session, event: EventData) -> None:
    """A status of 0, or RESET_DEVICE, resets the device (after its rings)."""
    s.backend.reset_device()


def reply_status(s: Session, event: EventData) -> None:
    """Answer the status byte."""
    status = s.status
    if s.dataplane.needs_reset():  # a broken ring: the driver must reset the device
        status |= DeviceStatus.DEVICE_NEEDS_RESET
    s.reply_with(msg_of(event), VhostUserU64(int(status)))


# --- device-state transfer -------------------------------------------------------------
def device_suspended(s: Session, event: EventData) -> bool:
    """Every ring is stopped."""
    return not s.started_rings()


def apply_device_state_fd(s: Session, event: EventData) -> None:
    """Start a state transfer; the reply's bit 8 says no fd comes back."""
    msg = msg_of(event)
    transfer = payload_of(event, VhostUserTransferDeviceState)
    (fd,) = s.take_fds(msg)
    try:
        own = s.backend.set_device_state_fd(transfer.direction, transfer.phase, fd)
    except BackendError as err:
        log.warning("SET_DEVICE_STATE_FD refused by the device: %s", str(err))
        s.reply_with(msg, VhostUserU64(VRING_NOFD_MASK | 1))
        return
    if own is None:
        s.reply_with(msg, VhostUserU64(VRING_NOFD_MASK))
    else:
        s.reply_with(msg, VhostUserU64(0), (own,))


def reply_device_state(s: Session, event: EventData) -> None:
    """Answer whether the transfer succeeded (0) or not (1)."""
    try:
        s.backend.check_device_state()
        result = 0
    except BackendError as err:
        log.warning("device state transfer failed: %s", str(err))
        result = 1
    s.reply_with(msg_of(event), VhostUserU64(result))


# --- stateless device requests ---------------------------------------------------------
def postcopy_without_mem_slots(s: Session, event: EventData) -> bool:
    """CONFIGURE_MEM_SLOTS was not negotiated."""
    return not s.acked_protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS


def reply_queue_num(s: Session, event: EventData) -> None:
    """Answer the queue count."""
    s.reply_with(msg_of(event), VhostUserU64(s.backend.queue_num()))


def reply_config(s: Session, event: EventData) -> None:
    """Read config space; an error is a zero-length reply."""
    msg = msg_of(event)
    request = payload_of(event, VhostUserConfig)
    try:
        data = bytes(get_config(s.backend, request.offset, request.size, request.flags))
    except BackendError as err:
        log.warning(
            "GET_CONFIG offset %d size %d refused: %s", request.offset, request.size, str(err)
        )
        s.reply_with(msg, None)
        return
    if len(data) != request.size:
        log.error(
            "get_config returned %d bytes, %d asked: answering an error", len(data), request.size
        )
        s.reply_with(msg, None)
        return
    s.reply_with(msg, VhostUserConfig(request.offset, request.size, request.flags, data))


def apply_config(s: Session, event: EventData) -> None:
    """Write config space (the device refuses read-only fields)."""
    request = payload_of(event, VhostUserConfig)
    try:
        set_config(s.backend, request.offset, bytes(request.payload), request.flags)
    except BackendError as err:
        raise s.violation("VU-PAY-002", f"SET_CONFIG refused by the device: {err}") from err


def apply_mtu(s: Session, event: EventData) -> None:
    """Record the MTU (its range is the catalogue's check)."""
    s.mtu = value_of(event)


def send_rarp(s: Session, event: EventData) -> None:
    """Record the guest MAC to announce."""
    s.rarp_mac = value_of(event).to_bytes(8, "little")[:6]


def reply_shared_object(s: Session, event: EventData) -> None:
    """The dma-buf fd when the device exports the UUID; the body is empty either way."""
    fd = s.backend.get_shared_object(payload_of(event, VhostUserShared).uuid)
    s.reply_with(msg_of(event), None, (fd,) if fd is not None else ())


def unsupported(s: Session, event: EventData) -> None:
    """Answered by policy (VU-REQ-001)."""
    raise s.violation("VU-REQ-001", "vhsm does not implement this request")


HANDLERS: dict[str, Handlers] = {
    "backend_channel": Handlers(callbacks=named(apply_backend_req_fd)),
    "inflight": Handlers(
        conditions=checks(no_ring_started, geometry_fits_device),
        callbacks=named(reply_inflight_fd, apply_inflight_fd),
    ),
    "status": Handlers(
        conditions=checks(status_zero, status_nonzero),
        callbacks=named(apply_status, reset_device_status, reply_status),
    ),
    "device_state": Handlers(
        conditions=checks(device_suspended),
        callbacks=named(apply_device_state_fd, reply_device_state),
    ),
    "device": Handlers(
        conditions=checks(postcopy_without_mem_slots),
        callbacks=named(
            reply_queue_num,
            reply_config,
            apply_config,
            apply_mtu,
            send_rarp,
            reply_shared_object,
            unsupported,
        ),
    ),
}

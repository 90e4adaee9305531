"""Conditions and callbacks of the memory-table machine (regions, slots, dirty log)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from transitions import EventData

from vhsm.errors import GuestMemoryError
from vhsm.session.events import Handlers, checks, msg_of, named, payload_of
from vhsm.wire import (
    ProtocolFeature,
    VhostUserLog,
    VhostUserMemory,
    VhostUserSingleMemoryRegion,
    VhostUserU64,
)

if TYPE_CHECKING:
    from vhsm.session.session import Session


def slots_suffice(s: Session, event: EventData) -> bool:
    """The table the request leaves fits in GET_MAX_MEM_SLOTS (the only slot check)."""
    limit = s.backend.max_mem_slots()
    payload = msg_of(event).payload
    if isinstance(payload, VhostUserMemory):
        if len(payload.regions) > limit:
            s.guard_detail = f"a table of {len(payload.regions)} regions; {limit} slots"
            return False
        return True
    if isinstance(payload, VhostUserSingleMemoryRegion) and s.mapped_regions >= limit:
        s.guard_detail = f"{s.mapped_regions} of {limit} slots in use"
        return False
    return True  # SET_MEM_TABLE's postcopy acknowledgement carries no region


def removes_last_region(s: Session, event: EventData) -> bool:
    """The table holds one region only."""
    return s.mapped_regions == 1


def keeps_other_regions(s: Session, event: EventData) -> bool:
    """The table holds more than one region."""
    return s.mapped_regions != 1


def reply_max_mem_slots(s: Session, event: EventData) -> None:
    """Answer the slot limit."""
    s.reply_with(msg_of(event), VhostUserU64(s.backend.max_mem_slots()))


def apply_mem_table(s: Session, event: EventData) -> None:
    """Replace the whole guest memory map."""
    msg = msg_of(event)
    regions = getattr(msg.payload, "regions", ())  # postcopy: a u64 body, no regions
    try:
        s.dataplane.set_mem_table(regions, s.take_fds(msg))
    except GuestMemoryError as err:
        raise s.memory_violation(err, "VU-MEM-004") from err
    s.mapped_regions = len(regions)


def add_region(s: Session, event: EventData) -> None:
    """Map one region into a free slot."""
    msg = msg_of(event)
    region = payload_of(event, VhostUserSingleMemoryRegion).region
    (fd,) = s.take_fds(msg)
    try:
        s.dataplane.add_mem_region(region, fd)
    except GuestMemoryError as err:
        raise s.memory_violation(err, "VU-MEM-004") from err
    s.mapped_regions += 1


def remove_region(s: Session, event: EventData) -> None:
    """Unmap the region matching guest address, user address and size."""
    msg = msg_of(event)
    if msg.fds:
        s.note("VU-MEM-009", "REM_MEM_REG carried an fd; closed unused")
    try:
        s.dataplane.remove_mem_region(payload_of(event, VhostUserSingleMemoryRegion).region)
    except GuestMemoryError as err:
        raise s.memory_violation(err, "VU-MEM-008") from err
    s.mapped_regions = max(0, s.mapped_regions - 1)


def apply_log_base(s: Session, event: EventData) -> None:
    """Attach the dirty log; with LOG_SHMFD the reply echoes the description."""
    msg = msg_of(event)
    (fd,) = s.take_fds(msg)
    try:
        s.dataplane.set_log_base(payload_of(event, VhostUserLog), fd)
    except GuestMemoryError as err:
        raise s.memory_violation(err, "VU-MEM-010") from err
    if s.acked_protocol_features & ProtocolFeature.LOG_SHMFD:
        s.reply_with(msg, msg.payload)


def apply_log_fd(s: Session, event: EventData) -> None:
    """Install the eventfd signalled after log updates."""
    (fd,) = s.take_fds(msg_of(event))
    s.dataplane.set_log_fd(fd)


HANDLERS: dict[str, Handlers] = {
    "memory": Handlers(
        conditions=checks(slots_suffice, removes_last_region, keeps_other_regions),
        callbacks=named(
            reply_max_mem_slots,
            apply_mem_table,
            add_region,
            remove_region,
            apply_log_base,
            apply_log_fd,
        ),
    )
}

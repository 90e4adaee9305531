"""What each request does once the machines allow it: the YAML's conditions and callbacks.

`_guard_<name>` methods are the named conditions, `_do_<name>` methods the
named callbacks of ``specs/session.yaml`` and ``specs/vring.yaml``; a test
checks that every declared name has its method here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, TypeVar

from transitions import EventData

from vhsm.backend import get_config, set_config
from vhsm.errors import BackendError, GuestMemoryError, ProtocolViolation
from vhsm.session.machines import SessionState
from vhsm.wire import (
    DeviceStatus,
    Message,
    ProtocolFeature,
    VhostUserConfig,
    VhostUserInflight,
    VhostUserLog,
    VhostUserShared,
    VhostUserSingleMemoryRegion,
    VhostUserU64,
    VhostUserVringAddr,
    VhostUserVringState,
    VirtioFeature,
    feature_names,
)
from vhsm.wire.enums import MAX_QUEUE_SIZE, VRING_NOFD_MASK

if TYPE_CHECKING:
    from vhsm.backend import VhostUserBackend
    from vhsm.session.dataplane import DataPlane

log = logging.getLogger(__name__)
P = TypeVar("P")

_LOG_ONLY = int(VirtioFeature.LOG_ALL)


def _msg(event: EventData) -> Message:
    msg: Message = event.kwargs["msg"]
    return msg


def _payload(event: EventData, cls: type[P]) -> P:
    """The message's payload as the class the catalogue gives its request."""
    payload = _msg(event).payload
    if not isinstance(payload, cls):  # the decoder guarantees it; a bug otherwise
        raise TypeError(f"{_msg(event).name}: payload {payload!r} is not a {cls.__name__}")
    return payload


def _ring(event: EventData) -> int:
    """The ring index of the vring model an event concerns."""
    return int(getattr(event.model, "index", -1))


def _num(event: EventData) -> int:
    return int(getattr(_msg(event).payload, "num", 0))


def _value(event: EventData) -> int:
    return int(getattr(_msg(event).payload, "value", 0))


class SessionHandlers:
    """Conditions and callbacks of both machines; mixed into `Session`."""

    backend: VhostUserBackend
    dataplane: DataPlane
    offered_features: int
    tolerated_unoffered_acks: int
    offered_protocol_features: int
    acked_features: int
    acked_protocol_features: int
    protocol_features_set: bool
    guard_detail: str | None
    owned: bool
    mapped_regions: int
    status: int
    mtu: int | None
    rarp_mac: bytes | None

    if TYPE_CHECKING:

        def violation(self, rule_id: str, detail: str) -> ProtocolViolation: ...  # noqa: D102
        def note(self, rule_id: str, detail: str) -> None: ...  # noqa: D102
        def take_fds(self, msg: Message) -> tuple[int, ...]: ...  # noqa: D102
        def reply_with(self, msg: Message, payload: object, fds: tuple[int, ...] = ()) -> None: ...  # noqa: D102
        def memory_violation(self, err: GuestMemoryError, default: str) -> ProtocolViolation: ...  # noqa: D102
        def ring_index(self, msg: Message) -> int: ...  # noqa: D102
        def fire_vring(self, index: int, trigger: str, msg: Message) -> None: ...  # noqa: D102
        def fire_all_vrings(self, trigger: str, msg: Message) -> None: ...  # noqa: D102
        def started_rings(self) -> list[int]: ...  # noqa: D102

    # --- session conditions ---------------------------------------------------------
    def _guard_features_offered(self, event: EventData) -> bool:
        unoffered = _value(event) & ~self.offered_features
        if not unoffered:
            return True
        names = ", ".join(feature_names(unoffered, VirtioFeature))
        if unoffered & ~self.tolerated_unoffered_acks == 0:
            # bits real front-ends ack anyway (specs/session.yaml): refusing them would
            # only cut the guest's device off (VU-NEG-013)
            self.note("VU-NEG-013", f"acked bits never offered: {names}")
            return True
        self.guard_detail = f"acked bits never offered: {names}"
        return False

    def _guard_features_change_only_log_all(self, event: EventData) -> bool:
        return (_value(event) ^ self.acked_features) & ~_LOG_ONLY == 0

    def _guard_not_owned(self, event: EventData) -> bool:
        return not self.owned

    def _guard_protocol_features_offered(self, event: EventData) -> bool:
        return self.offered_features & VirtioFeature.PROTOCOL_FEATURES != 0

    def _guard_protocol_features_acked_offered(self, event: EventData) -> bool:
        return _value(event) & ~self.offered_protocol_features == 0

    def _guard_inband_has_prerequisites(self, event: EventData) -> bool:
        bits = _value(event)
        needed = ProtocolFeature.REPLY_ACK | ProtocolFeature.BACKEND_REQ
        return not bits & ProtocolFeature.INBAND_NOTIFICATIONS or bits & needed == needed

    def _guard_inflight_extensions_have_prerequisites(self, event: EventData) -> bool:
        bits = _value(event)
        inflight, skip = (
            ProtocolFeature.GET_VRING_BASE_INFLIGHT,
            ProtocolFeature.GET_VRING_BASE_SKIP_DRAIN,
        )
        if bits & (inflight | skip) and not bits & ProtocolFeature.INFLIGHT_SHMFD:
            return False
        return not (bits & skip and not bits & inflight)

    def _guard_postcopy_without_mem_slots(self, event: EventData) -> bool:
        return not self.acked_protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS

    def _guard_no_region_mapped(self, event: EventData) -> bool:
        return self.mapped_regions == 0

    def _guard_stops_last_started_ring(self, event: EventData) -> bool:
        index = self.ring_index(_msg(event))
        return self.started_rings() == [index]

    def _guard_stops_other_ring(self, event: EventData) -> bool:
        return not self._guard_stops_last_started_ring(event)

    def _guard_features_set_first(self, event: EventData) -> bool:
        # NEGOTIATING is exactly "no SET_FEATURES yet" (RESET_DEVICE returns to it).
        return getattr(event.model, "state", None) is not SessionState.NEGOTIATING

    # --- session callbacks: negotiation ----------------------------------------------
    def _do_reply_features(self, event: EventData) -> None:
        self.reply_with(_msg(event), VhostUserU64(self.offered_features))

    def _do_apply_features(self, event: EventData) -> None:
        msg = _msg(event)
        acked = _value(event)
        if self.protocol_features_set and not acked & VirtioFeature.PROTOCOL_FEATURES:
            self.note(
                "VU-NEG-011",
                "protocol features in use but VHOST_USER_F_PROTOCOL_FEATURES not acked",
            )
        self.acked_features = acked
        self.dataplane.set_features(acked)
        self.backend.acked_features(acked)
        self.backend.set_event_idx(bool(acked & VirtioFeature.RING_EVENT_IDX))
        self.fire_all_vrings("set_features", msg)

    def _do_claim_owner(self, event: EventData) -> None:
        self.owned = True

    def _do_disable_all_rings(self, event: EventData) -> None:
        self.fire_all_vrings("reset_owner", _msg(event))

    def _do_reply_protocol_features(self, event: EventData) -> None:
        self.reply_with(_msg(event), VhostUserU64(self.offered_protocol_features))

    def _do_apply_protocol_features(self, event: EventData) -> None:
        self.acked_protocol_features = _value(event)
        self.protocol_features_set = True

    def _do_reply_queue_num(self, event: EventData) -> None:
        self.reply_with(_msg(event), VhostUserU64(self.backend.queue_num()))

    def _do_reply_max_mem_slots(self, event: EventData) -> None:
        self.reply_with(_msg(event), VhostUserU64(self.backend.max_mem_slots()))

    def _do_apply_backend_req_fd(self, event: EventData) -> None:
        (fd,) = self.take_fds(_msg(event))
        self.dataplane.set_backend_req_fd(fd)

    # --- session callbacks: memory ---------------------------------------------------
    def _do_apply_mem_table(self, event: EventData) -> None:
        msg = _msg(event)
        regions = getattr(msg.payload, "regions", ())
        try:
            self.dataplane.set_mem_table(regions, self.take_fds(msg))
        except GuestMemoryError as err:
            raise self.memory_violation(err, "VU-MEM-004") from err
        self.mapped_regions = len(regions)

    def _do_add_region(self, event: EventData) -> None:
        msg = _msg(event)
        region = _payload(event, VhostUserSingleMemoryRegion).region
        (fd,) = self.take_fds(msg)
        try:
            self.dataplane.add_mem_region(region, fd, self.backend.max_mem_slots())
        except GuestMemoryError as err:
            raise self.memory_violation(err, "VU-MEM-004") from err
        self.mapped_regions += 1

    def _do_remove_region(self, event: EventData) -> None:
        msg = _msg(event)
        if msg.fds:
            self.note("VU-MEM-009", "REM_MEM_REG carried an fd; closed unused")
        try:
            self.dataplane.remove_mem_region(_payload(event, VhostUserSingleMemoryRegion).region)
        except GuestMemoryError as err:
            raise self.memory_violation(err, "VU-MEM-008") from err
        self.mapped_regions = max(0, self.mapped_regions - 1)

    def _do_apply_log_base(self, event: EventData) -> None:
        msg = _msg(event)
        (fd,) = self.take_fds(msg)
        try:
            self.dataplane.set_log_base(_payload(event, VhostUserLog), fd)
        except GuestMemoryError as err:
            raise self.memory_violation(err, "VU-MEM-010") from err
        if self.acked_protocol_features & ProtocolFeature.LOG_SHMFD:
            self.reply_with(msg, msg.payload)

    def _do_apply_log_fd(self, event: EventData) -> None:
        (fd,) = self.take_fds(_msg(event))
        self.dataplane.set_log_fd(fd)

    # --- session callbacks: rings ----------------------------------------------------
    def _do_ring_request(self, event: EventData) -> None:
        msg = _msg(event)
        self.fire_vring(self.ring_index(msg), event.event.name, msg)

    # --- session callbacks: device ---------------------------------------------------
    def _do_reply_config(self, event: EventData) -> None:
        msg = _msg(event)
        request = _payload(event, VhostUserConfig)
        try:
            data = bytes(get_config(self.backend, request.offset, request.size, request.flags))
        except BackendError as err:
            log.warning(
                "GET_CONFIG offset %d size %d refused: %s", request.offset, request.size, str(err)
            )
            self.reply_with(msg, None)
            return
        if len(data) != request.size:
            log.error(
                "get_config returned %d bytes, %d asked: answering an error",
                len(data),
                request.size,
            )
            self.reply_with(msg, None)
            return
        self.reply_with(msg, VhostUserConfig(request.offset, request.size, request.flags, data))

    def _do_apply_config(self, event: EventData) -> None:
        request = _payload(event, VhostUserConfig)
        try:
            set_config(self.backend, request.offset, bytes(request.payload), request.flags)
        except BackendError as err:
            raise self.violation("VU-PAY-002", f"SET_CONFIG refused by the device: {err}") from err

    def _check_inflight_geometry(self, msg: Message) -> None:
        """Bound the buffer a front-end may make us allocate or map (VU-PAY-003)."""
        desc: Any = msg.payload
        queues, size = self.backend.num_queues(), min(MAX_QUEUE_SIZE, self.backend.max_queue_size())
        if desc.num_queues > queues or desc.queue_size > size:
            raise self.violation(
                "VU-PAY-003",
                f"inflight geometry {desc.num_queues} queues x {desc.queue_size} exceeds the "
                f"device's {queues} queues x {size}",
            )

    def _do_reply_inflight_fd(self, event: EventData) -> None:
        msg = _msg(event)
        self._check_inflight_geometry(msg)
        desc, fd = self.dataplane.get_inflight_fd(_payload(event, VhostUserInflight))
        self.reply_with(msg, desc, (fd,) if fd >= 0 else ())

    def _do_apply_inflight_fd(self, event: EventData) -> None:
        msg = _msg(event)
        self._check_inflight_geometry(msg)
        (fd,) = self.take_fds(msg)
        try:
            self.dataplane.set_inflight_fd(_payload(event, VhostUserInflight), fd)
        except GuestMemoryError as err:
            raise self.memory_violation(err, "VU-PAY-003") from err

    def _do_reset_device_state(self, event: EventData) -> None:
        self.fire_all_vrings("reset_device", _msg(event))
        self.acked_features = 0
        self.status = 0
        self.backend.reset_device()

    def _do_apply_status(self, event: EventData) -> None:
        self.status = _value(event)
        if self.status == 0:  # a status of 0 means reset (virtio device status byte)
            self.backend.reset_device()

    def _do_reply_status(self, event: EventData) -> None:
        status = self.status
        if self.dataplane.needs_reset():  # a broken ring: the driver must reset the device
            status |= DeviceStatus.DEVICE_NEEDS_RESET
        self.reply_with(_msg(event), VhostUserU64(int(status)))

    def _do_apply_mtu(self, event: EventData) -> None:
        self.mtu = _value(event)

    def _do_send_rarp(self, event: EventData) -> None:
        self.rarp_mac = _value(event).to_bytes(8, "little")[:6]

    def _do_reply_shared_object(self, event: EventData) -> None:
        msg = _msg(event)
        fd = self.backend.get_shared_object(_payload(event, VhostUserShared).uuid)
        # The reply body is empty, as the catalogue declares; the fd alone answers.
        self.reply_with(msg, None, (fd,) if fd is not None else ())

    def _do_apply_device_state_fd(self, event: EventData) -> None:
        msg = _msg(event)
        transfer: Any = msg.payload
        (fd,) = self.take_fds(msg)
        try:
            own = self.backend.set_device_state_fd(transfer.direction, transfer.phase, fd)
        except BackendError as err:
            log.warning("SET_DEVICE_STATE_FD refused by the device: %s", str(err))
            self.reply_with(msg, VhostUserU64(VRING_NOFD_MASK | 1))
            return
        if own is None:
            self.reply_with(msg, VhostUserU64(VRING_NOFD_MASK))
        else:
            self.reply_with(msg, VhostUserU64(0), (own,))

    def _do_reply_device_state(self, event: EventData) -> None:
        try:
            self.backend.check_device_state()
            result = 0
        except BackendError as err:
            log.warning("device state transfer failed: %s", str(err))
            result = 1
        self.reply_with(_msg(event), VhostUserU64(result))

    def _do_unsupported(self, event: EventData) -> None:
        raise self.violation("VU-REQ-001", "vhsm does not implement this request")

    # --- vring conditions ------------------------------------------------------------
    def _guard_queue_size_valid(self, event: EventData) -> bool:
        num = _num(event)
        packed = bool(self.acked_features & VirtioFeature.RING_PACKED)
        limit = min(MAX_QUEUE_SIZE, self.backend.max_queue_size())
        return 1 <= num <= limit and (packed or num & (num - 1) == 0)

    def _guard_vring_addr_valid(self, event: EventData) -> bool:
        addr = _payload(event, VhostUserVringAddr)
        # a packed ring's "avail" is its driver event area: two 16-bit words, 4-byte aligned
        avail_align = 4 if self.acked_features & VirtioFeature.RING_PACKED else 2
        return (
            addr.flags & ~0x1 == 0
            and addr.desc_user_addr % 16 == 0
            and addr.used_user_addr % 4 == 0
            and addr.avail_user_addr % avail_align == 0
        )

    def _guard_base_valid(self, event: EventData) -> bool:
        return bool(self.acked_features & VirtioFeature.RING_PACKED) or _num(event) >> 16 == 0

    def _guard_base_request_reserved_zero(self, event: EventData) -> bool:
        return _num(event) == 0

    def _guard_enable_requested(self, event: EventData) -> bool:
        return _num(event) == 1

    def _guard_disable_requested(self, event: EventData) -> bool:
        return _num(event) == 0

    def _guard_lacks_protocol_features(self, event: EventData) -> bool:
        return not _value(event) & VirtioFeature.PROTOCOL_FEATURES

    def _guard_has_protocol_features(self, event: EventData) -> bool:
        return not self._guard_lacks_protocol_features(event)

    # --- vring callbacks ---------------------------------------------------------------
    def _do_configure_num(self, event: EventData) -> None:
        try:
            self.dataplane.set_vring_num(_ring(event), _num(event))
        except GuestMemoryError as err:
            raise self.memory_violation(err, "VU-RING-004") from err
        except ValueError as err:  # a packed base set earlier does not fit the new size
            raise self.violation("VU-RING-005", str(err)) from err

    def _do_configure_addr(self, event: EventData) -> None:
        try:
            self.dataplane.set_vring_addr(_ring(event), _payload(event, VhostUserVringAddr))
        except GuestMemoryError as err:
            raise self.memory_violation(err, "VU-RING-004") from err
        except ValueError as err:  # the ring cannot be built at the base it was given
            raise self.violation("VU-RING-005", str(err)) from err

    def _do_configure_base(self, event: EventData) -> None:
        try:
            self.dataplane.set_vring_base(_ring(event), _num(event))
        except ValueError as err:  # a packed ring's index past its size
            raise self.violation("VU-RING-005", str(err)) from err

    def _do_configure_endian(self, event: EventData) -> None:
        log.info("ring %d: legacy endianness %s", _ring(event), "BE" if _num(event) else "LE")

    def _ring_fd(self, event: EventData) -> int | None:
        msg = _msg(event)
        if getattr(msg.payload, "nofd", False):
            return None
        (fd,) = self.take_fds(msg)
        return fd

    def _do_start_ring(self, event: EventData) -> None:
        index = _ring(event)
        if event.event.name == "set_vring_kick":
            self.dataplane.set_vring_kick(index, self._ring_fd(event))
        self.dataplane.start_vring(index)
        if event.event.name == "vring_kick":
            self.dataplane.kick_vring(index)

    def _do_restart_ring(self, event: EventData) -> None:
        self.dataplane.set_vring_kick(_ring(event), self._ring_fd(event))

    def _do_inband_kick(self, event: EventData) -> None:
        self.dataplane.kick_vring(_ring(event))

    def _do_stop_ring(self, event: EventData) -> None:
        self.dataplane.stop_vring(_ring(event))
        self._do_report_base(event)

    def _do_report_base(self, event: EventData) -> None:
        index = _ring(event)
        base = self.dataplane.get_vring_base(index)
        self.reply_with(_msg(event), VhostUserVringState(index, base))

    def _do_enable_ring(self, event: EventData) -> None:
        self.dataplane.enable_vring(_ring(event), True)

    def _do_disable_ring(self, event: EventData) -> None:
        self.dataplane.enable_vring(_ring(event), False)

    def _do_install_call(self, event: EventData) -> None:
        self.dataplane.set_vring_call(_ring(event), self._ring_fd(event))

    def _do_install_err(self, event: EventData) -> None:
        self.dataplane.set_vring_err(_ring(event), self._ring_fd(event))

    def _do_reset_ring(self, event: EventData) -> None:
        self.dataplane.reset_vring(_ring(event))

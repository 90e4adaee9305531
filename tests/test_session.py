"""The sans-IO session: machines from specs/, gates, policy, and the rule rejections (VU-*)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from vhsm.backend import VhostUserBackend
from vhsm.errors import BackendError, GuestMemoryError, ProtocolViolation
from vhsm.session import NullDataPlane, Session, SessionState, VringMachineState
from vhsm.wire import (
    Decoder,
    FrontendReq,
    Message,
    ProtocolFeature,
    VhostUserConfig,
    VhostUserMemory,
    VhostUserMemoryRegion,
    VhostUserU64,
    VhostUserVringAddr,
    VhostUserVringFd,
    VhostUserVringState,
    VirtioFeature,
    encode,
    make_reply,
    make_request,
)

R = FrontendReq
V1 = int(VirtioFeature.VERSION_1)
VF30 = int(VirtioFeature.PROTOCOL_FEATURES)
EVENT_IDX = int(VirtioFeature.RING_EVENT_IDX)
ALL_PROTOCOL = (1 << 24) - 1


class Device(VhostUserBackend):
    """A two-queue device offering every protocol feature."""

    def __init__(self, features: int = V1 | VF30 | EVENT_IDX, protocol: int = ALL_PROTOCOL):
        self._features = features
        self._protocol = protocol
        self.config = bytearray(range(16))
        self.resets = 0

    def num_queues(self) -> int:
        return 2

    def max_queue_size(self) -> int:
        return 1024

    def features(self) -> int:
        return self._features

    def protocol_features(self) -> int:
        return self._protocol

    def get_config(self, offset: int, size: int) -> bytes:
        if offset + size > len(self.config):
            raise BackendError("beyond config space")
        return bytes(self.config[offset : offset + size])

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        if offset < 8:
            raise BackendError("read-only field")
        self.config[offset : offset + len(data)] = data

    def reset_device(self) -> None:
        self.resets += 1


def wire(msg: Message) -> Message:
    """Send a message through the real decoder, as the daemon receives it."""
    (decoded,) = Decoder().feed(encode(msg), msg.fds)
    return decoded


def req(
    code: FrontendReq, payload: object = None, *, fds: tuple[int, ...] = (), ack: bool = False
) -> Message:
    return wire(make_request(code, payload, need_reply=ack, fds=fds))  # type: ignore[arg-type]


def efd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC)


def vstate(index: int, num: int) -> VhostUserVringState:
    return VhostUserVringState(index, num)


def negotiate(session: Session, protocol: int = ALL_PROTOCOL, features: int | None = None) -> None:
    session.handle(req(R.GET_FEATURES))
    session.handle(req(R.GET_PROTOCOL_FEATURES))
    session.handle(req(R.SET_PROTOCOL_FEATURES, VhostUserU64(protocol)))
    session.handle(req(R.SET_OWNER))
    acked = session.offered_features if features is None else features
    session.handle(req(R.SET_FEATURES, VhostUserU64(acked)))


def start_ring(session: Session, index: int = 0) -> None:
    session.handle(req(R.SET_VRING_NUM, vstate(index, 256)))
    session.handle(req(R.SET_VRING_BASE, vstate(index, 0)))
    session.handle(req(R.SET_VRING_ADDR, VhostUserVringAddr(index, 0, 0x1000, 0x3000, 0x2000, 0)))
    session.handle(req(R.SET_VRING_KICK, VhostUserVringFd(index, False), fds=(efd(),)))


@pytest.fixture
def session() -> Iterator[Session]:
    yield Session(Device())


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- negotiation --------------------------------------------------------------------
def test_qemu_order_negotiates_before_set_owner(session: Session) -> None:
    reply = session.handle(req(R.GET_FEATURES))
    assert (
        reply is not None
        and reply.flags == 0x5
        and reply.payload == VhostUserU64(V1 | VF30 | EVENT_IDX)
    )
    session.handle(req(R.GET_PROTOCOL_FEATURES))
    session.handle(req(R.SET_PROTOCOL_FEATURES, VhostUserU64(0x8F2B)))
    assert session.handle(req(R.GET_QUEUE_NUM)) == session.handle(req(R.GET_QUEUE_NUM))
    session.handle(req(R.SET_OWNER))
    session.handle(req(R.SET_FEATURES, VhostUserU64(V1 | VF30)))
    assert session.state is SessionState.SUSPENDED
    assert session.acked_features == V1 | VF30


def test_cloud_hypervisor_order_sets_owner_first(session: Session) -> None:
    session.handle(req(R.SET_OWNER))
    negotiate(session)
    assert session.owned and session.state is SessionState.SUSPENDED


def test_renegotiation_is_idempotent(session: Session) -> None:
    negotiate(session)
    start_ring(session)
    for _ in range(3):
        session.handle(req(R.GET_FEATURES))
        session.handle(req(R.SET_PROTOCOL_FEATURES, VhostUserU64(ALL_PROTOCOL)))
        session.handle(req(R.SET_FEATURES, VhostUserU64(session.acked_features)))
    assert session.state is SessionState.RUNNING


def test_reply_ack_success_and_nack(session: Session) -> None:
    negotiate(session)
    ok = session.handle(req(R.SET_VRING_NUM, vstate(0, 256), ack=True))
    assert ok is not None and ok.payload == VhostUserU64(0)
    bad = session.handle(req(R.SET_VRING_NUM, vstate(0, 100), ack=True))
    assert bad is not None and bad.payload == VhostUserU64(1)
    assert session.findings[-1].rule_id == "VU-RING-002"


def test_a_logged_violation_keeps_no_frames_alive(
    session: Session, caplog: pytest.LogCaptureFixture
) -> None:
    """The warning's record holds the text, not the violation and its traceback.

    A handler that keeps records (a test's log capture, a MemoryHandler) would
    otherwise pin the raising frames and the guest memory they view; the fuzzer
    found a memfd kept open that way.
    """
    negotiate(session)
    session.handle(req(R.SET_VRING_NUM, vstate(0, 100), ack=True))
    (record,) = [r for r in caplog.records if "VU-RING-002" in r.getMessage()]
    assert isinstance(record.args, tuple)
    assert all(isinstance(arg, str) for arg in record.args)


def test_violation_without_need_reply_raises(session: Session) -> None:
    negotiate(session)
    with pytest.raises(ProtocolViolation) as info:
        session.handle(req(R.SET_VRING_NUM, vstate(0, 100)))
    assert info.value.rule_id == "VU-RING-002"
    assert "SET_VRING_NUM" in str(info.value)


def test_no_reply_without_need_reply(session: Session) -> None:
    negotiate(session)
    assert session.handle(req(R.SET_VRING_NUM, vstate(0, 256))) is None


# --- ring state rules (VU-STATE-*) ------------------------------------------------------
def test_ring_starts_on_kick_and_stops_on_get_vring_base(session: Session) -> None:
    negotiate(session)
    start_ring(session, 0)
    assert session.state is SessionState.RUNNING
    assert session.vring_state(0) is VringMachineState.STARTED_DISABLED
    reply = session.handle(req(R.GET_VRING_BASE, vstate(0, 0)))
    assert reply is not None and reply.payload == VhostUserVringState(0, 0)
    assert session.vring_state(0) is VringMachineState.STOPPED_DISABLED
    assert session.state is SessionState.SUSPENDED


def test_session_stays_running_while_another_ring_runs(session: Session) -> None:
    negotiate(session)
    start_ring(session, 0)
    start_ring(session, 1)
    session.handle(req(R.GET_VRING_BASE, vstate(0, 0)))
    assert session.state is SessionState.RUNNING
    session.handle(req(R.GET_VRING_BASE, vstate(1, 0)))
    assert session.state is SessionState.SUSPENDED


def test_enable_is_tracked_while_stopped(session: Session) -> None:
    negotiate(session)
    session.handle(req(R.SET_VRING_ENABLE, vstate(0, 1)))
    assert session.vring_state(0) is VringMachineState.STOPPED_ENABLED
    start_ring(session, 0)
    assert session.vring_state(0) is VringMachineState.STARTED_ENABLED
    session.handle(req(R.SET_VRING_ENABLE, vstate(0, 0)))
    assert session.vring_state(0) is VringMachineState.STARTED_DISABLED


def test_set_features_without_protocol_bit_enables_every_ring() -> None:
    """VU-STATE-003: without VF 30 the back-end enables every ring at once."""
    session = Session(Device(features=V1))
    session.handle(req(R.SET_FEATURES, VhostUserU64(V1)))
    assert all(session.vring_state(i) is VringMachineState.STOPPED_ENABLED for i in (0, 1))


def test_reset_device_returns_rings_and_session_to_initial(session: Session) -> None:
    negotiate(session)
    session.handle(req(R.SET_VRING_ENABLE, vstate(1, 1)))
    start_ring(session, 0)
    session.handle(req(R.RESET_DEVICE))
    assert session.state is SessionState.NEGOTIATING
    assert session.acked_features == 0 and session.owned
    assert all(session.vring_state(i) is VringMachineState.STOPPED_DISABLED for i in (0, 1))
    assert isinstance(session.backend, Device) and session.backend.resets == 1


def test_set_status_zero_resets_the_device(session: Session) -> None:
    negotiate(session)
    session.handle(req(R.SET_STATUS, VhostUserU64(0x0F)))
    assert isinstance(session.backend, Device) and session.backend.resets == 0
    session.handle(req(R.SET_STATUS, VhostUserU64(0)))
    assert session.backend.resets == 1
    assert session.handle(req(R.GET_STATUS)) == make_reply(R.GET_STATUS, VhostUserU64(0))


def test_get_shared_object_reply_is_what_the_catalogue_declares() -> None:
    import uuid

    from vhsm.wire import Channel, VhostUserShared

    class Exporter(Device):
        def get_shared_object(self, object_id: uuid.UUID) -> int | None:
            return efd() if object_id.int == 1 else None

    session = Session(Exporter())
    negotiate(session)
    for object_id, nfds in ((uuid.UUID(int=1), 1), (uuid.UUID(int=2), 0)):
        reply = session.handle(req(R.GET_SHARED_OBJECT, VhostUserShared(object_id)))
        assert reply is not None
        # What vhsm's own front-end and auditor decode must accept vhsm's reply.
        (decoded,) = Decoder(Channel.MAIN).feed(encode(reply), reply.fds)
        assert decoded.error is None and len(decoded.fds) == nfds
        for fd in decoded.fds:
            os.close(fd)


def test_reset_owner_only_disables(session: Session) -> None:
    negotiate(session)
    session.handle(req(R.SET_VRING_ENABLE, vstate(0, 1)))
    start_ring(session, 0)
    session.handle(req(R.RESET_OWNER))
    assert session.vring_state(0) is VringMachineState.STARTED_DISABLED


def test_ring_size_cannot_change_while_started(session: Session) -> None:
    negotiate(session)
    start_ring(session, 0)
    with pytest.raises(ProtocolViolation) as info:
        session.handle(req(R.SET_VRING_NUM, vstate(0, 128)))
    assert info.value.rule_id == "VU-STATE-004"


def test_rings_not_configured_before_set_features(session: Session) -> None:
    with pytest.raises(ProtocolViolation) as info:
        session.handle(req(R.SET_VRING_NUM, vstate(0, 128)))
    assert info.value.rule_id == "VU-STATE-002"


def test_qemu_net_enables_every_ring_before_set_features(session: Session) -> None:
    """QEMU 7.2 vhost-user-net: SET_VRING_ENABLE at realize, none after the rings start."""
    session.handle(req(R.GET_FEATURES))
    session.handle(req(R.GET_PROTOCOL_FEATURES))
    session.handle(req(R.SET_PROTOCOL_FEATURES, VhostUserU64(ALL_PROTOCOL)))
    session.handle(req(R.SET_OWNER))
    for index in (0, 1):
        session.handle(req(R.SET_VRING_CALL, VhostUserVringFd(index, False), fds=(efd(),)))
    reply = session.handle(req(R.SET_VRING_ENABLE, vstate(0, 1), ack=True))
    assert reply is not None and reply.payload == VhostUserU64(0)
    assert session.vring_state(0) is VringMachineState.STOPPED_ENABLED
    assert session.state is SessionState.NEGOTIATING
    assert [(f.rule_id, f.rule.severity) for f in session.findings] == [("VU-STATE-012", "INTEROP")]
    session.handle(req(R.SET_FEATURES, VhostUserU64(session.offered_features)))
    start_ring(session, 0)
    start_ring(session, 1)
    # the early enable took effect at start; ring 1, never enabled, stays disabled
    assert session.vring_state(0) is VringMachineState.STARTED_ENABLED
    assert session.vring_state(1) is VringMachineState.STARTED_DISABLED
    assert len(session.findings) == 1


def test_early_disable_after_reset_device_is_recorded(session: Session) -> None:
    negotiate(session)
    session.handle(req(R.SET_VRING_ENABLE, vstate(1, 1)))
    session.handle(req(R.RESET_DEVICE))
    assert session.vring_state(1) is VringMachineState.STOPPED_DISABLED
    session.handle(req(R.SET_VRING_ENABLE, vstate(1, 1)))
    session.handle(req(R.SET_VRING_ENABLE, vstate(1, 0)))
    assert session.vring_state(1) is VringMachineState.STOPPED_DISABLED
    assert [f.rule_id for f in session.findings] == ["VU-STATE-012", "VU-STATE-012"]


def test_device_state_only_while_suspended(session: Session) -> None:
    negotiate(session)
    start_ring(session)
    with pytest.raises(ProtocolViolation) as info:
        session.handle(req(R.CHECK_DEVICE_STATE))
    assert info.value.rule_id == "VU-STATE-006"


def test_state_listener_sees_changes(session: Session) -> None:
    seen: list[tuple[str, int | None, str, str, str]] = []
    session.listeners.append(lambda *change: seen.append(change))
    negotiate(session)
    start_ring(session)
    assert ("session", None, "NEGOTIATING", "SUSPENDED", "set_features") in seen
    assert ("vring", 0, "STOPPED_DISABLED", "STARTED_DISABLED", "set_vring_kick") in seen
    assert ("session", None, "SUSPENDED", "RUNNING", "set_vring_kick") in seen


# --- negotiation rejections (VU-NEG-*)----------------------------------------------------
def test_n1_protocol_features_without_vf30_offered() -> None:
    session = Session(Device(features=V1))
    with pytest.raises(ProtocolViolation) as info:
        session.handle(req(R.GET_PROTOCOL_FEATURES))
    assert info.value.rule_id == "VU-NEG-001"


@pytest.mark.parametrize(
    ("code", "payload", "feature"),
    [
        (R.GET_QUEUE_NUM, None, "MQ"),
        (R.RESET_DEVICE, None, "RESET_DEVICE"),
        (R.GET_MAX_MEM_SLOTS, None, "CONFIGURE_MEM_SLOTS"),
        (R.GET_CONFIG, VhostUserConfig(0, 4, 0, bytes(4)), "CONFIG"),
        (R.GET_STATUS, None, "STATUS"),
    ],
)
def test_n2_gated_requests_need_their_protocol_feature(
    session: Session, code: FrontendReq, payload: object, feature: str
) -> None:
    negotiate(
        session,
        protocol=ALL_PROTOCOL
        & ~ProtocolFeature[feature]
        & ~ProtocolFeature.REPLY_ACK
        & ~ProtocolFeature.INBAND_NOTIFICATIONS,
    )
    with pytest.raises(ProtocolViolation) as info:
        session.handle(req(code, payload))
    assert info.value.rule_id == "VU-NEG-002" and feature in info.value.detail


def test_n3_set_vring_enable_without_protocol_features() -> None:
    session = Session(Device())
    session.handle(req(R.SET_FEATURES, VhostUserU64(V1)))
    with pytest.raises(ProtocolViolation) as info:
        session.handle(req(R.SET_VRING_ENABLE, vstate(0, 1)))
    assert info.value.rule_id == "VU-NEG-003"


def test_n4_unoffered_virtio_bits(session: Session) -> None:
    with pytest.raises(ProtocolViolation) as info:
        session.handle(req(R.SET_FEATURES, VhostUserU64(V1 | int(VirtioFeature.RING_PACKED))))
    assert info.value.rule_id == "VU-NEG-004"
    assert "acked bits never offered: RING_PACKED" in info.value.detail
    assert session.state is SessionState.NEGOTIATING


def test_qemu_rng_acking_unoffered_ring_features_is_tolerated() -> None:
    """QEMU 7.2's vhost-user-rng acks EVENT_IDX and INDIRECT_DESC whatever was offered."""
    session = Session(Device(features=V1 | VF30))
    acked = V1 | VF30 | EVENT_IDX | int(VirtioFeature.RING_INDIRECT_DESC)
    session.handle(req(R.SET_FEATURES, VhostUserU64(acked)))
    assert session.state is SessionState.SUSPENDED and session.acked_features == acked
    assert [f.rule_id for f in session.findings] == ["VU-NEG-013"]


def test_qemu_scsi_acking_unoffered_change_is_tolerated() -> None:
    """QEMU 7.2's vhost-user-scsi acks VIRTIO_SCSI_F_CHANGE (bit 2) whatever was offered."""
    session = Session(Device(features=V1 | VF30))
    session.handle(req(R.SET_FEATURES, VhostUserU64(V1 | VF30 | 1 << 2)))
    assert session.state is SessionState.SUSPENDED and session.acked_features & 1 << 2
    assert [f.rule_id for f in session.findings] == ["VU-NEG-013"]
    other = Session(Device(features=V1 | VF30))  # another device bit is still refused
    with pytest.raises(ProtocolViolation) as info:
        other.handle(req(R.SET_FEATURES, VhostUserU64(V1 | VF30 | 1 << 2 | 1 << 5)))
    assert info.value.rule_id == "VU-NEG-004"


def test_n5_unoffered_protocol_bits() -> None:
    session = Session(Device(protocol=0x8))
    with pytest.raises(ProtocolViolation) as info:
        session.handle(req(R.SET_PROTOCOL_FEATURES, VhostUserU64(0x9)))
    assert info.value.rule_id == "VU-NEG-005"


def test_n6_inband_without_prerequisites(session: Session) -> None:
    with pytest.raises(ProtocolViolation) as info:
        session.handle(
            req(R.SET_PROTOCOL_FEATURES, VhostUserU64(ProtocolFeature.INBAND_NOTIFICATIONS))
        )
    assert info.value.rule_id == "VU-NEG-006"


def test_n7_skip_drain_without_inflight(session: Session) -> None:
    bits = ProtocolFeature.GET_VRING_BASE_SKIP_DRAIN | ProtocolFeature.GET_VRING_BASE_INFLIGHT
    with pytest.raises(ProtocolViolation) as info:
        session.handle(req(R.SET_PROTOCOL_FEATURES, VhostUserU64(bits)))
    assert info.value.rule_id == "VU-NEG-007"


def test_n8_feature_change_while_running_is_rejected(session: Session) -> None:
    negotiate(session, features=V1 | VF30 | EVENT_IDX)
    start_ring(session)
    reply = session.handle(req(R.SET_FEATURES, VhostUserU64(V1 | VF30), ack=True))
    assert reply is not None and reply.payload == VhostUserU64(1)
    assert session.findings[-1].rule_id == "VU-NEG-008"
    assert session.acked_features == V1 | VF30 | EVENT_IDX


def test_n8_packed_layout_cannot_replace_a_running_split_ring(session: Session) -> None:
    packed = int(VirtioFeature.RING_PACKED)
    device = Device(features=V1 | VF30 | packed)
    session = Session(device)
    negotiate(session, features=V1 | VF30)
    start_ring(session)
    with pytest.raises(ProtocolViolation) as info:
        session.handle(req(R.SET_FEATURES, VhostUserU64(V1 | VF30 | packed)))
    assert info.value.rule_id == "VU-NEG-008"
    assert session.acked_features == V1 | VF30


def test_n8_log_all_may_toggle_while_running() -> None:
    log_all = int(VirtioFeature.LOG_ALL)
    session = Session(Device(features=V1 | VF30 | log_all))
    negotiate(session, features=V1 | VF30)
    start_ring(session)
    session.handle(req(R.SET_FEATURES, VhostUserU64(V1 | VF30 | log_all)))
    assert session.acked_features == V1 | VF30 | log_all and not session.findings


def test_protocol_features_without_acking_vf30_is_warned() -> None:
    """VU-NEG-011: QEMU < 7.2 used protocol features without acking VF 30."""
    session = Session(Device())
    session.handle(req(R.GET_FEATURES))
    session.handle(req(R.SET_PROTOCOL_FEATURES, VhostUserU64(0)))
    session.handle(req(R.SET_FEATURES, VhostUserU64(V1)))
    assert [f.rule_id for f in session.findings] == ["VU-NEG-011"]
    assert session.acked_features == V1


def test_postcopy_with_mem_slots_is_refused(session: Session) -> None:
    negotiate(session)
    with pytest.raises(ProtocolViolation) as info:
        session.handle(req(R.POSTCOPY_ADVISE))
    assert info.value.rule_id == "VU-MEM-012"


def test_postcopy_listen_after_regions_are_mapped_is_refused() -> None:
    session = Session(Device(), observer=True)
    negotiate(session, protocol=ALL_PROTOCOL & ~ProtocolFeature.CONFIGURE_MEM_SLOTS)
    region = VhostUserMemoryRegion(0, 4096, 0x7F00_0000_0000, 0)
    session.handle(req(R.SET_MEM_TABLE, VhostUserMemory((region,)), fds=(efd(),)))
    session.handle(req(R.POSTCOPY_LISTEN))
    assert session.findings[-1].rule_id == "VU-MEM-013"


def test_set_inflight_fd_after_rings_started_is_refused(session: Session) -> None:
    from vhsm.wire import VhostUserInflight

    negotiate(session)
    start_ring(session)
    memfd = os.memfd_create("inflight")
    with pytest.raises(ProtocolViolation) as info:
        session.handle(req(R.SET_INFLIGHT_FD, VhostUserInflight(4096, 0, 2, 256), fds=(memfd,)))
    assert info.value.rule_id == "VU-STATE-005"


def test_n9_iotlb_without_access_platform(session: Session) -> None:
    negotiate(session)
    from vhsm.wire import VhostUserIotlb

    with pytest.raises(ProtocolViolation) as info:
        session.handle(req(R.IOTLB_MSG, VhostUserIotlb(0, 4096, 0, 3, 2)))
    assert info.value.rule_id == "VU-NEG-009"


def test_n10_second_set_owner_is_warned(session: Session) -> None:
    session.handle(req(R.SET_OWNER))
    session.handle(req(R.SET_OWNER))
    assert session.findings[-1].rule_id == "VU-NEG-010"


# --- ring rejections (VU-RING-*) ----------------------------------------------------------
@pytest.mark.parametrize(
    "code", [R.SET_VRING_NUM, R.SET_VRING_BASE, R.GET_VRING_BASE, R.SET_VRING_ENABLE]
)
def test_r1_ring_index_out_of_range(session: Session, code: FrontendReq) -> None:
    negotiate(session)
    with pytest.raises(ProtocolViolation) as info:
        session.handle(req(code, vstate(2, 1 if code is not R.GET_VRING_BASE else 0)))
    assert info.value.rule_id == "VU-RING-001" and "0..1" in info.value.detail


def test_r1_kick_index_out_of_range_closes_fd(session: Session) -> None:
    negotiate(session)
    before = fd_count()
    with pytest.raises(ProtocolViolation) as info:
        session.handle(req(R.SET_VRING_KICK, VhostUserVringFd(5, False), fds=(efd(),)))
    assert info.value.rule_id == "VU-RING-001"
    assert fd_count() <= before


@pytest.mark.parametrize("num", [0, 3, 2048, 65535])
def test_r2_bad_ring_sizes(session: Session, num: int) -> None:
    negotiate(session)
    with pytest.raises(ProtocolViolation) as info:
        session.handle(req(R.SET_VRING_NUM, vstate(0, num)))
    assert info.value.rule_id == "VU-RING-002"


def test_r2_packed_ring_size_need_not_be_power_of_two() -> None:
    packed = int(VirtioFeature.RING_PACKED)
    session = Session(Device(features=V1 | VF30 | packed))
    negotiate(session)
    session.handle(req(R.SET_VRING_NUM, vstate(0, 300)))


@pytest.mark.parametrize(
    "addr",
    [
        VhostUserVringAddr(0, 2, 0x1000, 0x3000, 0x2000, 0),
        VhostUserVringAddr(0, 0, 0x1008, 0x3000, 0x2000, 0),
        VhostUserVringAddr(0, 0, 0x1000, 0x3002, 0x2000, 0),
        VhostUserVringAddr(0, 0, 0x1000, 0x3000, 0x2001, 0),
    ],
)
def test_r3_bad_vring_addr(session: Session, addr: VhostUserVringAddr) -> None:
    negotiate(session)
    with pytest.raises(ProtocolViolation) as info:
        session.handle(req(R.SET_VRING_ADDR, addr))
    assert info.value.rule_id == "VU-RING-003"


class UnmappedPlane(NullDataPlane):
    def set_vring_addr(self, index: int, addr: VhostUserVringAddr) -> None:
        raise GuestMemoryError(f"desc {addr.desc_user_addr:#x} not in any region")


def test_r4_ring_addresses_outside_memory() -> None:
    session = Session(Device(), UnmappedPlane())
    negotiate(session)
    with pytest.raises(ProtocolViolation) as info:
        session.handle(req(R.SET_VRING_ADDR, VhostUserVringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0)))
    assert info.value.rule_id == "VU-RING-004" and "0x1000" in info.value.detail


def test_r5_split_base_reserved_bits(session: Session) -> None:
    negotiate(session)
    with pytest.raises(ProtocolViolation) as info:
        session.handle(req(R.SET_VRING_BASE, vstate(0, 0x10000)))
    assert info.value.rule_id == "VU-RING-005"


class PackedIndexPlane(NullDataPlane):
    def set_vring_base(self, index: int, base: int) -> None:
        raise ValueError(f"packed avail index {base & 0x7FFF} >= queue size 64")


def test_r5_packed_base_past_the_ring_is_a_violation_not_an_internal_error() -> None:
    session = Session(Device(), PackedIndexPlane())
    negotiate(session)
    with pytest.raises(ProtocolViolation) as info:
        session.handle(req(R.SET_VRING_BASE, vstate(0, 0x400)))
    assert info.value.rule_id == "VU-RING-005" and "1024" in info.value.detail


def test_get_vring_base_with_leftover_num_is_only_warned(session: Session) -> None:
    negotiate(session)
    start_ring(session)
    reply = session.handle(req(R.GET_VRING_BASE, vstate(0, 0x55)))
    assert reply is not None and session.findings[-1].rule_id == "VU-RING-010"


# --- memory, payloads, unsupported ----------------------------------------------------------
class RejectingPlane(NullDataPlane):
    def set_mem_table(self, regions: object, fds: object) -> None:
        super().set_mem_table(regions, fds)  # type: ignore[arg-type]
        raise GuestMemoryError("regions overlap", rule_id="VU-MEM-005")


def test_memory_errors_keep_their_rule_and_fds_are_closed() -> None:
    session = Session(Device(), RejectingPlane())
    before = fd_count()
    region = VhostUserMemoryRegion(0, 4096, 0x7000, 0)
    fds = (os.memfd_create("r1"), os.memfd_create("r2"))
    with pytest.raises(ProtocolViolation) as info:
        session.handle(req(R.SET_MEM_TABLE, VhostUserMemory((region, region)), fds=fds))
    assert info.value.rule_id == "VU-MEM-005"
    assert fd_count() <= before


def test_p2_set_config_readonly_is_refused(session: Session) -> None:
    negotiate(session)
    reply = session.handle(req(R.SET_CONFIG, VhostUserConfig(0, 4, 0, b"abcd"), ack=True))
    assert reply is not None and reply.payload == VhostUserU64(1)
    assert session.findings[-1].rule_id == "VU-PAY-002"
    session.handle(req(R.SET_CONFIG, VhostUserConfig(8, 4, 0, b"abcd")))
    reply = session.handle(req(R.GET_CONFIG, VhostUserConfig(8, 4, 0, bytes(4))))
    assert reply is not None and reply.payload == VhostUserConfig(8, 4, 0, b"abcd")


def test_get_config_error_is_a_zero_length_reply(session: Session) -> None:
    negotiate(session)
    reply = session.handle(req(R.GET_CONFIG, VhostUserConfig(12, 8, 0, bytes(8))))
    assert reply is not None and reply.payload is None and encode(reply)[8:12] == bytes(4)


def test_unsupported_request_policy(session: Session) -> None:
    negotiate(session, protocol=ALL_PROTOCOL & ~ProtocolFeature.CONFIGURE_MEM_SLOTS)
    nack = session.handle(req(R.POSTCOPY_END, ack=True))
    assert nack is not None and nack.payload == VhostUserU64(1)
    assert session.findings[-1].rule_id == "VU-REQ-001"
    with pytest.raises(ProtocolViolation) as info:
        session.handle(req(R.GPU_SET_SOCKET, fds=(efd(),)))
    assert info.value.rule_id == "VU-REQ-001"


def test_wire_errors_are_raised_as_violations(session: Session) -> None:
    msg = Message(int(R.SET_FEATURES), 0x1, None, (), b"")
    (bad,) = Decoder().feed(encode(msg) + b"", ())
    with pytest.raises(ProtocolViolation) as info:
        session.handle(bad)
    assert info.value.rule_id == "VU-FRAME-006"


def test_observer_collects_instead_of_raising() -> None:
    session = Session(Device(), observer=True)
    assert session.handle(req(R.SET_VRING_NUM, vstate(0, 3))) is None
    session.handle(req(R.SET_FEATURES, VhostUserU64(V1 | int(VirtioFeature.RING_PACKED))))
    # observing, every condition is evaluated: the early ring request breaks two rules
    assert [f.rule_id for f in session.findings] == ["VU-STATE-002", "VU-RING-002", "VU-NEG-004"]
    assert session.state is SessionState.SUSPENDED


def test_f3_reply_flag_on_a_request(session: Session) -> None:
    msg = Message(int(R.GET_FEATURES), 0x5, None, (), b"")
    (decoded,) = Decoder().feed(encode(msg), ())
    with pytest.raises(ProtocolViolation) as info:
        session.handle(decoded)
    assert info.value.rule_id == "VU-FRAME-003"


@pytest.mark.parametrize("code", [R.GET_INFLIGHT_FD, R.SET_INFLIGHT_FD])
def test_inflight_geometry_is_bounded_by_the_device(session: Session, code: FrontendReq) -> None:
    from vhsm.wire import VhostUserInflight

    negotiate(session)
    before = fd_count()
    fds = (os.memfd_create("inflight"),) if code is R.SET_INFLIGHT_FD else ()
    with pytest.raises(ProtocolViolation) as info:
        session.handle(req(code, VhostUserInflight(1 << 30, 0, 65535, 32768), fds=fds))
    assert info.value.rule_id == "VU-PAY-003" and "65535 queues" in info.value.detail
    assert fd_count() <= before

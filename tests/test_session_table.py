"""Walk every (phase, trigger) pair of the session and every (state, trigger) pair of a ring.

The session fires a request on every machine that declares it: when each of them
allows it from its current state, every machine must land on a destination its
YAML declares; otherwise `ProtocolViolation` carries the rule the refusing
machine's YAML names for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from test_session import (
    ALL_PROTOCOL,
    EVENT_IDX,
    V1,
    VF30,
    Device,
    efd,
    negotiate,
    req,
    start_ring,
)

from vhsm.errors import ProtocolViolation
from vhsm.session import Session, SessionState, VringMachineState
from vhsm.session.machines import MachineSpec, composition, load_machine_spec
from vhsm.wire import (
    FrontendReq,
    Message,
    VhostUserConfig,
    VhostUserInflight,
    VhostUserIotlb,
    VhostUserLog,
    VhostUserMemory,
    VhostUserMemoryRegion,
    VhostUserShared,
    VhostUserSingleMemoryRegion,
    VhostUserTransferDeviceState,
    VhostUserU64,
    VhostUserVringAddr,
    VhostUserVringFd,
    VhostUserVringState,
    VirtioFeature,
)

R = FrontendReq
ACCESS_PLATFORM = int(VirtioFeature.ACCESS_PLATFORM)
FEATURES = V1 | VF30 | EVENT_IDX | ACCESS_PLATFORM
COMPOSITION = composition()
VRING = load_machine_spec("vring")
TRIGGERS = tuple(dict.fromkeys(t for spec in COMPOSITION.specs for t in spec.triggers))
REGION = VhostUserMemoryRegion(0, 0x10000, 0x7F0000000000, 0)


def memfd() -> int:
    return os.memfd_create("table", os.MFD_CLOEXEC)


def message(trigger: str, num: int = 0, value: int = FEATURES) -> Message:
    """A valid message for `trigger` aimed at ring 0."""
    code = R[trigger.upper()]
    ring = VhostUserVringState(0, num)
    payloads: dict[str, Callable[[], tuple[object, tuple[int, ...]]]] = {
        "set_features": lambda: (VhostUserU64(value), ()),
        "set_protocol_features": lambda: (VhostUserU64(ALL_PROTOCOL), ()),
        "set_mem_table": lambda: (VhostUserMemory((REGION,)), (memfd(),)),
        "add_mem_reg": lambda: (VhostUserSingleMemoryRegion(REGION), (memfd(),)),
        "rem_mem_reg": lambda: (VhostUserSingleMemoryRegion(REGION), ()),
        "set_log_base": lambda: (VhostUserLog(4096, 0), (memfd(),)),
        "set_log_fd": lambda: (None, (efd(),)),
        "set_vring_num": lambda: (VhostUserVringState(0, 256), ()),
        "set_vring_addr": lambda: (VhostUserVringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0), ()),
        "set_vring_base": lambda: (ring, ()),
        "get_vring_base": lambda: (ring, ()),
        "get_vring_base_skip_drain": lambda: (ring, ()),
        "set_vring_enable": lambda: (ring, ()),
        "set_vring_endian": lambda: (ring, ()),
        "vring_kick": lambda: (ring, ()),
        "set_vring_kick": lambda: (VhostUserVringFd(0, False), (efd(),)),
        "set_vring_call": lambda: (VhostUserVringFd(0, False), (efd(),)),
        "set_vring_err": lambda: (VhostUserVringFd(0, False), (efd(),)),
        "set_backend_req_fd": lambda: (None, (efd(),)),
        "gpu_set_socket": lambda: (None, (efd(),)),
        "get_config": lambda: (VhostUserConfig(0, 4, 0, bytes(4)), ()),
        "set_config": lambda: (VhostUserConfig(8, 4, 0, bytes(4)), ()),
        "get_inflight_fd": lambda: (VhostUserInflight(0, 0, 2, 256), ()),
        "set_inflight_fd": lambda: (VhostUserInflight(4096, 0, 2, 256), (memfd(),)),
        "set_status": lambda: (VhostUserU64(0x0B), ()),
        "net_set_mtu": lambda: (VhostUserU64(1500), ()),
        "send_rarp": lambda: (VhostUserU64(0x1234), ()),
        "close_crypto_session": lambda: (VhostUserU64(1), ()),
        "get_shared_object": lambda: (VhostUserShared(__import__("uuid").uuid4()), ()),
        "set_device_state_fd": lambda: (VhostUserTransferDeviceState(0, 0), (efd(),)),
        "iotlb_msg": lambda: (VhostUserIotlb(0, 4096, 0x7F0000000000, 3, 2), ()),
    }
    payload, fds = payloads.get(trigger, lambda: (None, ()))()
    return req(code, payload, fds=fds)


def allowed_destinations(spec: MachineSpec, state: str, trigger: str) -> set[str] | None:
    dests = {
        spec.destination(t, spec.states[state]).name
        for t in spec.transitions
        if t["trigger"] == trigger and spec.states[state] in spec.sources(t)
    }
    return dests or None


# --- session machine -------------------------------------------------------------------
def session_in(state: SessionState) -> Session:
    session = Session(Device(features=FEATURES))
    session.handle(req(R.SET_PROTOCOL_FEATURES, VhostUserU64(ALL_PROTOCOL)))
    if state is not SessionState.NEGOTIATING:
        negotiate(session)
    if state is SessionState.RUNNING:
        start_ring(session, 1)  # the messages aim at ring 0, which stays configurable
    assert session.state is state
    return session


SESSION_PAIRS = [(s, t) for s in SessionState for t in TRIGGERS]
#: Rules a declared transition may still break on this test's payloads: policy refusals,
#: gates, and the guards of the declaring machines.
POLICY = {"VU-REQ-001", "VU-MEM-012", "VU-NEG-009", "VU-MEM-008"}


def machine_states(session: Session) -> dict[str, str]:
    """Each machine's current state (ring 0 stands for the ring machine)."""
    return {
        name: (session.vring_state(0) if name == "vring" else session.machine_state(name)).name
        for name in COMPOSITION.machines
    }


@pytest.mark.parametrize(
    ("state", "trigger"), SESSION_PAIRS, ids=[f"{s.name}-{t}" for s, t in SESSION_PAIRS]
)
def test_session_pair(state: SessionState, trigger: str) -> None:
    session = session_in(state)
    before = machine_states(session)
    allowed = {
        name: allowed_destinations(load_machine_spec(name), before[name], trigger)
        for name in COMPOSITION.declaring(trigger)
    }
    msg = message(trigger)
    refusing = [name for name, dests in allowed.items() if dests is None]
    if refusing:
        with pytest.raises(ProtocolViolation) as info:
            session.handle(msg)
        rules = {
            load_machine_spec(n).invalid_state_rules.get(trigger, "VU-STATE-001") for n in refusing
        }
        assert info.value.rule_id in rules | POLICY | guard_rules(trigger)
        return
    try:
        session.handle(msg)
    except ProtocolViolation as violation:
        assert violation.rule_id in POLICY | guard_rules(trigger), violation
        return
    after = machine_states(session)
    for name, dests in allowed.items():
        assert dests is not None and after[name] in dests, name


def guard_rules(trigger: str) -> set[str]:
    """Every rule a condition of a transition of `trigger` names, in any machine."""
    return {
        spec.conditions[c]["rule"]
        for spec in COMPOSITION.specs
        for t in spec.transitions
        if t["trigger"] == trigger
        for c in t.get("conditions", [])
        if "rule" in spec.conditions[c]
    }


# --- vring machine -----------------------------------------------------------------------
def session_with_ring(state: VringMachineState) -> Session:
    session = session_in(SessionState.SUSPENDED)
    if state.enabled:
        session.handle(req(R.SET_VRING_ENABLE, VhostUserVringState(0, 1)))
    if state.started:
        start_ring(session)
    assert session.vring_state(0) is state
    return session


#: Each vring trigger with the payload variants its selectors tell apart.
VARIANTS: dict[str, list[dict[str, int]]] = {
    "set_vring_enable": [{"num": 1}, {"num": 0}],
    "set_features": [{"value": FEATURES}, {"value": FEATURES & ~VF30}],
}
SELECTORS: dict[str, Callable[[dict[str, int]], bool]] = {
    "enable_requested": lambda kw: kw.get("num") == 1,
    "disable_requested": lambda kw: kw.get("num") == 0,
    "lacks_protocol_features": lambda kw: not kw.get("value", FEATURES) & VF30,
    "has_protocol_features": lambda kw: bool(kw.get("value", FEATURES) & VF30),
}
VRING_CASES = [
    (s, t, kw) for s in VringMachineState for t in VRING.triggers for kw in VARIANTS.get(t, [{}])
]


def expected_vring_dest(state: VringMachineState, trigger: str, kw: dict[str, int]) -> str | None:
    for t in VRING.transitions:
        if t["trigger"] != trigger or state not in VRING.sources(t):
            continue
        selectors = [c for c in t.get("conditions", []) if c in SELECTORS]
        if all(SELECTORS[c](kw) for c in selectors):
            return VRING.destination(t, state).name
    return None


@pytest.mark.parametrize(
    ("state", "trigger", "kw"), VRING_CASES, ids=[f"{s.name}-{t}-{kw}" for s, t, kw in VRING_CASES]
)
def test_vring_pair(state: VringMachineState, trigger: str, kw: dict[str, int]) -> None:
    session = session_with_ring(state)
    expected = expected_vring_dest(state, trigger, kw)
    msg = message(trigger, **kw)
    if state.started and trigger == "set_features" and kw["value"] != FEATURES:
        expected = None  # the session refuses it first: only LOG_ALL may change (VU-NEG-008)
    if expected is None:
        with pytest.raises(ProtocolViolation) as info:
            session.handle(msg)
        default = "VU-NEG-008" if trigger == "set_features" else "VU-STATE-001"
        assert info.value.rule_id == VRING.invalid_state_rules.get(trigger, default)
        assert session.vring_state(0) is state
        return
    session.handle(msg)
    assert session.vring_state(0).name == expected


#: How to bring one machine into each of its states (after protocol features are set).
RECIPES: dict[str, dict[str, list[str]]] = {
    "ownership": {"UNOWNED": [], "OWNED": ["set_owner"]},
    "protocol_features": {
        "NOT_OFFERED": [],
        "OFFERED": ["get_protocol_features"],
        "SET": ["get_protocol_features", "set_protocol_features"],
    },
    "features": {"UNSET": [], "ACKED": ["set_features"]},
    "memory": {
        "NO_TABLE": [],
        "MAPPED": ["set_mem_table"],
        "LOGGING": ["set_mem_table", "set_log_base"],
    },
    "backend_channel": {"ABSENT": [], "CONNECTED": ["set_backend_req_fd"]},
    "inflight": {
        "NONE": [],
        "ALLOCATED": ["get_inflight_fd"],
        "ADOPTED": ["set_inflight_fd"],
    },
    "status": {"RESET": [], "ACTIVE": ["set_status"]},
    "device_state": {"IDLE": [], "TRANSFERRING": ["set_device_state_fd"]},
    "device": {"SERVING": []},
}
MACHINE_CASES = [
    (name, state, trigger)
    for name, states in RECIPES.items()
    for state in states
    for trigger in load_machine_spec(name).triggers
]


def machine_in(name: str, state: str) -> Session:
    session = Session(Device(features=FEATURES))
    if name != "protocol_features":
        session.handle(req(R.SET_PROTOCOL_FEATURES, VhostUserU64(ALL_PROTOCOL)))
    for trigger in RECIPES[name][state]:
        session.handle(message(trigger))
    assert session.machine_state(name).name == state
    return session


@pytest.mark.parametrize(
    ("name", "state", "trigger"), MACHINE_CASES, ids=[f"{n}-{s}-{t}" for n, s, t in MACHINE_CASES]
)
def test_machine_pair(name: str, state: str, trigger: str) -> None:
    session = machine_in(name, state)
    spec = load_machine_spec(name)
    dests = allowed_destinations(spec, state, trigger)
    try:
        session.handle(message(trigger))
    except ProtocolViolation as violation:
        refused = spec.invalid_state_rules.get(trigger, "VU-STATE-001")
        expected = POLICY | guard_rules(trigger) | ({refused} if dests is None else set())
        assert violation.rule_id in expected, violation
        assert session.machine_state(name).name == state
        return
    assert dests is not None and session.machine_state(name).name in dests


def test_every_declared_state_and_row_is_exercised() -> None:
    """Each machine's every state has a recipe, each declared (source, trigger) is walked."""
    walked_vring = {(s.name, t) for s, t, _ in VRING_CASES}
    for t in VRING.transitions:
        for source in VRING.sources(t):
            assert (source.name, t["trigger"]) in walked_vring
    walked = {(n, s, t) for n, s, t in MACHINE_CASES}
    for name in COMPOSITION.machines:
        if name == COMPOSITION.ring_machine:
            continue
        spec = load_machine_spec(name)
        assert set(RECIPES[name]) == {state.name for state in spec.states}, name
        for t in spec.transitions:
            for source in spec.sources(t):
                assert (name, source.name, t["trigger"]) in walked

"""What the live runtime rejects, `vhsm audit trace` flags with the same rule id.

Each scenario is a valid set-up followed by one request that breaks a rule. It
runs through the live path (a `Session` over the daemon's `DevicePlane`, real
memfds mapped), whose requests and replies are written as a transcript, as
`vhsm record` writes one; `audit_trace` reads it back and must flag the rule
the runtime named.

One rule is left out on purpose: a ring index beyond the back-end's rings
(VU-RING-001). A transcript's GET_QUEUE_NUM answer may count queue pairs (net
devices), so the auditor counts the rings a session uses instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import pytest

from vhsm.audit import audit_trace, parse_lines
from vhsm.backend import VhostUserBackend
from vhsm.device_plane import DevicePlane
from vhsm.errors import ProtocolViolation
from vhsm.memory import GuestMemoryAtomic
from vhsm.session import Session
from vhsm.wire import (
    FrontendReq,
    Message,
    ProtocolFeature,
    VhostUserInflight,
    VhostUserMemory,
    VhostUserMemoryRegion,
    VhostUserSingleMemoryRegion,
    VhostUserU64,
    VhostUserVringAddr,
    VhostUserVringFd,
    VhostUserVringState,
    VirtioFeature,
    make_request,
    message_to_record,
)

R = FrontendReq
PF = ProtocolFeature
FEATURES = int(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES | VirtioFeature.LOG_ALL)
PROTOCOL = int(PF.MQ | PF.REPLY_ACK | PF.CONFIGURE_MEM_SLOTS | PF.INFLIGHT_SHMFD | PF.STATUS)
SIZE = 0x10000
UVA = 0x7F00_0000_0000
REGION = VhostUserMemoryRegion(0, SIZE, UVA, 0)


class Device(VhostUserBackend):
    """Two small queues, the features above, four memory slots."""

    def num_queues(self) -> int:
        return 2

    def max_queue_size(self) -> int:
        return 256

    def features(self) -> int:
        return FEATURES

    def protocol_features(self) -> int:
        return PROTOCOL

    def max_mem_slots(self) -> int:
        return 2


def memfd() -> int:
    fd = os.memfd_create("parity", os.MFD_CLOEXEC)
    os.ftruncate(fd, SIZE)
    return fd


def efd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC)


def region(gpa: int, uva: int) -> VhostUserMemoryRegion:
    return VhostUserMemoryRegion(gpa, SIZE, uva, 0)


Step = Callable[[], Message]


def req(
    code: FrontendReq, payload: object = None, fds: Callable[[], tuple[int, ...]] = tuple
) -> Step:
    return lambda: make_request(code, payload, fds=fds())  # type: ignore[arg-type]


NEGOTIATE = [
    req(R.GET_FEATURES),
    req(R.GET_PROTOCOL_FEATURES),
    req(R.SET_PROTOCOL_FEATURES, VhostUserU64(PROTOCOL)),
    req(R.GET_QUEUE_NUM),
    req(R.GET_MAX_MEM_SLOTS),
    req(R.SET_OWNER),
    req(R.SET_FEATURES, VhostUserU64(FEATURES)),
]
TABLE = [*NEGOTIATE, req(R.SET_MEM_TABLE, VhostUserMemory((REGION,)), lambda: (memfd(),))]
ADDR = VhostUserVringAddr(0, 0, UVA, UVA + 0x2000, UVA + 0x1000, 0)
RUNNING = [
    *TABLE,
    req(R.SET_VRING_NUM, VhostUserVringState(0, 64)),
    req(R.SET_VRING_BASE, VhostUserVringState(0, 0)),
    req(R.SET_VRING_ADDR, ADDR),
    req(R.SET_VRING_KICK, VhostUserVringFd(0, False), lambda: (efd(),)),
]

SCENARIOS: dict[str, tuple[list[Step], str]] = {
    "ring configured before SET_FEATURES": (
        [req(R.SET_VRING_NUM, VhostUserVringState(0, 64))],
        "VU-STATE-002",
    ),
    "un-offered virtio bit": (
        [
            *NEGOTIATE[:-1],
            req(R.SET_FEATURES, VhostUserU64(FEATURES | int(VirtioFeature.RING_PACKED))),
        ],
        "VU-NEG-004",
    ),
    "gated request without its protocol feature": ([*NEGOTIATE, req(R.RESET_DEVICE)], "VU-NEG-002"),
    "ring size not a power of two": (
        [*NEGOTIATE, req(R.SET_VRING_NUM, VhostUserVringState(0, 3))],
        "VU-RING-002",
    ),
    "ring addresses outside the table": (
        [*TABLE, req(R.SET_VRING_ADDR, VhostUserVringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0))],
        "VU-RING-004",
    ),
    "overlapping regions": (
        [
            *NEGOTIATE,
            req(
                R.SET_MEM_TABLE,
                VhostUserMemory((region(0, UVA), region(SIZE // 2, UVA + 0x100000))),
                lambda: (memfd(), memfd()),
            ),
        ],
        "VU-MEM-005",
    ),
    "region added over another": (
        [
            *TABLE,
            req(
                R.ADD_MEM_REG,
                VhostUserSingleMemoryRegion(region(0, UVA + 0x100000)),
                lambda: (memfd(),),
            ),
        ],
        "VU-MEM-005",
    ),
    "a table larger than the slots": (
        [
            *NEGOTIATE,
            req(
                R.SET_MEM_TABLE,
                VhostUserMemory(tuple(region(i * SIZE, UVA + i * SIZE) for i in range(3))),
                lambda: (memfd(), memfd(), memfd()),
            ),
        ],
        "VU-MEM-007",
    ),
    "more regions than slots": (
        [
            *TABLE,
            req(
                R.ADD_MEM_REG,
                VhostUserSingleMemoryRegion(region(SIZE, UVA + SIZE)),
                lambda: (memfd(),),
            ),
            req(
                R.ADD_MEM_REG,
                VhostUserSingleMemoryRegion(region(2 * SIZE, UVA + 2 * SIZE)),
                lambda: (memfd(),),
            ),
        ],
        "VU-MEM-007",
    ),
    "removing an unknown region": (
        [*TABLE, req(R.REM_MEM_REG, VhostUserSingleMemoryRegion(region(8 * SIZE, UVA + 8 * SIZE)))],
        "VU-MEM-008",
    ),
    "features changed under running rings": (
        [*RUNNING, req(R.SET_FEATURES, VhostUserU64(FEATURES & ~int(VirtioFeature.VERSION_1)))],
        "VU-NEG-008",
    ),
    "inflight buffer after rings started": (
        [*RUNNING, req(R.SET_INFLIGHT_FD, VhostUserInflight(4096, 0, 2, 64), lambda: (memfd(),))],
        "VU-STATE-005",
    ),
    "ring size changed while started": (
        [*RUNNING, req(R.SET_VRING_NUM, VhostUserVringState(0, 128))],
        "VU-STATE-004",
    ),
    "postcopy with memory slots": ([*NEGOTIATE, req(R.POSTCOPY_ADVISE)], "VU-NEG-002"),
}


def live(steps: list[Step]) -> tuple[list[str], list[dict[str, object]]]:
    """The rule ids the runtime reports, and the session as transcript records.

    The runtime stops at the first rejection, as the daemon closes the connection.
    """
    backend = Device()
    plane = DevicePlane(backend, GuestMemoryAtomic())
    session = Session(backend, plane)
    plane.attach(session)
    records: list[dict[str, object]] = [{"conn": 1, "event": "open", "t": 0.0}]
    try:
        for number, step in enumerate(steps):
            msg = step()
            records.append(message_to_record(msg, direction="F>B", t=float(number), conn=1))
            try:
                reply = session.handle(msg)
            except ProtocolViolation:
                break
            if reply is not None:
                records.append(message_to_record(reply, direction="B>F", t=number + 0.5, conn=1))
                for fd in reply.fds:
                    os.close(fd)
    finally:
        plane.close()
    return [f.rule_id for f in session.findings], records


def audited(records: list[dict[str, object]]) -> list[str]:
    """The front-end rule ids `audit_trace` reports for the transcript."""
    report = audit_trace(parse_lines(json.dumps(r) for r in records))
    return [f.rule_id for f in report.findings if f.side == "front-end"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_runtime_and_auditor_flag_the_same_rule(name: str) -> None:
    steps, rule_id = SCENARIOS[name]
    found, records = live(steps)
    assert found[-1:] == [rule_id]
    assert rule_id in audited(records)

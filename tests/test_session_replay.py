"""Replay the real transcripts (QEMU 7.2 blk and net, DPDK 22.11 net) through a `Session`.

The back-end stub offers what the recorded back-end offered; every front-end
message must be accepted, every reply must match the recorded one in shape,
and in value wherever the offered features determine it.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from vhsm.backend import VhostUserBackend
from vhsm.session import Session, SessionState
from vhsm.wire import DEFAULT_MAX_MEM_SLOTS, MAX_QUEUE_SIZE, Decoder, FrontendReq, Message, encode

DATA = Path(__file__).parent / "data"
#: Replies whose value the offered features (or the stub's recorded state) determine.
VALUE_CHECKED = {
    "GET_FEATURES",
    "GET_PROTOCOL_FEATURES",
    "GET_QUEUE_NUM",
    "GET_MAX_MEM_SLOTS",
    "GET_CONFIG",
    "GET_STATUS",
    "SET_BACKEND_REQ_FD",
    "ADD_MEM_REG",
    "SET_MEM_TABLE",
    "SET_STATUS",
}


def load(name: str) -> list[dict[str, Any]]:
    with (DATA / name).open() as handle:
        return [json.loads(line) for line in handle if '"dir"' in line]


def recorded_u64(lines: list[dict[str, Any]], name: str) -> int:
    reply = next(x for x in lines if x["dir"] == "B>F" and x["name"] == name)
    value: int = struct.unpack("<Q", bytes.fromhex(reply["payload"]))[0]
    return value


class RecordedBackend(VhostUserBackend):
    """Offers exactly what the recorded back-end offered."""

    def __init__(self, lines: list[dict[str, Any]]) -> None:
        self.lines = lines
        self._features = recorded_u64(lines, "GET_FEATURES")
        self._protocol = recorded_u64(lines, "GET_PROTOCOL_FEATURES")
        rings = [
            int.from_bytes(bytes.fromhex(x["payload"])[:4], "little")
            for x in lines
            if x["name"].startswith("SET_VRING_") and x["dir"] == "F>B"
        ]
        self._queues = max(rings) + 1
        self._config = next(
            (
                bytes.fromhex(x["payload"])[12:]
                for x in lines
                if x["dir"] == "B>F" and x["name"] == "GET_CONFIG"
            ),
            b"",
        )

    def num_queues(self) -> int:
        return self._queues

    def queue_num(self) -> int:
        replies = [x for x in self.lines if x["dir"] == "B>F" and x["name"] == "GET_QUEUE_NUM"]
        return recorded_u64(self.lines, "GET_QUEUE_NUM") if replies else self._queues

    def max_mem_slots(self) -> int:
        replies = [x for x in self.lines if x["dir"] == "B>F" and x["name"] == "GET_MAX_MEM_SLOTS"]
        return recorded_u64(self.lines, "GET_MAX_MEM_SLOTS") if replies else DEFAULT_MAX_MEM_SLOTS

    def max_queue_size(self) -> int:
        return MAX_QUEUE_SIZE

    def features(self) -> int:
        return self._features

    def protocol_features(self) -> int:
        return self._protocol

    def get_config(self, offset: int, size: int) -> bytes:
        return self._config[offset : offset + size]


def to_message(line: dict[str, Any]) -> Message:
    """Rebuild the message from its recorded bytes, with fresh fds for the recorded count."""
    payload = bytes.fromhex(line["payload"])
    raw = struct.pack("<III", line["req"], int(line["flags"], 16), len(payload)) + payload
    fds = []
    for _ in range(line["nfds"]):
        if line["name"] in ("SET_MEM_TABLE", "ADD_MEM_REG"):
            fd = os.memfd_create("replay", os.MFD_CLOEXEC)
        else:
            fd = os.eventfd(0, os.EFD_CLOEXEC)
        fds.append(fd)
    (msg,) = Decoder().feed(raw, fds)
    return msg


def replay(name: str) -> tuple[Session, list[tuple[str, Message | None, dict[str, Any] | None]]]:
    lines = load(name)
    session = Session(RecordedBackend(lines))
    results = []
    for i, line in enumerate(lines):
        if line["dir"] != "F>B":
            continue
        reply = session.handle(to_message(line))
        nxt = lines[i + 1] if i + 1 < len(lines) else None
        recorded = (
            nxt if nxt is not None and nxt["dir"] == "B>F" and nxt["req"] == line["req"] else None
        )
        results.append((line["name"], reply, recorded))
    return session, results


@pytest.mark.parametrize(
    "transcript", ["qemu72-blk.jsonl", "dpdk2211-net.jsonl", "qemu72-net.jsonl"]
)
def test_every_message_accepted_and_replies_match(transcript: str) -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    session, results = replay(transcript)
    assert session.findings == [] or all(
        f.rule_id in ("VU-RING-010", "VU-NEG-012", "VU-STATE-012") for f in session.findings
    ), session.findings
    for name, reply, recorded in results:
        if recorded is None:
            assert reply is None, f"{name}: vhsm replied where the recorded back-end did not"
            continue
        assert reply is not None, f"{name}: no reply, the recorded back-end sent one"
        ours = encode(reply)
        assert reply.flags == int(recorded["flags"], 16) == 0x5
        assert len(ours) - 12 == recorded["size"], name
        if name in VALUE_CHECKED:
            assert ours[12:].hex() == recorded["payload"], name
    assert session.state is SessionState.SUSPENDED
    assert len(os.listdir("/proc/self/fd")) <= fds_before


def test_qemu_transcript_walks_the_session_machine() -> None:
    seen: list[tuple[str, str, str]] = []
    lines = load("qemu72-blk.jsonl")
    session = Session(RecordedBackend(lines))
    session.listeners.append(
        lambda machine, index, old, new, trigger: seen.append((old, new, trigger))
    )
    for line in lines:
        if line["dir"] == "F>B":
            session.handle(to_message(line))
    assert seen.count(("SUSPENDED", "RUNNING", "set_vring_kick")) == 2  # SeaBIOS, then Linux
    assert ("NEGOTIATING", "SUSPENDED", "set_features") in seen
    assert FrontendReq.GET_VRING_BASE.name.lower() in {t for _, _, t in seen}


def test_qemu_net_enables_rings_before_set_features_and_they_start_enabled() -> None:
    """QEMU 7.2 vhost-user-net: the early enables are kept and the rings start enabled."""
    lines = load("qemu72-net.jsonl")
    session = Session(RecordedBackend(lines))
    seen: list[tuple[str, int | None, str, str]] = []
    session.listeners.append(
        lambda machine, index, old, new, trigger: seen.append((machine, index, new, trigger))
    )
    for line in lines:
        if line["dir"] == "F>B":
            session.handle(to_message(line))
    for ring in (0, 1):
        assert ("vring", ring, "STOPPED_ENABLED", "set_vring_enable") in seen
        assert ("vring", ring, "STARTED_ENABLED", "set_vring_kick") in seen
    early = [f for f in session.findings if f.state == "NEGOTIATING"]
    assert len(early) == 10 and {f.rule_id for f in session.findings} == {"VU-STATE-012"}

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

try:
    from tests.wire_strategies import STRATEGIES, example
except ImportError:  # tests/ is not a package
    from wire_strategies import STRATEGIES, example  # type: ignore[no-redef,import-not-found,unused-ignore]

from vhsm.wire import (
    BlkFeature,
    Channel,
    FrontendReq,
    Message,
    RecordError,
    encode,
    make_reply,
    make_request,
    message_to_record,
    payload_from_dict,
    payload_to_dict,
    record_to_message,
)
from vhsm.wire import payloads as p
from vhsm.wire.catalogue import catalogue
from vhsm.wire.framing import HEADER, decode_message

DATA = Path(__file__).parent / "data"
ALL = [p.PAYLOAD_CLASSES[name] for name in sorted(p.PAYLOAD_CLASSES)]


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
@given(data=st.data())
def test_payload_dict_round_trip(cls: type[Any], data: st.DataObject) -> None:
    payload = data.draw(STRATEGIES[cls])
    as_json = json.loads(json.dumps(payload_to_dict(payload)))
    assert payload_from_dict(cls.__name__, as_json) == payload


def _nfds(rule: str, payload: Any, reply_of: str = "") -> int:
    if rule == "n":
        return len(payload.regions)
    if rule == "nofd-bit":
        return 0 if payload.nofd else 1
    if reply_of == "GET_INFLIGHT_FD" and payload.mmap_size == 0:
        return 0
    if reply_of == "SET_DEVICE_STATE_FD" and payload.value == 0:
        return 1  # accepted, the back-end's own fd attached
    return 1 if rule == "1" else 0


# payloads that must satisfy a request's own range checks
REQUEST_EXAMPLES: dict[str, Any] = {
    "NET_SET_MTU": p.VhostUserU64(1500),
    "BACKEND_IOTLB_MSG": p.VhostUserIotlb(0x1000, 0, 0, 1, 1),
}


def _messages() -> list[tuple[Message, int]]:
    out: list[tuple[Message, int]] = []
    for channel in Channel:
        for spec in catalogue(channel).values():
            payload = REQUEST_EXAMPLES.get(spec.name) or (
                example(spec.payload) if spec.payload else None
            )
            nfds = _nfds(spec.fds, payload)
            out.append((make_request(spec.code, payload, channel=channel), nfds))
            out.append((make_request(spec.code, payload, need_reply=True, channel=channel), nfds))
            reply = example(spec.reply_payload) if spec.reply_payload else None
            nfds = _nfds(spec.reply_fds, reply, spec.name)
            out.append((make_reply(spec.code, reply, channel=channel), nfds))
    return out


@pytest.mark.parametrize(
    ("msg", "nfds"),
    _messages(),
    ids=lambda v: f"{v.channel.value}-{v.name}-{v.flags}" if isinstance(v, Message) else str(v),
)
def test_message_record_round_trip(msg: Message, nfds: int) -> None:
    record = message_to_record(msg, direction="F>B", t=1.5, conn=2, nfds=nfds)
    line = json.dumps(record)
    back = record_to_message(json.loads(line))
    assert back.error is None, back.error
    assert (back.request, back.flags, back.payload, back.channel) == (
        msg.request,
        msg.flags,
        msg.payload,
        msg.channel,
    )
    assert back.raw == encode(msg) and back.fds == ()
    again = message_to_record(back, direction="F>B", t=1.5, conn=2, nfds=nfds)
    assert again == record


def _record(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "t": 0.5,
        "conn": 1,
        "dir": "F>B",
        "req": 8,
        "name": "SET_VRING_NUM",
        "flags": "0x1",
        "reply": False,
        "need_reply": False,
        "size": 8,
        "nfds": 0,
        "payload": "0000000080000000",
    }
    record.update(changes)
    return record


def test_record_strictness() -> None:
    assert record_to_message(_record()).payload == p.VhostUserVringState(0, 128)
    for bad in (
        {"req": "8"},
        {"reply": "false"},
        {"need_reply": 0},
        {"size": "8"},
        {"nfds": 0.0},
        {"t": "0.5"},
        {"flags": 1},
        {"extra": 1},
        {"reply": True},  # contradicts flags 0x1
        {"size": 9},  # contradicts the payload
        {"name": "GET_FEATURES"},  # contradicts req
        {"payload": "zz"},
    ):
        with pytest.raises(RecordError):
            record_to_message(_record(**bad))
    missing = _record()
    del missing["payload"]
    with pytest.raises(RecordError):
        record_to_message(missing)


def test_payload_strictness() -> None:
    with pytest.raises(RecordError):
        payload_from_dict("VhostUserU64", {"value": "12"})
    with pytest.raises(RecordError):
        payload_from_dict("VhostUserU64", {"value": True})
    with pytest.raises(RecordError):
        payload_from_dict("VhostUserVringFd", {"index": 1, "nofd": "false"})
    with pytest.raises(RecordError):
        payload_from_dict("VhostUserVringState", {"index": 1, "num": 2, "extra": 3})
    with pytest.raises(RecordError):
        payload_from_dict("NoSuchPayload", {})
    region = {"guest_phys_addr": 0, "memory_size": "4096", "userspace_addr": 0, "mmap_offset": 0}
    with pytest.raises(RecordError):
        payload_from_dict("VhostUserMemory", {"regions": [region], "padding": 0})
    ok = dict(region, memory_size=4096)
    table = payload_from_dict("VhostUserMemory", {"regions": [ok], "padding": 0})
    assert table == p.VhostUserMemory((p.VhostUserMemoryRegion(0, 4096, 0, 0),))


def test_bad_payload_in_record_gives_message_error() -> None:
    msg = record_to_message(_record(req=18, name="SET_VRING_ENABLE", payload="0000000002000000"))
    assert msg.error is not None and msg.error.rule_id == "VU-RING-006"
    record = message_to_record(msg, direction="F>B", t=0.0, conn=1)
    assert record["payload"] == "0000000002000000"
    assert record["decoded"]["error"] == "VU-RING-006"
    msg = record_to_message(_record(req=12, name="SET_VRING_KICK", payload="00" * 8, nfds=0))
    assert msg.error is not None and msg.error.rule_id == "VU-RING-008"


def test_decoded_helper() -> None:
    body = bytes.fromhex("467e007501000000")
    msg = decode_message(1, 5, HEADER.pack(1, 5, 8) + body)
    record = message_to_record(msg, direction="B>F", t=0.0, conn=1, device_features=[BlkFeature])
    assert record["decoded"]["u64"] == "0x175007e46"
    bits = record["decoded"]["bits"]
    assert bits[:3] == ["SIZE_MAX", "SEG_MAX", "BLK_SIZE"] and bits[-1] == "VERSION_1"
    assert "PROTOCOL_FEATURES" in bits and "LOG_ALL" in bits
    addr = make_request(FrontendReq.SET_VRING_ADDR, example(p.VhostUserVringAddr))
    decoded = message_to_record(addr, direction="F>B", t=0.0, conn=1)["decoded"]
    assert decoded["desc_user_addr"] == "0x1000" and decoded["index"] == 0
    plain = make_request(FrontendReq.SET_STATUS, p.VhostUserU64(0xB))
    decoded = message_to_record(plain, direction="F>B", t=0.0, conn=1)["decoded"]
    assert decoded["bits"] == ["ACKNOWLEDGE", "DRIVER", "FEATURES_OK"]
    assert "decoded" not in message_to_record(
        make_request(FrontendReq.GET_FEATURES), direction="F>B", t=0.0, conn=1
    )
    backend = make_request(
        p_backend_req("BACKEND_CONFIG_CHANGE_MSG"), channel=Channel.BACKEND, need_reply=True
    )
    record = message_to_record(backend, direction="B>F", t=0.0, conn=1)
    assert record["channel"] == "backend" and record["name"] == "BACKEND_CONFIG_CHANGE_MSG"
    assert record_to_message(record).channel is Channel.BACKEND


def p_backend_req(name: str) -> int:
    from vhsm.wire import BackendReq

    return BackendReq[name]


@pytest.mark.parametrize("name", ["qemu72-blk.jsonl", "dpdk2211-net.jsonl"])
def test_transcripts_decode_and_reencode(name: str) -> None:
    lines = (DATA / name).read_text().splitlines()
    messages = 0
    for line in lines:
        record = json.loads(line)
        if "event" in record:
            continue
        msg = record_to_message(record)
        assert msg.error is None, (record["name"], msg.error)
        assert msg.name == record["name"]
        assert encode(msg)[HEADER.size :].hex() == record["payload"]
        again = message_to_record(
            msg, direction=record["dir"], t=record["t"], conn=record["conn"], nfds=record["nfds"]
        )
        core = {k: v for k, v in record.items() if k != "decoded"}
        assert {k: v for k, v in again.items() if k != "decoded"} == core
        messages += 1
    assert messages > 40


def test_the_json_forms_load_on_first_use() -> None:
    """`import vhsm.wire` leaves cattrs out until a JSON name is used."""
    import subprocess
    import sys

    probe = (
        "import sys, vhsm.wire as w\n"
        "print('cattrs' in sys.modules)\n"
        "w.payload_to_dict\n"
        "print('cattrs' in sys.modules)\n"
        "try:\n"
        "    w.no_such_name\n"
        "except AttributeError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [
        "False",
        "True",
        "module 'vhsm.wire' has no attribute 'no_such_name'",
    ]

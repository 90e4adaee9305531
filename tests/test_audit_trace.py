"""`vhsm audit trace`: real transcripts are clean, doctored ones give the right rule ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest

from vhsm.audit import audit_trace, load_transcript, parse_lines
from vhsm.cli import main

DATA = Path(__file__).parent / "data"


def lines(name: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (DATA / name).read_text().splitlines() if x.strip()]


def audit(records: list[dict[str, Any]]) -> list[str]:
    report = audit_trace(parse_lines(json.dumps(r) for r in records))
    return [f.rule_id for f in report.findings]


@pytest.mark.parametrize("name", ["qemu72-blk.jsonl", "dpdk2211-net.jsonl"])
def test_real_transcripts_are_clean(name: str) -> None:
    report = audit_trace(load_transcript(DATA / name), name)
    assert report.findings == []
    assert report.exit_status() == 0


def test_qemu_net_transcript_has_only_its_early_enables() -> None:
    report = audit_trace(load_transcript(DATA / "qemu72-net.jsonl"), "qemu72-net.jsonl")
    assert {(f.rule_id, f.rule.severity, f.request) for f in report.findings} == {
        ("VU-STATE-012", "INTEROP", "SET_VRING_ENABLE")
    }
    assert report.verdict() == "pass" and report.exit_status() == 0


def test_missing_reply_is_found() -> None:
    records = lines("qemu72-blk.jsonl")
    drop = next(
        i for i, r in enumerate(records) if r.get("dir") == "B>F" and r["name"] == "GET_QUEUE_NUM"
    )
    del records[drop]
    assert audit(records) == ["VU-FRAME-010"]


def test_reply_with_wrong_flags_is_found() -> None:
    records = lines("qemu72-blk.jsonl")
    reply = next(r for r in records if r.get("dir") == "B>F" and r["name"] == "GET_FEATURES")
    reply["flags"], reply["need_reply"] = "0xd", True
    assert "VU-FRAME-009" in audit(records)


def test_front_end_not_waiting_for_a_reply_is_found() -> None:
    """VU-REQ-003: GET_PROTOCOL_FEATURES sent before the GET_FEATURES reply came back."""
    records = lines("qemu72-blk.jsonl")
    ask = next(i for i, r in enumerate(records) if r.get("dir") == "F>B")
    assert records[ask]["name"] == "GET_FEATURES" and records[ask + 1]["dir"] == "B>F"
    nxt = next(i for i, r in enumerate(records) if i > ask + 1 and r.get("dir") == "F>B")
    records.insert(ask + 1, records.pop(nxt))
    assert "VU-REQ-003" in audit(records)


def test_unsolicited_ack_is_found() -> None:
    records = lines("qemu72-blk.jsonl")
    at = next(
        i for i, r in enumerate(records) if r.get("dir") == "F>B" and r["name"] == "SET_OWNER"
    )
    ack = dict(records[at + 1], dir="B>F", req=3, name="SET_OWNER", flags="0x5", reply=True, size=8)
    ack.update(need_reply=False, nfds=0, payload="00" * 8)
    ack.pop("decoded", None)
    records.insert(at + 1, ack)
    assert audit(records) == ["VU-FRAME-010"]


def test_qemu_rng_unoffered_acks_have_their_own_rule() -> None:
    records = lines("qemu72-blk.jsonl")
    offered = next(r for r in records if r.get("dir") == "B>F" and r["name"] == "GET_FEATURES")
    value = int.from_bytes(bytes.fromhex(offered["payload"]), "little") & ~(1 << 29)
    for r in records:
        if r.get("dir") == "B>F" and r["name"] == "GET_FEATURES":
            r["payload"] = value.to_bytes(8, "little").hex()
    assert set(audit(records)) == {"VU-NEG-013"}


def test_unoffered_other_bits_are_a_must_violation() -> None:
    records = lines("dpdk2211-net.jsonl")
    sf = next(r for r in records if r.get("dir") == "F>B" and r["name"] == "SET_FEATURES")
    value = int.from_bytes(bytes.fromhex(sf["payload"]), "little") | (1 << 33)
    sf["payload"] = value.to_bytes(8, "little").hex()
    report = audit_trace(parse_lines(json.dumps(r) for r in records))
    assert [f.rule_id for f in report.findings] == ["VU-NEG-004"]
    assert "ACCESS_PLATFORM" in report.findings[0].detail
    assert report.exit_status() == 1


def test_short_get_config_reply_is_found() -> None:
    records = lines("qemu72-blk.jsonl")
    reply = next(r for r in records if r.get("dir") == "B>F" and r["name"] == "GET_CONFIG")
    body = bytearray(bytes.fromhex(reply["payload"]))
    body[4:8] = (8).to_bytes(4, "little")
    reply["payload"] = bytes(body[:20]).hex()
    reply["size"] = 20
    assert "VU-PAY-009" in audit(records)


def test_cli_formats_and_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "trace", str(DATA / "qemu72-blk.jsonl")]) == 0
    assert "verdict: PASS" in capsys.readouterr().out
    out = tmp_path / "report.xml"
    assert (
        main(
            [
                "audit",
                "trace",
                str(DATA / "dpdk2211-net.jsonl"),
                "--format",
                "junit",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    suite = ElementTree.parse(out).getroot()
    assert suite.get("failures") == "0" and int(suite.get("tests", "0")) > 60
    assert main(["audit", "trace", str(DATA / "dpdk2211-net.jsonl"), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "pass"


def test_cli_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"t": 0, "dir": "F>B"}\nnot json\n')
    assert main(["audit", "trace", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.jsonl:1" in err
    assert main(["audit", "trace", str(tmp_path / "missing.jsonl")]) == 2


def test_relay_raw_events_with_a_rule_become_findings() -> None:
    records = lines("qemu72-blk.jsonl")
    at = next(i for i, r in enumerate(records) if r.get("dir") == "F>B")
    records.insert(
        at,
        {
            "t": 0.01,
            "conn": 1,
            "event": "raw",
            "direction": "F>B",
            "size": 12,
            "nfds": 0,
            "bytes": "00" * 12,
            "rule": "VU-FRAME-005",
            "why": "size field 99999 of request 5 beyond the relay's cap",
        },
    )
    assert audit(records) == ["VU-FRAME-005"]


@pytest.mark.parametrize(
    "content",
    [
        "",
        "\n\n",
        '{"t": 0.0, "event": "open", "conn": 1}\n{"t": 0.1, "event": "close", "conn": 1}\n',
    ],
    ids=["empty", "blank", "no-message"],
)
def test_a_transcript_without_messages_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(content)
    assert main(["audit", "trace", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no vhost-user message recorded" in err


def test_a_transcript_cut_inside_a_record_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (DATA / "qemu72-blk.jsonl").read_text()
    path = tmp_path / "cut.jsonl"
    path.write_text(text[: len(text) // 2 - 7])
    assert main(["audit", "trace", str(path)]) == 2
    assert "not JSON" in capsys.readouterr().err


def test_findings_are_printed_once_with_the_link(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    records = lines("qemu72-blk.jsonl")
    reply = next(r for r in records if r.get("dir") == "B>F" and r["name"] == "GET_FEATURES")
    reply["flags"], reply["need_reply"] = "0xd", True
    path = tmp_path / "doctored.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    caplog.set_level("WARNING")
    assert main(["audit", "trace", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "VU-FRAME-009" not in err and not [r for r in caplog.records if "VU-" in r.message]
    line = next(x for x in out.splitlines() if "VU-FRAME-009" in x)
    assert "message #" in line and "(see https://" in line
    assert "1 finding (1 MUST, 0 SHOULD, 0 INTEROP); verdict: FAIL" in out

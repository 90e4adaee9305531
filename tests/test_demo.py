"""`vhsm demo`: the live transcript shows messages, state changes and a successful I/O."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vhsm.cli import main


def test_rng_demo_prints_messages_states_and_io(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    for name in ("GET_FEATURES", "SET_MEM_TABLE", "SET_VRING_KICK", "GET_VRING_BASE"):
        assert f"F>B  {name}" in out
    assert "B>F  GET_FEATURES" in out and "ack: ok" in out
    assert "ring 0: STOPPED_DISABLED -> STARTED_DISABLED  (on SET_VRING_KICK)" in out
    assert "session: NEGOTIATING -> SUSPENDED" in out
    assert "rng: read 32 bytes" in out
    assert out.rstrip().endswith("I/O OK")


def test_blk_demo_writes_and_reads_back(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    record = tmp_path / "demo.jsonl"
    assert main(["demo", "--device", "blk", "--record", str(record)]) == 0
    out = capsys.readouterr().out
    assert "blk: GET_ID = 'vhsm-demo'" in out
    assert "read them back: match" in out
    assert "ring 0: STARTED_ENABLED -> STOPPED_ENABLED  (on GET_VRING_BASE)" in out
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert any(r.get("name") == "SET_BACKEND_REQ_FD" for r in lines)

"""`vhsm audit frontend`: vhsm's own front-end driver audited by the permissive back-end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhsm.audit.frontend_mode import FrontendAudit
from vhsm.cli import main
from vhsm.frontend import Frontend, RngDevice
from vhsm.wire import (
    FrontendReq,
    VhostUserU64,
    VhostUserVringState,
    VirtioFeature,
    make_request,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vhsm-afe-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_vhsm_frontend_is_clean_against_rng(sock_dir: Path) -> None:
    events: list[dict[str, object]] = []
    with FrontendAudit(sock_dir / "fe.sock", "rng", once=True, on_event=events.append) as audit:
        fe = Frontend.connect(sock_dir / "fe.sock")
        try:
            fe.start()
            assert len(RngDevice(fe).read(32)) == 32
        finally:
            fe.close()
        assert audit.wait(10)
        report = audit.report()
    assert report.findings == []
    assert report.exit_status() == 0
    assert [(e["event"], e.get("by")) for e in events if "conn" in e] == [
        ("open", None),
        ("close", "F"),
    ]
    assert not (sock_dir / "fe.sock").exists()


def test_generic_device_takes_what_the_frontend_sets_up(sock_dir: Path) -> None:
    with FrontendAudit(sock_dir / "fe.sock", "generic", once=True) as audit:
        fe = Frontend.connect(sock_dir / "fe.sock")
        try:
            fe.start(queues=[0, 1, 2], inflight=True)
            vq = fe.vring(2)
            gpa = fe.memory.alloc(64)
            head = vq.post([(gpa, 64)])
            vq.kick(force=True)
            assert vq.wait_used(5) == (head, 0)
            assert fe.get_config(0, 16) == bytes(16)
        finally:
            fe.close()
        assert audit.wait(10)
        report = audit.report()
    assert report.findings == [], report.text()
    names = {r.get("name") for r in audit.relay.records}
    assert {"SET_BACKEND_REQ_FD", "GET_INFLIGHT_FD", "SET_STATUS"} <= names


def test_a_misbehaving_frontend_is_reported(sock_dir: Path) -> None:
    with FrontendAudit(sock_dir / "fe.sock", "rng", once=True) as audit:
        fe = Frontend.connect(sock_dir / "fe.sock")
        try:
            offered = fe.get_features()
            fe.set_owner()
            bad = offered | (1 << 5)  # a device bit rng never offered
            fe.send(make_request(FrontendReq.SET_FEATURES, VhostUserU64(bad)))
            assert fe.expect_closed(5)  # VU-NEG-004 is a reject: nothing more may be sent
        finally:
            fe.close()
        assert audit.wait(10)
        report = audit.report()
    rules = {f.rule_id for f in report.findings}
    assert "VU-NEG-004" in rules
    assert report.exit_status() == 1
    assert offered & VirtioFeature.PROTOCOL_FEATURES


def test_a_session_the_backend_cut_short_is_never_a_pass(sock_dir: Path) -> None:
    with FrontendAudit(sock_dir / "fe.sock", "net", once=True) as audit:
        fe = Frontend.connect(sock_dir / "fe.sock")
        try:
            fe.get_features()
            fe.set_owner()
            # a SHOULD rule the runtime enforces: rings configured before SET_FEATURES
            fe.send(make_request(FrontendReq.SET_VRING_NUM, VhostUserVringState(0, 256)))
            assert fe.expect_closed(5)
        finally:
            fe.close()
        assert audit.wait(10)
        report = audit.report()
    assert {f.rule.severity for f in report.findings} == {"SHOULD"}  # no MUST broken...
    assert report.verdict() == "incomplete" and report.exit_status() == 1  # ...yet no pass
    (why,) = report.incomplete
    assert "connection 1: the back-end closed it" in why and "before any ring started" in why
    assert "verdict: INCOMPLETE" in report.text()
    assert json.loads(report.json())["verdict"] == "incomplete"
    assert 'name="the whole session was audited"' in report.junit()


def test_command_once_json(sock_dir: Path) -> None:
    record = sock_dir / "session.jsonl"
    argv = [
        sys.executable,
        "-m",
        "vhsm",
        "audit",
        "frontend",
        "--listen",
        str(sock_dir / "fe.sock"),
    ]
    argv += ["--device", "rng", "--once", "--format", "json", "--record", str(record)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        fe = Frontend.connect(sock_dir / "fe.sock", retry_for=20)
        try:
            fe.start()
            RngDevice(fe).read(8)
        finally:
            fe.close()
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert json.loads(out)["verdict"] == "pass"
    assert "connection 1 close by F" in err
    assert main(["audit", "trace", str(record)]) == 0


def test_command_timeout_without_frontend(
    sock_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["audit", "frontend", "--listen", str(sock_dir / "fe.sock"), "--timeout", "0.3"]
    assert main(argv) == 0
    assert "0 findings" in capsys.readouterr().out


def test_command_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "frontend", "--listen", str(tmp_path / "no" / "x.sock")]) == 2
    argv = ["audit", "frontend", "--listen", str(tmp_path / "x.sock"), "--file", "img"]
    assert main(argv) == 2
    assert "--device blk" in capsys.readouterr().err

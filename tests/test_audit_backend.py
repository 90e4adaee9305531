"""`vhsm audit backend`: the active suite against vhsm's own devices and broken back-ends."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import pytest

from vhsm.audit.backend_suite import BackendSuite, run_suite, selects
from vhsm.audit.probe import Case
from vhsm.audit.report import AuditFinding, CaseResult, Report, plural
from vhsm.cli import main
from vhsm.daemon import Listener, VhostUserDaemon
from vhsm.devices.blk import BlkBackend
from vhsm.devices.rng import RngBackend
from vhsm.devices.vsock import VsockBackend
from vhsm.session.rules import rule
from vhsm.wire import FrontendReq, VhostUserU64, VirtioFeature, encode, make_reply
from vhsm.wire.framing import HEADER

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vhsm-aud-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def serving(backend: RngBackend | BlkBackend, path: Path) -> Iterator[VhostUserDaemon]:
    daemon = VhostUserDaemon(type(backend).__name__, backend)
    daemon.start(Listener(path))
    try:
        yield daemon
    finally:
        daemon.stop()


def test_vhsm_vsock_is_clean(sock_dir: Path) -> None:
    short = Path(tempfile.mkdtemp(prefix="vs-", dir="/tmp"))  # unix paths: 107 bytes at most
    vsock = VsockBackend(31337, short / "v.sock", claim_cid=False)
    daemon = VhostUserDaemon("vsock", vsock)
    daemon.start(Listener(short / "vu.sock"))
    try:
        report = run_suite(short / "vu.sock", "vsock", timeout=5.0)
        assert daemon.last_error is None
    finally:
        daemon.stop()
        vsock.close()
        shutil.rmtree(short, ignore_errors=True)
    failed = [(c.name, c.outcome, c.detail) for c in report.cases if c.failed]
    assert failed == []
    assert report.findings == []
    assert report.exit_status() == 0
    got = outcomes(report)
    for name in (
        "data round trip (vsock)",
        "config space read",
        "reconnect and resume",
        "ring stop/start cycles",
        "RESET_DEVICE and re-initialisation",
    ):
        assert got[name] == "pass", name


def outcomes(report: Report) -> dict[str, str]:
    """Each case's outcome by title."""
    return {case.title: case.outcome for case in report.cases}


# The clean-suite tests give each case 5 s: a clean back-end answers at once, so this
# costs nothing when it passes, and a loaded machine (a TCG guest on the other worker)
# cannot turn a slow reconnect into a "crashed" case.
def test_vhsm_rng_is_clean(sock_dir: Path) -> None:
    with serving(RngBackend(), sock_dir / "rng.sock") as daemon:
        report = run_suite(sock_dir / "rng.sock", "rng", timeout=5.0)
        assert daemon.last_error is None
    failed = [(c.name, c.outcome, c.detail) for c in report.cases if c.failed]
    assert failed == []
    assert report.findings == []
    assert report.exit_status() == 0
    got = outcomes(report)
    assert got["data round trip (rng)"] == "pass"
    assert got["reconnect and resume"] == "pass"
    assert got["payload size field 4 GiB-16"] == "rejected-cleanly"
    assert got["ring size 3 (split)"] == "rejected-cleanly"
    assert got["overlapping guest addresses"] == "rejected-cleanly"
    assert got["RESET_DEVICE and re-initialisation"] == "skipped"  # rng does not offer it
    by_rule = {case.rule_id: case.outcome for case in report.cases}
    for rule_id in ("VU-STATE-008", "VU-STATE-009", "VU-STATE-011", "VU-REQ-002"):
        assert by_rule[rule_id] == "pass", rule_id


def test_vhsm_blk_is_clean(sock_dir: Path, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(range(256)) * 4096)
    before = image.read_bytes()
    blk = BlkBackend(str(image))
    try:
        with serving(blk, sock_dir / "blk.sock") as daemon:
            report = run_suite(sock_dir / "blk.sock", "blk", timeout=5.0)
            assert daemon.last_error is None
    finally:
        blk.close()
    failed = [(c.name, c.outcome, c.detail) for c in report.cases if c.failed]
    assert failed == []
    assert report.exit_status() == 0
    got = outcomes(report)
    for name in (
        "data round trip (blk)",
        "ADD_MEM_REG / REM_MEM_REG",
        "RESET_DEVICE and re-initialisation",
        "status byte round trip",
        "config space read",
    ):
        assert got[name] == "pass", name
    assert got["ADD_MEM_REG without fd"] == "rejected-cleanly"
    assert image.read_bytes() == before  # the audit never changes the disk


class BrokenBackend:
    """A raw-socket server: ``silent`` never answers; ``crash`` answers GET_FEATURES, then dies."""

    def __init__(self, path: Path, mode: str) -> None:
        self.path = path
        self.mode = mode
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(8)
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                self.conns.append(conn)
                if self.mode == "crash":
                    threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                header = conn.recv(12)
                if len(header) < 12:
                    return
                request, _flags, size = HEADER.unpack(header)
                if size:
                    conn.recv(size)
                if request != FrontendReq.GET_FEATURES:
                    self.crash()
                    return
                features = VhostUserU64(int(VirtioFeature.VERSION_1))
                conn.sendall(encode(make_reply(FrontendReq.GET_FEATURES, features)))

    def crash(self) -> None:
        """Everything goes: connections, listener, socket file."""
        for conn in self.conns:
            conn.close()
        self.listener.close()
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.crash()


def test_a_backend_that_never_answers_is_wedged(sock_dir: Path) -> None:
    broken = BrokenBackend(sock_dir / "silent.sock", "silent")
    try:
        report = run_suite(sock_dir / "silent.sock", "rng", timeout=0.3)
    finally:
        broken.close()
    assert [(c.title, c.outcome) for c in report.cases] == [("GET_FEATURES is answered", "wedged")]
    assert report.exit_status() == 1  # VU-FRAME-010 is a MUST


def test_a_backend_that_dies_is_crashed(sock_dir: Path) -> None:
    broken = BrokenBackend(sock_dir / "crash.sock", "crash")
    try:
        # A timeout a loaded machine cannot miss: the crash must be seen before the judge runs.
        report = BackendSuite(sock_dir / "crash.sock", "rng", timeout=2.0).run(only="QEMU's order")
    finally:
        broken.close()
    got = outcomes(report)
    assert got == {"GET_FEATURES is answered": "pass", "negotiation, QEMU's order": "crashed"}
    assert "no new connection" in report.cases[1].detail
    assert report.exit_status() == 1


def test_command_json_and_exit_status(sock_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with serving(RngBackend(), sock_dir / "rng.sock"):
        argv = ["audit", "backend", "--socket", str(sock_dir / "rng.sock"), "--device", "rng"]
        # --timeout: a case's answer wait, generous because a loaded machine is slow and
        # this test is about the output, not about speed
        status = main([*argv, "--format", "json", "--only", "VU-FRAME-001", "--timeout", "20"])
    out = capsys.readouterr()
    assert status == 0
    doc = json.loads(out.out)
    assert doc["verdict"] == "pass"
    assert [c["outcome"] for c in doc["cases"]] == ["pass", "rejected-cleanly", "rejected-cleanly"]
    assert [c["name"] for c in doc["cases"]][1:] == [
        "VU-FRAME-001 header version bits 0",
        "VU-FRAME-001 header version bits 2",
    ]
    assert doc["cases"][1]["rule_id"] == "VU-FRAME-001"
    assert doc["cases"][1]["title"] == "header version bits 0"
    assert out.err == ""  # progress only in text format


def test_command_text_progress(sock_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with serving(RngBackend(), sock_dir / "rng.sock"):
        argv = ["audit", "backend", "--socket", str(sock_dir / "rng.sock")]
        status = main([*argv, "--only", "vu-ring-002", "--timeout", "20"])
    out = capsys.readouterr()
    assert status == 0
    assert "[  4/4] rejected-cleanly VU-RING-002 ring size 65536" in out.err
    assert "verdict: PASS" in out.out


def test_only_selects_by_rule_id_prefix_alias_or_title() -> None:
    suite = BackendSuite("/nonexistent", "rng")

    def chosen(only: str) -> list[str]:
        return [case.name for case in suite.cases() if selects(case, only)]

    ring_size = [
        "VU-RING-002 ring size 0",
        "VU-RING-002 ring size 3 (split)",
        "VU-RING-002 ring size 65536",
    ]
    assert chosen("VU-RING-002") == ring_size
    assert chosen("vu-ring-002 ") == ring_size
    # An alias is looked up in specs/rules.yaml, the one place aliases are written.
    alias = rule("VU-RING-002").alias
    assert alias is not None
    assert chosen(alias) == chosen(alias.lower()) == ring_size
    assert {name.split()[0] for name in chosen("VU-MEM")} == {
        f"VU-MEM-{n:03}" for n in (1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 14)
    }
    assert chosen("ring size 3") == ["VU-RING-002 ring size 3 (split)"]
    assert chosen("VU-NOPE") == chosen("zzz") == []


def test_command_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "backend", "--socket", str(tmp_path / "none.sock")]) == 2
    assert "no socket" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["audit", "backend", "--socket", "x", "--device", "gpu"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["audit", "backend", "--socket", "x", "--timeout", "0"])
    assert exc.value.code == 2


def test_only_matching_nothing_is_a_usage_error(
    sock_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with serving(RngBackend(), sock_dir / "rng.sock"):
        argv = ["audit", "backend", "--socket", str(sock_dir / "rng.sock"), "--only", "zzz"]
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--only 'zzz' matches no case" in err


def test_failed_cases_are_findings_and_counts_agree_with_the_verdict() -> None:
    report = Report("t")
    report.cases += [
        CaseResult("VU-FRAME-010", "GET_FEATURES is answered", "pass"),
        CaseResult("VU-FRAME-001", "header version bits 0", "fail", "accepted"),
        CaseResult("VU-FRAME-002", "reserved header flag bits set", "wedged", "no answer"),
        CaseResult("VU-FRAME-006", "GET_FEATURES with a payload", "rejected-cleanly"),
        CaseResult("VU-NEG-001", "x", "skipped", "not offered"),
    ]
    report.findings.append(
        AuditFinding(
            "VU-REQ-002",
            "acked then closed",
            "back-end",
            case="VU-FRAME-006 GET_FEATURES with a payload",
        )
    )
    findings = report.all_findings()
    assert [(f.rule_id, f.case) for f in findings] == [
        ("VU-REQ-002", "VU-FRAME-006 GET_FEATURES with a payload"),
        ("VU-FRAME-001", "VU-FRAME-001 header version bits 0"),
        ("VU-FRAME-002", "VU-FRAME-002 reserved header flag bits set"),
    ]
    text = report.text()
    assert "3 findings (2 MUST, 1 SHOULD, 0 INTEROP); 5 cases, 2 failed; verdict: FAIL" in text
    assert "  FAIL             VU-FRAME-001 header version bits 0: accepted\n" in text
    assert "in case 'VU-FRAME-001 header version bits 0': fail: accepted (see https://" in text
    assert json.loads(report.json())["findings"][1]["case"] == "VU-FRAME-001 header version bits 0"
    suite = ElementTree.fromstring(report.junit())
    names = [case.get("name") for case in suite]
    assert names == [c.name for c in report.cases]  # one test case per case, no rule rows
    assert suite.get("failures") == "3" and suite.get("skipped") == "1"
    failed = {c.get("name") for c in suite if c.find("failure") is not None}
    assert (
        "VU-FRAME-006 GET_FEATURES with a payload" in failed
    )  # rejected cleanly, but a MUST finding


def test_findings_of_a_live_run_name_their_case(sock_dir: Path) -> None:
    with serving(RngBackend(), sock_dir / "rng.sock"):
        suite = BackendSuite(sock_dir / "rng.sock", "rng", timeout=10.0)

        def lying_case() -> tuple[str, str]:
            suite.findings.append(AuditFinding("VU-REQ-002", "acked then closed", "back-end"))
            return "rejected-cleanly", "closed"

        suite.cases = lambda: [Case("VU-FRAME-006", "my case", lying_case)]  # type: ignore[method-assign]
        report = suite.run()
    assert [(f.rule_id, f.case) for f in report.findings] == [
        ("VU-REQ-002", "VU-FRAME-006 my case")
    ]
    assert report.exit_status() == 1


def test_plurals() -> None:
    assert plural(0, "finding") == "0 findings"
    assert plural(1, "finding") == "1 finding"
    assert plural(2, "case") == "2 cases"

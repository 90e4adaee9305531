"""`vhsm record`: the relay between vhsm's front-end driver and a real VhostUserDaemon."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vhsm.audit.record import Relay
from vhsm.audit.transcript import load_transcript
from vhsm.cli import main
from vhsm.daemon import Listener, VhostUserDaemon
from vhsm.devices.rng import RngBackend
from vhsm.frontend import Frontend, RngDevice
from vhsm.wire import (
    FrontendReq,
    ProtocolFeature,
    VhostUserU64,
    VhostUserVringState,
    encode,
    make_request,
)

pytestmark = pytest.mark.timeout(60)


class ChannelRng(RngBackend):
    """rng that also takes the back-end request channel and has a config space."""

    def __init__(self) -> None:
        self.channel: Any = None
        self.got_channel = threading.Event()

    def protocol_features(self) -> int:
        return int(
            ProtocolFeature.MQ
            | ProtocolFeature.REPLY_ACK
            | ProtocolFeature.BACKEND_REQ
            | ProtocolFeature.CONFIG
        )

    def get_config(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def set_backend_req_fd(self, channel: Any) -> None:
        self.channel = channel
        if channel is not None:
            self.got_channel.set()


@pytest.fixture
def sock_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="vhsm-rec-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def backend(sock_dir: Path) -> Iterator[tuple[ChannelRng, VhostUserDaemon]]:
    device = ChannelRng()
    daemon = VhostUserDaemon("rng", device)
    daemon.start(Listener(sock_dir / "b.sock"))
    yield device, daemon
    daemon.stop()


@pytest.fixture
def relay(sock_dir: Path) -> Iterator[Relay]:
    relay = Relay(sock_dir / "a.sock", sock_dir / "b.sock", sock_dir / "t.jsonl")
    relay.start()
    yield relay
    relay.stop()


def _messages(records: list[dict[str, Any]], channel: str = "main") -> list[tuple[Any, ...]]:
    keys = ("conn", "dir", "req", "flags", "size", "nfds", "payload")
    return [
        tuple(r[k] for k in keys)
        for r in records
        if "dir" in r and r.get("channel", "main") == channel
    ]


def test_relay_records_every_message_with_fds_and_the_backend_channel(
    sock_dir: Path, backend: tuple[ChannelRng, VhostUserDaemon], relay: Relay
) -> None:
    device, _ = backend
    fe = Frontend.connect(sock_dir / "a.sock")
    try:
        fe.start()
        assert len(RngDevice(fe).read(64)) == 64  # kick/call eventfds and memfd went through
        assert device.got_channel.wait(5)
        device.channel.config_change()  # back-end request, acked by the front-end (REPLY_ACK)
        assert fe.backend_channel is not None
        assert fe.backend_channel.wait_for(2, 5) is not None
        fe.reconnect()
        assert len(RngDevice(fe).read(16)) == 16
    finally:
        fe.close()
    relay.stop()
    records = [json.loads(line) for line in (sock_dir / "t.jsonl").read_text().splitlines()]

    # The relay saw exactly what the front-end sent and received, in order.
    assert _messages(records) == _messages(fe.transcript)
    assert _messages(records, "backend") == _messages(fe.transcript, "backend")
    names = [(r["dir"], r["name"], r["nfds"]) for r in records if "dir" in r]
    assert ("F>B", "SET_MEM_TABLE", 1) in names
    assert ("F>B", "SET_VRING_KICK", 1) in names
    assert ("F>B", "SET_BACKEND_REQ_FD", 1) in names
    backend_lines = [r for r in records if r.get("channel") == "backend" and "dir" in r]
    assert [(r["dir"], r["name"], r["reply"]) for r in backend_lines] == [
        ("B>F", "BACKEND_CONFIG_CHANGE_MSG", False),
        ("F>B", "BACKEND_CONFIG_CHANGE_MSG", True),
    ]
    assert backend_lines[0]["need_reply"] is True

    events = [(r["event"], r.get("conn"), r.get("by")) for r in records if "event" in r]
    assert events[0] == ("listen", None, None)
    assert ("open", 1, None) in events and ("open", 2, None) in events
    assert ("close", 1, "F") in events and ("close", 2, "F") in events
    assert events[-1] == ("exit", None, None)
    assert {r["conn"] for r in records if "dir" in r} == {1, 2}

    # The recording is a clean session for the trace auditor.
    assert main(["audit", "trace", str(sock_dir / "t.jsonl")]) == 0
    entries = load_transcript(sock_dir / "t.jsonl")
    assert sum(e.message is not None for e in entries) == len(_messages(records)) + 2


def test_close_by_the_backend_is_recorded(
    sock_dir: Path, backend: tuple[ChannelRng, VhostUserDaemon], relay: Relay
) -> None:
    _, daemon = backend
    fe = Frontend.connect(sock_dir / "a.sock")
    try:
        fe.negotiate()
        daemon.stop()  # the back-end goes away mid-session
        assert fe.expect_closed(5)
    finally:
        fe.close()
    relay.stop()
    closes = [r for r in relay.records if r.get("event") == "close" and "channel" not in r]
    assert [(c["conn"], c["by"]) for c in closes] == [(1, "B")]


def test_backend_not_listening_is_recorded(sock_dir: Path) -> None:
    relay = Relay(sock_dir / "a.sock", sock_dir / "nobody.sock", None, connect_timeout=0.1)
    relay.start()
    try:
        fe = Frontend.connect(sock_dir / "a.sock")
        try:
            assert fe.expect_closed(5)
        finally:
            fe.close()
    finally:
        relay.stop()
    close = next(r for r in relay.records if r.get("event") == "close")
    assert close["by"] == "B" and "cannot connect" in close["why"]


def test_malformed_messages_pass_through_unchanged(
    sock_dir: Path, backend: tuple[ChannelRng, VhostUserDaemon], relay: Relay
) -> None:
    fe = Frontend.connect(sock_dir / "a.sock")
    try:
        fe.negotiate()
        bad = make_request(FrontendReq.SET_VRING_NUM, VhostUserVringState(0, 3), need_reply=True)
        fe.send(bad)
        reply = fe.recv(5)  # the daemon NACKs the size: it got the very bytes we sent
        assert isinstance(reply.payload, VhostUserU64) and reply.payload.value != 0
    finally:
        fe.close()
    relay.stop()
    sent = [r for r in relay.records if r.get("name") == "SET_VRING_NUM"]
    assert sent[0]["payload"] == encode(bad)[12:].hex()


def test_record_command_once(sock_dir: Path, backend: tuple[ChannelRng, VhostUserDaemon]) -> None:
    out = sock_dir / "cli.jsonl"
    argv = [sys.executable, "-m", "vhsm", "record", "--listen", str(sock_dir / "a.sock")]
    argv += ["--connect", str(sock_dir / "b.sock"), "--out", str(out), "--once"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        fe = Frontend.connect(sock_dir / "a.sock", retry_for=20)
        try:
            fe.start()
            RngDevice(fe).read(8)
        finally:
            fe.close()
        assert proc.wait(20) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    events = [line["event"] for line in lines if "event" in line and "channel" not in line]
    assert events == ["listen", "open", "close", "exit"]
    channel = [line["event"] for line in lines if line.get("channel") == "backend"]
    assert channel[0] == "open" and channel[-1] == "close"
    assert main(["audit", "trace", str(out)]) == 0
    assert not (sock_dir / "a.sock").exists()


def test_record_command_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no" / "a.sock"
    assert main(["record", "--listen", str(missing), "--connect", "x", "--out", "o"]) == 2
    assert "no directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["record", "--listen", str(tmp_path / "a.sock")])
    assert exc.value.code == 2

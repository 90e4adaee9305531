"""A real VhostUserDaemon on a real unix socket, driven by the project's front-end driver."""

from __future__ import annotations

import gc
import logging
import os
import shutil
import socket
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from fuzz_support import settle_fds, wait_idle

from vhsm.backend import VhostUserBackend
from vhsm.daemon import Listener, VhostUserDaemon
from vhsm.errors import BackendError, VhsmError
from vhsm.frontend import Frontend, FrontendListener
from vhsm.transport import PeerClosed
from vhsm.vring import VringRwLock, VringState
from vhsm.wire import (
    BackendReq,
    FrontendReq,
    ProtocolFeature,
    VhostUserInflight,
    VhostUserLog,
    VhostUserVringFd,
    VhostUserVringState,
    VirtioFeature,
    encode,
    make_request,
)

WAIT = 10.0
PF = ProtocolFeature


class UpperBackend(VhostUserBackend):
    """Two queues; each chain's readable bytes come back upper-cased in its writable part."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.fail = False
        self.fail_hook: str | None = None
        self.hold = False
        self.held: list[int] = []
        self.channel: Any = None
        self.memory_seen: Any = None

    def _note(self, *event: Any) -> None:
        self.events.append(event)
        if self.fail_hook == event[0]:
            raise BackendError(f"{event[0]} hook fails on purpose")

    def num_queues(self) -> int:
        return 2

    def max_queue_size(self) -> int:
        return 256

    def features(self) -> int:
        return int(
            VirtioFeature.VERSION_1
            | VirtioFeature.PROTOCOL_FEATURES
            | VirtioFeature.RING_EVENT_IDX
            | VirtioFeature.RING_INDIRECT_DESC
            | VirtioFeature.LOG_ALL
        )

    def protocol_features(self) -> int:
        return int(
            PF.MQ
            | PF.REPLY_ACK
            | PF.BACKEND_REQ
            | PF.CONFIG
            | PF.INFLIGHT_SHMFD
            | PF.RESET_DEVICE
            | PF.BACKEND_SEND_FD
            | PF.CONFIGURE_MEM_SLOTS
            | PF.LOG_SHMFD
        )

    def handle_event(
        self, device_event: int, evset: int, vrings: Sequence[Any], thread_id: int
    ) -> None:
        if self.fail:
            raise BackendError("handle_event fails on purpose")
        vring = vrings[device_event]
        while True:
            vring.disable_notification()
            while (chain := vring.pop()) is not None:
                if self.hold:
                    self.held.append(chain.head)
                    continue
                written = chain.write(chain.read_all().upper())
                vring.add_used(chain.head, written)
            vring.signal_used_queue()
            if not vring.enable_notification():
                break

    def update_memory(self, memory: Any) -> None:
        self.memory_seen = memory

    def set_backend_req_fd(self, channel: Any) -> None:
        self.channel = channel

    def connected(self) -> None:
        self._note("connected")

    def disconnected(self) -> None:
        self._note("disconnected")

    def ring_started(self, index: int) -> None:
        self._note("ring_started", index)

    def ring_stopped(self, index: int) -> None:
        self._note("ring_stopped", index)

    def ring_enabled(self, index: int) -> None:
        self._note("ring_enabled", index)

    def ring_disabled(self, index: int) -> None:
        self._note("ring_disabled", index)

    def memory_updated(self) -> None:
        self._note("memory_updated")


@pytest.fixture
def sock_path() -> Iterator[Path]:
    directory = tempfile.mkdtemp(prefix="vhsm-", dir="/tmp")
    yield Path(directory) / "vu.sock"
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def served(sock_path: Path) -> Iterator[tuple[UpperBackend, VhostUserDaemon, Path]]:
    backend = UpperBackend()
    daemon = VhostUserDaemon("test", backend)
    daemon.start(Listener(sock_path))
    yield backend, daemon, sock_path
    daemon.stop()


def connect(path: Path, **kwargs: Any) -> Frontend:
    return Frontend.connect(path, timeout=WAIT, **kwargs)


def upper(fe: Frontend, index: int, text: bytes) -> bytes:
    """Post one chain on ring `index`, kick, wait for it to come back."""
    vq = fe.vring(index)
    src = fe.memory.alloc(len(text))
    dst = fe.memory.alloc(len(text))
    fe.memory.write(src, text)
    head = vq.post([(src, len(text))], [(dst, len(text))])
    vq.kick(force=True)
    got, length = vq.wait_used(WAIT)
    assert got == head
    out = fe.memory.read(dst, length)
    fe.memory.free(src)
    fe.memory.free(dst)
    return out


def wait_until(predicate: Any) -> None:
    """Wait (not assert) for a condition another thread makes true."""
    pause = threading.Event()
    for _ in range(int(WAIT / 0.01)):
        if predicate():
            return
        pause.wait(0.01)
    raise AssertionError(f"{predicate} never became true")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- requests through the device -------------------------------------------------------
def test_request_through_the_backend_on_both_rings(served) -> None:
    backend, daemon, path = served
    with connect(path) as fe:
        fe.start(queues=2, size=64)
        assert upper(fe, 0, b"hello vhost-user") == b"HELLO VHOST-USER"
        assert upper(fe, 1, b"ring one") == b"RING ONE"
        assert daemon.serving
    wait_until(lambda: ("disconnected",) in backend.events)
    names = [e[0] for e in backend.events]
    assert names[0] == "connected"
    for event in [
        ("ring_started", 0),
        ("ring_started", 1),
        ("ring_enabled", 0),
        ("memory_updated",),
    ]:
        assert event in backend.events
    assert backend.memory_seen is daemon.memory


def test_vring_class_is_chosen_by_the_backend(sock_path) -> None:
    for cls in (VringRwLock, VringState):
        backend = UpperBackend()
        backend.vring_class = cls  # type: ignore[attr-defined]
        daemon = VhostUserDaemon("cls", backend)
        assert all(type(v) is cls for v in daemon.plane.vrings)
        daemon.start(Listener(sock_path))
        try:
            with connect(sock_path) as fe:
                fe.start(queues=1, size=16)
                assert upper(fe, 0, b"abc") == b"ABC"
        finally:
            daemon.stop()


def test_stop_and_restart_a_ring_processes_what_is_pending(served) -> None:
    backend, _, path = served
    with connect(path) as fe:
        fe.start(queues=1, size=64)
        assert upper(fe, 0, b"one") == b"ONE"
        base = fe.stop_vring(0)
        assert base == 1
        assert ("ring_stopped", 0) in backend.events
        vq = fe.vring(0)
        src, dst = fe.memory.alloc(5), fe.memory.alloc(5)
        fe.memory.write(src, b"later")
        vq.post([(src, 5)], [(dst, 5)])
        fe.restart_vring(0)  # no kick: the start itself must pick the chain up
        assert vq.wait_used(WAIT)[1] == 5
        assert fe.memory.read(dst, 5) == b"LATER"


def test_rescan_on_enable_after_mem_table_dpdk_style(served) -> None:
    _, _, path = served
    with connect(path) as fe:
        fe.start(queues=1, size=64)
        fe.enable_vring(0, False)
        fe.set_mem_table()  # re-translated while disabled
        vq = fe.vring(0)
        src, dst = fe.memory.alloc(4), fe.memory.alloc(4)
        fe.memory.write(src, b"dpdk")
        vq.post([(src, 4)], [(dst, 4)])
        vq.kick(force=True)  # lost: the ring is disabled
        fe.enable_vring(0, True)
        assert vq.wait_used(WAIT)[1] == 4
        assert fe.memory.read(dst, 4) == b"DPDK"


def test_memory_hotplug_keeps_rings_working(served) -> None:
    backend, daemon, path = served
    with connect(path) as fe:
        fe.start(queues=1, size=64)
        assert fe.has_protocol(PF.CONFIGURE_MEM_SLOTS)
        fe.add_mem_region(0x4000_0000, 1 << 20)
        assert len(daemon.memory.memory().regions) == 2
        assert upper(fe, 0, b"added") == b"ADDED"
        fe.remove_mem_region(0x4000_0000)
        assert len(daemon.memory.memory().regions) == 1
        assert upper(fe, 0, b"removed") == b"REMOVED"
        assert backend.events.count(("memory_updated",)) == 3


def test_dirty_log_marks_written_pages(served) -> None:
    backend, _, path = served
    with connect(path) as fe:
        fe.start(queues=1, size=64, protocol_features=backend.protocol_features())
        fe.set_features(fe.acked_features | VirtioFeature.LOG_ALL)  # migration starts
        log_size = 4096
        log_fd = os.memfd_create("dirty-log")
        os.ftruncate(log_fd, log_size)
        reply = fe.call(FrontendReq.SET_LOG_BASE, VhostUserLog(log_size, 0), fds=[log_fd])
        assert reply is not None
        vq = fe.vring(0)
        src, dst = fe.memory.alloc(8), fe.memory.alloc(8, align=4096)
        fe.memory.write(src, b"loglog!!")
        vq.post([(src, 8)], [(dst, 8)])
        vq.kick(force=True)
        assert vq.wait_used(WAIT)[1] == 8
        bitmap = os.pread(log_fd, log_size, 0)
        page = dst // 4096
        assert bitmap[page // 8] & (1 << (page % 8))
        os.close(log_fd)


# --- failures ------------------------------------------------------------------------
def test_failing_handle_event_signals_err_and_keeps_serving(served, caplog) -> None:
    backend, _, path = served
    with connect(path) as fe:
        fe.start(queues=1, size=64)
        vq = fe.vring(0)
        backend.fail = True
        src, dst = fe.memory.alloc(2), fe.memory.alloc(2)
        fe.memory.write(src, b"ok")
        vq.post([(src, 2)], [(dst, 2)])
        vq.kick(force=True)
        wait_until(vq.error_signalled)
        assert "ring 0" in caplog.text
        backend.fail = False
        vq.kick(force=True)
        assert vq.wait_used(WAIT)[1] == 2
        assert upper(fe, 0, b"still") == b"STILL"


def test_failing_lifecycle_hook_is_logged_not_fatal(served, caplog) -> None:
    backend, _, path = served
    backend.fail_hook = "ring_started"
    with connect(path) as fe:
        fe.start(queues=1, size=64)
        assert upper(fe, 0, b"fine") == b"FINE"
    assert "ring_started" in caplog.text


def test_unpollable_kick_fd_is_nacked(served, sock_path) -> None:
    _, _, path = served
    with connect(path) as fe:
        fe.start(queues=1, size=64)
        fe.stop_vring(0)
        with open(sock_path.parent / "plain", "w") as plain:
            reply = fe.request(
                FrontendReq.SET_VRING_KICK,
                VhostUserVringFd(0),
                fds=[plain.fileno()],
                need_reply=True,
            )
        assert reply is not None and reply.payload.value == 1
        fe.restart_vring(0)
        assert upper(fe, 0, b"recovered") == b"RECOVERED"


def test_unpollable_kick_fd_on_a_started_ring_keeps_the_old_kick(served, sock_path) -> None:
    _, _, path = served
    with connect(path) as fe:
        fe.start(queues=1, size=64)
        with open(sock_path.parent / "plain", "w") as plain:
            reply = fe.request(
                FrontendReq.SET_VRING_KICK,
                VhostUserVringFd(0),
                fds=[plain.fileno()],
                need_reply=True,
            )
        assert reply is not None and reply.payload.value == 1
        assert upper(fe, 0, b"still kicked") == b"STILL KICKED"


def test_pipelined_requests_are_answered_in_arrival_order(served) -> None:
    """VU-STATE-010: three requests in one write, three replies in the same order."""
    _, _, path = served
    with connect(path) as fe:
        codes = [
            FrontendReq.GET_FEATURES,
            FrontendReq.GET_PROTOCOL_FEATURES,
            FrontendReq.GET_FEATURES,
        ]
        fe.send_raw(b"".join(encode(make_request(code)) for code in codes))
        assert [fe.recv(WAIT).request for _ in codes] == codes


def test_protocol_violation_closes_and_the_next_front_end_is_served(served, caplog) -> None:
    backend, daemon, path = served
    fe = connect(path)
    fe.start(queues=1, size=64)
    fe.send(make_request(FrontendReq.SET_VRING_NUM, VhostUserVringState(7, 64)))
    assert fe.expect_closed(WAIT)
    assert "VU-RING-001" in caplog.text
    fe.close()
    wait_until(lambda: ("disconnected",) in backend.events)
    with connect(path) as again:
        again.start(queues=1, size=64)
        assert upper(again, 0, b"reconnected") == b"RECONNECTED"
    assert daemon.connections == 2


def test_framing_error_closes_and_resets(served, caplog) -> None:
    backend, _, path = served
    fe = connect(path)
    fe.start(queues=1, size=64)
    fe.send_raw(struct.pack("<III", int(FrontendReq.GET_FEATURES), 1, 5000))
    assert fe.expect_closed(WAIT)
    assert "VU-FRAME-005" in caplog.text
    fe.close()
    wait_until(lambda: ("disconnected",) in backend.events)
    assert ("ring_stopped", 0) in backend.events
    with connect(path) as again:
        again.start(queues=1, size=64)
        assert upper(again, 0, b"x") == b"X"


def test_reconnect_resumes_rings(served) -> None:
    backend, _, path = served
    with connect(path) as fe:
        fe.start(queues=1, size=64)
        assert upper(fe, 0, b"before") == b"BEFORE"
        fe.reconnect()
        assert upper(fe, 0, b"after") == b"AFTER"
    assert backend.events.count(("connected",)) == 2


def test_second_front_end_is_refused(served, caplog) -> None:
    _, _, path = served
    with connect(path) as first:
        first.start(queues=1, size=64)
        second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        second.connect(str(path))
        second.settimeout(WAIT)
        assert second.recv(1) == b""  # accepted and closed
        second.close()
        assert "refusing a second front-end" in caplog.text
        assert upper(first, 0, b"undisturbed") == b"UNDISTURBED"


def test_reconnect_that_beats_its_own_close_is_served(served, caplog) -> None:
    """A front-end that connects again a moment before its old socket closes is not refused."""
    _, _, path = served
    first = connect(path)
    first.start(queues=1, size=64)
    closer = threading.Timer(0.1, first.close)
    closer.start()
    with connect(path, retry_for=0) as second:  # accepted while the first is still open
        assert second.get_features() != 0
    closer.join()
    assert "refusing a second front-end" not in caplog.text


# --- inflight and the back-end channel ---------------------------------------------------
def test_inflight_requests_are_resubmitted_after_reconnect(served) -> None:
    backend, _, path = served
    with connect(path) as fe:
        fe.start(queues=1, size=64, inflight=True)
        assert fe.inflight is not None
        vq = fe.vring(0)
        backend.hold = True
        bufs = []
        for text in (b"first", b"second"):
            src, dst = fe.memory.alloc(len(text)), fe.memory.alloc(len(text))
            fe.memory.write(src, text)
            vq.post([(src, len(text))], [(dst, len(text))])
            bufs.append((dst, text))
        vq.kick(force=True)
        wait_until(lambda: len(backend.held) == 2)
        backend.hold = False
        vq.base = 2  # the back-end had consumed both: resume after them
        fe.reconnect()
        for dst, text in bufs:
            assert vq.wait_used(WAIT)[1] == len(text)
            assert fe.memory.read(dst, len(text)) == text.upper()


def test_repeated_get_inflight_fd_keeps_one_buffer(served) -> None:
    _, _, path = served
    with connect(path) as fe:
        fe.start(queues=1, size=64)
        before = open_fds()
        for _ in range(20):
            reply = fe.request(FrontendReq.GET_INFLIGHT_FD, VhostUserInflight(0, 0, 1, 64))
            assert reply is not None and len(reply.fds) == 1
            os.close(reply.fds[0])
        assert open_fds() <= before + 1  # the daemon holds the latest buffer only


def test_backend_channel_config_change(served) -> None:
    backend, _, path = served
    with connect(path) as fe:
        fe.start(queues=1, size=64)
        assert backend.channel is not None
        backend.channel.config_change()  # waits for the front-end's ack (REPLY_ACK)
        assert fe.backend_channel is not None
        msg = fe.backend_channel.wait_for(BackendReq.BACKEND_CONFIG_CHANGE_MSG, WAIT)
        assert msg is not None and msg.need_reply


# --- lifecycle, resources --------------------------------------------------------------
def test_no_fd_leak_after_1000_connections(served) -> None:
    _, daemon, path = served
    with connect(path) as warm:  # first use imports and caches what later ones need
        warm.start(queues=2, size=16)
    wait_until(lambda: not daemon.serving)
    before = open_fds()
    for cycle in range(1000):
        fe = connect(path)
        try:
            if cycle % 100 == 0:
                fe.start(queues=2, size=16, inflight=True)
                assert upper(fe, 1, b"x") == b"X"
            else:
                fe.get_features()
        finally:
            fe.close()
        wait_until(lambda: not daemon.serving)
    # A guest-memory mapping still viewed by a finishing thread is unmapped (and its fd
    # closed) by the garbage collector: wait for that, a leak never settles.
    wait_until(lambda: gc.collect() >= 0 and open_fds() <= before)


def test_stop_leaves_no_thread_and_removes_the_socket(sock_path) -> None:
    threads = set(threading.enumerate())
    before = open_fds()
    backend = UpperBackend()
    daemon = VhostUserDaemon("stop", backend)
    daemon.start(Listener(sock_path))
    fe = connect(sock_path)
    fe.start(queues=2, size=16)
    assert upper(fe, 0, b"a") == b"A"
    daemon.stop()
    assert fe.expect_closed(WAIT)
    fe.close()
    assert set(threading.enumerate()) == threads
    assert not sock_path.exists()
    assert open_fds() <= before
    assert ("disconnected",) in backend.events
    daemon.stop()  # idempotent


def test_shutdown_handle_and_once(sock_path) -> None:
    daemon = VhostUserDaemon("once", UpperBackend())
    daemon.start(Listener(sock_path), once=True)
    with connect(sock_path) as fe:
        fe.get_features()
    assert daemon.wait(WAIT)
    daemon.stop()

    daemon = VhostUserDaemon("handle", UpperBackend())
    daemon.start(Listener(sock_path))
    threading.Thread(target=daemon.shutdown_handle().shutdown).start()
    assert daemon.wait(WAIT)
    daemon.stop()


def test_serve_in_a_thread_until_shutdown(sock_path) -> None:
    daemon = VhostUserDaemon("serve", UpperBackend())
    thread = threading.Thread(target=daemon.serve, args=(sock_path,))
    thread.start()
    with connect(sock_path) as fe:
        fe.start(queues=1, size=16)
        assert upper(fe, 0, b"served") == b"SERVED"
    daemon.shutdown_handle().shutdown()
    thread.join(WAIT)
    assert not thread.is_alive()
    assert not sock_path.exists()


def test_client_mode_connects_and_reconnects(sock_path) -> None:
    listener = FrontendListener(sock_path)
    daemon = VhostUserDaemon("client", UpperBackend())
    try:
        daemon.start_client(sock_path)
        fe = Frontend(listener.accept_socket(WAIT), listener=listener, timeout=WAIT)
        fe.start(queues=1, size=16)
        assert upper(fe, 0, b"client") == b"CLIENT"
        fe.reconnect()  # the daemon connects again; the front-end accepts it
        assert upper(fe, 0, b"again") == b"AGAIN"
        fe.close()
    finally:
        daemon.stop()
        listener.close()


def test_client_mode_gives_up_after_the_timeout(sock_path) -> None:
    daemon = VhostUserDaemon("client", UpperBackend())
    with pytest.raises(VhsmError, match="cannot connect"):
        daemon.start_client(sock_path, connect_timeout=0.2)
    daemon.stop()


# --- Listener ------------------------------------------------------------------------------
def test_listener_mode_stale_live_and_foreign_paths(sock_path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()  # a socket file nobody listens on
    listener = Listener(sock_path)
    assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
    with pytest.raises(VhsmError, match="socket in use"):
        Listener(sock_path)
    listener.close()
    assert not sock_path.exists()
    sock_path.write_text("not a socket")
    with pytest.raises(VhsmError, match="not a socket"):
        Listener(sock_path)
    assert sock_path.read_text() == "not a socket"
    with pytest.raises(VhsmError, match="cannot listen"):
        Listener(sock_path.parent / "missing" / "vu.sock")


# --- internal errors and what they keep ----------------------------------------------------
def mapped_guest_regions() -> set[str]:
    """Inodes of the front-end guest memfds mapped in this process (vhsm.frontend names them)."""
    with open("/proc/self/maps") as maps:
        return {line.split()[4] for line in maps if "vhsm-guest-" in line}


def assert_no_new_guest_mappings(before: set[str]) -> None:
    """No guest memfd mapped since `before` stays mapped (other tests' leftovers are not ours).

    The session's teardown runs on the daemon's thread: wait (with a collection each
    round) for it to let go, and fail only if it never does.
    """
    for _ in range(int(WAIT / 0.05)):
        gc.collect()
        if not mapped_guest_regions() - before:
            return
        time.sleep(0.05)
    raise AssertionError("guest memory stayed mapped after the front-end left")


def test_internal_error_is_kept_as_a_summary_not_with_its_frames(
    served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception kept with its traceback pinned the session's guest mappings."""
    _, daemon, path = served
    from vhsm.session import Session

    def broken(self: Any, msg: Any) -> Any:
        raise RuntimeError("a bug in the daemon, on purpose")

    before = mapped_guest_regions()
    with connect(path) as fe:
        fe.start(queues=1, size=64)
        monkeypatch.setattr(Session, "handle", broken)
        fe.send(make_request(FrontendReq.GET_FEATURES))
        assert fe.expect_closed(WAIT)
    monkeypatch.undo()
    wait_until(lambda: not daemon.serving)
    wait_until(lambda: daemon.last_error is not None)
    assert daemon.last_error == "RuntimeError: a bug in the daemon, on purpose"
    assert_no_new_guest_mappings(before)
    assert not daemon.failed
    with connect(path) as again:
        again.start(queues=1, size=64)
        assert upper(again, 0, b"served") == b"SERVED"


def test_region_ending_at_2_64_is_refused_not_an_internal_error(served, caplog) -> None:
    caplog.set_level(logging.INFO, logger="vhsm")
    from vhsm.wire import VhostUserMemory, VhostUserU64, VhostUserVringAddr
    from vhsm.wire.payloads import VhostUserMemoryRegion

    _, daemon, path = served
    top = (1 << 64) - (1 << 20)
    fd = os.memfd_create("top", os.MFD_CLOEXEC)
    os.ftruncate(fd, 1 << 20)
    try:
        with connect(path) as fe:
            fe.negotiate()
            region = VhostUserMemoryRegion(top, 1 << 20, 0x7F00_0000_0000, 0)
            reply = fe.request(
                FrontendReq.SET_MEM_TABLE, VhostUserMemory([region]), fds=[fd], need_reply=True
            )
            assert reply is not None and reply.payload == VhostUserU64(1)
            fe.call(FrontendReq.SET_VRING_NUM, VhostUserVringState(0, 64))
            uva = 0x7F00_0000_0000
            addr = VhostUserVringAddr(0, 0, uva, uva + 4096, uva + 8192, 0)
            reply = fe.request(FrontendReq.SET_VRING_ADDR, addr, need_reply=True)
            assert reply is not None and reply.payload == VhostUserU64(1)
            assert fe.get_features()  # still connected
    finally:
        os.close(fd)
    assert "VU-MEM-004" in caplog.text
    assert daemon.last_error is None


# --- a patient but bounded listener ---------------------------------------------------------
@pytest.fixture
def impatient(sock_path: Path) -> Iterator[tuple[VhostUserDaemon, Path]]:
    daemon = VhostUserDaemon("impatient", UpperBackend(), handshake_timeout=0.3)
    daemon.start(Listener(sock_path))
    yield daemon, sock_path
    daemon.stop()


def raw_connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.connect(str(path))
    sock.settimeout(WAIT)
    return sock


SET_FEATURES_HEADER = struct.pack("<III", int(FrontendReq.SET_FEATURES), 1, 8)


@pytest.mark.parametrize(
    "sent",
    [b"", SET_FEATURES_HEADER[:5], SET_FEATURES_HEADER],
    ids=["nothing", "half-a-header", "header-without-payload"],
)
def test_a_silent_or_stalled_client_does_not_keep_others_out(impatient, caplog, sent) -> None:
    """A client that sends nothing, or stops inside a message, is closed in time."""
    caplog.set_level(logging.INFO, logger="vhsm")
    daemon, path = impatient
    with raw_connect(path) as silent:
        silent.sendall(sent)
        with connect(path) as fe:  # served once the silent one timed out, not refused
            fe.start(queues=1, size=64)
            assert upper(fe, 0, b"served") == b"SERVED"
        assert silent.recv(1) == b""
    assert "VU-FRAME-011" in caplog.text
    assert daemon.last_error is None


def test_an_idle_front_end_is_not_timed_out(impatient) -> None:
    """After its first message a front-end may be silent as long as it likes."""
    _, path = impatient
    with connect(path) as fe:
        fe.start(queues=1, size=64)
        threading.Event().wait(0.8)  # longer than the hand-shake timeout
        assert upper(fe, 0, b"still here") == b"STILL HERE"
        with connect(path) as second:  # the served front-end spoke: the newcomer is refused
            assert second.expect_closed(WAIT)


def test_handshake_timeout_must_be_positive() -> None:
    with pytest.raises(VhsmError, match="hand-shake timeout"):
        VhostUserDaemon("bad", UpperBackend(), handshake_timeout=0)


def test_socket_mode_is_set_without_touching_the_path(sock_path, monkeypatch) -> None:
    """chmod() after bind() follows a symlink swapped in by a writer of the directory."""
    calls: list[object] = []
    monkeypatch.setattr(os, "chmod", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(os, "lchmod", lambda *a, **k: calls.append(a), raising=False)
    old = os.umask(0)
    try:
        with Listener(sock_path):
            assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
    finally:
        os.umask(old)
    assert calls == [], "the socket's mode was changed through its path"


# --- guest memory that can vanish -------------------------------------------------------------
def test_sealable_guest_memory_cannot_be_shrunk_under_the_daemon(served) -> None:
    _, daemon, path = served
    with connect(path) as fe:
        fe.start(queues=1, size=64)
        (region,) = fe.memory.regions
        with pytest.raises(PermissionError):
            os.ftruncate(region.fd, 0)
        assert upper(fe, 0, b"intact") == b"INTACT"
    assert daemon.last_error is None


def test_unsealable_guest_memory_that_shrinks_ends_the_session_not_the_daemon(
    served, caplog
) -> None:
    """A memfd shrunk after SET_MEM_TABLE: the next kick used to kill the daemon (SIGBUS)."""
    from vhsm.frontend import FrontendMemory

    caplog.set_level(logging.INFO, logger="vhsm")
    _, daemon, path = served
    before = mapped_guest_regions()
    with connect(path, memory=FrontendMemory(sealing=False)) as fe:
        fe.start(queues=1, size=64)
        (region,) = fe.memory.regions
        os.ftruncate(region.fd, 0)  # neither side may touch the region from now on
        del region
        os.eventfd_write(fe.vring(0).kick_fd, 1)
        assert fe.expect_closed(WAIT), "the session went on over a shrunk mapping"
    wait_until(lambda: not daemon.serving)
    assert "VU-FD-004" in caplog.text
    assert_no_new_guest_mappings(before)
    with connect(path) as again:
        again.start(queues=1, size=64)
        assert upper(again, 0, b"next") == b"NEXT"
    assert daemon.last_error is None


def test_unsealable_memory_shrunk_between_requests_ends_the_session(served, caplog) -> None:
    from vhsm.frontend import FrontendMemory

    caplog.set_level(logging.INFO, logger="vhsm")
    _, daemon, path = served
    with connect(path, memory=FrontendMemory(sealing=False)) as fe:
        fe.start(queues=1, size=64)
        fe.stop_vring(0)
        (region,) = fe.memory.regions
        os.ftruncate(region.fd, 4096)
        fe.send(make_request(FrontendReq.GET_FEATURES))
        assert fe.expect_closed(WAIT)
    assert "VU-FD-004" in caplog.text
    assert daemon.last_error is None


def test_a_ring_started_without_addresses_is_noted_once_not_on_every_kick(served, caplog) -> None:
    caplog.set_level(logging.INFO, logger="vhsm")
    _, daemon, path = served
    with connect(path) as fe:
        fe.negotiate()
        fe.set_mem_table()
        kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            fe.call(FrontendReq.SET_VRING_KICK, VhostUserVringFd(0), fds=[kick])
            for _ in range(50):
                os.eventfd_write(kick, 1)
                threading.Event().wait(0.002)
            fe.stop_vring(0)
        finally:
            os.close(kick)
        fe.setup_vring(0, 64)
        assert upper(fe, 0, b"configured") == b"CONFIGURED"
    assert caplog.text.count("VU-RING-011") == 1
    assert "Traceback" not in caplog.text and "handle_event failed" not in caplog.text
    assert daemon.last_error is None


def test_dirty_log_far_larger_than_guest_memory_is_rejected(served, caplog) -> None:
    """VU-MEM-015: 4 MiB of guest memory never needs a 64 MiB log (it covers 2 TiB)."""
    backend, daemon, path = served
    fds = open_fds()
    with connect(path) as fe:
        fe.start(queues=1, size=64, protocol_features=backend.protocol_features())
        fe.set_features(fe.acked_features | VirtioFeature.LOG_ALL)
        log_fd = os.memfd_create("dirty-log-huge")
        os.ftruncate(log_fd, 64 << 20)  # sparse: nothing is allocated
        try:
            with pytest.raises((BackendError, PeerClosed)):
                fe.call(FrontendReq.SET_LOG_BASE, VhostUserLog(64 << 20, 0), fds=[log_fd])
        finally:
            os.close(log_fd)
    assert "VU-MEM-015" in caplog.text
    wait_idle(daemon)
    with connect(path) as fe:  # the daemon serves on
        fe.start(queues=1, size=64)
        assert upper(fe, 0, b"again") == b"AGAIN"
    wait_idle(daemon)
    assert settle_fds(fds) <= fds


@pytest.mark.parametrize("base", [0x7FFF, 0x8000_7FFF, 0xFFFF_FFFF, 0x4000_0040])
def test_packed_base_past_the_ring_is_refused_not_an_internal_error(caplog, base) -> None:
    """A packed SET_VRING_BASE index at or past the ring size used to raise a ValueError."""
    from fuzz_support import EchoBackend, running_daemon

    caplog.set_level(logging.INFO, logger="vhsm")
    with running_daemon(EchoBackend(), "packed") as (daemon, path), connect(path) as fe:
        fe.start(queues=1, size=64, packed=True)
        fe.stop_vring(0)
        reply = fe.request(
            FrontendReq.SET_VRING_BASE, VhostUserVringState(0, base), need_reply=True
        )
        assert reply is not None and reply.payload.value == 1
        fe.restart_vring(0)
        assert upper(fe, 0, b"packed").lower() == b"packed"  # echoed (the echo device)
        assert fe.packed
        assert "VU-RING-005" in caplog.text
        assert daemon.last_error is None

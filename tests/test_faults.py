"""Faults: back-ends killed mid-write, configuration swapped under I/O, hooks that raise.

* A ``vhsm serve blk`` subprocess is SIGKILLed while writes are in flight and
  restarted; the front-end reconnects the QEMU way (SET_INFLIGHT_FD, rings
  resumed at the used index found in guest memory). No acknowledged write is
  lost and every request is completed exactly once.
* The same with a back-end that stalls on one request (so it is certainly in
  flight, recorded in the inflight buffer, when killed): it must be resubmitted
  once (from the inflight region), not also popped again from the avail ring.
* The front-end process is SIGKILLed mid-write; a new front-end holding the same
  guest memory and inflight buffer reconnects: no acknowledged write is lost,
  every posted request completes exactly once.
* Memory table and call fd replaced while requests are being processed.
* A device hook raising in the middle of a chain: err fd signalled, daemon serves on.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fuzz_support import (
    EchoBackend,
    open_fds,
    running_daemon,
    settle_fds,
    temp_dir,
    wait_idle,
    wait_until,
)

from vhsm.devices.blk import BlkBackend
from vhsm.frontend import BlkDevice, Frontend, FrontendMemory, GuestRegion
from vhsm.frontend.memory import UVA_BASE
from vhsm.wire import FrontendReq, VhostUserVringFd

WAIT = 10.0
SECTOR = 512
HDR = struct.Struct("<IIQ")
IMAGE_SECTORS = 64 << 11  # 64 MiB
CHUNK = 64 << 10  # bytes per write request


def serve_blk(sock: Path, image: Path, *, stall: int | None = None) -> subprocess.Popen[bytes]:
    """Start ``vhsm serve blk`` (or, with ``stall``, a blk that never finishes that sector)."""
    if stall is None:
        cmd = [sys.executable, "-m", "vhsm", "serve", "blk", "--socket", str(sock)]
        cmd += ["--file", str(image)]
    else:
        cmd = [sys.executable, __file__, "stalling-blk", str(sock), str(image), str(stall)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + WAIT
    while not sock.exists():
        assert proc.poll() is None, f"back-end exited with {proc.returncode}"
        assert time.monotonic() < deadline, "back-end did not create its socket"
        time.sleep(0.01)
    return proc


def kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGKILL)
    proc.wait(WAIT)


class Writer:
    """Posts numbered write requests (one indirect descriptor each) and reaps completions."""

    def __init__(self, fe: Frontend) -> None:
        self.fe = fe
        self.vq = fe.vring(0)
        self.outstanding: dict[int, int] = {}  # head -> request number
        self.acked: set[int] = set()
        self.status: dict[int, int] = {}
        self.completions: list[int] = []
        self.bufs: dict[int, tuple[int, int, int]] = {}

    @staticmethod
    def data(n: int) -> bytes:
        return (b"req%06d" % n) * (CHUNK // 9) + bytes(CHUNK % 9)

    def post(self, n: int) -> None:
        mem = self.fe.memory
        hdr, data, status = mem.alloc(16), mem.alloc(CHUNK, align=4096), mem.alloc(1)
        mem.write(hdr, HDR.pack(1, 0, n * (CHUNK // SECTOR)))
        mem.write(data, self.data(n))
        mem.write(status, b"\xff")
        head = self.vq.post([(hdr, 16), (data, CHUNK)], [(status, 1)], indirect=True)
        assert head not in self.outstanding, f"head {head} reused while outstanding"
        self.outstanding[head] = n
        self.bufs[n] = (hdr, data, status)

    def reap(self) -> int:
        """Take every used element now in the ring; each head must be outstanding."""
        got = 0
        while (used := self.vq.get_used()) is not None:
            head, _ = used
            assert head in self.outstanding, f"head {head} completed twice (or never posted)"
            n = self.outstanding.pop(head)
            status = self.fe.memory.read(self.bufs[n][2], 1)[0]
            self.status[n] = status
            if status == 0:
                self.acked.add(n)
            self.completions.append(n)
            got += 1
        return got

    def wait_all(self) -> None:
        deadline = time.monotonic() + WAIT
        while self.outstanding:
            assert time.monotonic() < deadline, f"never completed: {sorted(self.outstanding)}"
            if not self.reap():
                time.sleep(0.002)


def check_image(image: Path, acked: set[int]) -> None:
    with image.open("rb") as f:
        for n in sorted(acked):
            f.seek(n * CHUNK)
            assert f.read(CHUNK) == Writer.data(n), f"acknowledged write {n} lost"


def no_extra_completions(fe: Frontend, w: Writer) -> None:
    """A last request: nothing may be completed before it (a duplicate would be)."""
    blk = BlkDevice(fe, timeout=WAIT)
    blk.flush()  # raises if the used element is not this request's
    w.reap()
    assert not w.outstanding


@pytest.fixture
def disk() -> Iterator[tuple[Path, Path]]:
    with temp_dir() as directory:
        image = directory / "disk.img"
        with image.open("wb") as f:
            f.truncate(IMAGE_SECTORS * SECTOR)
        yield directory / "blk.sock", image


def big_memory() -> FrontendMemory:
    return FrontendMemory(((0, 64 << 20),))


@pytest.mark.parametrize("when", [0.0, 0.002, 0.01])
def test_backend_killed_mid_write_and_restarted(disk: tuple[Path, Path], when: float) -> None:
    sock, image = disk
    proc = serve_blk(sock, image)
    try:
        with Frontend.connect(sock, timeout=WAIT, memory=big_memory()) as fe:
            fe.start(queues=1, size=256, inflight=True)
            assert fe.inflight is not None, "blk offers INFLIGHT_SHMFD: a buffer is expected"
            w = Writer(fe)
            for n in range(200):
                w.post(n)
            w.vq.kick(force=True)
            time.sleep(when)
            kill(proc)
            w.reap()
            proc = serve_blk(sock, image)
            fe.reconnect(WAIT)
            w.wait_all()
            no_extra_completions(fe, w)
            assert sorted(w.completions) == list(range(200)), "a request completed twice"
            assert all(s == 0 for s in w.status.values()), w.status
            check_image(image, w.acked)
    finally:
        kill(proc)


def test_request_in_flight_at_the_kill_is_resubmitted_once(disk: tuple[Path, Path]) -> None:
    sock, image = disk
    stall_at = 5
    proc = serve_blk(sock, image, stall=stall_at * (CHUNK // SECTOR))
    try:
        with Frontend.connect(sock, timeout=WAIT, memory=big_memory()) as fe:
            fe.start(queues=1, size=256, inflight=True)
            w = Writer(fe)
            for n in range(12):
                w.post(n)
            w.vq.kick(force=True)
            wait_until(lambda: len(w.completions) + w.reap() >= stall_at, WAIT, "5 completions")
            time.sleep(0.05)  # request 5 is in process() now: popped, in the inflight buffer
            w.reap()
            assert w.completions == list(range(stall_at)), w.completions
            kill(proc)
            proc = serve_blk(sock, image)
            fe.reconnect(WAIT)  # base = used idx from guest memory (5), as QEMU does
            w.wait_all()
            no_extra_completions(fe, w)
            assert sorted(w.completions) == list(range(12)), (
                f"completions {w.completions}: the resubmitted request was also popped again"
            )
            check_image(image, w.acked)
    finally:
        kill(proc)


# --- the front-end dies --------------------------------------------------------------------
class SharedRegion(GuestRegion):
    """A guest region over an existing memfd (the survivor's copy of the guest's memory)."""

    def __init__(self, fd: int, size: int) -> None:
        self.guest_phys_addr = 0
        self.memory_size = size
        self.userspace_addr = UVA_BASE
        self.mmap_offset = 0
        self.fd = fd
        self._mmap = mmap.mmap(fd, size, mmap.MAP_SHARED)
        self.view = memoryview(self._mmap)
        self._free = [(mmap.PAGESIZE, size - mmap.PAGESIZE)]


def shared_memory(fd: int, size: int) -> FrontendMemory:
    mem = FrontendMemory(())
    mem._regions.append(SharedRegion(fd, size))
    return mem


def frontend_child(sock: str, mem_fd: int, report_fd: int) -> None:
    """The doomed front-end: set up with inflight, post writes, report acks, until killed."""
    size = os.fstat(mem_fd).st_size
    report = socket.socket(fileno=report_fd)
    fe = Frontend.connect(sock, timeout=WAIT, memory=shared_memory(mem_fd, size))
    fe.start(queues=1, size=256, inflight=True)
    assert fe.inflight is not None and fe.inflight_fd is not None
    vq = fe.vring(0)
    layout = {
        "desc": vq.desc_gpa,
        "avail": vq.avail_gpa,
        "used": vq.used_gpa,
        "inflight": [fe.inflight.mmap_size, fe.inflight.mmap_offset],
    }
    socket.send_fds(report, [json.dumps(layout).encode() + b"\n"], [fe.inflight_fd])
    w = Writer(fe)
    for n in range(200):
        w.post(n)
        if n % 8 == 7:
            vq.kick(force=True)
        for done in [*w.completions]:
            report.sendall(b"%d %d\n" % (done, w.status[done]))
        w.completions.clear()
        w.reap()
    vq.kick(force=True)
    while True:  # report the rest; the parent kills us somewhere in here
        w.reap()
        for done in w.completions:
            report.sendall(b"%d %d\n" % (done, w.status[done]))
        w.completions.clear()
        time.sleep(0.001)


def test_frontend_killed_mid_write_then_a_new_frontend_resumes() -> None:
    with temp_dir() as directory:
        image = directory / "disk.img"
        with image.open("wb") as f:
            f.truncate(IMAGE_SECTORS * SECTOR)
        backend = BlkBackend(str(image))
        try:
            with running_daemon(backend, "fe-kill") as (daemon, sock):
                run_frontend_kill(daemon, sock, image)
        finally:
            backend.close()


def run_frontend_kill(daemon: Any, sock: Path, image: Path) -> None:
    size = 64 << 20
    mem_fd = os.memfd_create("guest", os.MFD_CLOEXEC)
    os.ftruncate(mem_fd, size)
    parent, child = socket.socketpair()
    cmd = [sys.executable, __file__, "frontend", str(sock), str(mem_fd), str(child.fileno())]
    proc = subprocess.Popen(cmd, pass_fds=(mem_fd, child.fileno()), stdin=subprocess.DEVNULL)
    child.close()
    try:
        parent.settimeout(WAIT)
        line, fds, _, _ = socket.recv_fds(parent, 4096, 1)
        layout = json.loads(line.split(b"\n")[0])
        inflight_fd = fds[0]
        acked: set[int] = set()
        buffered = line.split(b"\n", 1)[1]
        while len(acked) < 20:  # kill it in the middle: after some acks, with more in flight
            buffered += parent.recv(4096)
            *lines, buffered = buffered.split(b"\n")
            acked |= {int(x.split()[0]) for x in lines if x.endswith(b" 0")}
        kill(proc)
        buffered += _drain(parent)
        acked |= {int(x.split()[0]) for x in buffered.split(b"\n") if x.endswith(b" 0")}
        wait_idle(daemon)
        # The survivor: same guest memory, same inflight buffer, a new connection.
        from vhsm.wire import VhostUserInflight

        fe = Frontend.connect(sock, timeout=WAIT, memory=shared_memory(mem_fd, size))
        try:
            fe.negotiate()
            fe.inflight = VhostUserInflight(layout["inflight"][0], layout["inflight"][1], 1, 256)
            fe.inflight_fd = inflight_fd
            fe.set_inflight_fd()
            fe.set_mem_table()
            mem = fe.memory
            used_idx = int.from_bytes(mem.read(layout["used"] + 2, 2), "little")
            avail_idx = int.from_bytes(mem.read(layout["avail"] + 2, 2), "little")
            call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            try:
                _start_raw_ring(fe, layout, used_idx, kick, call)
                wait_until(
                    lambda: int.from_bytes(mem.read(layout["used"] + 2, 2), "little") == avail_idx,
                    WAIT,
                    "every posted request to complete",
                )
                used = [
                    struct.unpack("<II", mem.read(layout["used"] + 4 + 8 * i, 8))
                    for i in range(avail_idx)
                ]
                heads = [struct.unpack("<H", mem.read(layout["avail"] + 4 + 2 * i, 2))[0]
                         for i in range(avail_idx)]  # fmt: skip
                assert sorted(h for h, _ in used) == sorted(heads), "not each request exactly once"
            finally:
                os.close(call)
                os.close(kick)
        finally:
            fe.close()
        check_image(image, acked)
    finally:
        kill(proc)
        parent.close()


def _drain(sock: socket.socket) -> bytes:
    out = b""
    sock.settimeout(0.5)
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            out += chunk
    return out


def _start_raw_ring(fe: Frontend, layout: dict[str, Any], base: int, kick: int, call: int) -> None:
    from vhsm.wire import VhostUserVringAddr, VhostUserVringState

    mem = fe.memory
    fe.call(FrontendReq.SET_VRING_NUM, VhostUserVringState(0, 256))
    fe.call(FrontendReq.SET_VRING_BASE, VhostUserVringState(0, base))
    addr = VhostUserVringAddr(
        0,
        0,
        mem.gpa_to_uva(layout["desc"]),
        mem.gpa_to_uva(layout["used"]),
        mem.gpa_to_uva(layout["avail"]),
        layout["used"],
    )
    fe.call(FrontendReq.SET_VRING_ADDR, addr)
    fe.call(FrontendReq.SET_VRING_KICK, VhostUserVringFd(0), fds=[kick])
    fe.call(FrontendReq.SET_VRING_CALL, VhostUserVringFd(0), fds=[call])
    fe.enable_vring(0, True)
    os.eventfd_write(kick, 1)


# --- configuration swapped under I/O ----------------------------------------------------
@pytest.fixture
def echo() -> Iterator[tuple[EchoBackend, Any, Path]]:
    backend = EchoBackend()
    with running_daemon(backend, "faults") as (daemon, path):
        yield backend, daemon, path


def post_echo(fe: Frontend, count: int, tag: bytes) -> dict[int, tuple[int, bytes]]:
    vq = fe.vring(0)
    posted = {}
    for i in range(count):
        text = tag + b"-%04d" % i
        src, dst = fe.memory.alloc(len(text)), fe.memory.alloc(len(text))
        fe.memory.write(src, text)
        posted[vq.post([(src, len(text))], [(dst, len(text))])] = (dst, text)
    vq.kick(force=True)
    return posted


def reap_echo(fe: Frontend, posted: dict[int, tuple[int, bytes]]) -> None:
    vq = fe.vring(0)
    while posted:
        head, length = vq.wait_used(WAIT)
        assert head in posted, f"unexpected used id {head}"
        dst, text = posted.pop(head)
        assert fe.memory.read(dst, length) == text


def test_memory_table_replaced_during_io(echo: Any) -> None:
    _, daemon, path = echo
    fds = open_fds()
    with Frontend.connect(path, timeout=WAIT) as fe:
        fe.start(queues=1, size=256)
        for round_ in range(30):
            posted = post_echo(fe, 64, b"mem%d" % round_)
            if round_ % 3 == 2:
                fe.add_mem_region(64 << 20, 1 << 20)
                fe.remove_mem_region(64 << 20)
            else:
                fe.set_mem_table()  # the same regions: remapped while the worker runs
            reap_echo(fe, posted)
    wait_idle(daemon)
    assert daemon.last_error is None
    assert settle_fds(fds) <= fds


def test_call_fd_replaced_during_io(echo: Any) -> None:
    _, daemon, path = echo
    fds = open_fds()
    # Calls signalled on the old fd while it is swapped are lost by design: not strict.
    with Frontend.connect(path, timeout=WAIT, strict=False) as fe:
        fe.start(queues=1, size=256)
        vq = fe.vring(0)
        for round_ in range(30):
            posted = post_echo(fe, 64, b"call%d" % round_)
            new = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            fe.call(FrontendReq.SET_VRING_CALL, VhostUserVringFd(0), fds=[new])
            os.close(vq.call_fd)
            vq.call_fd = new
            reap_echo(fe, posted)
        del vq  # its ring views keep the front-end's own mapping (and the mmap's fd) alive
    wait_idle(daemon)
    assert daemon.last_error is None
    assert settle_fds(fds) <= fds


def test_hook_raising_in_the_middle_of_a_chain(echo: Any) -> None:
    backend, daemon, path = echo
    with Frontend.connect(path, timeout=WAIT) as fe:
        fe.start(queues=1, size=64)
        vq = fe.vring(0)
        backend.raise_on = b"POISON"
        post_echo(fe, 1, b"POISON")
        wait_until(vq.error_signalled, WAIT, "the err fd")
        backend.raise_on = None
        reap_echo(fe, post_echo(fe, 8, b"after"))  # the next kick is served
        with Frontend.connect(path, timeout=WAIT) as second:  # refused: one at a time
            assert second.expect_closed(WAIT)
    wait_idle(daemon)
    assert daemon.last_error is None
    assert_reconnect_serves(path)


def assert_reconnect_serves(path: Path) -> None:
    with Frontend.connect(path, timeout=WAIT) as fe:
        fe.start(queues=1, size=64)
        reap_echo(fe, post_echo(fe, 4, b"again"))


# --- subprocess entry points -------------------------------------------------------------
def _stalling_blk(sock: str, image: str, stall_sector: int) -> None:
    from vhsm.daemon import VhostUserDaemon

    class StallingBlk(BlkBackend):
        def process(self, chain: Any, queue: int = 0) -> int:
            _, _, sector = HDR.unpack(chain.read(16))
            if sector == stall_sector:
                time.sleep(3600)  # killed in here
            return super().process(chain, queue)

    VhostUserDaemon("stalling-blk", StallingBlk(image)).serve(sock)


if __name__ == "__main__":
    if sys.argv[1] == "stalling-blk":
        _stalling_blk(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif sys.argv[1] == "frontend":
        frontend_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))

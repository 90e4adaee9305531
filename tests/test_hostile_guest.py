"""Guests that try to wedge the daemon: index jumps, aliased ring areas, misaligned areas.

Each case runs `vhsm serve` in a subprocess with a real front-end (vhsm.frontend)
playing the guest. What must hold afterwards: the ring is marked broken once
(err fd signalled, DEVICE_NEEDS_RESET in GET_STATUS, one log line), the control
thread still answers (GET_VRING_BASE), a fresh front-end is served, and SIGTERM
exits 0. The in-process cases also check that no fd or mapping is left behind.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fuzz_support import open_fds, running_daemon, settle_fds, wait_idle

from vhsm.devices.blk import SEG_MAX, SIZE_MAX
from vhsm.devices.rng import RngBackend
from vhsm.errors import BackendError
from vhsm.frontend import BlkDevice, Frontend, NetDevice, RngDevice
from vhsm.frontend.devices import VIRTIO_BLK_S_IOERR, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from vhsm.wire import (
    DeviceStatus,
    FrontendReq,
    ProtocolFeature,
    VhostUserVringAddr,
    VhostUserVringFd,
    VhostUserVringState,
)

WAIT = 20.0
VHSM = [sys.executable, "-m", "vhsm", "--log-level", "INFO"]
N = 64
BROKEN = "broken (VU-RING-009)"


@pytest.fixture
def workdir() -> Iterator[Path]:
    directory = tempfile.mkdtemp(prefix="vhsm-hg-", dir="/tmp")
    yield Path(directory)
    shutil.rmtree(directory, ignore_errors=True)


def serve(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*VHSM, "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def terminate(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """SIGTERM; the exit code and stderr (killed, then AssertionError, if it hangs)."""
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"SIGTERM ignored; log tail:\n{err[-3000:]}") from None
    return proc.returncode, err


def connect(path: Path) -> Frontend:
    return Frontend.connect(path, retry_for=WAIT, timeout=WAIT)


def signalled(fd: int, timeout: float = WAIT) -> bool:
    """Wait for an eventfd to be written; consume it."""
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return False
    os.eventfd_read(fd)
    return True


def jump_avail(fe: Frontend, ring: int, by: int = N + 5) -> None:
    """The guest moves ring `ring`'s avail index more than the ring size ahead and kicks."""
    vq = fe.vring(ring)
    idx = struct.unpack("<H", fe.memory.read(vq.avail_gpa + 2, 2))[0]
    fe.memory.write(vq.avail_gpa + 2, struct.pack("<H", (idx + by) & 0xFFFF))
    os.eventfd_write(vq.kick_fd, 1)


def alias_used_over_avail(fe: Frontend, ring: int, pending: int = 5) -> None:
    """Restart ring `ring` with its used ring placed over its avail ring, work pending.

    The used index then reads as the avail index: every completion would publish
    one more available entry, forever.
    """
    vq = fe.vring(ring)
    fe.stop_vring(ring)
    fe.memory.write(vq.avail_gpa + 2, struct.pack("<H", pending))
    mem = fe.memory
    fe.call(FrontendReq.SET_VRING_BASE, VhostUserVringState(ring, 0))
    addr = VhostUserVringAddr(
        ring, 0, mem.gpa_to_uva(vq.desc_gpa), mem.gpa_to_uva(vq.avail_gpa),
        mem.gpa_to_uva(vq.avail_gpa), vq.avail_gpa,
    )  # fmt: skip
    fe.call(FrontendReq.SET_VRING_ADDR, addr)
    fe.call(FrontendReq.SET_VRING_KICK, VhostUserVringFd(ring), fds=[vq.kick_fd])
    fe.call(FrontendReq.SET_VRING_CALL, VhostUserVringFd(ring), fds=[vq.call_fd])
    fe.call(FrontendReq.SET_VRING_ERR, VhostUserVringFd(ring), fds=[vq.err_fd])
    os.eventfd_write(vq.kick_fd, 1)


def assert_broken_reported(fe: Frontend, ring: int) -> None:
    """Err fd signalled, NEEDS_RESET in the status, and the control thread answers."""
    assert signalled(fe.vring(ring).err_fd), f"ring {ring}: err fd not signalled"
    if fe.has_protocol(ProtocolFeature.STATUS):  # rng does not offer it
        assert fe.get_status() & DeviceStatus.DEVICE_NEEDS_RESET
    fe.stop_vring(ring)  # GET_VRING_BASE is answered: the worker let go of the lock


def needs_reset(fe: Frontend) -> bool:
    return fe.has_protocol(ProtocolFeature.STATUS) and bool(
        fe.get_status() & DeviceStatus.DEVICE_NEEDS_RESET
    )


def check_log(err: str) -> None:
    assert err.count(BROKEN) == 1, f"expected one 'broken' line:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert "handle_event failed" not in err, err[-3000:]


# --- net ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("mode", "ring"), [("loopback", 1), ("loopback", 0), ("sink", 1)])
def test_net_avail_index_jump_breaks_the_ring_once(workdir: Path, mode: str, ring: int) -> None:
    path = workdir / "net.sock"
    proc = serve("net", "--socket", str(path), "--mode", mode)
    try:
        with connect(path) as fe:
            fe.start(queues=2, size=N)
            dev = NetDevice(fe)
            if ring == 0:
                dev.post_rx(2)
            jump_avail(fe, ring)
            if ring == 0:  # the RX ring is read when a frame arrives
                os.eventfd_write(fe.vring(1).kick_fd, 1)
                fe.vring(1).post([(fe.memory.alloc(64), 64)], [])
                fe.vring(1).kick(force=True)
            assert_broken_reported(fe, ring)
        with connect(path) as fe:  # a fresh front-end is served
            fe.start(queues=2, size=N)
            dev = NetDevice(fe)
            frame = bytes(range(60))
            if mode == "loopback":
                dev.post_rx(2)
                dev.send(frame)
                assert dev.receive(WAIT) == frame
            else:
                dev.send(frame)
            assert not needs_reset(fe)
    finally:
        code, err = terminate(proc)
    assert code == 0, err[-3000:]
    check_log(err)


# --- rng, blk: used ring over the avail ring -------------------------------------------------
@pytest.mark.parametrize("device", ["rng", "blk"])
def test_used_ring_over_avail_ring_breaks_the_ring_once(workdir: Path, device: str) -> None:
    path = workdir / "dev.sock"
    args = ["rng"] if device == "rng" else ["blk", "--file", str(workdir / "disk.img")]
    if device == "blk":
        (workdir / "disk.img").write_bytes(bytes(1 << 20))
    proc = serve(*args, "--socket", str(path))
    try:
        with connect(path) as fe:
            fe.start(queues=1, size=N)
            alias_used_over_avail(fe, 0)
            assert_broken_reported(fe, 0)
        with connect(path) as fe:
            fe.start(queues=1, size=N)
            if device == "rng":
                assert len(RngDevice(fe).read(32)) == 32
            assert not needs_reset(fe)
    finally:
        code, err = terminate(proc)
    assert code == 0, err[-3000:]
    check_log(err)


# --- packed driver area 2 mod 4 --------------------------------------------------------------
def test_packed_driver_area_misaligned_is_rejected_with_its_rule(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fds = open_fds()
    with running_daemon(RngBackend(), "hostile-packed") as (daemon, path):
        fe = connect(path)
        fe.start(queues=1, size=N, packed=True)
        fe.stop_vring(0)
        addr = ring_addr(fe, 0, avail_offset=2)  # the driver area at 2 mod 4
        with pytest.raises(BackendError, match="answered 1"):  # a NACK, the session goes on
            fe.call(FrontendReq.SET_VRING_ADDR, addr)
        assert "VU-RING-003" in caplog.text
        assert daemon.last_error is None, repr(daemon.last_error)
        fe.close()
        wait_idle(daemon)
        with connect(path) as again:
            again.start(queues=1, size=N, packed=True)
            assert len(RngDevice(again).read(16)) == 16
        wait_idle(daemon)
        assert daemon.last_error is None, repr(daemon.last_error)
    assert settle_fds(fds) <= fds


def ring_addr(fe: Frontend, ring: int, avail_offset: int = 0) -> VhostUserVringAddr:
    """Ring `ring`'s SET_VRING_ADDR payload, its avail (driver) area moved by `avail_offset`."""
    vq, mem = fe.vring(ring), fe.memory
    return VhostUserVringAddr(
        ring, 0, mem.gpa_to_uva(vq.desc_gpa), mem.gpa_to_uva(vq.used_gpa),
        mem.gpa_to_uva(vq.avail_gpa) + avail_offset, vq.used_gpa,
    )  # fmt: skip


# --- in-process: no fd or mapping left behind --------------------------------------------------
def maps_of(needle: str) -> int:
    return sum(needle in line for line in Path("/proc/self/maps").read_text().splitlines())


def test_broken_ring_leaves_no_fd_or_mapping_behind() -> None:
    fds = open_fds()
    mapped = maps_of("vhsm-guest-")
    with running_daemon(RngBackend(), "hostile-inproc") as (daemon, path):
        for _ in range(3):
            fe: Any = connect(path)
            fe.start(queues=1, size=N)
            alias_used_over_avail(fe, 0)
            assert_broken_reported(fe, 0)
            fe.close()
            wait_idle(daemon)
            jumper = connect(path)
            jumper.start(queues=1, size=N)
            jump_avail(jumper, 0)
            assert_broken_reported(jumper, 0)
            jumper.close()
            wait_idle(daemon)
        assert not daemon.plane.needs_reset()
        assert maps_of("vhsm-guest-") == mapped, "guest memory still mapped"
        assert daemon.last_error is None, repr(daemon.last_error)
    assert settle_fds(fds) <= fds


# --- blk: the limits its config space advertises ------------------------------------------
def test_blk_requests_over_its_limits_fail_and_the_daemon_serves_on(workdir: Path) -> None:
    image = workdir / "disk.img"
    image.write_bytes(bytes(4 << 20))
    path = workdir / "blk.sock"
    proc = serve("blk", "--file", str(image), "--socket", str(path))
    hdr_out = struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 0)
    hdr_in = struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)
    try:
        with connect(path) as fe:
            fe.start(queues=1, size=256)
            dev = BlkDevice(fe)
            # seg_max + 1 data segments, one segment over size_max, a read with nowhere to go
            cases = [
                ([hdr_out] + [bytes([1]) * 512] * (SEG_MAX + 1), [1]),
                ([hdr_out, bytes([2]) * (SIZE_MAX + 512)], [1]),
                ([hdr_in, bytes(512)], [1]),
                ([hdr_in], [1]),
            ]
            for readable, writable in cases:
                _, got = dev._run(dev.vq, readable, writable)
                assert got[-1] == bytes([VIRTIO_BLK_S_IOERR])
            dev.write(0, bytes([3]) * 512)  # within the limits: served
        assert image.read_bytes()[:512] == bytes([3]) * 512
        assert image.read_bytes()[512:] == bytes(len(image.read_bytes()) - 512)
        with connect(path) as fe:
            fe.start(queues=1, size=256)
            assert BlkDevice(fe).read(0) == bytes([3]) * 512
    finally:
        code, err = terminate(proc)
    assert code == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]

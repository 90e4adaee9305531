"""A real guest keeps its data when `vhsm serve blk` is SIGKILLed mid-I/O and restarted.

QEMU's chardev has ``reconnect=1``: when the back-end dies QEMU stops the device, and on
the new connection it hands the new daemon the same inflight region, whose requests the
daemon resubmits. Four concurrent O_DIRECT writers run in the guest; the first daemon
holds one write without completing it (tests/guest/hold_write.py), so the SIGKILL
certainly leaves a request in flight. Every write is read back in the guest and
checked in the image, and the second daemon must report the resubmission.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from guest.harness import (
    BackendProcess,
    GuestEnv,
    require_guest_env,
    short_socket_dir,
    start_backend,
    vhost_user_blk,
)
from guest.initramfs import build_initramfs
from guest.serve import HOLD_WRITE, require_serve, serve_blk_argv
from guest.vm import GuestStopped, RunningGuest, start_guest
from guest.writers import WriterPlan

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(600)]

RESUBMITTED = re.compile(r"ring 0: (\d+) requests resubmitted from the inflight region")


@pytest.fixture
def guest_env() -> GuestEnv:
    require_serve("blk")
    return require_guest_env()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with short_socket_dir() as path:
        yield path


def wait_for_log(backend: BackendProcess, text: str, guest: RunningGuest, timeout: float) -> None:
    """Wait until the back-end printed ``text``, while the guest runs."""
    deadline = time.monotonic() + timeout
    while text not in backend.log():
        if not guest.alive() or not backend.alive() or time.monotonic() > deadline:
            raise GuestStopped(f"back-end never printed {text!r}\n{guest.report()}")
        time.sleep(0.1)


@pytest.mark.parametrize("packed", ["off", "on"], ids=["split", "packed"])
def test_blk_guest_survives_sigkill_of_vhsm(
    guest_env: GuestEnv, tmp_path: Path, sock_dir: Path, packed: str
) -> None:
    plan = WriterPlan()
    image = plan.prepare_image(tmp_path / "disk.img")
    sock = sock_dir / "blk.sock"
    held_sector = ((plan.writers - 1) * plan.writes + 3) * plan.block // 512
    work = tmp_path / "guest"
    work.mkdir()
    initramfs = build_initramfs(
        guest_env.kernel, plan.script(), work / "initramfs.cpio", busybox=guest_env.busybox
    )
    first = start_backend(
        serve_blk_argv(image, sock, vhsm=[*HOLD_WRITE, str(held_sector)]),
        sock,
        tmp_path / "vhsm-1.log",
    )
    backends = [first]
    try:
        guest = start_guest(
            guest_env, initramfs, work, devices=[vhost_user_blk(sock, reconnect=1, packed=packed)]
        )
        try:
            wait_for_log(first, f"HOLDING write at sector {held_sector}", guest, timeout=180)
            first.proc.kill()
            first.proc.wait()
            before_kill = guest.output()
            second = start_backend(
                serve_blk_argv(image, sock, "--log-level", "INFO"), sock, tmp_path / "vhsm-2.log"
            )
            backends.append(second)
            guest.backends = [second]
            result = guest.result(guest.wait_exit(timeout=300))
        finally:
            guest.kill()
    finally:
        for backend in backends:
            backend.stop()
    assert first.proc.returncode == -9
    assert plan.verify_image(image, result) == plan.writers * plan.writes
    assert result.values["verified"] == "ok"
    # The held write, and the rest, completed after the kill (through the new daemon).
    assert writes_after_kill(result.output, before_kill) > 0, result.report()
    resubmitted = RESUBMITTED.search(second.log())
    assert resubmitted is not None and int(resubmitted.group(1)) >= 1, result.report()
    for backend in backends:
        assert "Traceback" not in backend.log(), result.report()


def writes_after_kill(output: str, before: str) -> int:
    """How many writes the guest reported after the test channel read ``before``."""
    assert output.startswith(before)
    return sum(1 for line in output[len(before) :].splitlines() if line.startswith("VHSM-KV w."))

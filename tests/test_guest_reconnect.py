"""A real guest keeps its data when `vhsm serve blk` is SIGKILLed mid-I/O and restarted.

QEMU's chardev has ``reconnect=1``: when the back-end dies QEMU stops the device, and on
the new connection it hands the new daemon the same inflight region, whose requests the
daemon resubmits. The guest writes with four concurrent O_DIRECT writers while the
daemon is killed; every write is read back in the guest and checked in the image.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from guest.harness import (
    GuestEnv,
    require_guest_env,
    short_socket_dir,
    start_backend,
    vhost_user_blk,
)
from guest.initramfs import build_initramfs
from guest.serve import require_serve, serve_blk_argv
from guest.vm import start_guest
from guest.writers import WriterPlan

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(600)]


@pytest.fixture
def guest_env() -> GuestEnv:
    require_serve("blk")
    return require_guest_env()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with short_socket_dir() as path:
        yield path


def test_blk_guest_survives_sigkill_of_vhsm(
    guest_env: GuestEnv, tmp_path: Path, sock_dir: Path
) -> None:
    plan = WriterPlan()
    image = plan.prepare_image(tmp_path / "disk.img")
    sock = sock_dir / "blk.sock"
    argv = serve_blk_argv(image, sock)
    work = tmp_path / "guest"
    work.mkdir()
    initramfs = build_initramfs(
        guest_env.kernel, plan.script(), work / "initramfs.cpio", busybox=guest_env.busybox
    )
    first = start_backend(argv, sock, tmp_path / "vhsm-1.log")
    backends = [first]
    try:
        guest = start_guest(guest_env, initramfs, work, devices=[vhost_user_blk(sock, reconnect=1)])
        try:
            # Kill while the writers are busy: each has done a few of its writes.
            guest.wait_for_line(plan.progress_line(plan.writers - 1, 3), timeout=180)
            first.proc.kill()
            before_kill = guest.output()
            first.proc.wait()
            backends.append(start_backend(argv, sock, tmp_path / "vhsm-2.log"))
            guest.backends = [backends[-1]]
            result = guest.result(guest.wait_exit(timeout=300))
        finally:
            guest.kill()
    finally:
        for backend in backends:
            backend.stop()
    assert first.proc.returncode == -9
    assert plan.verify_image(image, result) == plan.writers * plan.writes
    assert result.values["verified"] == "ok"
    # Writes finished after the kill went through the restarted daemon.
    assert writes_after_kill(result.output, before_kill) > 0, result.report()
    for backend in backends:
        assert "Traceback" not in backend.log(), result.report()


def writes_after_kill(output: str, before: str) -> int:
    """How many writes the guest reported after the test channel read ``before``."""
    assert output.startswith(before)
    return sum(1 for line in output[len(before) :].splitlines() if line.startswith("VHSM-KV w."))

"""Reference runs of the real-guest tests against peers written in C.

qemu-storage-daemon serves a raw image as vhost-user-blk; QEMU's built-in virtio-rng
checks the guest rng script. These prove the harness, so a failure in
test_guest_vhsm.py with the same scripts points at vhsm.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from guest.harness import (
    QSD,
    GuestEnv,
    boot_guest,
    qemu_virtio_rng,
    qsd_blk_argv,
    require_guest_env,
    running_backend,
    short_socket_dir,
    vhost_user_blk,
)
from guest.initramfs import modules_in_load_order
from guest.scripts import BlkPlan, check_rng_result, rng_script

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(300)]


@pytest.fixture
def guest_env() -> GuestEnv:
    return require_guest_env(QSD)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with short_socket_dir() as path:
        yield path


def test_blk_guest_against_qemu_storage_daemon(
    guest_env: GuestEnv, tmp_path: Path, sock_dir: Path
) -> None:
    plan = BlkPlan()
    image = plan.prepare_image(tmp_path / "disk.img")
    sock = sock_dir / "blk.sock"
    with running_backend(qsd_blk_argv(image, sock), sock, tmp_path / "qsd.log") as qsd:
        result = boot_guest(
            guest_env,
            script=plan.script(),
            devices=[vhost_user_blk(sock)],
            backends=[qsd],
            workdir=tmp_path / "guest",
        )
    result.assert_passed()
    assert result.values["blk"] == "ok"
    assert plan.verify_image(image, result) == [r.name for r in plan.regions]
    assert result.values["write_cache_set"] == "write back"  # so sync sent FLUSH requests


def test_rng_guest_against_qemu_virtio_rng(guest_env: GuestEnv, tmp_path: Path) -> None:
    result = boot_guest(
        guest_env,
        script=rng_script(8192),
        devices=[qemu_virtio_rng()],
        workdir=tmp_path / "guest",
    )
    check_rng_result(result, 8192)


def test_guest_reports_script_failure(guest_env: GuestEnv, tmp_path: Path) -> None:
    script = 'echo "VHSM-KV before=1"\nexit 3\necho "VHSM-KV after=1"\n'
    result = boot_guest(guest_env, script=script, workdir=tmp_path / "guest")
    assert result.status == "fail"
    assert result.values == {"before": "1"}
    assert "VHSM-GUEST-RESULT FAIL rc=3" in result.output
    assert "reboot: Power down" in result.console


def test_guest_boot_is_killed_at_timeout(guest_env: GuestEnv, tmp_path: Path) -> None:
    result = boot_guest(guest_env, script="sleep 600\n", timeout=3, workdir=tmp_path / "guest")
    assert result.status == "timeout"
    assert not result.passed
    assert result.returncode is not None


def test_virtio_modules_load_in_dependency_order(guest_env: GuestEnv) -> None:
    names = [m.name for m in modules_in_load_order(guest_env.kernel.modules_dir, ["virtio_blk"])]
    assert names[-1] == "virtio_blk"
    assert names.index("virtio_ring") < names.index("virtio")


def test_boot_stops_when_backend_dies(guest_env: GuestEnv, tmp_path: Path, sock_dir: Path) -> None:
    plan = BlkPlan()
    image = plan.prepare_image(tmp_path / "disk.img")
    sock = sock_dir / "blk.sock"
    with running_backend(qsd_blk_argv(image, sock), sock, tmp_path / "qsd.log") as qsd:
        killer = threading.Timer(0.5, qsd.proc.kill)
        killer.start()
        try:
            result = boot_guest(
                guest_env,
                script="sleep 600\n",
                devices=[vhost_user_blk(sock)],
                backends=[qsd],
                timeout=120,
                workdir=tmp_path / "guest",
            )
        finally:
            killer.cancel()
    # QEMU usually has connected by then (back-end gone mid-boot); if not, it fails to start.
    assert result.status in {"backend-exited", "no-result"}, result.report()
    assert not result.passed

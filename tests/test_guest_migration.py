"""Live migration of a real guest on `vhsm serve blk` to a second QEMU on a second daemon.

The guest reads chunks of its disk into its page cache while the migration runs; the
destination compares them (see guest/migration.py). The second test cuts vhsm's dirty
log of written buffers and expects stale chunks: it shows the first one can fail.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from guest.harness import (
    GuestEnv,
    GuestResult,
    require_guest_env,
    running_backend,
    short_socket_dir,
    vhost_user_blk,
)
from guest.initramfs import build_initramfs
from guest.migration import (
    MARKER_CHECK,
    MARKER_READ,
    MIGRATION_CMDLINE,
    MigrationError,
    PageCachePlan,
    finish_migration,
    hold_migration,
    migration_status,
)
from guest.scripts import VIRTIO_F_RING_PACKED, guest_virtio_features
from guest.serve import CUT_DIRTY_LOG, VHSM, require_serve, serve_blk_argv
from guest.vm import RunningGuest, start_guest

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(600)]


@pytest.fixture
def guest_env() -> GuestEnv:
    require_serve("blk")
    return require_guest_env()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with short_socket_dir() as path:
        yield path


@dataclass
class Migrated:
    """What a migration run produced."""

    result: GuestResult  # the destination's verdict, with the source's output first
    intact: int
    stale: int
    held: dict[str, object]  # query-migrate while the guest was caching


def _wait_running(guest: RunningGuest, timeout: float = 120.0) -> None:
    assert guest.qmp is not None
    deadline = time.monotonic() + timeout
    while (status := guest.qmp.execute("query-status"))["status"] != "running":
        if time.monotonic() > deadline:
            raise MigrationError(f"destination not running: {status}\n{guest.report()}")
        time.sleep(0.2)


def migrate_blk_guest(
    env: GuestEnv,
    tmp_path: Path,
    sock_dir: Path,
    *,
    source_vhsm: Sequence[str] = VHSM,
    packed: str = "off",
) -> Migrated:
    """Boot on one `vhsm serve blk`, migrate to a second QEMU and daemon, check the cache."""
    plan = PageCachePlan()
    image = plan.prepare_image(tmp_path / "disk.img")
    work = tmp_path / "guest"
    work.mkdir()
    initramfs = build_initramfs(
        env.kernel, plan.script(), work / "initramfs.cpio", busybox=env.busybox
    )
    socks = {n: sock_dir / f"{n}.sock" for n in ("src", "dst", "mig", "srcq", "dstq")}
    with ExitStack() as stack:
        src_be = stack.enter_context(
            running_backend(
                serve_blk_argv(image, socks["src"], vhsm=list(source_vhsm)),
                socks["src"],
                tmp_path / "vhsm-src.log",
            )
        )
        dst_be = stack.enter_context(
            running_backend(
                serve_blk_argv(image, socks["dst"]), socks["dst"], tmp_path / "vhsm-dst.log"
            )
        )
        common = {"memory_mb": 256, "cmdline": MIGRATION_CMDLINE}
        source = start_guest(
            env,
            initramfs,
            work,
            name="source",
            devices=[vhost_user_blk(socks["src"], packed=packed)],
            backends=[src_be],
            qmp_socket=socks["srcq"],
            **common,  # type: ignore[arg-type]
        )
        stack.callback(source.kill)
        dest = start_guest(
            env,
            initramfs,
            work,
            name="dest",
            devices=[vhost_user_blk(socks["dst"], packed=packed)],
            backends=[dst_be],
            qmp_socket=socks["dstq"],
            extra_args=("-incoming", f"unix:{socks['mig']}"),
            **common,  # type: ignore[arg-type]
        )
        stack.callback(dest.kill)
        assert source.qmp is not None
        source.wait_for_line("mig: ready", timeout=180)
        hold_migration(source.qmp, f"unix:{socks['mig']}")
        plan.set_marker(image, MARKER_READ)
        line = source.wait_for_line("VHSM-KV cached=", timeout=300, others=[dest])
        held = migration_status(source.qmp)
        if source.find_line("VHSM-KV cached=") is None or held.get("status") != "active":
            raise MigrationError(f"migration finished before the guest cached ({line}): {held}")
        finish_migration(source.qmp)
        _wait_running(dest)
        plan.set_marker(image, MARKER_CHECK)
        status = dest.wait_exit(timeout=300)
        result = dest.result(status, extra_output=source.output())
    for backend in (src_be, dst_be):
        assert "Traceback" not in backend.log(), result.report()
    # QEMU hands the destination a new inflight region: adopted at the ring's position
    assert "inflight buffer not usable" not in dst_be.log(), dst_be.log()
    assert "vring error" not in result.qemu_log, result.report()
    intact, stale = plan.outcome(result)
    return Migrated(result, intact, stale, held)


@pytest.mark.parametrize("packed", ["off", "on"], ids=["split", "packed"])
def test_blk_guest_migrates_between_vhsm_daemons(
    guest_env: GuestEnv, tmp_path: Path, sock_dir: Path, packed: str
) -> None:
    run = migrate_blk_guest(guest_env, tmp_path, sock_dir, packed=packed)
    assert "init_on_alloc=0" in run.result.values["cmdline"]
    negotiated = bool(guest_virtio_features(run.result) & (1 << VIRTIO_F_RING_PACKED))
    assert negotiated == (packed == "on"), run.result.report()
    assert run.stale == 0, run.result.report()
    assert run.intact == PageCachePlan().chunks


@pytest.mark.parametrize("packed", ["off", "on"], ids=["split", "packed"])
def test_migration_check_detects_a_cut_dirty_log(
    guest_env: GuestEnv, tmp_path: Path, sock_dir: Path, packed: str
) -> None:
    run = migrate_blk_guest(guest_env, tmp_path, sock_dir, source_vhsm=CUT_DIRTY_LOG, packed=packed)
    assert run.stale > 0, run.result.report()

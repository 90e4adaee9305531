"""Live migration of a guest whose disk is a vhost-user back-end, with a dirty-log check.

The check: during migration the guest reads chunks of its disk through the page cache.
The back-end writes those pages into guest RAM directly (DMA), so QEMU learns they
changed only from the back-end's dirty log. On the destination the guest reads the
chunks again from its page cache (no disk I/O) and compares them with what the host
seeded: a page the log missed still holds what it held when it was first sent.
The guest boots with ``init_on_alloc=0``: zeroed page allocations would dirty every
page-cache page from the CPU and hide a missing log.

The host holds the migration in its bulk stage (the first pass over RAM) while the
guest reads, so some of the pages the back-end then writes were already sent:

1. The guest fills most of its free RAM with non-zero bytes (zero pages cost the bulk
   stage nothing, so an empty guest is sent in a blink): first 32 MiB, which take
   the lowest free pages, then all but a 40 MiB headroom; prints ``mig: ready``.
2. The host migrates at 32 MiB/s; once 40% of RAM was sent it drops ``max-bandwidth``
   to 100 bytes/s (a page or two per 100 ms): the bulk stage cannot finish, no dirty
   bitmap is synced, the migration cannot complete.
3. The host writes ``READ`` into the disk's first block (the guest polls it with
   O_DIRECT); the guest frees its first fill (already sent: the page cache reuses
   those pages), reads every chunk and prints ``cached=N``.
4. The host lifts the limit; QEMU syncs its dirty bitmap (with the back-end's log),
   sends what changed, completes, and the destination runs.
5. The host writes ``CHCK``; the destination guest compares its cached chunks.

The guest's own CPU writes are not what is tested here (QEMU tracks those itself).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .harness import GuestResult
from .qmp import QMPClient

__all__ = [
    "MIGRATION_CMDLINE",
    "MigrationError",
    "PageCachePlan",
    "finish_migration",
    "hold_migration",
    "migration_status",
]

KiB = 1024
MiB = 1024 * KiB

#: Kernel arguments of a migrated guest: page allocations keep their old contents.
MIGRATION_CMDLINE = "init_on_alloc=0 init_on_free=0"

MARKER_READ = b"READ"
MARKER_CHECK = b"CHCK"


class MigrationError(AssertionError):
    """The migration failed, finished too early, or did not reach a state in time."""


@dataclass(frozen=True)
class PageCachePlan:
    """Seeded chunks the guest caches during migration and checks on the destination."""

    chunks: int = 32
    chunk_size: int = 256 * KiB
    stride: int = 512 * KiB
    base: int = 1 * MiB
    device: str = "/dev/vda"
    first_fill: int = 32 * MiB
    headroom: int = 40 * MiB
    seed: bytes = field(default_factory=lambda: os.urandom(32))

    @property
    def image_size(self) -> int:
        """Bytes of the raw image (the marker block, then the chunks)."""
        return self.base + self.chunks * self.stride

    def chunk_data(self, index: int) -> bytes:
        """The seeded contents of chunk ``index`` (pseudo-random, from ``seed``)."""
        out = bytearray()
        counter = 0
        while len(out) < self.chunk_size:
            block = hashlib.sha512(self.seed + index.to_bytes(4) + counter.to_bytes(4))
            out += block.digest()
            counter += 1
        return bytes(out[: self.chunk_size])

    def prepare_image(self, path: Path) -> Path:
        """Write the raw image: an empty marker block and every chunk's data."""
        with open(path, "wb") as f:
            f.truncate(self.image_size)
            for i in range(self.chunks):
                f.seek(self.base + i * self.stride)
                f.write(self.chunk_data(i))
        return path

    def set_marker(self, path: Path, marker: bytes) -> None:
        """Write ``marker`` into the image's first block (the guest polls it)."""
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, marker.ljust(4096, b"\0"), 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    def script(self) -> str:
        """The guest script (busybox sh)."""
        lines = [
            _PRELUDE.format(
                dev=self.device,
                bs=4096,
                count=self.chunk_size // 4096,
                first_8m=self.first_fill // (8 * MiB),
                headroom_8m=self.headroom // (8 * MiB),
            ),
            'echo "step: read chunks into the page cache (during migration)"',
        ]
        for i in range(self.chunks):
            block = (self.base + i * self.stride) // 4096
            want = hashlib.sha256(self.chunk_data(i)).hexdigest()
            lines.append(f"cache {i} {block} {want}")
        lines.append(_CACHED.format(chunks=self.chunks))
        for i in range(self.chunks):
            block = (self.base + i * self.stride) // 4096
            want = hashlib.sha256(self.chunk_data(i)).hexdigest()
            lines.append(f"verify {i} {block} {want}")
        lines.append(_REPORT)
        return "\n".join(lines) + "\n"

    def outcome(self, result: GuestResult) -> tuple[int, int]:
        """(chunks intact, chunks stale) as the destination guest reported them.

        Raises:
            AssertionError: the guest did not finish, or re-read chunks from the disk
                (then the page-cache check would prove nothing).
        """
        result.assert_passed()
        values = result.values
        if values.get("check_sectors_read") != "0":
            raise AssertionError(
                "the destination read chunks from disk, not from its page cache\n" + result.report()
            )
        ok, stale = int(values["intact"]), int(values["stale"])
        if ok + stale != self.chunks:
            raise AssertionError(f"{ok} + {stale} chunks != {self.chunks}\n" + result.report())
        return ok, stale


_PRELUDE = """set -e
DEV={dev}
fail() {{ echo "FAIL: $*"; exit 1; }}
sha() {{ sha256sum | cut -d' ' -f1; }}
marker() {{ dd if=$DEV bs=4096 count=1 iflag=direct 2>/dev/null | head -c 4; }}
# chunk BLOCK: checksum of one chunk read through the page cache
chunk() {{ dd if=$DEV bs={bs} skip=$1 count={count} 2>/dev/null | sha; }}
sectors_read() {{ awk '{{print $3}}' /sys/block/${{DEV##*/}}/stat; }}
cache() {{
    got=$(chunk $2)
    [ "$got" = "$3" ] || fail "chunk $1 read from the disk: $got != $3"
    echo "cached $1"
}}
intact=0
stale=0
verify() {{
    got=$(chunk $2)
    if [ "$got" = "$3" ]; then
        intact=$((intact + 1))
    else
        stale=$((stale + 1)); echo "stale $1"
    fi
}}
i=0
while [ ! -b $DEV ]; do
    i=$((i + 1)); [ $i -le 100 ] || fail "no $DEV"
    sleep 0.1
done
# Linux drops a block device's page cache when its last opener closes it: hold it open.
exec 3<$DEV
echo "VHSM-KV cmdline=$(cat /proc/cmdline)"
echo "VHSM-KV virtio_features=$(cat /sys/block/${{DEV##*/}}/device/features)"
# Non-zero RAM keeps the bulk stage busy for seconds (zero pages cost it nothing).
# fill N FILE: N times 8 MiB of the same random bytes (one urandom MiB, cat is cheap)
fill() {{ i=0; while [ $i -lt $1 ]; do cat /tmp/r8; i=$((i + 1)); done >$2; }}
mkdir -p /fill
mount -t tmpfs -o size=95% tmpfs /fill
dd if=/dev/urandom of=/tmp/r bs=1M count=1 2>/dev/null
cat /tmp/r /tmp/r /tmp/r /tmp/r /tmp/r /tmp/r /tmp/r /tmp/r >/tmp/r8
# The first fill takes the lowest free pages (sent early); the rest of free RAM
# but {headroom_8m} x 8 MiB goes to the second.
fill {first_8m} /fill/first
free_8m=$(( $(awk '/^MemFree:/ {{print $2}}' /proc/meminfo) / 8192 ))
[ $free_8m -gt {headroom_8m} ] || fail "only $free_8m x 8 MiB free"
fill $((free_8m - {headroom_8m})) /fill/rest
echo "VHSM-KV fill_kib=$(du -k /fill/first | cut -f1)+$(du -k /fill/rest | cut -f1)"
echo "mig: ready"
until [ "$(marker)" = READ ]; do sleep 0.2; done
rm /fill/first
"""

_CACHED = """echo "VHSM-KV cached={chunks}"
until [ "$(marker)" = CHCK ]; do sleep 0.2; done
echo "step: compare the cached chunks (on the destination)"
before=$(sectors_read)"""

_REPORT = """after=$(sectors_read)
echo "VHSM-KV check_sectors_read=$((after - before))"
echo "VHSM-KV intact=$intact"
echo "VHSM-KV stale=$stale"
"""


def migration_status(qmp: QMPClient) -> dict[str, Any]:
    """``query-migrate`` of the source."""
    status: dict[str, Any] = qmp.execute("query-migrate")
    return status


def _wait(
    qmp: QMPClient, what: str, done: Any, timeout: float, *, poll: float = 0.2
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = migration_status(qmp)
        if done(status):
            return status
        if status.get("status") in {"failed", "cancelled", "completed"}:
            raise MigrationError(f"migration {status.get('status')} waiting for {what}: {status}")
        if time.monotonic() > deadline:
            raise MigrationError(f"no {what} after {timeout}s: {status}")
        time.sleep(poll)


def hold_migration(
    qmp: QMPClient, uri: str, *, hold_at: float = 0.4, timeout: float = 300.0
) -> dict[str, Any]:
    """Start migrating to ``uri``; hold the bulk stage once ``hold_at`` of RAM was sent.

    Raises:
        MigrationError: the migration failed, or finished its bulk stage before the hold.
    """
    qmp.execute("migrate-set-parameters", **{"max-bandwidth": 32 * MiB})
    qmp.execute("migrate", uri=uri)

    def sent_enough(status: dict[str, Any]) -> bool:
        ram = status.get("ram", {})
        pages = int(ram.get("normal", 0)) + int(ram.get("duplicate", 0))
        return pages * int(ram.get("page-size", 4096)) >= hold_at * int(ram.get("total", 1 << 62))

    _wait(qmp, f"{hold_at:.0%} of RAM sent", sent_enough, timeout, poll=0.05)
    # A page or two per 100 ms: the bulk stage cannot finish until the limit is lifted.
    qmp.execute("migrate-set-parameters", **{"max-bandwidth": 100})
    status = migration_status(qmp)
    ram = status.get("ram", {})
    if status.get("status") != "active" or int(ram.get("dirty-sync-count", 0)) > 1:
        raise MigrationError(f"migration left its bulk stage before the hold: {status}")
    return status


def finish_migration(qmp: QMPClient, *, timeout: float = 300.0) -> dict[str, Any]:
    """Lift the limit of :func:`hold_migration` and wait until the migration completed.

    Raises:
        MigrationError: it failed, or did not complete within ``timeout`` seconds.
    """
    qmp.execute("migrate-set-parameters", **{"max-bandwidth": 512 * MiB})
    return _wait(qmp, "completion", lambda s: s.get("status") == "completed", timeout)

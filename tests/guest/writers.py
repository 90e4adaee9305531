"""Concurrent O_DIRECT writers in the guest, and the host-side check of every write.

Each writer fills its own blocks with fresh random data, one ``dd`` (one request) per
block, and reports ``w.<writer>.<n>=<offset>:<sha256>`` once the write returned. After
all writers finished, the guest flushes, drops its caches, and reads every block back;
the host then checks the image file against every reported checksum. Used where the
back-end is disturbed mid-I/O (killed and restarted): no write may be lost or torn.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .harness import GuestResult

__all__ = ["WriterPlan"]

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class WriterPlan:
    """``writers`` background loops of ``writes`` blocks of ``block`` bytes each.

    With ``pin``, writer k runs on CPU k (taskset): with one request queue per CPU,
    each writer then submits on its own queue.
    """

    writers: int = 4
    writes: int = 32
    block: int = 64 * KiB
    device: str = "/dev/vda"
    pin: bool = False

    @property
    def image_size(self) -> int:
        """Bytes of the raw image: every writer's blocks, plus 1 MiB never written."""
        return self.writers * self.writes * self.block + MiB

    def prepare_image(self, path: Path) -> Path:
        """An all-zero raw image."""
        with open(path, "wb") as f:
            f.truncate(self.image_size)
        return path

    def progress_line(self, writer: int, done: int) -> str:
        """The prefix of the line writer ``writer`` prints after ``done`` writes."""
        return f"VHSM-KV w.{writer}.{done - 1}="

    def script(self) -> str:
        """The guest script (busybox sh)."""
        return _SCRIPT.format(
            dev=self.device,
            writers=" ".join(str(k) for k in range(self.writers)),
            writes=self.writes,
            bs=self.block,
            pin='taskset -c "$k"' if self.pin else "",
        )

    def verify_image(self, path: Path, result: GuestResult) -> int:
        """Check every write the guest reported against the image; returns how many.

        Raises:
            AssertionError: a write is missing from the report, or the image differs.
        """
        result.assert_passed()
        data = Path(path).read_bytes()
        problems: list[str] = []
        for k in range(self.writers):
            for n in range(self.writes):
                reported = result.values.get(f"w.{k}.{n}")
                offset = (k * self.writes + n) * self.block
                if reported is None or not reported.startswith(f"{offset}:"):
                    problems.append(f"write {k}.{n}: guest reported {reported!r}")
                    continue
                got = hashlib.sha256(data[offset : offset + self.block]).hexdigest()
                if got != reported.split(":", 1)[1]:
                    problems.append(f"write {k}.{n} at {offset}: image has {got}")
        if any(data[self.writers * self.writes * self.block :]):
            problems.append("stray write past the writers' blocks")
        if problems:
            raise AssertionError(
                "image check failed:\n  " + "\n  ".join(problems) + "\n" + result.report()
            )
        return self.writers * self.writes


_SCRIPT = """set -e
DEV={dev}
fail() {{ echo "FAIL: $*"; exit 1; }}
sha() {{ sha256sum | cut -d' ' -f1; }}
i=0
while [ ! -b $DEV ]; do
    i=$((i + 1)); [ $i -le 100 ] || fail "no $DEV"
    sleep 0.1
done
name=${{DEV##*/}}
# Write-back cache on (if the device offers it), so sync sends FLUSH requests.
echo "write back" >/sys/block/$name/cache_type 2>/dev/null || true
echo "VHSM-KV write_cache=$(cat /sys/block/$name/queue/write_cache)"
writer() {{
    k=$1
    n=0
    while [ $n -lt {writes} ]; do
        block=$((k * {writes} + n))
        dd if=/dev/urandom of=/tmp/w.$k.$n bs={bs} count=1 iflag=fullblock 2>/dev/null
        if ! {pin} dd if=/tmp/w.$k.$n of=$DEV bs={bs} seek=$block oflag=direct conv=notrunc \\
                2>/tmp/err.$k; then
            echo "FAIL: write $k.$n: $(cat /tmp/err.$k)"
            touch /tmp/failed
            return 1
        fi
        echo "VHSM-KV w.$k.$n=$((block * {bs})):$(sha </tmp/w.$k.$n)"
        n=$((n + 1))
    done
}}
echo "step: concurrent O_DIRECT writers"
for k in {writers}; do writer $k & done
wait
[ ! -e /tmp/failed ] || fail "a writer failed"
echo "step: flush, drop caches, read every block back"
sync
blockdev --flushbufs $DEV
echo 3 >/proc/sys/vm/drop_caches
for k in {writers}; do
    n=0
    while [ $n -lt {writes} ]; do
        block=$((k * {writes} + n))
        want=$(sha </tmp/w.$k.$n)
        got=$(dd if=$DEV bs={bs} skip=$block count=1 iflag=direct 2>/dev/null | sha)
        [ "$got" = "$want" ] || fail "block $k.$n reads back $got, wrote $want"
        n=$((n + 1))
    done
done
echo "VHSM-KV verified=ok"
"""

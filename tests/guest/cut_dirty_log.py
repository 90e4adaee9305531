"""`python cut_dirty_log.py ARGS` runs `vhsm ARGS` with a dirty log that misses data.

For the migration test's own test: split and packed rings stop logging the buffers the
back-end writes (used-ring entries and used descriptors are still logged, so the guest
keeps running). A migration check that passes against this back-end proves nothing.
"""

import sys

from vhsm.cli import main
from vhsm.virtq.packed import PackedQueue
from vhsm.virtq.split import SplitQueue

_packed_log_used = PackedQueue._log_used


def _no_buffers(self: SplitQueue, head: int) -> list[tuple[int, int]]:
    return []


def _packed_no_buffers(self: PackedQueue, wg: object, length: int, p: int, k: int) -> None:
    _packed_log_used(self, None, length, p, k)


SplitQueue._writable_gpas = _no_buffers  # type: ignore[method-assign]
PackedQueue._log_used = _packed_no_buffers  # type: ignore[method-assign]
sys.exit(main())

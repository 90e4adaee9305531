"""`python cut_dirty_log.py ARGS` runs `vhsm ARGS` with a dirty log that misses data.

For the migration test's own test: split rings stop logging the buffers the back-end
writes (used-ring entries are still logged, so the guest keeps running). A migration
check that passes against this back-end proves nothing.
"""

import sys

from vhsm.cli import main
from vhsm.virtq.split import SplitQueue


def _no_buffers(self: SplitQueue, head: int) -> list[tuple[int, int]]:
    return []


SplitQueue._writable_gpas = _no_buffers  # type: ignore[method-assign]
sys.exit(main())

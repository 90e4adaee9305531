"""`python hold_write.py SECTOR ARGS` runs `vhsm ARGS`; the first write at SECTOR never ends.

For the reconnect test: `vhsm serve blk` prints ``HOLDING write at sector N`` and keeps
that request (popped from the ring, data not written) until it is killed, so a SIGKILL
is certain to find a request in flight, which the next daemon must resubmit.
"""

import sys
import threading
from typing import Any

from vhsm.cli import main
from vhsm.devices import blk

HOLD_SECTOR = int(sys.argv.pop(1))
_dispatch = blk.BlkBackend._dispatch
_held = threading.Event()


def _holding_dispatch(self: blk.BlkBackend, rtype: int, sector: int, *views: Any) -> int:
    if rtype == blk.VIRTIO_BLK_T_OUT and sector == HOLD_SECTOR and not _held.is_set():
        _held.set()
        print(f"HOLDING write at sector {sector}", file=sys.stderr, flush=True)
        threading.Event().wait()  # until the test kills the process
    return _dispatch(self, rtype, sector, *views)


blk.BlkBackend._dispatch = _holding_dispatch  # type: ignore[method-assign]
sys.exit(main())

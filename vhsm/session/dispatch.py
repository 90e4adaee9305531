"""The explicit dispatch table: every machine's named conditions and callbacks.

`vhsm.session.Session` resolves the names of ``specs/<machine>.yaml`` through
`DISPATCH` only; ``tests/test_session_dispatch.py`` checks that the table and the
YAML name exactly the same things.
"""

from __future__ import annotations

from vhsm.session import device, memtable, negotiation, rings
from vhsm.session.events import Handlers

DISPATCH: dict[str, Handlers] = {
    **negotiation.HANDLERS,
    **memtable.HANDLERS,
    **rings.HANDLERS,
    **device.HANDLERS,
}

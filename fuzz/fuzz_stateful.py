#!/usr/bin/env python3
"""Long fuzz run of the state machine: random negotiation, memory, ring and I/O interleavings.

Runs tests/test_fuzz_stateful.py with bigger hypothesis budgets:

    .venv/bin/python fuzz/fuzz_wire_session.py --examples 5000          # one round
    .venv/bin/python fuzz/fuzz_wire_session.py --examples 2000 --seconds 3600

--examples N: inputs per test per round; --seconds S: repeat rounds (fresh
seeds) for S seconds; -k EXPR: pytest selection (e.g. -k blk). Prints the
inputs run per test; a failure's output is kept in /tmp/vhsm-fuzz-out/ and the failing
input in .hypothesis/ (a plain pytest run replays it).
"""

from __future__ import annotations

import sys

from runner import main

if __name__ == "__main__":
    sys.exit(main("tests/test_fuzz_stateful.py", __doc__ or "", 300))

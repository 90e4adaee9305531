"""Which data path runs: the compiled accelerator ``vhsm._speedups`` or pure Python.

The accelerator is optional, built by ``pip install`` when a C compiler and the
Python headers are there (see ``tools/build_speedups.py``). Each of its
functions is an exact stand-in for a step of the numpy/Python ring code, which
stays the reference and the fallback: the rings call it when :data:`accel` is
set and take the pure path otherwise, or when it answers "fall back" (it then
wrote nothing, and the pure path raises its own errors).

``VHSM_PURE_PYTHON=1`` forces the pure path. A module built from another
version of ``_speedups.c`` than the one beside it (an in-place build left stale
by a ``git pull``) is not used either: one warning says to rebuild it.
Queues read :data:`accel` when they are built, so tests can compare both paths
in one process by setting it (``monkeypatch.setattr(speedups, "accel", None)``).
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

from vhsm._digest import sha256_hex

#: The environment variable that forces the pure-Python data path.
PURE_ENV = "VHSM_PURE_PYTHON"

_logger = logging.getLogger("vhsm.speedups")


def _load() -> tuple[ModuleType | None, str]:
    """(the accelerator module or None, one line saying which path runs and why)."""
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        return None, f"pure Python ({PURE_ENV} is set)"
    try:
        from vhsm import _speedups
    except ImportError as exc:
        return None, f"pure Python (compiled accelerator not available: {exc})"
    source = os.path.join(os.path.dirname(__file__), "_speedups.c")
    built_from: str = _speedups.source_sha256
    if os.path.exists(source) and sha256_hex(_read(source)) != built_from:
        _logger.warning(
            "vhsm._speedups was built from another _speedups.c: using the pure-Python data "
            "path (rebuild with `make speedups` or `pip install -e .`)"
        )
        return None, "pure Python (compiled accelerator stale: rebuild it)"
    from vhsm.wire.enums import MAX_QUEUE_SIZE  # the declared limit, one home: specs/

    _speedups.set_max_queue_size(MAX_QUEUE_SIZE)
    return _speedups, "compiled accelerator (vhsm._speedups)"


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


#: The accelerator module when the compiled data path is active, else None.
accel: ModuleType | None
#: One line naming the active data path (``vhsm --version`` prints it).
description: str
accel, description = _load()


def data_path() -> str:
    """One line naming the data path queues built now will use."""
    if accel is None:
        return description if description.startswith("pure") else "pure Python"
    return "compiled accelerator (vhsm._speedups)"

"""Command lines that start `vhsm serve` as a guest's back-end (a separate process)."""

from __future__ import annotations

import functools
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

__all__ = ["CUT_DIRTY_LOG", "HOLD_WRITE", "VHSM", "require_serve", "serve_blk_argv"]

VHSM = [sys.executable, "-m", "vhsm"]

#: `vhsm` with the dirty log of written buffers cut (see cut_dirty_log.py).
CUT_DIRTY_LOG = [sys.executable, str(Path(__file__).with_name("cut_dirty_log.py"))]

#: `vhsm` that never completes the first write at a sector (see hold_write.py).
HOLD_WRITE = [sys.executable, str(Path(__file__).with_name("hold_write.py"))]

NOT_YET = "vhsm serve not available yet"


@functools.cache
def _serve_problem(device: str) -> str | None:
    try:
        cli = importlib.import_module("vhsm.cli")
    except ImportError as err:
        return f"{NOT_YET} (vhsm.cli: {err})"
    if not hasattr(cli, "main"):
        return f"{NOT_YET} (vhsm.cli has no main)"
    probe = subprocess.run(
        [*VHSM, "serve", device, "--help"], capture_output=True, text=True, timeout=60
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or [""])[-1]
        return f"{NOT_YET} (`vhsm serve {device} --help` exited {probe.returncode}: {last})"
    return None


def require_serve(device: str) -> None:
    """Skip the test unless `vhsm serve DEVICE` runs."""
    reason = _serve_problem(device)
    if reason:
        pytest.skip(reason)


def serve_blk_argv(
    image: Path, socket: Path, *extra: str, vhsm: tuple[str, ...] | list[str] = VHSM
) -> list[str]:
    """`vhsm serve blk` on a raw image, listening on `socket`; `extra` options appended."""
    return [*vhsm, "serve", "blk", "--socket", str(socket), "--file", str(image), *extra]

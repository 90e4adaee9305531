"""Small C programs for the guest, built here with ``gcc -static`` at test time.

The initramfs has busybox and nothing else: a guest test that needs a system
call busybox does not make (vsock sockets, the ethtool ioctl) ships a tiny
static program next to its test.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def build_static(source: Path, workdir: Path) -> bytes | str:
    """The static program's bytes, or a sentence saying why it cannot be built."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return "gcc not found (run .ci/install-deps)"
    out = workdir / source.stem
    proc = subprocess.run(
        [gcc, "-static", "-O2", "-o", str(out), str(source)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        return f"cannot build the static {source.stem} (libc6-dev?): {proc.stderr.strip()[-400:]}"
    return out.read_bytes()


__all__ = ["build_static"]

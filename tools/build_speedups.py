"""Compile ``vhsm/_speedups.c``, the optional C accelerator of the ring data path.

Used three ways: by the hatchling build hook (``hatch_build.py``) when pip builds
a wheel or an editable install, by ``make`` to rebuild the in-place module after
the C source changed, and by ``make asan`` for an AddressSanitizer build.

Nothing but a C compiler and the Python headers is needed (the module talks to
numpy through the buffer protocol only), so there is no build-time dependency to
install. When either is missing the build is skipped with one line and vhsm runs
its pure-Python data path, which the accelerator mirrors exactly.

Usage: ``python tools/build_speedups.py [--out DIR] [--asan]`` (default DIR: the
``vhsm`` package directory, i.e. an in-place build).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "vhsm" / "_speedups.c"
MODULE = "_speedups"


class Unavailable(Exception):
    """The accelerator cannot be built here (no compiler, no headers, a compile error)."""


def source_digest(path: Path = SOURCE) -> str:
    """SHA-256 of the C source: compiled into the module so a stale build is noticed."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def target_name() -> str:
    """File name of the extension module for this interpreter (e.g. ``.cpython-311-...so``)."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return MODULE + suffix


def compiler() -> list[str]:
    """The C compiler command: ``$CC``, else the one Python was built with, else ``cc``."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    cmd = shlex.split(cc)
    if not cmd or shutil.which(cmd[0]) is None:
        for fallback in ("cc", "gcc", "clang"):
            if shutil.which(fallback):
                return [fallback]
        raise Unavailable(f"no C compiler found (tried {cc!r}, cc, gcc, clang)")
    return cmd


def build(out_dir: Path, *, asan: bool = False) -> Path:
    """Compile the module into ``out_dir``; Unavailable (one line) if it cannot be done."""
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").exists():
        raise Unavailable(f"no Python headers ({include / 'Python.h'} missing: python3-dev)")
    flags = ["-O2"] if not asan else ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"]
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / target_name()
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        partial = Path(tmp) / target.name
        cmd = [
            *compiler(),
            "-shared",
            "-fPIC",
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-Wno-unused-parameter",
            *flags,
            f"-I{include}",
            f'-DVHSM_SOURCE_SHA256="{source_digest()}"',
            str(SOURCE),
            "-o",
            str(partial),
        ]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise Unavailable(f"compiler failed to run: {exc}") from None
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["(no output)"])[0]
            raise Unavailable(f"compile failed: {first}")
        os.replace(partial, target)  # atomic: a running process never sees half a file
    return target


def main(argv: list[str] | None = None) -> int:
    """Build in place (or into --out); a missing toolchain is one line and exit 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "vhsm", help="output directory")
    parser.add_argument("--asan", action="store_true", help="AddressSanitizer build")
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 if the module cannot be built"
    )
    args = parser.parse_args(argv)
    try:
        path = build(args.out, asan=args.asan)
    except Unavailable as exc:
        print(
            f"vhsm: compiled accelerator not built ({exc}); pure-Python data path", file=sys.stderr
        )
        return 1 if args.strict else 0
    print(f"vhsm: compiled accelerator built: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

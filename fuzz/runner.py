"""Shared driver of the long fuzz runs: the tests/test_fuzz_*.py tests with bigger budgets.

Each round is one pytest run (a fresh process, fresh random seeds) of a test
file with ``VHSM_FUZZ_EXAMPLES`` set; rounds repeat until ``--seconds`` have
passed (at least one round). Inputs run are counted per test through
``VHSM_FUZZ_COUNTS``. A failing round's output is kept in ``--out`` and the
run stops; hypothesis' example database (``.hypothesis/``) keeps the failing
input, so a plain pytest run of the same test replays it first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(test_file: str, doc: str, default_examples: int, argv: list[str] | None = None) -> int:
    """Run `test_file` (relative to the repo) in rounds; return 0 when every round passed."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument(
        "--examples",
        type=int,
        default=default_examples,
        metavar="N",
        help=f"hypothesis max_examples per test per round (default {default_examples})",
    )
    parser.add_argument(
        "--seconds", type=float, default=0.0, metavar="S", help="keep running rounds for S seconds"
    )
    parser.add_argument("-k", default="", metavar="EXPR", help="pytest -k selection")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(tempfile.gettempdir()) / "vhsm-fuzz-out",
        help="where failing output is kept",
    )
    args = parser.parse_args(argv)
    total: Counter[str] = Counter()
    start = time.monotonic()
    rounds = 0
    status = 0
    while True:
        rounds += 1
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            counts_path = Path(tmp.name)
        env = dict(os.environ)
        env["VHSM_FUZZ_EXAMPLES"] = str(args.examples)
        env["VHSM_FUZZ_COUNTS"] = str(counts_path)
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file]
        cmd += ["-o", "timeout=0"]
        if args.k:
            cmd += ["-k", args.k]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        if counts_path.exists() and counts_path.stat().st_size:
            total.update(json.loads(counts_path.read_text()))
        counts_path.unlink(missing_ok=True)
        last = proc.stdout.strip().splitlines()[-1:] or ["(no output)"]
        elapsed = time.monotonic() - start
        print(f"round {rounds}: {last[0]} ({elapsed:.0f} s)", flush=True)
        if proc.returncode != 0:
            args.out.mkdir(parents=True, exist_ok=True)
            report = args.out / f"{Path(test_file).stem}-{int(time.time())}.txt"
            report.write_text(proc.stdout + proc.stderr)
            print(f"FAILED: output kept in {report}", flush=True)
            status = 1
            break
        if elapsed >= args.seconds:
            break
    print(f"inputs run ({rounds} rounds, {time.monotonic() - start:.0f} s):")
    for name, n in sorted(total.items()):
        print(f"  {name}: {n}")
    return status

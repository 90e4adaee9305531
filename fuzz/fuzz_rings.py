"""Hostile rings at volume: tests/test_fuzz_rings.py's checks in a plain loop (no hypothesis).

Every device (rng, blk, net loopback, net sink) gets rings drawn by
``random_layout`` from one seeded generator: aliased and overlapping areas,
index jumps, random tables. Each ring is configured and served the way the
daemon's data plane and workers do it; anything but a clean outcome (refused
by the data plane, marked broken, or served) is counted and the first few are
printed with their layout (``run_ring(rig, layout)`` replays one). fds and RSS
are measured before and after. Run: .venv/bin/python fuzz/fuzz_rings.py
[--rings 1000000] [--seed 1]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import random
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fuzz_support import open_fds, rss_kib  # noqa: E402
from test_fuzz_rings import Rig, random_layout, run_ring  # noqa: E402

DEVICES = ("rng", "blk", "net-loopback", "net-sink")


def main(argv: list[str] | None = None) -> int:
    """Run the rings; return 0 when every one ended cleanly and nothing leaked."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--rings", type=int, default=1_000_000, help="rings in all")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generator")
    args = parser.parse_args(argv)
    logging_off()
    rnd = random.Random(args.seed)
    outcomes: Counter[str] = Counter()
    unclean: list[str] = []
    with tempfile.TemporaryDirectory(prefix="vhsm-fuzz-rings-") as directory:
        image = Path(directory) / "disk.img"
        image.write_bytes(bytes(64 << 10))
        rigs = [Rig(name, image) for name in DEVICES]
        for rig in rigs:  # warm up (imports, numpy caches) before the first measurement
            run_ring(rig, random_layout(random.Random(0)))
        gc.collect()
        fds0, rss0 = open_fds(), rss_kib()
        start = time.monotonic()
        for n in range(args.rings):
            rig = rigs[n % len(rigs)]
            layout = random_layout(rnd)
            try:
                outcomes[run_ring(rig, layout)] += 1
            except Exception as exc:
                outcomes["unclean"] += 1
                if len(unclean) < 5:
                    unclean.append(f"{rig.name} {layout}: {exc!r}\n{traceback.format_exc()}")
                    print(f"UNCLEAN (ring {n}): {unclean[-1]}", flush=True)
            if (n + 1) % 20_000 == 0:
                rate = (n + 1) / (time.monotonic() - start)
                print(f"{n + 1} rings, {rate:.0f}/s, {dict(outcomes)}", flush=True)
        elapsed = time.monotonic() - start
        gc.collect()
        fds1, rss1 = open_fds(), rss_kib()
        for rig in rigs:
            rig.close()
    for text in unclean:
        print(text)
    print(f"rings: {args.rings} in {elapsed:.0f} s (seed {args.seed})")
    print(f"outcomes: {dict(sorted(outcomes.items()))}")
    print(f"fds: {fds0} -> {fds1}; RSS: {rss0} -> {rss1} KiB")
    return 1 if outcomes["unclean"] or fds1 > fds0 else 0


def logging_off() -> None:
    """Broken rings log one warning each: a million of them are not worth printing."""
    import logging

    logging.disable(logging.WARNING)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    os._exit(130)

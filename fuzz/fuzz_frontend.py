"""A hostile front-end at volume: tests/test_fuzz_frontend.py's attacks in a plain loop.

Attacks drawn by ``random_attack`` from one seeded generator (fds of every kind on
every fd-carrying request, shrinking unsealable memfds, silent and stalled
clients) run against one live daemon; after each, the served front-end must get
its data back. Anything but a clean outcome is counted and the first few are
printed (``run_attack(rig, attack)`` replays one). fds and RSS are measured
before and after. Run: .venv/bin/python fuzz/fuzz_frontend.py [--attacks 100000] [--seed 1]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import random
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fuzz_support import open_fds, rss_kib, settle_fds  # noqa: E402
from test_fuzz_frontend import Rig, random_attack, run_attack  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Run the attacks; return 0 when every one ended cleanly and nothing leaked."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--attacks", type=int, default=100_000, help="attacks in all")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generator")
    args = parser.parse_args(argv)
    logging.disable(logging.ERROR)  # every refused fd logs its rule: not worth printing
    rnd = random.Random(args.seed)
    outcomes: Counter[str] = Counter()
    unclean: list[str] = []
    rig = Rig()
    try:
        run_attack(rig, random_attack(random.Random(0)))  # warm up before measuring
        rig.frontend()
        gc.collect()
        fds0, rss0 = open_fds(), rss_kib()
        start = time.monotonic()
        for n in range(args.attacks):
            attack = random_attack(rnd)
            try:
                outcomes[run_attack(rig, attack)] += 1
            except Exception as exc:
                outcomes["unclean"] += 1
                if len(unclean) < 5:
                    unclean.append(f"{attack}: {exc!r}\n{traceback.format_exc()}")
                rig.drop()
            if (n + 1) % 10_000 == 0:
                rate = (n + 1) / (time.monotonic() - start)
                print(f"{n + 1} attacks, {rate:.0f}/s, {dict(outcomes)}", flush=True)
        elapsed = time.monotonic() - start
        rig.frontend()
        gc.collect()
        fds1, rss1 = settle_fds(fds0), rss_kib()
    finally:
        rig.close()
    for text in unclean:
        print(text)
    print(f"attacks: {args.attacks} in {elapsed:.0f} s (seed {args.seed})")
    print(f"outcomes: {dict(sorted(outcomes.items()))}")
    print(f"fds: {fds0} -> {fds1}; RSS: {rss0} -> {rss1} KiB")
    return 1 if outcomes["unclean"] or fds1 > fds0 else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    os._exit(130)

"""Messages at volume: random streams into Decoder + Session, sans-IO, until N messages ran.

The streams are those of tests/test_fuzz_wire_session.py, from the same generator
(tests/message_streams.py) with its choices taken from a seeded ``random.Random``
instead of hypothesis (far too slow for 10^6): after an optional negotiation or
negotiation plus a running ring, well-formed requests with plausible and random fields
and the fds a front-end would attach (or wrong ones: pipes, sockets, /dev/null, memfds
of the wrong size), the same with bytes flipped, and raw headers with random bodies;
cut at random points.
Half the streams go to the `NullDataPlane`, half to the daemon's `DevicePlane`
(memory mapped, rings built). Anything that escapes other than a declared
rejection (ProtocolViolation and its WireError / FramingError) is counted as
unclean and printed with the stream. fds (checked every 1000 streams) and RSS
are measured before and after. Run: .venv/bin/python fuzz/fuzz_messages.py
[--messages 1000000] [--seed 1]
"""

from __future__ import annotations

import argparse
import gc
import logging
import random
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fuzz_support import open_fds, rss_kib  # noqa: E402
from message_streams import RandomChoices, stream  # noqa: E402
from test_fuzz_wire_session import run_sans_io  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Run streams until enough messages went in; 0 when all were clean and nothing leaked."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000, help="messages in all")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generator")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # every rejection logs its rule: not worth printing
    rnd = random.Random(args.seed)
    choices = RandomChoices(rnd)
    run_sans_io(stream(RandomChoices(random.Random(0)), 24), [], "device")  # warm-up
    gc.collect()
    fds0, rss0, start = open_fds(), rss_kib(), time.monotonic()
    messages = streams = 0
    outcomes: Counter[str] = Counter()
    unclean: list[str] = []
    fd_growth = 0
    while messages < args.messages:
        items = stream(choices, 24)
        cuts = [rnd.randrange(0, 201) for _ in range(rnd.randrange(0, 7))]
        plane = "device" if streams % 2 else "null"
        try:
            log = run_sans_io(items, cuts, plane)
            outcomes["rejected" if log and not log[-1].startswith("ok") else "accepted"] += 1
        except Exception as exc:
            outcomes["unclean"] += 1
            if len(unclean) < 5:
                labels = [i.label for i in items]
                unclean.append(f"{plane} {labels}: {exc!r}\n{traceback.format_exc()}")
                print(f"UNCLEAN (stream {streams}): {unclean[-1]}", flush=True)
        messages += len(items)
        streams += 1
        if streams % 1000 == 0:
            gc.collect()
            fd_growth = max(fd_growth, open_fds() - fds0)
        if streams % 2000 == 0:
            rate = messages / (time.monotonic() - start)
            print(f"{messages} messages, {rate:.0f}/s, {dict(outcomes)}", flush=True)
    elapsed = time.monotonic() - start
    gc.collect()
    fds1, rss1 = open_fds(), rss_kib()
    for text in unclean:
        print(text)
    print(f"messages: {messages} in {streams} streams, {elapsed:.0f} s (seed {args.seed})")
    print(f"streams ending: {dict(sorted(outcomes.items()))}")
    print(f"fds: {fds0} -> {fds1} (most above the start at a check: {fd_growth})")
    print(f"RSS: {rss0} -> {rss1} KiB")
    return 1 if outcomes["unclean"] or fds1 > fds0 else 0


if __name__ == "__main__":
    sys.exit(main())

"""Messages at volume: random streams into Decoder + Session, sans-IO, until N messages ran.

The streams are those of tests/test_fuzz_wire_session.py drawn by a seeded
generator instead of hypothesis (hypothesis is far too slow for 10^6): after an
optional negotiation or negotiation plus a running ring, well-formed requests
with plausible and random fields and the fds a front-end would attach (or
wrong ones: pipes, sockets, /dev/null, memfds of the wrong size), the same
with bytes flipped, and raw headers with random bodies; cut at random points.
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fuzz_support import open_fds, rss_kib  # noqa: E402
from test_fuzz_wire_session import (  # noqa: E402
    COMMON,
    MIB,
    OFFERED,
    OFFERED_PF,
    UVA,
    Item,
    default_fds,
    item_of,
    negotiation,
    ring_setup,
    run_sans_io,
)

from vhsm.wire import (  # noqa: E402
    FrontendReq,
    VhostUserConfig,
    VhostUserInflight,
    VhostUserLog,
    VhostUserMemory,
    VhostUserMemoryRegion,
    VhostUserSingleMemoryRegion,
    VhostUserU64,
    VhostUserVringAddr,
    VhostUserVringFd,
    VhostUserVringState,
    make_request,
    request_spec,
)
from vhsm.wire.enums import MAX_QUEUE_SIZE, PACKED_BASE_INITIAL  # noqa: E402
from vhsm.wire.framing import HEADER  # noqa: E402

U64 = (1 << 64) - 1
RINGS = [0, 0, 1, 2, 255, 0xFFFF_FFFF]
NUMS = [0, 1, 2, 3, 64, 256, 1024, 2048, MAX_QUEUE_SIZE, PACKED_BASE_INITIAL, 0x10000]
GPAS = [0, MIB, 2 * MIB, 4 * MIB, 1 << 40, U64 + 1 - MIB]
SIZES = [0, 4096, MIB, 2 * MIB, 4 * MIB, 1 << 40, U64]
OFFSETS = [0, 4096, MIB, U64 + 1 - 4096]
FD_KINDS: list[tuple[Any, ...]] = [
    ("eventfd",),
    ("memfd", 0),
    ("memfd", 4096),
    ("memfd", MIB),
    ("pipe",),
    ("devnull",),
    ("socket",),
]
ALL_REQUESTS = list(FrontendReq)


def pick(rnd: random.Random, values: list[Any]) -> Any:
    """One of `values`."""
    return values[rnd.randrange(len(values))]


def word(rnd: random.Random, offered: int) -> int:
    """A features word: what was offered, part of it, anything, or nothing."""
    return pick(rnd, [offered, rnd.getrandbits(64) & offered, rnd.getrandbits(64), 0])


def region(rnd: random.Random) -> VhostUserMemoryRegion:
    """A memory region: plausible addresses and sizes, now and then absurd ones."""
    gpa = pick(rnd, GPAS)
    uva = UVA + gpa if rnd.random() < 0.7 else rnd.getrandbits(64)
    return VhostUserMemoryRegion(gpa, pick(rnd, SIZES), uva & U64, pick(rnd, OFFSETS))


def payload_for(rnd: random.Random, req: FrontendReq) -> Any:
    """A plausible payload for `req` (None: the request has none or gets random bytes)."""
    r = FrontendReq
    if req in (r.SET_FEATURES, r.SET_PROTOCOL_FEATURES, r.SET_STATUS):
        return VhostUserU64(word(rnd, OFFERED if req != r.SET_PROTOCOL_FEATURES else OFFERED_PF))
    if req in (r.SET_VRING_NUM, r.SET_VRING_BASE, r.GET_VRING_BASE, r.SET_VRING_ENABLE):
        return VhostUserVringState(pick(rnd, RINGS), pick(rnd, NUMS))
    if req == r.SET_VRING_ADDR:
        return VhostUserVringAddr(
            pick(rnd, RINGS), pick(rnd, [0, 0, 1, 2]),
            pick(rnd, [UVA, UVA + 0x1000, UVA + 8, 0]), pick(rnd, [UVA + 0x3000, UVA + 0x3002, 0]),
            pick(rnd, [UVA + 0x2000, UVA + 0x2001, UVA + 0x2002, 0]), pick(rnd, [0x3000, 1 << 50]),
        )  # fmt: skip
    if req in (r.SET_VRING_KICK, r.SET_VRING_CALL, r.SET_VRING_ERR):
        return VhostUserVringFd(pick(rnd, [0, 1, 2, 200]), rnd.random() < 0.2)
    if req == r.SET_MEM_TABLE:
        return VhostUserMemory(tuple(region(rnd) for _ in range(rnd.randrange(0, 4))))
    if req in (r.ADD_MEM_REG, r.REM_MEM_REG):
        return VhostUserSingleMemoryRegion(region(rnd))
    if req == r.SET_LOG_BASE:
        return VhostUserLog(pick(rnd, SIZES), pick(rnd, OFFSETS))
    if req == r.GET_INFLIGHT_FD:
        return VhostUserInflight(0, 0, pick(rnd, [0, 1, 2, 16]), pick(rnd, [0, 64, 256, 0xFFFF]))
    if req == r.SET_INFLIGHT_FD:
        return VhostUserInflight(
            pick(rnd, [0, 4096, 8192, 1 << 40]), pick(rnd, [0, 4096]),
            pick(rnd, [0, 1, 2, 0xFFFF]), pick(rnd, [0, 64, 256, 0xFFFF]),
        )  # fmt: skip
    if req == r.GET_CONFIG:
        size = pick(rnd, [1, 8, 256])
        return VhostUserConfig(pick(rnd, [0, 8, 0xFFFF_FFFF]), size, pick(rnd, [0, 1]), bytes(size))
    return None


def valid_item(rnd: random.Random) -> Item:
    """A well-formed request with a plausible payload and fds (sometimes wrong ones)."""
    req = pick(rnd, COMMON) if rnd.random() < 0.6 else pick(rnd, ALL_REQUESTS)
    spec = request_spec(req)
    payload = payload_for(rnd, req)
    if payload is None and spec is not None and spec.payload is not None:
        return raw_item(rnd, int(req))  # a payload class without a plausible form: bytes
    fds = default_fds(req, payload)
    if rnd.random() < 0.1:  # wrong fds: count and kinds
        fds = [pick(rnd, FD_KINDS) for _ in range(rnd.randrange(0, 5))]
    msg = make_request(req, payload, need_reply=rnd.random() < 0.75)
    return item_of(msg, fds, req.name)


def raw_item(rnd: random.Random, req: int | None = None) -> Item:
    """A header with a random body, size and flags (request `req` or any code)."""
    body = rnd.randbytes(rnd.randrange(0, 81))
    code = req if req is not None else pick(rnd, [rnd.randrange(0, 51), rnd.getrandbits(32)])
    flags = pick(rnd, [0x1, 0x5, 0x9, 0x0, 0x2, 0x11, 0xFFFF_FFFF])
    size = len(body) if rnd.random() < 0.7 else rnd.randrange(0, 4097)
    fds = tuple(
        pick(rnd, FD_KINDS) for _ in range(rnd.randrange(0, 3) if rnd.random() < 0.2 else 0)
    )
    return Item(HEADER.pack(code, flags, size) + body, fds, f"raw {code}/{flags:#x}/{size}")


def random_stream(rnd: random.Random) -> list[Item]:
    """One connection's bytes: a prefix (none, negotiation, a running ring), then noise."""
    prefix = pick(rnd, ["none", "negotiated", "running", "running"])
    items: list[Item] = []
    if prefix != "none":
        items += negotiation(OFFERED_PF if rnd.random() < 0.5 else rnd.getrandbits(64) & OFFERED_PF)
    if prefix == "running":
        items += ring_setup(0)
    for _ in range(rnd.randrange(0, 25)):
        r = rnd.random()
        if r < 0.55:
            items.append(valid_item(rnd))
        elif r < 0.8:
            base = valid_item(rnd)
            data = bytearray(base.data)
            for _ in range(rnd.randrange(1, 5)):
                data[rnd.randrange(len(data))] ^= rnd.randrange(1, 256)
            items.append(Item(bytes(data), base.fds, f"mutated {base.label}"))
        else:
            items.append(raw_item(rnd))
    tail = rnd.random()
    if tail < 0.1:
        last = valid_item(rnd)
        items.append(Item(last.data[: rnd.randrange(1, max(2, len(last.data)))], last.fds, "cut"))
    elif tail < 0.15:
        items.append(Item(HEADER.pack(1, 1, rnd.randrange(4097, 1 << 32)) + bytes(16), (), "big"))
    return items


def main(argv: list[str] | None = None) -> int:
    """Run streams until enough messages went in; 0 when all were clean and nothing leaked."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000, help="messages in all")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generator")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # every rejection logs its rule: not worth printing
    rnd = random.Random(args.seed)
    run_sans_io(random_stream(random.Random(0)), [], "device")  # warm-up before measuring
    gc.collect()
    fds0, rss0, start = open_fds(), rss_kib(), time.monotonic()
    messages = streams = 0
    outcomes: Counter[str] = Counter()
    unclean: list[str] = []
    fd_growth = 0
    while messages < args.messages:
        items = random_stream(rnd)
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

"""Hostile rings in-process, fast: aliased ring areas, index jumps, random tables, every device.

No daemon and no socket: the vrings are configured the way the data plane does
it, and each kick is served the way a worker serves it (`begin_pass`, then
`handle_event`, again while the ring `yielded`). Guest memory has a second
mapping of the same bytes at ALIAS, so ring areas can alias through two guest
addresses as well as overlap directly. Each example draws a layout (areas
normal, overlapping, or aliased), a base, an avail index anywhere in 0..65535
and a seeded random table (plausible descriptors mixed with noise).

Properties: configuring the ring raises nothing but the data plane's documented
errors (GuestMemoryError, ValueError for sizes); serving raises nothing; no ring
needs more than a few passes when the guest adds nothing (a ring that feeds
itself is a broken ring, caught); the broken flag is reported as NEEDS_RESET.
``make fuzz`` runs this file for 10^6 rings (``fuzz/fuzz_rings.py``).
"""

from __future__ import annotations

import contextlib
import os
import random
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fuzz_support import count, fuzz_settings, temp_dir
from hypothesis import given
from hypothesis import strategies as st

from vhsm.backend import EPOLLIN
from vhsm.devices.blk import BlkBackend
from vhsm.devices.net import NetBackend
from vhsm.devices.rng import RngBackend
from vhsm.errors import GuestMemoryError
from vhsm.memory import GuestMemory, GuestMemoryAtomic
from vhsm.vring import VringMutex
from vhsm.wire.payloads import VhostUserMemoryRegion

MEM = 256 << 10  # the guest's bytes
ALIAS = 1 << 20  # the same bytes again, through a second mapping
UVA = 0x7F00_0000_0000
RING_PACKED = 1 << 34
EVENT_IDX = 1 << 29
INDIRECT = 1 << 28
#: Passes a ring may need without the guest adding work: one, plus one to notice.
MAX_PASSES = 4
DESC = struct.Struct("<QIHH")


def guest_memory() -> GuestMemory:
    fd = os.memfd_create("vhsm-fuzz-rings", os.MFD_CLOEXEC)
    os.ftruncate(fd, MEM)
    regions = [
        VhostUserMemoryRegion(0, MEM, UVA, 0),
        VhostUserMemoryRegion(ALIAS, MEM, UVA + ALIAS, 0),
    ]
    return GuestMemory.from_table(regions, [fd, os.dup(fd)])


class Rig:
    """One device over the shared guest memory, its rings rebuilt for every example."""

    def __init__(self, name: str, image: Path) -> None:
        self.name = name
        self.backend: Any = {
            "rng": lambda: RngBackend(),
            "blk": lambda: BlkBackend(str(image)),
            "net-loopback": lambda: NetBackend("loopback", busy_poll_us=0),
            "net-sink": lambda: NetBackend("sink", busy_poll_us=0),
        }[name]()
        self.memory = guest_memory()
        self.atomic = GuestMemoryAtomic(self.memory)
        self.view = self.memory.regions[0].view
        self.vrings = [
            VringMutex(self.atomic, self.backend.max_queue_size(), index=i)
            for i in range(self.backend.num_queues())
        ]
        self.errs = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in self.vrings]
        self.calls = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in self.vrings]

    def close(self) -> None:
        for vring in self.vrings:
            vring.reset()
        for fd in self.errs + self.calls:
            os.close(fd)
        self.atomic.close()
        if isinstance(self.backend, BlkBackend):
            self.backend.close()

    def serve(self, index: int) -> int:
        """Serve one kick like a worker; return how many passes it took (MAX_PASSES + 1: spins)."""
        for passes in range(1, MAX_PASSES + 2):
            for vring in self.vrings:
                vring.begin_pass()
            self.backend.handle_event(index, EPOLLIN, self.vrings, 0)
            if not self.vrings[index].yielded:
                return passes
        return MAX_PASSES + 1


@pytest.fixture(scope="module", params=["rng", "blk", "net-loopback", "net-sink"])
def rig(request: Any) -> Iterator[Rig]:
    with temp_dir() as directory:
        image = directory / "disk.img"
        image.write_bytes(bytes(64 << 10))
        r = Rig(request.param, image)
        try:
            yield r
        finally:
            r.close()


# --- layouts ---------------------------------------------------------------------------------
USED_KINDS = ["normal", "normal", "normal", "over-avail", "over-desc", "alias", "random"]
AVAIL_KINDS = ["normal", "normal", "alias", "over-desc"]
SPLIT_SIZES = [1, 2, 4, 16, 64, 256]
PACKED_SIZES = [1, 3, 16, 64, 200]


def random_layout(rnd: random.Random) -> dict[str, Any]:
    """A layout drawn with `rnd` (the campaign's generator; hypothesis draws the same keys)."""
    packed = rnd.random() < 0.5
    return {
        "packed": packed,
        "event_idx": rnd.random() < 0.5,
        "indirect": rnd.random() < 0.5,
        "size": rnd.choice(PACKED_SIZES if packed else SPLIT_SIZES),
        "used": rnd.choice(USED_KINDS),
        "avail": rnd.choice(AVAIL_KINDS),
        "base": rnd.choice([0, 0x8000_8000, rnd.randrange(0, 0x10000)]),
        "avail_idx": rnd.choice([rnd.randrange(0, 9), rnd.randrange(0, 0x10000)]),
        "seed": rnd.getrandbits(32),
        "noise": rnd.choice([0.0, 0.1, 1.0]),
        "ring": rnd.randrange(0, 4),
    }


@st.composite
def layouts(draw: Any) -> dict[str, Any]:
    packed = draw(st.booleans())
    return {
        "packed": packed,
        "event_idx": draw(st.booleans()),
        "indirect": draw(st.booleans()),
        "size": draw(st.sampled_from(PACKED_SIZES if packed else SPLIT_SIZES)),
        "used": draw(st.sampled_from(USED_KINDS)),
        "avail": draw(st.sampled_from(AVAIL_KINDS)),
        "base": draw(st.integers(0, 0xFFFF) | st.sampled_from([0, 0x8000_8000])),
        "avail_idx": draw(st.integers(0, 0xFFFF) | st.integers(0, 8)),
        "seed": draw(st.integers(0, 1 << 32)),
        "noise": draw(st.sampled_from([0.0, 0.1, 1.0])),
        "ring": draw(st.integers(0, 3)),
    }


def addresses(lay: dict[str, Any], rnd: random.Random) -> tuple[int, int, int]:
    """desc, avail (driver area), used (device area) guest addresses for the layout."""
    n = lay["size"]
    desc = 0x1000
    avail = desc + 16 * n
    avail = (avail + 3) & ~3
    used = (avail + 6 + 2 * n + 3) & ~3
    if lay["avail"] == "alias":
        avail += ALIAS
    elif lay["avail"] == "over-desc":
        avail = desc + 4 * rnd.randrange(0, 4 * n)
    kind = lay["used"]
    if kind == "over-avail":
        used = (avail & ~(ALIAS)) + 4 * rnd.randrange(0, 2)
    elif kind == "over-desc":
        used = desc + 4 * rnd.randrange(0, 4 * n)
    elif kind == "alias":
        used = (avail ^ ALIAS) & ~3
    elif kind == "random":
        used = 4 * rnd.randrange(0, (MEM + ALIAS) // 4)
    return desc, avail, used


def fill(rig: Rig, lay: dict[str, Any], rnd: random.Random, desc: int, avail: int) -> None:
    """Write the guest's side: a table of plausible or random descriptors, the avail index."""
    n = lay["size"]
    view = rig.view
    view[0x1000 : 0x1000 + 16 * n + 8 * n + 64] = bytes(16 * n + 8 * n + 64)
    for i in range(n):
        if rnd.random() < lay["noise"]:
            raw = rnd.randbytes(16)
        else:
            addr = (
                0x20000 + rnd.randrange(0, 0x10000) if rnd.random() < 0.9 else rnd.getrandbits(64)
            )
            flags = rnd.choice([0, 1, 2, 3, 4, 2 | 0x80, 0x80, 0x8080, 0x82])
            raw = DESC.pack(
                addr,
                rnd.choice([0, 1, 16, 64, 512, 4096, 0xFFFF_FFFF]),
                flags,
                rnd.randrange(0, n + 2),
            )
        view[0x1000 + 16 * i : 0x1000 + 16 * i + 16] = raw
    if not lay["packed"]:
        a = avail & (ALIAS - 1)
        if a + 4 + 2 * n <= MEM:
            for i in range(n):
                struct.pack_into("<H", view, a + 4 + 2 * i, rnd.randrange(0, n + 1))
            struct.pack_into("<H", view, a + 2, lay["avail_idx"])


def run_ring(rig: Rig, lay: dict[str, Any]) -> str:
    """Configure and serve one hostile ring; its outcome: refused, broken or served.

    Raises AssertionError when the ring spins (more than MAX_PASSES passes with an
    idle guest) and whatever a device lets escape (the daemon would log it as a
    failed hook).
    """
    rnd = random.Random(lay["seed"])
    index = lay["ring"] % len(rig.vrings)
    vring = rig.vrings[index]
    features = rig.backend.features() & ~(RING_PACKED | EVENT_IDX | INDIRECT)
    features |= (RING_PACKED if lay["packed"] else 0) | (EVENT_IDX if lay["event_idx"] else 0)
    features |= INDIRECT if lay["indirect"] else 0
    rig.backend.acked_features(features)
    desc, avail, used = addresses(lay, rnd)
    fill(rig, lay, rnd, desc, avail)
    for i, v in enumerate(rig.vrings):
        v.reset()
        v.set_features(features)
        v.set_err(os.dup(rig.errs[i]))
        v.set_call(os.dup(rig.calls[i]))
        v.started = v.enabled = True
    try:
        vring.set_queue_size(lay["size"])
        vring.set_queue_base(lay["base"] & (0xFFFF_FFFF if lay["packed"] else 0xFFFF))
        vring.set_queue_info(desc, avail, used)
    except (GuestMemoryError, ValueError):
        return "refused"  # the data plane refuses it (a NACK with its rule)
    if rig.name.startswith("net") and index == 1:  # loopback frames need somewhere to go
        with contextlib.suppress(GuestMemoryError, ValueError):
            rig.vrings[0].set_queue_size(lay["size"])
            rig.vrings[0].set_queue_info(desc, avail, used)
    passes = rig.serve(index)
    assert passes <= MAX_PASSES, (
        f"{rig.name}: ring {index} still had work after {MAX_PASSES} passes with the guest"
        f" idle (it feeds itself) and was not marked broken: {lay}"
    )
    assert rig.serve(index) <= MAX_PASSES  # a second kick: a broken ring stays quiet
    return "broken" if vring.broken is not None else "served"


@fuzz_settings(120)
@given(lay=layouts())
def test_hostile_rings_never_spin_or_raise(rig: Rig, lay: dict[str, Any]) -> None:
    run_ring(rig, lay)
    count(f"hostile_rings[{rig.name}]")

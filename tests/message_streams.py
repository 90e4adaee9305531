"""The message streams of the control-path fuzzers, written once for hypothesis and for volume.

A stream is what one front-end connection sends: an optional negotiation (and a
running ring), then well-formed requests with plausible and random fields and the fds
a front-end would attach (or wrong ones), the same with bytes flipped, raw headers with
random bodies, and maybe a cut or oversized last message.

Every choice goes through a `Choices`: `DrawChoices` draws it with hypothesis (so a
failing stream shrinks; ``tests/test_fuzz_wire_session.py``), `RandomChoices` takes it
from a seeded ``random.Random`` (10^6 messages in minutes; ``fuzz/fuzz_messages.py``).
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import attrs
from fuzz_support import EchoBackend
from hypothesis import strategies as st
from wire_strategies import STRATEGIES

from vhsm.wire import (
    FrontendReq,
    Message,
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
    encode,
    make_request,
    request_spec,
)
from vhsm.wire.enums import MAX_QUEUE_SIZE, PACKED_BASE_INITIAL
from vhsm.wire.framing import HEADER

T = TypeVar("T")
UVA = 0x7F00_0000_0000
MIB = 1 << 20
U64 = (1 << 64) - 1
BACKEND = EchoBackend()
OFFERED = BACKEND.features()
OFFERED_PF = BACKEND.protocol_features()


# --- choices ---------------------------------------------------------------------------
class Choices(Protocol):
    """Where a stream's choices come from."""

    def pick(self, values: Sequence[T]) -> T:
        """One of `values`."""

    def integer(self, lo: int, hi: int) -> int:
        """An integer in lo..hi (both included)."""

    def chance(self, p: float) -> bool:
        """True with probability about `p`."""

    def data(self, most: int) -> bytes:
        """Up to `most` random bytes."""

    def payload(self, cls: type) -> Any:
        """Any value of payload class `cls`, or None to send random bytes instead."""


@attrs.define
class RandomChoices:
    """Choices from a seeded generator: fast, reproducible from the seed."""

    rnd: random.Random

    def pick(self, values: Sequence[T]) -> T:
        return values[self.rnd.randrange(len(values))]

    def integer(self, lo: int, hi: int) -> int:
        return self.rnd.randint(lo, hi)

    def chance(self, p: float) -> bool:
        return self.rnd.random() < p

    def data(self, most: int) -> bytes:
        return self.rnd.randbytes(self.rnd.randrange(most + 1))

    def payload(self, cls: type) -> Any:
        return None


@attrs.define
class DrawChoices:
    """Choices drawn by hypothesis (``@st.composite``): a failing stream shrinks."""

    draw: Callable[[st.SearchStrategy[Any]], Any]

    def pick(self, values: Sequence[T]) -> T:
        return self.draw(st.sampled_from(values))  # type: ignore[no-any-return]

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))  # type: ignore[no-any-return]

    def chance(self, p: float) -> bool:
        return self.draw(st.integers(0, 999)) < p * 1000  # type: ignore[no-any-return]

    def data(self, most: int) -> bytes:
        return self.draw(st.binary(max_size=most))  # type: ignore[no-any-return]

    def payload(self, cls: type) -> Any:
        return self.draw(STRATEGIES[cls])


# --- fds -------------------------------------------------------------------------------
#: An fd "kind": ("eventfd",), ("memfd", size), ("pipe",), ("devnull",), ("socket",),
#: ("blocking-eventfd",), ("read-only-file",), ("directory",), ("pipe-write",).
FdKind = tuple[Any, ...]
FD_KINDS: list[FdKind] = [
    ("eventfd",),
    ("memfd", 0),
    ("memfd", 4096),
    ("memfd", MIB),
    ("memfd", 2 * MIB),
    ("pipe",),
    ("devnull",),
    ("socket",),
    ("blocking-eventfd",),
    ("read-only-file",),
    ("directory",),
    ("pipe-write",),
]


def make_fd(kind: FdKind) -> int:
    """Open one fd of the given kind (the caller owns it)."""
    name = kind[0]
    if name == "eventfd":
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    if name == "blocking-eventfd":
        return os.eventfd(0, os.EFD_CLOEXEC)
    if name == "read-only-file":
        return os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
    if name == "directory":
        return os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    if name == "pipe-write":
        r, w = os.pipe2(os.O_CLOEXEC)
        os.close(r)
        return w
    if name == "memfd":
        fd = os.memfd_create("vhsm-fuzz", os.MFD_CLOEXEC)
        os.ftruncate(fd, kind[1])
        return fd
    if name == "pipe":
        r, w = os.pipe2(os.O_CLOEXEC)
        os.close(w)
        return r
    if name == "socket":
        a, b = socket.socketpair()
        b.close()
        return a.detach()
    return os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)


def region_fd(region: VhostUserMemoryRegion) -> FdKind:
    """A memfd just big enough for the region when that is small, else a 1 MiB one."""
    need = region.memory_size + region.mmap_offset
    return ("memfd", need if 0 < need <= 8 * MIB else MIB)


def default_fds(req: int, payload: Any) -> list[FdKind]:
    """The fds a well-behaved front-end attaches to this request."""
    spec = request_spec(req)
    if spec is None:
        return []
    if isinstance(payload, VhostUserMemory):
        return [region_fd(r) for r in payload.regions]
    if isinstance(payload, VhostUserSingleMemoryRegion):
        return [region_fd(payload.region)] if req == FrontendReq.ADD_MEM_REG else []
    if isinstance(payload, VhostUserVringFd):
        return [] if payload.nofd else [("eventfd",)]
    if isinstance(payload, VhostUserLog):
        need = payload.mmap_size + payload.mmap_offset
        return [("memfd", need if 0 < need <= 8 * MIB else MIB)]
    if req == FrontendReq.SET_INFLIGHT_FD:
        return [("memfd", 64 * 1024)]
    if req == FrontendReq.SET_BACKEND_REQ_FD:
        return [("socket",)]
    if req in (FrontendReq.SET_LOG_FD,):
        return [("eventfd",)]
    if req == FrontendReq.SET_DEVICE_STATE_FD:
        return [("pipe",)]
    return [("eventfd",)] if spec.fds == "1" else []


# --- plausible payloads (deep into the session) ----------------------------------------
RINGS = [0, 0, 1, 2, 255, 0xFFFF_FFFF]
NUMS = [0, 1, 2, 3, 64, 256, 1024, 2048, MAX_QUEUE_SIZE, PACKED_BASE_INITIAL, 0x10000]
GPAS = [0, MIB, 2 * MIB, 4 * MIB, 1 << 40, U64 + 1 - MIB]
SIZES = [0, 4096, MIB, 2 * MIB, 4 * MIB, 1 << 40, U64]
OFFSETS = [0, 4096, MIB, U64 + 1 - 4096]


def word(c: Choices, offered: int) -> int:
    """A features word: what was offered, part of it, anything, or nothing."""
    return c.pick([offered, c.integer(0, U64) & offered, c.integer(0, U64), 0])


def region(c: Choices) -> VhostUserMemoryRegion:
    """A memory region: plausible addresses and sizes, now and then absurd ones."""
    gpa = c.pick(GPAS)
    uva = UVA + gpa if c.chance(0.7) else c.integer(0, U64)
    return VhostUserMemoryRegion(gpa, c.pick(SIZES), uva & U64, c.pick(OFFSETS))


def payload_for(c: Choices, req: FrontendReq) -> Any:
    """A plausible payload for `req`, else any value of its class (None: random bytes)."""
    r = FrontendReq
    if req in (r.SET_FEATURES, r.SET_PROTOCOL_FEATURES, r.SET_STATUS):
        return VhostUserU64(word(c, OFFERED_PF if req == r.SET_PROTOCOL_FEATURES else OFFERED))
    if req in (r.SET_VRING_NUM, r.SET_VRING_BASE):
        return VhostUserVringState(c.pick(RINGS), c.pick(NUMS))
    if req == r.GET_VRING_BASE:
        return VhostUserVringState(c.pick(RINGS), c.pick([0, 1]))
    if req == r.SET_VRING_ENABLE:
        return VhostUserVringState(c.pick(RINGS), c.pick([0, 1, 2]))
    if req == r.SET_VRING_ADDR:
        return VhostUserVringAddr(
            c.pick(RINGS), c.pick([0, 0, 1, 2]),
            c.pick([UVA, UVA + 0x1000, UVA + 8, 0]), c.pick([UVA + 0x3000, UVA + 0x3002, 0]),
            c.pick([UVA + 0x2000, UVA + 0x2001, UVA + 0x2002, 0]), c.pick([0x3000, 1 << 50]),
        )  # fmt: skip
    if req in (r.SET_VRING_KICK, r.SET_VRING_CALL, r.SET_VRING_ERR):
        return VhostUserVringFd(c.pick([0, 1, 2, 200]), c.chance(0.2))
    if req == r.SET_MEM_TABLE:
        return VhostUserMemory(tuple(region(c) for _ in range(c.integer(0, 3))))
    if req in (r.ADD_MEM_REG, r.REM_MEM_REG):
        return VhostUserSingleMemoryRegion(region(c))
    if req == r.SET_LOG_BASE:
        return VhostUserLog(c.pick(SIZES), c.pick(OFFSETS))
    if req == r.GET_INFLIGHT_FD:
        # Kept small: an uncapped geometry makes the back-end allocate up to 34 GiB
        # (test_hardening covers the cap without risking the machine).
        queues, size = c.pick([0, 1, 2, 16]), c.pick([0, 64, 256, 0x8000, 0xFFFF])
        return VhostUserInflight(0, 0, queues, size)
    if req == r.SET_INFLIGHT_FD:
        return VhostUserInflight(
            c.pick([0, 4096, 8192, 1 << 40]), c.pick([0, 4096]),
            c.pick([0, 1, 2, 0xFFFF]), c.pick([0, 64, 256, 0xFFFF]),
        )  # fmt: skip
    if req == r.GET_CONFIG:
        size = c.pick([1, 8, 256])
        return VhostUserConfig(c.pick([0, 8, 0xFFFF_FFFF]), size, c.pick([0, 1, 2]), bytes(size))
    spec = request_spec(req)
    return None if spec is None or spec.payload is None else c.payload(spec.payload)


#: Requests a real front-end sends most: drawn more often.
COMMON = [
    FrontendReq.SET_MEM_TABLE,
    FrontendReq.ADD_MEM_REG,
    FrontendReq.REM_MEM_REG,
    FrontendReq.SET_VRING_NUM,
    FrontendReq.SET_VRING_ADDR,
    FrontendReq.SET_VRING_BASE,
    FrontendReq.GET_VRING_BASE,
    FrontendReq.SET_VRING_KICK,
    FrontendReq.SET_VRING_CALL,
    FrontendReq.SET_VRING_ERR,
    FrontendReq.SET_VRING_ENABLE,
    FrontendReq.SET_FEATURES,
    FrontendReq.SET_LOG_BASE,
    FrontendReq.GET_INFLIGHT_FD,
    FrontendReq.SET_INFLIGHT_FD,
    FrontendReq.RESET_DEVICE,
    FrontendReq.GET_CONFIG,
]
ALL_REQUESTS = list(FrontendReq)


# --- stream items ----------------------------------------------------------------------
@attrs.frozen
class Item:
    """One chunk of the stream: bytes and the fds sent with its first byte."""

    data: bytes
    fds: tuple[FdKind, ...] = ()
    label: str = ""


def item_of(msg: Message, fds: Sequence[FdKind], label: str) -> Item:
    """The item that sends `msg` with fds of the given kinds."""
    return Item(encode(msg), tuple(fds), label)


def valid_item(c: Choices) -> Item:
    """A well-formed request with a plausible payload and fds (sometimes wrong ones)."""
    req = c.pick(COMMON) if c.chance(0.6) else c.pick(ALL_REQUESTS)
    spec = request_spec(req)
    payload = payload_for(c, req)
    if payload is None and spec is not None and spec.payload is not None:
        return raw_item(c, int(req))  # a payload class without a drawn value: bytes
    fds = default_fds(req, payload)
    if c.chance(0.1):  # wrong fds: count and kinds
        fds = [c.pick(FD_KINDS) for _ in range(c.integer(0, 4))]
    msg = make_request(req, payload, need_reply=c.chance(0.75))  # NACKs go deeper
    return item_of(msg, fds, req.name)


def mutated_item(c: Choices) -> Item:
    """A well-formed request with one to four bytes flipped."""
    base = valid_item(c)
    data = bytearray(base.data)
    for _ in range(c.integer(1, 4)):
        data[c.integer(0, len(data) - 1)] ^= c.integer(1, 255)
    return Item(bytes(data), base.fds, f"mutated {base.label}")


def raw_item(c: Choices, req: int | None = None) -> Item:
    """A header with a random body, size and flags (request `req` or any code)."""
    body = c.data(80)
    code = req if req is not None else c.integer(0, 50 if c.chance(0.5) else 0xFFFF_FFFF)
    flags = c.pick([0x1, 0x5, 0x9, 0x0, 0x2, 0x11, 0xFFFF_FFFF])
    size = len(body) if c.chance(0.7) else c.integer(0, 4096)
    fds = tuple(c.pick(FD_KINDS) for _ in range(c.integer(0, 2) if c.chance(0.2) else 0))
    return Item(HEADER.pack(code, flags, size) + body, fds, f"raw {code}/{flags:#x}/{size}")


def negotiation(pf: int = OFFERED_PF, features: int = OFFERED) -> list[Item]:
    """GET_FEATURES, protocol features `pf`, SET_OWNER and SET_FEATURES `features`."""
    return [
        item_of(make_request(FrontendReq.GET_FEATURES), [], "GET_FEATURES"),
        item_of(make_request(FrontendReq.GET_PROTOCOL_FEATURES), [], "GET_PROTOCOL_FEATURES"),
        item_of(make_request(FrontendReq.SET_PROTOCOL_FEATURES, VhostUserU64(pf)), [], "SET_PF"),
        item_of(make_request(FrontendReq.SET_OWNER), [], "SET_OWNER"),
        item_of(make_request(FrontendReq.SET_FEATURES, VhostUserU64(features)), [], "SET_F"),
    ]


def ring_setup(index: int = 0) -> list[Item]:
    """A 4 MiB table at guest 0 and ring `index` (size 64) laid out at 0x1000.. and started."""
    table = VhostUserMemory((VhostUserMemoryRegion(0, 4 * MIB, UVA, 0),))
    base = 0x1000 + index * 0x4000
    addr = VhostUserVringAddr(index, 0, UVA + base, UVA + base + 0x800, UVA + base + 0x400, 0)
    msgs: list[tuple[Message, list[FdKind]]] = [
        (make_request(FrontendReq.SET_MEM_TABLE, table), [("memfd", 4 * MIB)]),
        (make_request(FrontendReq.SET_VRING_NUM, VhostUserVringState(index, 64)), []),
        (make_request(FrontendReq.SET_VRING_BASE, VhostUserVringState(index, 0)), []),
        (make_request(FrontendReq.SET_VRING_ADDR, addr), []),
        (make_request(FrontendReq.SET_VRING_KICK, VhostUserVringFd(index)), [("eventfd",)]),
        (make_request(FrontendReq.SET_VRING_CALL, VhostUserVringFd(index)), [("eventfd",)]),
        (make_request(FrontendReq.SET_VRING_ENABLE, VhostUserVringState(index, 1)), []),
    ]
    return [item_of(m, f, m.name) for m, f in msgs]


def stream(c: Choices, most: int = 12) -> list[Item]:
    """One connection's items: a prefix (none, negotiated, a running ring), then noise.

    At most `most` items of noise; the last one is now and then cut short, or a header
    announcing an oversized payload.
    """
    prefix = c.pick(["none", "negotiated", "running", "running"])
    items: list[Item] = []
    if prefix != "none":
        items += negotiation(OFFERED_PF if c.chance(0.5) else c.integer(0, U64) & OFFERED_PF)
    if prefix == "running":
        items += ring_setup(0)
    for _ in range(c.integer(0, most)):
        kind = c.pick(["valid", "valid", "mutated", "raw"])
        items.append({"valid": valid_item, "mutated": mutated_item, "raw": raw_item}[kind](c))
    tail = c.pick(["none"] * 6 + ["truncated", "oversized"])
    if tail == "truncated":
        last = valid_item(c)
        cut = c.integer(1, max(1, len(last.data) - 1))
        items.append(Item(last.data[:cut], last.fds, f"truncated {last.label}"))
    elif tail == "oversized":
        size = c.integer(4097, 0xFFFF_FFFF)
        items.append(Item(HEADER.pack(1, 1, size) + bytes(16), (), f"oversized {size}"))
    return items


@st.composite
def streams(draw: Any) -> list[Item]:
    """Hypothesis: one stream, drawn (and shrunk) choice by choice."""
    return stream(DrawChoices(draw))

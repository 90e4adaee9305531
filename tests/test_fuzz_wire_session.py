"""Fuzzing the control path: generated message streams into Decoder + Session, and a live daemon.

Streams mix well-formed requests (plausible payloads, right fds), mutated bytes,
random headers, wrong fd counts and kinds, a truncated last message and
oversized sizes. Properties: only the documented errors (ProtocolViolation and
its WireError / FramingError subclasses) come out; every fd handed in is closed
by the time the session is torn down; a live daemon answers the next front-end
after every bad stream. ``fuzz/fuzz_wire_session.py`` runs the same tests longer.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

import attrs
import pytest
from fuzz_support import (
    EchoBackend,
    count,
    fd_table,
    fuzz_settings,
    open_fds,
    running_daemon,
    settle_fds,
    wait_idle,
)
from hypothesis import given
from hypothesis import strategies as st
from wire_strategies import STRATEGIES

from vhsm.device_plane import DevicePlane
from vhsm.errors import FramingError, ProtocolViolation
from vhsm.frontend import Frontend
from vhsm.memory import GuestMemoryAtomic
from vhsm.session import NullDataPlane, Session
from vhsm.transport import recv_with_fds, send_with_fds
from vhsm.wire import (
    Decoder,
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
from vhsm.wire.framing import HEADER

UVA = 0x7F00_0000_0000
MIB = 1 << 20
BACKEND = EchoBackend()
OFFERED = BACKEND.features()
OFFERED_PF = BACKEND.protocol_features()

# --- fds -----------------------------------------------------------------------------
#: An fd "kind": ("eventfd",), ("memfd", size), ("pipe",), ("devnull",), ("socket",),
#: ("blocking-eventfd",), ("read-only-file",), ("directory",), ("pipe-write",).
FdKind = tuple[Any, ...]


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


any_fd = st.one_of(
    st.just(("eventfd",)),
    st.sampled_from([0, 4096, MIB, 2 * MIB]).map(lambda n: ("memfd", n)),
    st.just(("pipe",)),
    st.just(("devnull",)),
    st.just(("socket",)),
    st.sampled_from([("blocking-eventfd",), ("read-only-file",), ("directory",), ("pipe-write",)]),
)

# --- plausible payloads (deep into the session) and anything else ---------------------
U64 = st.integers(0, (1 << 64) - 1)
ring = st.sampled_from([0, 1, 2, 255, 0xFFFF_FFFF])
ring_num = st.sampled_from([0, 1, 2, 3, 64, 256, 1024, 2048, 0x8000, 0x8000_8000, 0x10000])
gpa = st.sampled_from([0, MIB, 2 * MIB, 4 * MIB, 1 << 40, (1 << 64) - MIB])
region_size = st.sampled_from([0, 4096, MIB, 2 * MIB, 1 << 40, (1 << 64) - 1])
offset = st.sampled_from([0, 4096, MIB, (1 << 64) - 4096])


@st.composite
def plausible_region(draw: Any) -> VhostUserMemoryRegion:
    g = draw(gpa)
    uaddr = draw(st.one_of(st.just(UVA + g), U64))
    return VhostUserMemoryRegion(g, draw(region_size), uaddr % (1 << 64), draw(offset))


def region_fd(region: VhostUserMemoryRegion) -> FdKind:
    """A memfd just big enough for the region when that is small, else a 1 MiB one."""
    need = region.memory_size + region.mmap_offset
    return ("memfd", need if 0 < need <= 8 * MIB else MIB)


def features_word(offered: int) -> st.SearchStrategy[int]:
    return st.one_of(
        st.just(offered),
        st.integers(0, (1 << 64) - 1).map(lambda x: x & offered),
        U64,
        st.just(0),
    )


PLAUSIBLE: dict[int, st.SearchStrategy[Any]] = {
    FrontendReq.SET_FEATURES: features_word(OFFERED).map(VhostUserU64),
    FrontendReq.SET_PROTOCOL_FEATURES: features_word(OFFERED_PF).map(VhostUserU64),
    FrontendReq.SET_VRING_NUM: st.builds(VhostUserVringState, ring, ring_num),
    FrontendReq.SET_VRING_BASE: st.builds(VhostUserVringState, ring, ring_num),
    FrontendReq.GET_VRING_BASE: st.builds(VhostUserVringState, ring, st.sampled_from([0, 1])),
    FrontendReq.SET_VRING_ENABLE: st.builds(VhostUserVringState, ring, st.sampled_from([0, 1, 2])),
    FrontendReq.SET_VRING_ADDR: st.builds(
        VhostUserVringAddr,
        ring,
        st.sampled_from([0, 1, 2]),
        st.sampled_from([UVA, UVA + 0x1000, UVA + 8, 0]),
        st.sampled_from([UVA + 0x3000, UVA + 0x3002, 0]),
        st.sampled_from([UVA + 0x2000, UVA + 0x2001, 0]),
        st.sampled_from([0x3000, 1 << 50]),
    ),
    FrontendReq.SET_MEM_TABLE: st.lists(plausible_region(), min_size=0, max_size=3).map(
        lambda rs: VhostUserMemory(tuple(rs))
    ),
    FrontendReq.ADD_MEM_REG: plausible_region().map(VhostUserSingleMemoryRegion),
    FrontendReq.REM_MEM_REG: plausible_region().map(VhostUserSingleMemoryRegion),
    FrontendReq.SET_LOG_BASE: st.builds(VhostUserLog, region_size, offset),
    FrontendReq.GET_INFLIGHT_FD: st.builds(
        VhostUserInflight,
        st.just(0),
        st.just(0),
        # Kept small: an uncapped geometry makes the back-end allocate up to 34 GiB
        # (test_hardening covers the cap without risking the machine).
        st.sampled_from([0, 1, 2, 16]),
        st.sampled_from([0, 64, 256, 0x8000, 0xFFFF]),
    ),
    FrontendReq.SET_INFLIGHT_FD: st.builds(
        VhostUserInflight,
        st.sampled_from([0, 4096, 8192, 1 << 40]),
        st.sampled_from([0, 4096]),
        st.sampled_from([0, 1, 2, 0xFFFF]),
        st.sampled_from([0, 64, 256, 0xFFFF]),
    ),
    FrontendReq.GET_CONFIG: st.builds(
        VhostUserConfig,
        st.sampled_from([0, 8, 0xFFFF_FFFF]),
        st.sampled_from([1, 8, 256]),
        st.sampled_from([0, 1, 2]),
        st.just(b""),
    ).map(lambda c: attrs.evolve(c, payload=bytes(c.size))),
}
for _req in (FrontendReq.SET_VRING_KICK, FrontendReq.SET_VRING_CALL, FrontendReq.SET_VRING_ERR):
    PLAUSIBLE[_req] = st.builds(VhostUserVringFd, st.sampled_from([0, 1, 2, 200]), st.booleans())


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


@attrs.frozen
class Item:
    """One chunk of the stream: bytes and the fds sent with its first byte."""

    data: bytes
    fds: tuple[FdKind, ...] = ()
    label: str = ""


def item_of(msg: Message, fds: Sequence[FdKind], label: str) -> Item:
    return Item(encode(msg), tuple(fds), label)


@st.composite
def valid_items(draw: Any) -> Item:
    req = draw(st.one_of(st.sampled_from(COMMON), st.sampled_from(list(FrontendReq))))
    spec = request_spec(req)
    assert spec is not None
    cls = spec.payload
    if req in PLAUSIBLE:
        payload = draw(PLAUSIBLE[req])
    elif cls is None:
        payload = None
    else:
        payload = draw(STRATEGIES[cls])
    fds = default_fds(req, payload)
    if draw(st.integers(0, 9)) == 0:  # wrong fds: count and kinds
        fds = draw(st.lists(any_fd, max_size=4))
    need_reply = draw(st.integers(0, 3)) > 0  # NACKs keep the connection: go deeper
    msg = make_request(req, payload, need_reply=need_reply)
    return item_of(msg, fds, f"{req.name}")


@st.composite
def mutated_items(draw: Any) -> Item:
    base = draw(valid_items())
    data = bytearray(base.data)
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] ^= draw(st.integers(1, 255))
    return Item(bytes(data), base.fds, f"mutated {base.label}")


@st.composite
def raw_items(draw: Any) -> Item:
    body = draw(st.binary(max_size=80))
    req = draw(st.one_of(st.integers(0, 50), st.integers(0, 0xFFFF_FFFF)))
    flags = draw(st.sampled_from([0x1, 0x5, 0x9, 0x0, 0x2, 0x11, 0xFFFF_FFFF]))
    size = len(body) if draw(st.booleans()) else draw(st.integers(0, 4096))
    fds = draw(st.lists(any_fd, max_size=3))
    return Item(HEADER.pack(req, flags, size) + body, tuple(fds), f"raw {req}/{flags:#x}/{size}")


def negotiation(pf: int = OFFERED_PF, features: int = OFFERED) -> list[Item]:
    return [
        item_of(make_request(FrontendReq.GET_FEATURES), [], "GET_FEATURES"),
        item_of(make_request(FrontendReq.GET_PROTOCOL_FEATURES), [], "GET_PROTOCOL_FEATURES"),
        item_of(make_request(FrontendReq.SET_PROTOCOL_FEATURES, VhostUserU64(pf)), [], "SET_PF"),
        item_of(make_request(FrontendReq.SET_OWNER), [], "SET_OWNER"),
        item_of(make_request(FrontendReq.SET_FEATURES, VhostUserU64(features)), [], "SET_F"),
    ]


def ring_setup(index: int = 0) -> list[Item]:
    """A 4 MiB table at guest 0 and ring `index` (size 64) laid out at 0x1000.. and started."""
    region = VhostUserMemoryRegion(0, 4 * MIB, UVA, 0)
    base = 0x1000 + index * 0x4000
    msgs: list[tuple[Message, list[FdKind]]] = [
        (make_request(FrontendReq.SET_MEM_TABLE, VhostUserMemory((region,))), [("memfd", 4 * MIB)]),
        (make_request(FrontendReq.SET_VRING_NUM, VhostUserVringState(index, 64)), []),
        (make_request(FrontendReq.SET_VRING_BASE, VhostUserVringState(index, 0)), []),
        (
            make_request(
                FrontendReq.SET_VRING_ADDR,
                VhostUserVringAddr(index, 0, UVA + base, UVA + base + 0x800, UVA + base + 0x400, 0),
            ),
            [],
        ),
        (make_request(FrontendReq.SET_VRING_KICK, VhostUserVringFd(index)), [("eventfd",)]),
        (make_request(FrontendReq.SET_VRING_CALL, VhostUserVringFd(index)), [("eventfd",)]),
        (make_request(FrontendReq.SET_VRING_ENABLE, VhostUserVringState(index, 1)), []),
    ]
    return [item_of(m, f, m.name) for m, f in msgs]


@st.composite
def streams(draw: Any) -> list[Item]:
    prefix = draw(st.sampled_from(["none", "negotiated", "running"]))
    items: list[Item] = []
    if prefix != "none":
        subset = draw(st.integers(0, (1 << 64) - 1)) & OFFERED_PF
        items += negotiation(subset if draw(st.booleans()) else OFFERED_PF)
    if prefix == "running":
        items += ring_setup(0)
    body = st.one_of(valid_items(), valid_items(), mutated_items(), raw_items())
    items += draw(st.lists(body, max_size=12))
    tail = draw(st.sampled_from(["none"] * 6 + ["truncated", "oversized"]))
    if tail == "truncated":
        last = draw(valid_items())
        cut = draw(st.integers(1, max(1, len(last.data) - 1)))
        items.append(Item(last.data[:cut], last.fds, f"truncated {last.label}"))
    elif tail == "oversized":
        size = draw(st.integers(4097, 0xFFFF_FFFF))
        items.append(Item(HEADER.pack(1, 1, size) + bytes(16), (), f"oversized {size}"))
    return items


def chunks(item: Item, cut: int) -> list[bytes]:
    """Split an item's bytes in two at `cut` (the fds travel with the first part)."""
    if 0 < cut < len(item.data):
        return [item.data[:cut], item.data[cut:]]
    return [item.data]


# --- sans-IO: Decoder + Session --------------------------------------------------------
def run_sans_io(items: list[Item], cuts: list[int], plane_kind: str) -> list[str]:
    """Feed the stream like the daemon does; return what happened (for failure reports)."""
    backend = EchoBackend()
    plane: Any = (
        NullDataPlane() if plane_kind == "null" else DevicePlane(backend, GuestMemoryAtomic())
    )
    session = Session(backend, plane)
    if isinstance(plane, DevicePlane):
        plane.attach(session)
    decoder = Decoder()
    pending: list[Message] = []
    log: list[str] = []
    try:
        for n, item in enumerate(items):
            fds = [make_fd(k) for k in item.fds]
            parts = chunks(item, cuts[n % len(cuts)] if cuts else 0)
            try:
                for i, part in enumerate(parts):
                    pending += decoder.feed(part, fds if i == 0 else ())
            except FramingError as err:
                log.append(f"framing {err.rule_id}")
                break
            stop = False
            while pending:
                msg = pending.pop(0)
                try:
                    reply = session.handle(msg)
                except ProtocolViolation as err:
                    log.append(f"violation {err.rule_id} on {msg.name}")
                    stop = True
                    break
                if reply is not None and isinstance(plane, NullDataPlane):
                    for fd in reply.fds:  # NullDataPlane hands fresh fds: the sender closes
                        os.close(fd)
                log.append(f"ok {msg.name}")
            if stop:
                break
    finally:
        for msg in pending:
            for fd in msg.fds:
                os.close(fd)
        with contextlib.suppress(FramingError):
            decoder.close()
        if isinstance(plane, DevicePlane):
            plane.close()
    return log


@pytest.mark.parametrize("plane_kind", ["null", "device"])
@fuzz_settings(150)
@given(items=streams(), cuts=st.lists(st.integers(0, 200), max_size=6))
def test_streams_into_decoder_and_session(
    plane_kind: str, items: list[Item], cuts: list[int]
) -> None:
    before = fd_table()
    run_sans_io(items, cuts, plane_kind)
    gc.collect()  # a mapping still viewed is unmapped (and its mmap fd closed) by the GC
    after = fd_table()
    count(f"wire_session_sans_io[{plane_kind}]")
    count("messages", len(items))
    leaked = {fd: what for fd, what in after.items() if fd not in before}
    assert not leaked, f"fds leaked: {leaked} by {[i.label for i in items]}"


def test_a_table_that_drops_a_running_ring_leaves_no_mapping_behind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found by the fuzzer: the warning kept the exception, its traceback the old mapping.

    Log records (pytest's, or any handler that keeps them) must not hold exceptions:
    their frames hold memory views, and the old table's fd stays open with them.
    """
    packed = 1 << 34
    small = VhostUserMemoryRegion(0, 4096, UVA, 0)  # the ring at 0x1000 is outside it
    items = [*negotiation(features=OFFERED | packed), *ring_setup()]
    table = make_request(FrontendReq.SET_MEM_TABLE, VhostUserMemory((small,)))
    items.append(item_of(table, [("memfd", 4096)], "SET_MEM_TABLE"))
    before = fd_table()
    with caplog.at_level(logging.WARNING):
        log = run_sans_io(items, [], "device")
    gc.collect()
    assert log[-1] == "ok SET_MEM_TABLE"
    assert "not mapped by the new table" in caplog.text
    assert not [a for r in caplog.records for a in r.args or () if isinstance(a, BaseException)]
    leaked = {fd: what for fd, what in fd_table().items() if fd not in before}
    assert not leaked


# --- the same streams against a live daemon ------------------------------------------
def send_stream(path: Any, items: list[Item]) -> None:
    """Send every item (stop when the daemon hangs up), then drain replies until EOF."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.connect(str(path))
    sock.settimeout(10.0)
    try:
        for item in items:
            fds = [make_fd(k) for k in item.fds]
            try:
                send_with_fds(sock, item.data, fds)
            except (BrokenPipeError, ConnectionResetError):
                break
            finally:
                for fd in fds:
                    os.close(fd)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        while True:
            try:
                data, fds = recv_with_fds(sock)
            except ConnectionResetError:
                break
            for fd in fds:
                os.close(fd)
            if not data:
                break
    finally:
        sock.close()


def assert_serves(path: Any) -> None:
    """A well-behaved front-end gets the right answer after the bad stream."""
    with Frontend.connect(path, timeout=10.0) as fe:
        assert fe.get_features() == OFFERED


@pytest.fixture(scope="module")
def live() -> Any:
    with running_daemon(EchoBackend(), "fuzz-live") as served:
        yield served


@fuzz_settings(40)
@given(items=streams())
def test_streams_against_a_live_daemon(live: Any, items: list[Item]) -> None:
    daemon, path = live
    wait_idle(daemon)
    baseline = open_fds()
    send_stream(path, items)
    wait_idle(daemon)
    assert daemon.last_error is None, f"internal error: {daemon.last_error!r}"
    assert_serves(path)
    wait_idle(daemon)
    count("wire_session_live")
    now = settle_fds(baseline)
    assert now <= baseline, f"fd count {baseline} -> {now} after {[i.label for i in items]}"

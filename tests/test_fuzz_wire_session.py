"""Fuzzing the control path: generated message streams into Decoder + Session, and a live daemon.

Streams mix well-formed requests (plausible payloads, right fds), mutated bytes,
random headers, wrong fd counts and kinds, a truncated last message and
oversized sizes. Properties: only the documented errors (ProtocolViolation and
its WireError / FramingError subclasses) come out; every fd handed in is closed
by the time the session is torn down; a live daemon answers the next front-end
after every bad stream. The streams come from ``message_streams.py`` (which
``fuzz/fuzz_messages.py`` also draws from, at volume); ``fuzz/fuzz_wire_session.py``
runs the same tests longer.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
from typing import Any

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
from message_streams import (
    OFFERED,
    UVA,
    Item,
    item_of,
    make_fd,
    negotiation,
    ring_setup,
    streams,
)

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
    VhostUserMemory,
    VhostUserMemoryRegion,
    make_request,
)


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

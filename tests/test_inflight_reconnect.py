"""Inflight I/O across a reconnect: held requests come back exactly once."""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from vhsm.backend import VhostUserBackend
from vhsm.daemon import Listener, VhostUserDaemon
from vhsm.frontend import Frontend
from vhsm.wire import ProtocolFeature, VirtioFeature

WAIT = 10.0
PF = ProtocolFeature


class HoldingBackend(VhostUserBackend):
    """One queue; upper-cases each request, or holds it (uncompleted) while ``hold`` is set."""

    def __init__(self) -> None:
        self.hold = False
        self.held: list[Any] = []  # chains popped and not completed
        self.done: list[bytes] = []  # every request processed, in order
        self.vrings: Sequence[Any] = ()
        self.lock = threading.Lock()

    def num_queues(self) -> int:
        return 1

    def max_queue_size(self) -> int:
        return 64

    def features(self) -> int:
        return int(
            VirtioFeature.VERSION_1
            | VirtioFeature.PROTOCOL_FEATURES
            | VirtioFeature.RING_PACKED
            | VirtioFeature.RING_EVENT_IDX
            | VirtioFeature.RING_INDIRECT_DESC
        )

    def protocol_features(self) -> int:
        return int(PF.MQ | PF.REPLY_ACK | PF.INFLIGHT_SHMFD | PF.CONFIGURE_MEM_SLOTS)

    def handle_event(
        self, device_event: int, evset: int, vrings: Sequence[Any], thread_id: int
    ) -> None:
        self.vrings = vrings
        vring = vrings[device_event]
        while True:
            vring.disable_notification()
            while (chain := vring.pop()) is not None:
                with self.lock:
                    if self.hold:
                        self.held.append(chain)
                        continue
                    self._serve(vring, chain)
            vring.signal_used_queue()
            if not vring.enable_notification():
                break

    def _serve(self, vring: Any, chain: Any) -> None:
        text = chain.read_all()
        self.done.append(text)
        vring.add_used(chain.head, chain.write(text.upper()))

    def complete_held(self, position: int) -> None:
        """Complete one held request now (out of order), from the test's thread."""
        with self.lock:
            chain = self.held.pop(position)
            self._serve(self.vrings[0], chain)
            self.vrings[0].signal_used_queue()

    def disconnected(self) -> None:
        # what was held belongs to the dead session (its memory views are gone)
        with self.lock:
            self.held.clear()


@pytest.fixture
def served() -> Iterator[tuple[HoldingBackend, Path]]:
    with tempfile.TemporaryDirectory(prefix="vhsm-ifl-") as d:
        backend = HoldingBackend()
        daemon = VhostUserDaemon("holding", backend)
        path = Path(d) / "hold.sock"
        daemon.start(Listener(path))
        try:
            yield backend, path
        finally:
            daemon.stop()


def wait_until(predicate: Any) -> None:
    """Wait (not assert) for a condition another thread makes true."""
    pause = threading.Event()
    for _ in range(int(WAIT / 0.01)):
        if predicate():
            return
        pause.wait(0.01)
    raise AssertionError(f"{predicate} never became true")


def post(fe: Frontend, text: bytes, *, indirect: bool = False) -> tuple[int, int]:
    """Post ``text`` in two readable pieces and one writable buffer: (head, output gpa)."""
    mem, vq = fe.memory, fe.vring(0)
    half = len(text) // 2
    a, b, out = mem.alloc(half), mem.alloc(len(text) - half), mem.alloc(len(text))
    mem.write(a, text[:half])
    mem.write(b, text[half:])
    head = vq.post([(a, half), (b, len(text) - half)], [(out, len(text))], indirect=indirect)
    return head, out


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_held_requests_are_resubmitted_and_completed_exactly_once(
    served: tuple[HoldingBackend, Path], packed: bool
) -> None:
    backend, path = served
    with Frontend.connect(path, timeout=WAIT) as fe:
        fe.start(queues=1, size=16, packed=packed, inflight=True)
        assert fe.inflight is not None and fe.packed is packed
        vq = fe.vring(0)
        for i in range(11):  # move the ring on, so the held requests straddle its end
            head, out = post(fe, b"warm-%02d" % i)
            vq.kick(force=True)
            assert vq.wait_used(WAIT) == (head, 7)
            assert fe.memory.read(out, 7) == b"WARM-%02d" % i
        backend.hold = True
        texts = [b"first held", b"second held", b"third held"]
        posted = [post(fe, t, indirect=i == 1) for i, t in enumerate(texts)]
        vq.kick(force=True)
        wait_until(lambda: len(backend.held) == 3)
        backend.complete_held(1)  # the second one completes before the crash
        assert vq.wait_used(WAIT) == (posted[1][0], len(texts[1]))
        backend.hold = False

        fe.reconnect()  # the back-end loses the session with two requests in flight
        got = [vq.wait_used(WAIT), vq.wait_used(WAIT)]
        assert got == [(posted[0][0], len(texts[0])), (posted[2][0], len(texts[2]))]
        for (_, out), text in zip(posted, texts, strict=True):
            assert fe.memory.read(out, len(text)) == text.upper()
        # the ring carries on, and nothing was completed twice
        head, out = post(fe, b"after")
        vq.kick(force=True)
        assert vq.wait_used(WAIT) == (head, 5) and fe.memory.read(out, 5) == b"AFTER"
        assert vq.get_used() is None
        warm = [b"warm-%02d" % i for i in range(11)]
        assert backend.done == [*warm, texts[1], texts[0], texts[2], b"after"]
        set_inflight = [r["conn"] for r in fe.transcript if r.get("name") == "SET_INFLIGHT_FD"]
        assert len(set_inflight) == 2 * 2  # request and reply, on each connection


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_reconnect_with_nothing_in_flight_resumes_where_the_ring_was(
    served: tuple[HoldingBackend, Path], packed: bool
) -> None:
    backend, path = served
    with Frontend.connect(path, timeout=WAIT) as fe:
        fe.start(queues=1, size=16, packed=packed, inflight=True)
        vq = fe.vring(0)
        for round_ in range(3):
            for i in range(7):
                head, out = post(fe, b"r%d-%d" % (round_, i))
                vq.kick(force=True)
                assert vq.wait_used(WAIT) == (head, 4)
            fe.reconnect()
        head, out = post(fe, b"last")
        vq.kick(force=True)
        assert vq.wait_used(WAIT) == (head, 4) and fe.memory.read(out, 4) == b"LAST"
        assert vq.get_used() is None and len(backend.done) == 3 * 7 + 1


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_a_new_all_zero_region_adopts_the_rings_position(
    served: tuple[HoldingBackend, Path], packed: bool
) -> None:
    """A migration destination's fresh region is new: no ring error, tracked from here on."""
    backend, path = served
    with Frontend.connect(path, timeout=WAIT) as fe:
        fe.start(queues=1, size=16, packed=packed, inflight=True)
        vq = fe.vring(0)
        for i in range(40):  # the ring moves well past its size
            head, out = post(fe, b"m%02d" % i)
            vq.kick(force=True)
            assert vq.wait_used(WAIT) == (head, 3)
        assert fe.inflight is not None and fe.inflight_fd is not None
        region = bytes(fe.inflight.mmap_size)
        os.pwrite(fe.inflight_fd, region, fe.inflight.mmap_offset)  # fresh and all zero
        fe.reconnect()
        assert not vq.error_signalled()
        if not packed:  # the split header records version 1 and the ring's used index
            header = os.pread(fe.inflight_fd, 16, fe.inflight.mmap_offset)
            assert (header[8], header[14]) == (1, 40)
        backend.hold = True
        head, out = post(fe, b"held")
        vq.kick(force=True)
        wait_until(lambda: len(backend.held) == 1)
        backend.hold = False
        fe.reconnect()  # now the region has content: the held request is resubmitted
        assert vq.wait_used(WAIT) == (head, 4) and fe.memory.read(out, 4) == b"HELD"
        assert not vq.error_signalled()
        head, out = post(fe, b"next")
        vq.kick(force=True)
        assert vq.wait_used(WAIT) == (head, 4) and fe.memory.read(out, 4) == b"NEXT"
        assert backend.done[-2:] == [b"held", b"next"]
